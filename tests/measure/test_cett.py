"""PPL-p% sparsity on the CETT criterion, against independent computations on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from prosparse.core.errors import UsageError
from prosparse.measure.cett import (
    cett_curve,
    cutoff_for,
    dense_x1,
    down_column_norms,
    ppl_p_sparsity,
    truncated,
)
from prosparse.models.relufy import find_gated_ffns
from tests.conftest import tiny_llama


def brute_cett(x1: torch.Tensor, w: torch.Tensor, tau: float) -> float:
    """Mean over tokens of ||sum of dropped contributions|| / ||output||, token by token in
    float64, neuron by neuron."""
    x1, w = x1.double(), w.double()
    norms = w.norm(dim=0)
    out = []
    for t in range(x1.shape[0]):
        e = torch.zeros(w.shape[0], dtype=torch.float64)
        for i in range(x1.shape[1]):
            if abs(float(x1[t, i])) * float(norms[i]) < tau:
                e += x1[t, i] * w[:, i]
        out.append(float(e.norm() / (w @ x1[t]).norm()))
    return sum(out) / len(out)


def test_cett_curve_matches_a_token_by_token_computation():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(12, 40, generator=g) * (torch.rand(12, 40, generator=g) > 0.3)
    w = torch.randn(16, 40, generator=g)
    taus, cetts = cett_curve(x1, w.norm(dim=0), w, points=9)
    assert taus[0] == 0 and cetts[0] == 0
    for tau, c in zip(taus.tolist(), cetts.tolist()):
        assert c == pytest.approx(brute_cett(x1, w, tau), rel=1e-4, abs=1e-6)
    tau = cutoff_for(taus, cetts, 0.1)
    assert brute_cett(x1, w, tau) <= 0.1 + 1e-3 and brute_cett(x1, w, float(taus[-1])) > 0.1


@pytest.fixture(scope="module")
def trained():
    """A tiny SiLU Llama trained for 80 steps on a word corpus, so its FFNs matter (on a random
    model dropping them costs no perplexity) and blocks of held-out and calibration text."""
    from prosparse.data import pack_blocks
    from tests.conftest import char_tokenizer

    tok = char_tokenizer()
    words = ["alpha", "beta", "gamma", "delta", "sparse", "relu", "token", "layer", "model"]
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(len(words), (30,), generator=g).tolist())
            + "." for _ in range(60)]
    blocks = pack_blocks(tok, docs, 32)
    model = tiny_llama(intermediate_size=96)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(80):
        ids = blocks[(step * 4) % (len(blocks) - 4):][:4]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), blocks[-8:], blocks[:8]


def test_ppl_p_sparsity_holds_its_tolerance_and_counts_what_it_drops(trained):
    model, blocks, calib = trained
    r = ppl_p_sparsity(model, blocks, calib, ppl_tolerance=0.01, progress=False)
    assert r["baseline_sparsity"] == 0.0  # SiLU: no exact zeros of its own
    assert 0.3 < r["average_sparsity"] < 0.99 and 0 < r["cett_threshold"] < 0.9
    assert r["baseline_perplexity"] <= r["perplexity"] <= 1.01 * r["baseline_perplexity"]

    # Independently: apply the cut-offs by hand and count the zeros of x1 and the loss.
    cut = r["layer_cutoffs"]
    norms = down_column_norms(model)
    zeros, total = [0] * len(cut), [0] * len(cut)
    handles = []
    for i, ffn in enumerate(find_gated_ffns(model)):
        def hook(_m, args, i=i):
            x1 = args[0]
            x1 = x1 * (x1.abs() * norms[i] >= cut[i])
            zeros[i] += int((x1 == 0).sum())
            total[i] += x1.numel()
            return (x1,)
        handles.append(ffn.down_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    for h in handles:
        h.remove()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            blocks[:, 1:].reshape(-1))
    assert math.exp(float(nll)) == pytest.approx(r["perplexity"], rel=1e-4)
    layer = [z / t for z, t in zip(zeros, total)]
    assert r["layer_sparsity"] == pytest.approx(layer, abs=1e-9)


def test_truncation_needs_one_cutoff_per_layer_and_dense_x1_has_every_layer():
    model = tiny_llama()
    with pytest.raises(ValueError, match="cut-offs for 2 gated FFNs"):
        with truncated(model, [0.1]):
            pass
    x1s = dense_x1(model, torch.randint(2, 128, (2, 16)), max_tokens=20)
    assert len(x1s) == 2 and x1s[0].shape == (20, 176)


def test_a_looser_tolerance_buys_more_sparsity_and_relu_zeros_count_from_the_start(trained):
    import copy

    from prosparse import relufy_

    model, blocks, calib = trained
    tight = ppl_p_sparsity(model, blocks, calib, ppl_tolerance=0.01, progress=False)
    loose = ppl_p_sparsity(model, blocks, calib, ppl_tolerance=0.10, progress=False)
    assert loose["average_sparsity"] > tight["average_sparsity"]
    relu = copy.deepcopy(model)
    relufy_(relu, "relu")
    r = ppl_p_sparsity(relu, blocks, calib, ppl_tolerance=0.01, progress=False)
    assert r["baseline_sparsity"] > 0.2  # ReLU's own exact zeros
    assert r["average_sparsity"] >= r["baseline_sparsity"]


def test_sparsity_command_reports_ppl_p_with_its_json_keys(trained, tmp_path, text_file):
    import json

    from prosparse import save_model
    from prosparse.cli import main
    from tests.conftest import char_tokenizer

    model, _, _ = trained
    save_model(model, char_tokenizer(), tmp_path / "m")
    out = tmp_path / "r.json"
    assert main(["sparsity", str(tmp_path / "m"), "--data", f"c={text_file}", "--tokens", "256",
                 "--seq-len", "32", "--cett-tokens", "256", "--ppl-tolerance", "0.01",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("ppl_tolerance", "cett_threshold", "average_sparsity", "layer_sparsity",
                "perplexity", "baseline_perplexity"):
        assert key in r, key
    assert r["ppl_tolerance"] == 0.01 and len(r["layer_sparsity"]) == 2
    assert r["perplexity"] <= 1.01 * r["baseline_perplexity"]


def test_per_layer_thresholds_hold_the_tolerance_and_deploy(trained, tmp_path, text_file):
    import copy

    from prosparse import load_model, relufy_, save_model
    from prosparse.inference import sparsify_
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.measure.sparsity import heldout_sets
    from prosparse.measure.threshold import per_layer_thresholds
    from prosparse.models.relufy import current_activation
    from tests.conftest import char_tokenizer

    model, _, _ = trained
    relu = copy.deepcopy(model)
    relufy_(relu, "relu")
    tok = char_tokenizer()
    data = [f"c={text_file}"]
    r = per_layer_thresholds(relu, tok, data=data, tolerance=0.02, tokens=256, seq_len=32,
                             calib_tokens=256, progress=False)
    ts = r["layer_thresholds"]
    assert len(ts) == 2 and all(t >= 0 for t in ts) and max(ts) > 0
    assert r["perplexity"] <= 1.02 * r["baseline_perplexity"]
    assert r["average_sparsity"] > r["baseline_sparsity"]
    assert current_activation(relu) == ("relu", 0.0)  # the sweep leaves the model as it was
    relufy_(relu, "fatrelu", ts)  # deployed: the same figures, and they survive a save
    held = heldout_sets(tok, data, 256, 32)
    assert evaluate_heldout(relu, held)["perplexity"] == pytest.approx(r["perplexity"])
    save_model(relu, tok, tmp_path / "m")
    back, _ = load_model(str(tmp_path / "m"))
    assert current_activation(back) == ("fatrelu", pytest.approx(ts))
    ids = torch.randint(2, 128, (1, 1), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        dense = back(input_ids=ids).logits
        sparsify_(back, backend="cpu", dense_below=0.0)  # every kernel reads its layer's t
        torch.testing.assert_close(back(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_per_layer_thresholds_against_a_reference_perplexity(trained, text_file):
    """Judged against another model's perplexity (the original's), the search finds the sparsest
    thresholds within it, never below the trained t; a reference the model at its trained t
    already misses is reported, and the thresholds stay at that t."""
    import copy

    from prosparse import relufy_
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.measure.sparsity import heldout_sets
    from prosparse.measure.threshold import per_layer_thresholds
    from prosparse.models.relufy import set_threshold_
    from tests.conftest import char_tokenizer

    model, _, _ = trained
    tok = char_tokenizer()
    data = [f"c={text_file}"]
    held = heldout_sets(tok, data, 256, 32)
    relu = copy.deepcopy(model)
    relufy_(relu, "relu")
    at_zero = evaluate_heldout(relu, held)["perplexity"]
    for big_t in (0.3, 0.6, 1.2, 2.4, 4.8):  # a threshold the model pays for
        set_threshold_(relu, big_t)
        at_big = evaluate_heldout(relu, held)["perplexity"]
        if at_big > 1.05 * at_zero:
            break
    assert at_big > 1.05 * at_zero
    relufy_(relu, "relu")
    ref = (at_zero + at_big) / 2
    kw = dict(data=data, tokens=256, seq_len=32, calib_tokens=256, progress=False)
    own = per_layer_thresholds(relu, tok, tolerance=0.01, **kw)
    r = per_layer_thresholds(relu, tok, tolerance=0.01, reference_perplexity=ref, **kw)
    assert r["within_tolerance"] and r["reference_perplexity"] == ref
    assert r["perplexity"] <= ref * 1.01
    assert r["average_sparsity"] > own["average_sparsity"]  # a looser bar, more zeros
    set_threshold_(relu, r["layer_thresholds"])
    assert evaluate_heldout(relu, held)["perplexity"] == pytest.approx(r["perplexity"])
    miss = per_layer_thresholds(relu, tok, tolerance=0.0, baseline_t=big_t,
                                reference_perplexity=at_zero, **kw)
    assert not miss["within_tolerance"] and miss["layer_thresholds"] == [big_t, big_t]
    assert miss["perplexity"] == pytest.approx(at_big)
    with pytest.raises(UsageError, match="reference perplexity"):
        per_layer_thresholds(relu, tok, reference_perplexity=float("nan"), **kw)
