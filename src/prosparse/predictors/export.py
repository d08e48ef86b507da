"""Save and load predictors: our format and PowerInfer's folder layout
(``docs/conventions.md``, "Activation predictors").

Ours, a folder::

    predictors.safetensors   layers.{i}.fc1.weight [hidden, d_model], layers.{i}.fc2.weight
                             [d_ff, hidden], thresholds [n_layers] (logit space)
    predictors.json          {"format": "prosparse-predictors", "d_model", "d_ff", "hidden",
                              "n_layers", "thresholds", ...}

PowerInfer's, a folder of ``model_{layer}.pt`` state dicts holding ``fc1.weight [D, d_model]``
and ``fc2.weight [d_ff, D]``, plus ``config.json`` with ``sparse_threshold``: one logit
threshold for all layers (a neuron is skipped when its logit is below it). :func:`fold_thresholds`
folds per-layer thresholds into ``fc2`` by scaling, ``z >= t  <=>  s z >= T`` for ``s = T / t > 0``:

- all equal: ``T = t``, no scaling;
- one sign: ``T`` is the threshold of largest magnitude, so every scale is ``>= 1`` (fp16 keeps
  its relative precision when scaling up; scaling down would push small weights subnormal);
- mixed signs, or a zero among others: no positive scale maps ``t >= 0`` onto a negative ``T``
  (and fc2 has no bias to shift by), so ``T`` is negative (the most negative threshold, or -1)
  and each layer with ``t >= 0`` gets the largest scale fp16 holds: its effective threshold
  ``T / s`` is just below 0, a few neurons more are kept than asked for (recall up, never down).

Every scale is capped so that ``max |s * fc2|`` stays :data:`FP16_SAFE` (PowerInfer's converter
writes fc2 in fp16); a capped layer's effective threshold moves toward ``-inf``, never up, so
capping only ever keeps more neurons.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prosparse.core.errors import UsageError
from prosparse.core.io import atomic_dir
from prosparse.predictors.model import PredictorSet

FORMAT = "prosparse-predictors"
FP16_SAFE = 2.0**15
"""Largest |fc2 weight| a fold may produce: half the fp16 maximum (65504), so the converter's
fp16 copy stays finite with room for rounding."""

log = logging.getLogger(__name__)


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


@dataclass
class ThresholdFold:
    """Per-layer thresholds folded into one ``sparse_threshold`` and per-layer fc2 scales."""

    sparse_threshold: float
    """``T``, the one logit threshold PowerInfer applies to every layer."""
    scales: list[float]
    """Per layer, the factor fc2 is multiplied by (always > 0)."""
    requested: list[float]
    """Per layer, the threshold the predictors were trained or calibrated to."""
    effective: list[float]
    """Per layer, ``T / scale``: the threshold PowerInfer effectively applies to the unscaled
    logits (equal to ``requested`` where ``exact``, below it otherwise)."""
    exact: list[bool]
    """Per layer, whether every decision is the requested one."""

    def as_dict(self) -> dict:
        return asdict(self)


def fold_thresholds(pset: PredictorSet) -> ThresholdFold:
    """Fold ``pset``'s per-layer thresholds into one ``T`` and fc2 scales (module docstring)."""
    th = [float(t) for t in pset.thresholds]
    if any(not math.isfinite(t) for t in th):
        bad = [i for i, t in enumerate(th) if not math.isfinite(t)]
        raise UsageError(f"layers {bad} have no trained predictor (threshold inf); train every "
                         "layer before exporting to PowerInfer")
    absmax = [float(p.fc2.weight.detach().abs().max()) for p in pset.layers]
    caps = [min(FP16_SAFE / a, 1e30) if a > 0 else 1e30 for a in absmax]
    target = None
    if all(t == th[0] for t in th):
        target = th[0]
    elif all(t < 0 for t in th):
        target = min(th)
    elif all(t > 0 for t in th) and all(max(th) / t <= c for t, c in zip(th, caps)):
        target = max(th)  # (a capped layer here would move its threshold up: fall through)
    if target is None:  # mixed signs, zeros among others: T < 0, t >= 0 folded to just below 0
        target = min(th) if min(th) < 0 else -1.0
    scales, effective, exact = [], [], []
    for t, cap in zip(th, caps):
        if t == target:
            s, e = 1.0, t
        elif t != 0 and (t > 0) == (target > 0) and target / t <= cap:
            s, e = target / t, t
        else:  # other side of 0, or past the cap: the cap, T / cap below t
            s = cap
            e = target / s
        scales.append(s)
        effective.append(e)
        exact.append(e == t)
    return ThresholdFold(target, scales, th, effective, exact)


