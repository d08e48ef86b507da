"""Training on a tiny model learns something; metrics match a hand count; thresholds hit recall."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prosparse import relufy_
from prosparse.predictors.collect import PairData, collect_pairs
from prosparse.predictors.metrics import LayerCounts, metrics_table, summarize
from prosparse.predictors.model import Predictor
from prosparse.predictors.train import (
    TrainConfig,
    evaluate_predictors,
    init_from_gate,
    threshold_for_recall,
    train_predictors,
)


def test_metrics_against_a_hand_count():
    # 2 tokens x 4 neurons
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    predicted = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    mass = torch.tensor([[2.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 4.0]])
    c = LayerCounts()
    c.add(predicted, labels, mass)
    m = c.metrics()
    # positives 4, predicted 4, true positives 3 (t0n0, t1n0, t1n3); token 0 misses neuron 1
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["predicted_sparsity"] == pytest.approx(1 - 4 / 8)
    assert m["true_sparsity"] == pytest.approx(1 - 4 / 8)
    assert m["mass_missed"] == pytest.approx(3.0 / 10.0)
    # batches add up: the same counts split in two calls
    c2 = LayerCounts()
    c2.add(predicted[:1], labels[:1], mass[:1])
    c2.add(predicted[1:], labels[1:], None)
    assert c2.metrics()["recall"] == m["recall"]
    assert c2.metrics()["mass_missed"] == pytest.approx(3.0 / 5.0)
    s = summarize([m, {**m, "recall": 1.0, "mass_missed": None}])
    assert s["average_recall"] == pytest.approx((0.75 + 1.0) / 2)
    assert s["average_mass_missed"] == pytest.approx(0.3)
    assert "75.00" in metrics_table(s)


def test_threshold_for_recall_is_the_largest_that_keeps_it():
    logits = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0, 1.0, -2.0])
    labels = torch.tensor([True, True, True, True, True, False, False])
    t = threshold_for_recall(logits, labels, 0.8)  # 5 positives: one may fall below
    assert t == -1.0
    rec = lambda t: float((logits[labels] >= t).float().mean())  # noqa: E731
    assert rec(t) >= 0.8 and rec(t + 1e-3) < 0.8
    assert threshold_for_recall(logits, labels, 1.0) == -3.0


@pytest.fixture
def collected(llama, tmp_path):
    relufy_(llama)
    blocks = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(0))
    collect_pairs(llama, blocks, tmp_path / "c", batch_size=8, val_fraction=0.1,
                  progress=False)
    return PairData(tmp_path / "c")


def test_paper_mode_keeps_the_best_recall_checkpoint(collected):
    cfg = TrainConfig(hidden=64, epochs=3, batch_size=32, lr=1e-2, patience=5, seed=0,
                      init="random")
    pset, result = train_predictors(collected, cfg, progress=False)
    assert len(result["layers"]) == 2 and result["val_tokens"] == collected.n_val
    for layer in result["layers"]:
        hist = layer["history"]
        assert layer["epochs_run"] == 3 and hist[-1]["loss"] < hist[0]["loss"]
        best = max(hist, key=lambda h: h["recall"])
        assert layer["best_epoch"] == best["epoch"]
        assert layer["recall"] == pytest.approx(best["recall"])  # best-recall checkpoint kept
        assert layer["threshold"] == 0.0
        assert layer["mass_missed"] is not None and 0 <= layer["mass_missed"] <= 1
        packed = np.array(collected.labels_packed(layer["layer"])[:collected.n_train])
        assert layer["positive_rate"] == pytest.approx(  # counted without unpacking
            np.unpackbits(packed, axis=-1, count=collected.d_ff).mean())
    # the saved thresholds and weights give the same numbers when evaluated again
    again = evaluate_predictors(pset, collected, progress=False)
    assert again["average_recall"] == pytest.approx(result["average_recall"])
    assert again["average_predicted_sparsity"] == pytest.approx(
        result["average_predicted_sparsity"])


def test_target_recall_learns_sparsity_at_that_recall(collected):
    cfg = TrainConfig(hidden=64, epochs=6, batch_size=32, lr=1e-2, target_recall=0.95, seed=0,
                      init="random")
    pset, result = train_predictors(collected, cfg, progress=False)
    for layer in result["layers"]:
        assert layer["recall"] >= 0.95
        assert layer["threshold"] == pytest.approx(float(pset.thresholds[layer["layer"]]))
        hist = layer["history"]
        assert layer["predicted_sparsity"] == pytest.approx(
            max(h["predicted_sparsity"] for h in hist))
        # it learned: more neurons skipped than at the first epoch, and better than chance
        assert layer["predicted_sparsity"] > hist[0]["predicted_sparsity"] + 0.1
        assert layer["precision"] > (1 - layer["true_sparsity"]) + 0.05


def test_subset_of_layers_leaves_the_rest_predicting_nothing(collected):
    pset, result = train_predictors(collected, TrainConfig(hidden=8, epochs=1), layers=[1],
                                    progress=False)
    assert [m["layer"] for m in result["layers"]] == [1]
    assert math.isinf(float(pset.thresholds[0]))


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="target_recall"):
        TrainConfig(target_recall=1.5)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=-1)


def test_gate_init_is_the_gates_low_rank_map():
    gate = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    y = x @ gate.T > 0
    full = Predictor(8, 24, hidden=16)  # k = 8 = full rank: the gate itself, times c > 0
    info = init_from_gate(full, gate, x, y, neg_weight=0.5)
    assert info["rank"] == 8 and info["scale"] > 0
    torch.testing.assert_close(full(x), info["scale"] * x @ gate.T, rtol=1e-4, atol=1e-4)
    low = Predictor(8, 24, hidden=7)  # k = 3, one spare hidden unit that adds nothing yet
    info = init_from_gate(low, gate, x, y, neg_weight=0.5)
    u, s, vh = torch.linalg.svd(gate)
    want = info["scale"] * x @ (u[:, :3] * s[:3] @ vh[:3]).T
    assert info["rank"] == 3 and not low.fc2.weight[:, 6].any()
    torch.testing.assert_close(low(x), want, rtol=1e-4, atol=1e-4)


@pytest.fixture
def collected_gate(tmp_path):
    from tests.conftest import tiny_llama

    model = tiny_llama(intermediate_size=96)
    with torch.no_grad():  # norms with non-trivial weights, so diag(g) matters
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    relufy_(model)
    blocks = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(0))
    collect_pairs(model, blocks, tmp_path / "g", batch_size=8, val_fraction=0.1, progress=False)
    return model, PairData(tmp_path / "g")


def test_collection_keeps_the_effective_gate(collected_gate):
    model, data = collected_gate
    assert data.meta["gate_init"] == [True, True]
    for i, layer in enumerate(model.model.layers):
        want = layer.mlp.gate_proj.weight * layer.post_attention_layernorm.weight
        torch.testing.assert_close(data.gate(i), want.detach(), rtol=2e-3, atol=2e-3)  # fp16


def test_gate_init_starts_at_the_exact_labels(collected_gate):
    # hidden 2 * d_model: the start reproduces sign(gate) exactly, so recall 1 at sparsity = true
    _, data = collected_gate
    cfg = TrainConfig(hidden=128, epochs=1, batch_size=64, lr=1e-5, patience=1, seed=0)
    _, result = train_predictors(data, cfg, progress=False)
    for layer in result["layers"]:
        start = layer["history"][0]
        assert layer["init"] == "gate" and layer["rank"] == 64 and start["epoch"] == 0
        assert start["recall"] >= 0.995
        assert abs(start["predicted_sparsity"] - layer["true_sparsity"]) < 0.01
    # the paper's random start is far from that after one epoch
    rnd = train_predictors(data, TrainConfig(hidden=128, epochs=1, batch_size=64, seed=0,
                                             init="random"), progress=False)[1]
    assert rnd["average_recall"] < result["average_recall"] - 0.05 or \
        rnd["average_predicted_sparsity"] < result["average_predicted_sparsity"] - 0.05


def test_non_rms_norm_has_no_gate_and_gate_init_says_so(tmp_path):
    from torch import nn

    from tests.conftest import tiny_llama

    model = tiny_llama(intermediate_size=96)
    model.model.layers[1].post_attention_layernorm = nn.LayerNorm(64)
    relufy_(model)
    blocks = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    collect_pairs(model, blocks, tmp_path / "n", batch_size=8, val_fraction=0.25,
                  progress=False)
    data = PairData(tmp_path / "n")
    assert data.meta["gate_init"] == [True, False]
    assert "not an RMS-type norm" in data.meta["gate_init_notes"][1]
    assert data.gate(1) is None
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\].*RMS-type.*re-collect"):
        train_predictors(data, TrainConfig(hidden=8, epochs=1, init="gate"), progress=False)
    _, result = train_predictors(data, TrainConfig(hidden=8, epochs=1), progress=False)  # auto
    assert [m["init"] for m in result["layers"]] == ["gate", "random"]


@pytest.mark.parametrize("act,kw", [("fatrelu", {"threshold": 0.05}), ("relu", {})])
def test_gate_check_follows_the_cutoff_and_clipped_labels(tmp_path, act, kw):
    from tests.conftest import tiny_llama

    model = tiny_llama(intermediate_size=96)
    relufy_(model, act, **kw)
    blocks = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    collect_pairs(model, blocks, tmp_path / "f", batch_size=8, val_fraction=0.25,
                  clip_top=0.15 if act == "relu" else None, progress=False)
    assert PairData(tmp_path / "f").meta["gate_init"] == [True, True]


def test_zero_epochs_is_the_untrained_gate_truncation(collected_gate):
    _, data = collected_gate
    cfg = TrainConfig(hidden=32, epochs=0, target_recall=0.9, seed=0)
    pset, result = train_predictors(data, cfg, progress=False)
    for layer in result["layers"]:
        assert layer["epochs_run"] == 0 and [h["epoch"] for h in layer["history"]] == [0]
        assert layer["recall"] >= 0.9 and layer["rank"] == 16
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0, init="random")


def test_device_asked_for_must_exist(collected_gate):
    _, data = collected_gate
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
        train_predictors(data, TrainConfig(hidden=8, epochs=1, device="cuda"), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_matches_cpu(collected_gate):
    _, data = collected_gate
    cfg = dict(hidden=128, epochs=0, target_recall=0.95, seed=0)  # the gate start: deterministic
    cpu = train_predictors(data, TrainConfig(device="cpu", **cfg), progress=False)[1]
    gpu = train_predictors(data, TrainConfig(device="cuda", **cfg), progress=False)[1]
    assert gpu["average_predicted_sparsity"] == pytest.approx(
        cpu["average_predicted_sparsity"], abs=0.01)
    assert gpu["average_recall"] >= 0.95
