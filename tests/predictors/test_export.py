"""Export round trips: ours, and PowerInfer's names and shapes."""

from __future__ import annotations

import json

import pytest
import torch

from prosparse.predictors import (
    PredictorSet,
    export_powerinfer,
    load_predictors,
    save_predictors,
)


def random_set(n_layers=2, d_model=64, d_ff=176, hidden=32, thresholds=None, seed=0):
    torch.manual_seed(seed)
    pset = PredictorSet(d_model, d_ff, n_layers, hidden)
    if thresholds is not None:
        pset.thresholds.copy_(torch.tensor(thresholds))
    return pset


def decisions(pset, x):
    return torch.stack([pset.predict(i, x) for i in range(len(pset))])


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


@pytest.mark.parametrize("thresholds", [[0.0, 0.0], [0.5, 2.0], [-1.0, -0.25]])
def test_powerinfer_layout_names_shapes_and_decisions(tmp_path, thresholds):
    pset = random_set(thresholds=thresholds)
    t = export_powerinfer(pset, tmp_path / "pi")
    files = sorted(p.name for p in (tmp_path / "pi").iterdir())
    assert files == ["config.json", "model_0.pt", "model_1.pt"]
    assert json.loads((tmp_path / "pi" / "config.json").read_text()) == {"sparse_threshold": t}
    for i in range(2):
        sd = torch.load(tmp_path / "pi" / f"model_{i}.pt", weights_only=True)
        assert set(sd) == {"fc1.weight", "fc2.weight"}
        assert sd["fc1.weight"].shape == (32, 64)  # [D, d_model]
        assert sd["fc2.weight"].shape == (176, 32)  # [d_ff, D]
    back = load_predictors(tmp_path / "pi")
    x = torch.randn(50, 64)
    # a neuron is skipped when its logit is below sparse_threshold: the same decisions as ours
    assert torch.equal(decisions(back, x), decisions(pset, x))


def test_powerinfer_refuses_thresholds_it_cannot_fold(tmp_path):
    with pytest.raises(ValueError, match="mix signs"):
        export_powerinfer(random_set(thresholds=[-0.5, 0.5]), tmp_path / "pi")
    with pytest.raises(FileNotFoundError, match="neither predictors.json"):
        load_predictors(tmp_path)
