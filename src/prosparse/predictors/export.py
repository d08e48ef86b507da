"""Save and load predictors: our format and PowerInfer's folder layout
(``docs/conventions.md``, "Activation predictors").

Ours, a folder::

    predictors.safetensors   layers.{i}.fc1.weight [hidden, d_model], layers.{i}.fc2.weight
                             [d_ff, hidden], thresholds [n_layers] (logit space)
    predictors.json          {"format": "prosparse-predictors", "d_model", "d_ff", "hidden",
                              "n_layers", "thresholds", ...}

PowerInfer's, a folder of ``model_{layer}.pt`` state dicts holding ``fc1.weight [D, d_model]``
and ``fc2.weight [d_ff, D]``, plus ``config.json`` with ``sparse_threshold``: one logit
threshold for all layers (a neuron is skipped when its logit is below it). Per-layer thresholds
of the same sign are folded into ``fc2`` by scaling, which preserves every decision:
``z >= t  <=>  z * (T / t) >= T`` when ``T / t > 0``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from prosparse.io import atomic_dir
from prosparse.predictors.model import PredictorSet

FORMAT = "prosparse-predictors"


def save_predictors(pset: PredictorSet, out: str | os.PathLike, overwrite: bool = False,
                    extra: dict | None = None) -> Path:
    """Write ``pset`` in our format (atomically); ``extra`` goes into the JSON."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in pset.state_dict().items()}
    meta = {"format": FORMAT, "d_model": pset.d_model, "d_ff": pset.d_ff, "hidden": pset.hidden,
            "n_layers": len(pset), "thresholds": [float(t) for t in pset.thresholds],
            **(extra or {})}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "predictors.safetensors"))
        (tmp / "predictors.json").write_text(
            json.dumps(meta, indent=2, allow_nan=True) + "\n")
    return Path(out)


def export_powerinfer(pset: PredictorSet, out: str | os.PathLike, overwrite: bool = False) -> float:
    """Write PowerInfer's layout; returns the ``sparse_threshold`` written.

    Raises ``ValueError`` when per-layer thresholds differ in sign (no scaling can fold them).
    """
    th = [float(t) for t in pset.thresholds]
    if any(not math.isfinite(t) for t in th):
        raise ValueError("some layers have no trained predictor (threshold inf); train every "
                         "layer before exporting to PowerInfer")
    if all(t == th[0] for t in th):
        target, scales = th[0], [1.0] * len(th)
    elif all(t > 0 for t in th) or all(t < 0 for t in th):
        target = sum(th) / len(th)
        scales = [target / t for t in th]
    else:
        raise ValueError(
            f"per-layer thresholds mix signs ({min(th):.3f} .. {max(th):.3f}); PowerInfer has "
            "one sparse_threshold and fc2 has no bias to fold them into: retrain without "
            "--target-recall (threshold 0) or with a target recall the layers agree on"
        )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for i, (p, s) in enumerate(zip(pset.layers, scales)):
            torch.save({"fc1.weight": p.fc1.weight.detach().cpu().contiguous(),
                        "fc2.weight": (p.fc2.weight.detach() * s).cpu().contiguous()},
                       tmp / f"model_{i}.pt")
        (tmp / "config.json").write_text(json.dumps({"sparse_threshold": target}) + "\n")
    return target


def _from_layers(layers: list[dict[str, torch.Tensor]], thresholds: list[float]) -> PredictorSet:
    hidden, d_model = layers[0]["fc1.weight"].shape
    d_ff = layers[0]["fc2.weight"].shape[0]
    pset = PredictorSet(d_model, d_ff, len(layers), hidden)
    for p, sd in zip(pset.layers, layers):
        p.load_state_dict({k: v.float() for k, v in sd.items()})
    pset.thresholds.copy_(torch.tensor(thresholds, dtype=torch.float32))
    return pset


def load_predictors(path: str | os.PathLike) -> PredictorSet:
    """Load a folder in either format (ours if ``predictors.json`` exists, else PowerInfer's)."""
    path = Path(path)
    if (path / "predictors.json").is_file():
        from safetensors.torch import load_file

        meta = json.loads((path / "predictors.json").read_text())
        pset = PredictorSet(meta["d_model"], meta["d_ff"], meta["n_layers"], meta["hidden"])
        pset.load_state_dict(load_file(str(path / "predictors.safetensors")))
        return pset
    files = sorted(path.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(
            f"{path} holds neither predictors.json (prosparse) nor model_0.pt (PowerInfer)")
    if [int(f.stem.split("_")[1]) for f in files] != list(range(len(files))):
        raise ValueError(f"{path}: PowerInfer files must be model_0.pt .. model_{len(files) - 1}.pt "
                         "with no gaps")
    layers = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    for f, sd in zip(files, layers):
        if set(sd) != {"fc1.weight", "fc2.weight"}:
            raise ValueError(f"{f} holds {sorted(sd)}; expected fc1.weight and fc2.weight")
    cfg = path / "config.json"
    t = json.loads(cfg.read_text()).get("sparse_threshold", 0.0) if cfg.is_file() else 0.0
    return _from_layers(layers, [float(t)] * len(layers))
