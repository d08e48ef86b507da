"""Export round trips: ours, and PowerInfer's names, shapes and decisions, thresholds folded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prosparse.core.errors import UsageError
from prosparse.predictors import (
    PredictorSet,
    export_powerinfer,
    load_predictors,
    save_predictors,
)
from prosparse.predictors.export import FP16_SAFE, fold_thresholds


def random_set(n_layers=2, d_model=64, d_ff=176, hidden=32, thresholds=None, seed=0):
    torch.manual_seed(seed)
    pset = PredictorSet(d_model, d_ff, n_layers, hidden)
    if thresholds is not None:
        pset.thresholds.copy_(torch.tensor(thresholds))
    return pset


def logits(pset, x):
    return torch.stack([pset.layers[i](x) for i in range(len(pset))])  # (layers, tokens, d_ff)


def decisions(pset, x, thresholds=None):
    th = pset.thresholds if thresholds is None else torch.tensor(thresholds)
    return logits(pset, x) >= th.view(-1, 1, 1)


def listing(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_our_format_round_trips(tmp_path):
    pset = random_set(thresholds=[0.25, -0.5])
    save_predictors(pset, tmp_path / "p", extra={"model": "tiny"})
    meta = json.loads((tmp_path / "p" / "predictors.json").read_text())
    assert meta["format"] == "prosparse-predictors" and meta["hidden"] == 32
    assert meta["thresholds"] == [0.25, -0.5] and meta["model"] == "tiny"
    back = load_predictors(tmp_path / "p")
    for k, v in pset.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(FileExistsError, match="already exists"):
        save_predictors(pset, tmp_path / "p")


@pytest.mark.parametrize("thresholds", [[0.0, 0.0], [0.5, 2.0], [-1.0, -0.25], [0.3, 0.3, -2.0]])
def test_powerinfer_layout_names_shapes_and_decisions(tmp_path, thresholds):
    """PowerInfer's documented layout: model_{layer}.pt with fc1.weight [D, d_model] and
    fc2.weight [d_ff, D] (what its converter's ReluMLP loads), config.json with
    sparse_threshold; one-sign thresholds fold with every decision kept."""
    n = len(thresholds)
    pset = random_set(n_layers=n, thresholds=thresholds)
    t = export_powerinfer(pset, tmp_path / "pi")
    assert listing(tmp_path / "pi") == ["config.json"] + [f"model_{i}.pt" for i in range(n)]
    assert json.loads((tmp_path / "pi" / "config.json").read_text()) == {"sparse_threshold": t}
    for i in range(n):
        sd = torch.load(tmp_path / "pi" / f"model_{i}.pt", weights_only=True)
        assert set(sd) == {"fc1.weight", "fc2.weight"}
        assert sd["fc1.weight"].shape == (32, 64)  # [D, d_model]
        assert sd["fc2.weight"].shape == (176, 32)  # [d_ff, D]
        assert sd["fc1.weight"].dtype == sd["fc2.weight"].dtype == torch.float32
        assert torch.isfinite(sd["fc2.weight"].half()).all()
    back = load_predictors(tmp_path / "pi")
    assert back.thresholds.tolist() == [t] * n
    x = torch.randn(50, 64)
    fold = fold_thresholds(pset)
    if len(set(thresholds)) == 1 or all(v < 0 for v in thresholds) or all(v > 0 for v in thresholds):
        assert all(fold.exact) and fold.effective == fold.requested
        # a neuron is skipped when its logit is below sparse_threshold: the same decisions as ours
        assert torch.equal(decisions(back, x), decisions(pset, x))


@pytest.mark.parametrize("thresholds", [[-1.17, 0.995], [0.0, -0.3], [0.0, 0.7], [0.7, 0.0, -0.2]])
def test_mixed_signs_and_zero_fold_to_just_below_zero(tmp_path, thresholds):
    """No positive scale maps t >= 0 onto a negative T: those layers keep neurons from a logit
    just below 0 (more neurons, never fewer); every other decision is the requested one."""
    n = len(thresholds)
    pset = random_set(n_layers=n, thresholds=thresholds)
    fold = fold_thresholds(pset)
    assert fold.sparse_threshold < 0
    for t, r, e, ok in zip(thresholds, fold.requested, fold.effective, fold.exact):
        if t < 0:
            assert ok and e == r
        else:
            assert not ok and -1e-3 < e < 0, (t, e)
    export_powerinfer(pset, tmp_path / "pi")
    back = load_predictors(tmp_path / "pi")
    for i in range(n):
        w = back.layers[i].fc2.weight
        assert w.abs().max() <= FP16_SAFE * (1 + 1e-6) and torch.isfinite(w.half()).all()
    x = torch.randn(200, 64)
    got = decisions(back, x)  # what PowerInfer decides
    assert torch.equal(got, decisions(pset, x, fold.effective))
    z, asked = logits(pset, x), decisions(pset, x)
    for i, t in enumerate(fold.requested):
        differ = got[i] != asked[i]
        # only neurons with a logit in [effective, requested) change, and only to kept
        assert (got[i] | ~asked[i]).all()
        assert ((z[i][differ] >= fold.effective[i]) & (z[i][differ] < t)).all()
        if t == 0:
            assert differ.float().mean() < 1e-3


def test_a_scale_past_the_fp16_cap_only_keeps_more_neurons():
    pset = random_set(thresholds=[-1.0, -1e-7])  # layer 1 would need fc2 x 1e7
    fold = fold_thresholds(pset)
    assert fold.sparse_threshold == -1.0 and fold.exact == [True, False]
    cap = FP16_SAFE / float(pset.layers[1].fc2.weight.detach().abs().max())
    assert math.isclose(fold.scales[1], cap) and fold.effective[1] < -1e-7
    with torch.no_grad():
        pset.layers[0].fc2.weight.zero_()  # a zero predictor: no cap, logits 0 either way
    assert fold_thresholds(pset).scales[0] == 1.0


def test_powerinfer_refuses_untrained_layers(tmp_path):
    with pytest.raises(UsageError, match=r"layers \[1\] have no trained predictor"):
        export_powerinfer(random_set(thresholds=[-0.5, math.inf]), tmp_path / "pi")
    assert not (tmp_path / "pi").exists()
    with pytest.raises(FileNotFoundError, match="neither predictors.json"):
        load_predictors(tmp_path)


def test_truncated_or_corrupt_predictor_files_are_one_line(tmp_path):
    pset = random_set(thresholds=[0.25, -0.5])
    save_predictors(pset, tmp_path / "p")
    weights = tmp_path / "p" / "predictors.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated or corrupt.*train or export"):
        load_predictors(tmp_path / "p")
    (tmp_path / "p" / "predictors.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a predictor description"):
        load_predictors(tmp_path / "p")
    export_powerinfer(random_set(thresholds=[0.25, -0.5]), tmp_path / "pi")
    first = tmp_path / "pi" / "model_0.pt"
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(UsageError, match="model_0.pt does not load") as err:
        load_predictors(tmp_path / "pi")
    assert "\n" not in str(err.value)
