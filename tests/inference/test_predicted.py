"""The predictor-driven FFN against its masked dense twin, attachment, calibration and the
decode benchmark."""

from __future__ import annotations

import pytest
import torch

from prosparse import find_gated_ffns, relufy_
from prosparse.inference import PredictedSparseMLP, attach_predictors_
from prosparse.predictors import save_predictors
from tests.predictors.test_export import random_set


def test_predicted_ffn_gather_path_ties_the_masked_twin(llama):
    relufy_(llama)
    pset = random_set(thresholds=[0.0, 0.1])
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = llama(input_ids=ids).logits
    restore = attach_predictors_(llama, pset)
    mods = [m for m in llama.modules() if isinstance(m, PredictedSparseMLP)]
    assert len(mods) == 2 and [m.threshold for m in mods] == [0.0, pytest.approx(0.1)]
    with torch.no_grad():
        masked = llama(input_ids=ids).logits  # 9 tokens: the masked twin
        # token by token through the KV cache: the gather path (1 token per call)
        out, past = [], None
        for i in range(ids.shape[1]):
            o = llama(input_ids=ids[:, i:i + 1], past_key_values=past, use_cache=True)
            out.append(o.logits)
            past = o.past_key_values
    gathered = torch.cat(out, dim=1)
    diff = (gathered - masked).abs()
    assert torch.allclose(gathered, masked, atol=1e-5), f"max {diff.max():.2e} mean {diff.mean():.2e}"
    assert not torch.allclose(masked, dense, atol=1e-3)  # random predictors do change the output
    restore()
    assert not any(isinstance(m, PredictedSparseMLP) for m in llama.modules())
    with torch.no_grad():
        assert torch.allclose(llama(input_ids=ids).logits, dense, atol=1e-6)
    assert all(f.down_proj.weight.is_contiguous() for f in find_gated_ffns(llama))


def test_all_active_prediction_is_the_dense_ffn(llama):
    relufy_(llama)
    pset = random_set(thresholds=[-1e9, -1e9])
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = llama(input_ids=ids).logits
        restore = attach_predictors_(llama, pset, max_tokens=8)  # 5 tokens: gather per token
        got = llama(input_ids=ids).logits
    restore()
    assert torch.allclose(got, dense, atol=1e-5), f"max {(got - dense).abs().max():.2e}"
    # none active: every FFN outputs zero
    ffn = find_gated_ffns(llama)[0].module
    none = PredictedSparseMLP(ffn, random_set().layers[0], float("inf"))
    none.set_residual(torch.randn(1, 64))
    assert torch.equal(none(torch.randn(1, 64)), torch.zeros(1, 64))


def test_attach_checks_shapes(llama):
    relufy_(llama)
    with pytest.raises(ValueError, match="3 layers"):
        attach_predictors_(llama, random_set(n_layers=3))
    with pytest.raises(ValueError, match="d_ff 100"):
        attach_predictors_(llama, random_set(d_ff=100))


def test_decode_benchmark_reports_quality_and_speed(llama):
    from prosparse.inference.benchmark import decode_benchmark_with_predictors

    relufy_(llama)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 128, (1, 6), generator=gen)
    blocks = torch.randint(0, 128, (2, 16), generator=gen)
    everything = random_set(thresholds=[-1e9, -1e9])  # predicts every neuron: exact
    r = decode_benchmark_with_predictors(llama, everything, ids, new_tokens=8, eval_blocks=blocks)
    assert r["greedy_differ"] == 0 and r["teacher_forced_differ"] == 0
    assert r["predicted_perplexity"] == pytest.approx(r["dense_perplexity"], rel=1e-5)
    assert r["decode_predicted_sparsity"] == 0
    assert r["dense_tokens_per_s"] > 0 and r["predicted_tokens_per_s"] > 0
    nothing = random_set(thresholds=[1e9, 1e9])  # predicts nothing: FFNs vanish
    r = decode_benchmark_with_predictors(llama, nothing, ids, new_tokens=8, eval_blocks=blocks)
    assert r["decode_predicted_sparsity"] == 1
    assert r["predicted_perplexity"] != pytest.approx(r["dense_perplexity"], rel=1e-3)
    assert not any(isinstance(m, PredictedSparseMLP) for m in llama.modules())  # left dense


def test_report_for_bench_decode(llama, tokenizer, tmp_path):
    from prosparse.inference.benchmark import format_predictor_report, predictor_decode_report

    relufy_(llama)
    save_predictors(random_set(thresholds=[-1e9, -1e9]), tmp_path / "p")
    ids = torch.randint(2, 100, (1, 4), generator=torch.Generator().manual_seed(4))
    r = predictor_decode_report(llama, None, str(tmp_path / "p"), ids, new_tokens=4)
    assert r["greedy_differ"] == 0 and "predicted_perplexity" not in r
    assert r["predictors"] == str(tmp_path / "p")
    assert r["exact_tokens_per_s"] > 0 and r["predicted_over_exact"] > 0  # all three timed
    text = format_predictor_report(r)
    assert "greedy tokens that differ from dense: 0.0%" in text and "exact sparse" in text


def test_calibrated_thresholds_give_the_predicted_sparsity(llama):
    from prosparse.inference import calibrate_thresholds_

    relufy_(llama)
    ids = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    pset = random_set()
    thresholds = calibrate_thresholds_(llama, pset, ids, 0.75)
    assert thresholds == pytest.approx(pset.thresholds.tolist())
    restore = attach_predictors_(llama, pset)
    try:
        llama(input_ids=ids, use_cache=False)
        mods = [m for m in llama.modules() if isinstance(m, PredictedSparseMLP)]
        skipped = [1 - m.predicted_active / (m.tokens * m.d_ff) for m in mods]
        # the same tokens: exactly the calibrated share in every layer, since each was
        # calibrated on the residual stream the predicted FFNs before it produce
        assert skipped == pytest.approx([0.75, 0.75], abs=1e-3)
    finally:
        restore()
    with pytest.raises(ValueError, match="sparsity"):
        calibrate_thresholds_(llama, pset, ids, 1.0)


def test_bench_decode_7b_shape_takes_only_random_predictors(tmp_path, capsys):
    from prosparse.cli import main

    assert main(["bench", "decode", "--llama2-7b-shape", "--predictors", str(tmp_path)]) == 2
    assert "--predictors takes 'random'" in capsys.readouterr().err
