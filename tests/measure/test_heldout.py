"""The one held-out evaluator: split across processes, every process runs the same forward
passes (sharded models communicate inside them) and the padding is counted nowhere."""

from __future__ import annotations

import contextlib

import pytest
import torch

from prosparse import relufy_
from prosparse.measure.heldout import evaluate_blocks
from tests.conftest import tiny_llama


class FakeRank:
    """What evaluate_blocks asks of an Accelerator; reduce is left to the test."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes, self.device = rank, world, "cpu"

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, t, reduction="sum"):
        return t


@pytest.mark.parametrize("n_blocks,batch_size", [(3, 1), (5, 2), (4, 4)])
def test_uneven_split_same_forwards_and_exact_counts(n_blocks, batch_size):
    model = tiny_llama()
    relufy_(model)
    blocks = torch.randint(0, 128, (n_blocks, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    whole = evaluate_blocks(model, blocks, batch_size)
    parts, forwards = [], []
    for rank in range(2):
        calls.clear()
        parts.append(evaluate_blocks(model, blocks, batch_size, accelerator=FakeRank(rank, 2)))
        forwards.append(len(calls))
    assert forwards[0] == forwards[1], "processes ran different numbers of forward passes"
    assert sum(p.nll_count for p in parts) == whole.nll_count
    assert sum(p.nll_sum for p in parts) == pytest.approx(whole.nll_sum, rel=1e-5)
    # zero counts of the two halves add up to the whole: the repeated block is counted nowhere
    tokens = [n_blocks - n_blocks // 2, n_blocks // 2]
    mixed = sum(p.average_sparsity * t for p, t in zip(parts, tokens)) / n_blocks
    assert mixed == pytest.approx(whole.average_sparsity, abs=1e-6)
