"""Training on a tiny model learns something; metrics match a hand count; thresholds hit recall."""

from __future__ import annotations

import math

import pytest
import torch

from prosparse import relufy_
from prosparse.predictors.collect import PairData, collect_pairs
from prosparse.predictors.metrics import LayerCounts, metrics_table, summarize
from prosparse.predictors.train import (
    TrainConfig,
    evaluate_predictors,
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
    cfg = TrainConfig(hidden=64, epochs=3, batch_size=32, lr=1e-2, patience=5, seed=0)
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
    # the saved thresholds and weights give the same numbers when evaluated again
    again = evaluate_predictors(pset, collected, progress=False)
    assert again["average_recall"] == pytest.approx(result["average_recall"])
    assert again["average_predicted_sparsity"] == pytest.approx(
        result["average_predicted_sparsity"])


def test_target_recall_learns_sparsity_at_that_recall(collected):
    cfg = TrainConfig(hidden=64, epochs=6, batch_size=32, lr=1e-2, target_recall=0.95, seed=0)
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
        TrainConfig(epochs=0)
