"""Sparsity counts agree with an independent count on the same tokens; perplexity with HF's."""

from __future__ import annotations

import math

import pytest
import torch

from prosparse import find_gated_ffns, relufy_
from prosparse.core.errors import UsageError
from prosparse.data import load_texts, pack_blocks
from prosparse.measure.heldout import evaluate_blocks
from prosparse.measure.sparsity import measure_sparsity
from prosparse.measure.threshold import threshold_sweep
from prosparse.models.relufy import current_activation
from prosparse.sparsity import ZeroCounter, capture_x1


def independent_layer_sparsity(model, blocks):
    """Recompute x1 = act(gate(x)) * up(x) from each FFN's own input, outside our hooks."""
    zeros, total = [], []
    inputs = {}
    handles = [f.module.register_forward_hook(lambda m, a, o, i=i: inputs.setdefault(i, []).append(a[0]))
               for i, f in enumerate(find_gated_ffns(model))]
    with torch.no_grad():
        model(input_ids=blocks)
    for h in handles:
        h.remove()
    for i, f in enumerate(find_gated_ffns(model)):
        x = torch.cat(inputs[i])
        x1 = f.act(f.module.gate_proj(x)) * f.module.up_proj(x)
        zeros.append((x1 == 0).sum().item())
        total.append(x1.numel())
    return [z / t for z, t in zip(zeros, total)]


@pytest.mark.parametrize("act,threshold", [("relu", 0.0), ("fatrelu", 0.05)])
def test_counts_match_an_independent_count(llama, act, threshold):
    relufy_(llama, act, threshold)
    blocks = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    got = evaluate_blocks(llama, blocks, batch_size=2)
    want = independent_layer_sparsity(llama, blocks)
    assert got.layer_sparsity == pytest.approx(want, abs=1e-12)
    assert got.average_sparsity == pytest.approx(sum(want) / len(want))
    assert 0.3 < got.average_sparsity < 0.9
    assert got.tokens == 3 * 17
    with torch.no_grad():
        hf_loss = llama(input_ids=blocks, labels=blocks).loss.item()
    assert got.perplexity == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_silu_model_has_no_exact_zeros(llama):
    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert evaluate_blocks(llama, blocks).average_sparsity == 0.0


def test_counter_memory_is_flat_and_mask_excludes_padding():
    counter = ZeroCounter(1)
    x1 = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # (batch 1, seq 2, d_ff 2)
    counter.set_mask(torch.tensor([[1, 0]]))
    counter(0, x1)
    assert counter.layer_sparsity() == [0.5] and counter.tokens.tolist() == [1]
    counter.set_mask(None)
    for _ in range(100):
        counter(0, x1)
    assert counter.zeros.shape == (1,) and counter.tokens.item() == 201