def write_powerinfer(pset: PredictorSet, folder: str | os.PathLike) -> ThresholdFold:
    """Write PowerInfer's predictor files into the existing ``folder``: ``model_{i}.pt`` with
    the folded fc2, and ``config.json`` with ``sparse_threshold``. Returns the fold."""
    folder = Path(folder)
    fold = fold_thresholds(pset)
    for i, (p, s) in enumerate(zip(pset.layers, fold.scales)):
        torch.save({"fc1.weight": p.fc1.weight.detach().cpu().contiguous(),
                    "fc2.weight": (p.fc2.weight.detach().float() * s).to(p.fc2.weight.dtype)
                    .cpu().contiguous()},
                   folder / f"model_{i}.pt")
    (folder / "config.json").write_text(
        json.dumps({"sparse_threshold": fold.sparse_threshold}) + "\n")
    return fold


def export_powerinfer(pset: PredictorSet, out: str | os.PathLike, overwrite: bool = False) -> float:
    """Write PowerInfer's layout to ``out`` (atomically); returns the ``sparse_threshold``
    written. Per-layer thresholds are folded as :func:`fold_thresholds` says."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        fold = write_powerinfer(pset, tmp)
    inexact = [i for i, e in enumerate(fold.exact) if not e]
    if inexact:  # `predictors export` prints no table: say what the fold changed
        log.warning("PowerInfer has one sparse_threshold (%g): layers %s keep neurons from logit "
                    "%s instead of %s", fold.sparse_threshold, inexact,
                    ", ".join(f"{fold.effective[i]:.3g}" for i in inexact),
                    ", ".join(f"{fold.requested[i]:.4g}" for i in inexact))
    return fold.sparse_threshold


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
    redo = "train or export the predictors again"
    if (path / "predictors.json").is_file():
        from safetensors.torch import load_file

        try:
            meta = json.loads((path / "predictors.json").read_text())
            pset = PredictorSet(meta["d_model"], meta["d_ff"], meta["n_layers"], meta["hidden"])
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path / 'predictors.json'} is not a predictor description "
                             f"({type(e).__name__}: {str(e)[:120]}); {redo}") from None
        weights = path / "predictors.safetensors"
        try:
            state = load_file(str(weights))
        except FileNotFoundError:
            raise UsageError(f"{weights} is missing; {redo}") from None
        except Exception as e:  # safetensors' errors on a truncated or corrupt file
            raise UsageError(f"{weights} is truncated or corrupt ({str(e)[:120]}); {redo}") \
                from None
        try:
            pset.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:160]
            raise UsageError(f"{weights} does not match {path / 'predictors.json'} ({first}); "
                             f"{redo}") from None
        return pset
    files = sorted(path.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(
            f"{path} holds neither predictors.json (prosparse) nor model_0.pt (PowerInfer)")
    if [int(f.stem.split("_")[1]) for f in files] != list(range(len(files))):
        raise UsageError(f"{path}: PowerInfer files must be model_0.pt .. model_{len(files) - 1}.pt "
                         "with no gaps")
    layers = []
    for f in files:
        try:
            layers.append(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # a truncated or foreign .pt: name it, do not echo it
            raise UsageError(f"{f} does not load as a PowerInfer predictor "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                             f"{redo}") from None
    for f, sd in zip(files, layers):
        if set(sd) != {"fc1.weight", "fc2.weight"}:
            raise UsageError(f"{f} holds {sorted(sd)}; expected fc1.weight and fc2.weight")
    cfg = path / "config.json"
    t = json.loads(cfg.read_text()).get("sparse_threshold", 0.0) if cfg.is_file() else 0.0
    return _from_layers(layers, [float(t)] * len(layers))
