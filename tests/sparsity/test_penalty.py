"""The L1 term: both normalisations against a direct computation, and its gradient."""

import pytest
import torch

from prosparse.measure.hooks import capture_x1
from prosparse.sparsity.penalty import PenaltyCollector, l1_penalty


def test_normalisations_match_direct_computation():
    torch.manual_seed(0)
    x1s = [torch.randn(2, 5, 7), torch.randn(2, 5, 7)]
    mean = sum(x.abs().mean() for x in x1s)
    assert l1_penalty(x1s, "mean").item() == pytest.approx(mean.item())
    scaled = sum(x.abs().sum() for x in x1s) * 1e-8 / 4
    assert l1_penalty(x1s, "sum_scaled", 1e-8, grad_accum=4).item() == pytest.approx(
        scaled.item(), rel=1e-6)
    with pytest.raises(KeyError, match="choose one of mean, sum_scaled"):
        l1_penalty(x1s, "l2")


def test_collector_on_model_keeps_graph_and_counts_zeros(llama):
    from prosparse import relufy_

    relufy_(llama, act="relu")
    ids = torch.randint(0, 128, (2, 9))
    seen = []
    with capture_x1(llama, lambda i, x1: seen.append(x1.detach().clone())):
        llama(input_ids=ids)
    collector = None
    with capture_x1(llama, lambda i, x1: collector(i, x1)) as n:
        collector = PenaltyCollector(n, "mean")
        llama(input_ids=ids)
    pen = collector.take()
    assert pen.item() == pytest.approx(sum(x.abs().mean() for x in seen).item(), rel=1e-6)
    pen.backward()
    assert llama.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    zeros = [(x == 0).float().mean().item() for x in seen]
    assert collector.zeros.layer_sparsity() == pytest.approx(zeros)
    assert collector.take().item() == 0.0  # reset after take