def test_capture_hooks_are_removed(llama):
    seen = []
    with capture_x1(llama, lambda i, x1: seen.append(i)) as n:
        llama(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert n == 2 and seen == [0, 1]
    llama(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert seen == [0, 1]


def test_measure_sparsity_json_keys(llama, tokenizer, text_file):
    relufy_(llama)
    out = measure_sparsity(llama, tokenizer, [f"mine={text_file}"], tokens=256, seq_len=32,
                           progress=False, model_name="tiny")
    assert set(out) == {"model", "average_sparsity", "perplexity", "layer_sparsity", "datasets"}
    d = out["datasets"]["mine"]
    assert out["perplexity"] == pytest.approx(d["perplexity"])  # one source: the same figures
    assert out["layer_sparsity"] == pytest.approx(d["layer_sparsity"])
    assert set(d) == {"tokens", "perplexity", "average_sparsity", "layer_sparsity"}
    assert d["tokens"] == 256 and len(d["layer_sparsity"]) == 2
    blocks = pack_blocks(tokenizer, load_texts(str(text_file), "heldout"), 32, 256)
    assert d["layer_sparsity"] == pytest.approx(independent_layer_sparsity(llama, blocks))


def test_threshold_sweep_recommends_within_tolerance_and_restores(llama, tokenizer, text_file):
    before = current_activation(llama)
    out = threshold_sweep(llama, tokenizer, [0.0, 0.01, 0.5, 5.0], data=[str(text_file)],
                          tolerance=0.02, tokens=256, seq_len=32, progress=False)
    rows = out["thresholds"]
    assert [r["t"] for r in rows] == [0.0, 0.01, 0.5, 5.0]
    assert all(set(r) >= {"t", "average_sparsity", "perplexity"} for r in rows)
    sp = [r["average_sparsity"] for r in rows]
    assert sp == sorted(sp) and sp[-1] > 0.99  # higher thresholds, more zeros
    base = rows[0]["perplexity"]
    ok = [r["t"] for r in rows if r["perplexity"] <= base * 1.02]
    assert out["recommended"] == max(ok)
    assert current_activation(llama) == before  # SiLU restored
    assert llama.config.hidden_act == "silu"


def test_pruned_model_reports_weight_sparsity(llama, tokenizer, text_file):
    from prosparse.pruning import nm_mask, prunable_linears

    relufy_(llama)
    out = measure_sparsity(llama, tokenizer, [f"mine={text_file}"], tokens=256, seq_len=32,
                           progress=False)
    assert "weight_sparsity" not in out  # dense weights: nothing to report
    with torch.no_grad():
        for lin in prunable_linears(llama).values():
            lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))
    out = measure_sparsity(llama, tokenizer, [f"mine={text_file}"], tokens=256, seq_len=32,
                           progress=False)
    w = out["weight_sparsity"]
    assert w["pattern"] == "2:4" and w["compliance"] == 1.0
    assert w["zeros"] == pytest.approx(0.5, abs=0.01)


def test_threshold_sweep_tolerance_is_relative_to_baseline_t(llama, tokenizer, text_file):
    """A model trained under FATReLU t is judged against its own t, not against t = 0."""
    relufy_(llama)
    out = threshold_sweep(llama, tokenizer, [0.01, 0.5, 5.0], data=[str(text_file)],
                          tolerance=0.02, tokens=256, seq_len=32, progress=False,
                          baseline_t=0.5)
    rows = {r["t"]: r for r in out["thresholds"]}
    assert out["baseline_t"] == 0.5
    assert out["baseline_perplexity"] == pytest.approx(rows[0.5]["perplexity"])
    ok = [t for t, r in rows.items() if r["perplexity"] <= rows[0.5]["perplexity"] * 1.02]
    assert out["recommended"] == max(ok) and out["recommended"] >= 0.5
    with pytest.raises(UsageError, match="baseline_t"):
        threshold_sweep(llama, tokenizer, [0.1], data=[str(text_file)], tokens=256, seq_len=32,
                        progress=False, baseline_t=-1.0)


def test_threshold_sweep_against_a_reference_perplexity(llama, tokenizer, text_file):
    """Judged against a reference (the original model's perplexity), the recommendation is the
    largest t within it, and a reference no t meets says so and keeps baseline_t (not the
    lowest t tried: a model trained under t is worse below it)."""
    relufy_(llama)
    kw = dict(data=[str(text_file)], tokens=256, seq_len=32, progress=False)
    out = threshold_sweep(llama, tokenizer, [0.0, 0.5, 5.0], tolerance=0.0, **kw)
    rows = {r["t"]: r["perplexity"] for r in out["thresholds"]}
    ref = (rows[0.5] + rows[5.0]) / 2
    out = threshold_sweep(llama, tokenizer, [0.0, 0.5, 5.0], tolerance=0.0,
                          reference_perplexity=ref, **kw)
    expected = max(t for t, p in rows.items() if p <= ref)
    assert out["recommended"] == expected and out["within_tolerance"]
    assert out["reference_perplexity"] == ref
    low = threshold_sweep(llama, tokenizer, [0.0, 5.0], tolerance=0.0,
                          reference_perplexity=min(rows.values()) / 2, baseline_t=0.5, **kw)
    assert not low["within_tolerance"] and low["recommended"] == 0.5
