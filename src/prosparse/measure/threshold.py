"""Activation threshold shifting sweep (paper Section 3.2, Appendix O, Table 9)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from prosparse.core.errors import UsageError
from prosparse.measure.heldout import evaluate_heldout
from prosparse.measure.sparsity import heldout_sets
from prosparse.models.relufy import activation_state, current_activation, set_threshold_


def threshold_sweep(
    model: nn.Module,
    tokenizer,
    thresholds: list[float],
    data: list[str] | tuple[str, ...] = ("wiki",),
    tolerance: float = 0.01,
    tokens: int = 8192,
    seq_len: int = 256,
    batch_size: int = 4,
    progress: bool = True,
    baseline_t: float = 0.0,
    reference_perplexity: float | None = None,
    measured: dict[float, dict] | None = None,
) -> dict:
    """Sparsity and perplexity of ``model`` with FATReLU at each threshold ``t``.

    The activation is swapped in place for each ``t`` and restored at the end. ``recommended``
    is the largest ``t`` whose perplexity is within ``tolerance`` (relative: 0.01 = +1%) of
    ``t = baseline_t`` (measured even when it is not in ``thresholds``): 0 for a model trained
    under plain ReLU, the trained threshold for one trained under FATReLU (``threshold.train``),
    whose perplexity at t = 0 is off its training point. Sparsity and perplexity combine
    all data sources token-weighted. Returns the JSON of ``prosparse threshold``.

    With ``reference_perplexity`` (another model's perplexity on the same text, e.g. the
    original SiLU model's), the tolerance is judged against it instead; when no ``t`` is within
    it, ``recommended`` is ``baseline_t`` and ``within_tolerance`` is false.

    ``measured`` maps thresholds to measurements of this model already made on the same text
    (``evaluate_heldout``'s dict: the trained model at its trained t), which are used instead of
    measuring again.
    """
    _check_reference(reference_perplexity)
    if not thresholds or any(not math.isfinite(t) or t < 0 for t in thresholds):
        raise UsageError(f"--thresholds must be finite and >= 0 (got {thresholds})")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise UsageError(f"--tolerance ({tolerance}) must be a finite number >= 0")
    original = current_activation(model)
    if original[0] not in ("relu", "fatrelu", "drelu"):
        # Threshold shifting applies to a ReLU model; on SiLU/GELU it is a swap too. Say so.
        print(f"note: the model's activation is {original[0]}; each t also swaps it to FATReLU")
    batches = heldout_sets(tokenizer, data, tokens, seq_len)
    if not math.isfinite(baseline_t) or baseline_t < 0:
        raise UsageError(f"baseline_t ({baseline_t}) must be a finite number >= 0")
    grid = sorted(set(thresholds) | {float(baseline_t)})
    rows = {}
    restore = activation_state(model)
    try:
        known = {float(t): m for t, m in (measured or {}).items()}
        for t in tqdm(grid, desc="thresholds", disable=not progress):
            if t in known:
                rows[t] = {"t": t, **known[t]}
                continue
            set_threshold_(model, t)
            rows[t] = {"t": t, **evaluate_heldout(model, batches, batch_size)}
    finally:
        restore()
    base = rows[float(baseline_t)]["perplexity"]
    limit = (base if reference_perplexity is None else reference_perplexity) * (1 + tolerance)
    ok = [t for t in grid if rows[t]["perplexity"] <= limit]
    return {
        "thresholds": [rows[t] for t in sorted(set(thresholds))],
        "recommended": max(ok) if ok else float(baseline_t),
        "within_tolerance": bool(ok),
        "baseline_perplexity": base,
        "baseline_t": float(baseline_t),
        "tolerance": tolerance,
        "reference_perplexity": reference_perplexity,
    }


def _check_reference(reference_perplexity: float | None) -> None:
    if reference_perplexity is not None and not (math.isfinite(reference_perplexity)
                                                 and reference_perplexity > 0):
        raise UsageError(f"the reference perplexity ({reference_perplexity}) must be a finite "
                         "number > 0")


def per_layer_thresholds(
    model: nn.Module,
    tokenizer,
    data: list[str] | tuple[str, ...] = ("wiki",),
    tolerance: float = 0.01,
    tokens: int = 8192,
    seq_len: int = 256,
    batch_size: int = 4,
    calib_tokens: int = 2048,
    baseline_t: float = 0.0,
    interval: float = 1e-3,
    progress: bool = True,
    reference_perplexity: float | None = None,
) -> dict:
    """One FATReLU threshold per layer instead of the paper's single ``t``.

    Each layer's threshold is the largest that keeps its CETT (the norm of the dropped neurons'
    output over the FFN output, :mod:`prosparse.measure.cett`) within one budget shared by all
    layers, on ``calib_tokens`` of the train split; the budget is searched (bisection to
    ``interval``) for the largest held-out perplexity within ``tolerance`` of the model at
    ``baseline_t``, as the single-``t`` sweep judges it. Layers whose gates matter less get a
    higher threshold. The model's activation is restored afterwards; the JSON has the
    ``layer_thresholds`` to deploy (``relufy_(model, "fatrelu", layer_thresholds)``).

    With ``reference_perplexity`` (another model's perplexity on the same text, e.g. the
    original SiLU model's), the budget is searched for the largest perplexity within
    ``tolerance`` of it instead: the sparsest thresholds at that quality. No threshold falls
    below ``baseline_t``: a model trained under FATReLU t is worse below it (the weights rely
    on the small activations being cut). ``within_tolerance`` is false when the model at
    ``baseline_t`` is already past it; the thresholds are then ``baseline_t``.
    """
    _check_reference(reference_perplexity)
    from prosparse.measure.cett import cett_curve, cutoff_for, dense_gates, dense_x1
    from prosparse.models.relufy import find_gated_ffns

    if not math.isfinite(tolerance) or tolerance < 0:
        raise UsageError(f"--tolerance ({tolerance}) must be a finite number >= 0")
    act = current_activation(model)[0]
    if act not in ("relu", "fatrelu", "drelu"):
        raise UsageError(f"per-layer thresholds shift a ReLU-family gate; the model runs {act}: "
                         "ReLUfy it first")
    batches = heldout_sets(tokenizer, data, tokens, seq_len)
    calib = torch.cat(list(heldout_sets(tokenizer, data, calib_tokens, seq_len,
                                        split="train").values()))
    restore = activation_state(model)
    try:
        set_threshold_(model, baseline_t)
        base = evaluate_heldout(model, batches, batch_size)
        limit = (base["perplexity"] if reference_perplexity is None
                 else reference_perplexity) * (1 + tolerance)
        gates = dense_gates(model, calib, calib_tokens, batch_size)
        x1s = dense_x1(model, calib, calib_tokens, batch_size)
        ffns = find_gated_ffns(model)
        curves = [cett_curve(x1, f.down_proj.weight.detach().float().norm(dim=0),
                             f.down_proj.weight, score=g)
                  for x1, g, f in zip(tqdm(x1s, desc="CETT curves", leave=False,
                                           disable=not progress), gates, ffns)]

        def at(c: float) -> list[float]:
            return [max(float(baseline_t), cutoff_for(t, v, c)) for t, v in curves]

        lo, hi, best = 0.0, 1.0, (0.0, [float(baseline_t)] * len(curves), base)
        for _ in tqdm(range(math.ceil(math.log2(1 / interval))), desc="per-layer search",
                      leave=False, disable=not progress):
            mid = (lo + hi) / 2
            ts = at(mid)
            set_threshold_(model, ts)
            res = evaluate_heldout(model, batches, batch_size)
            if res["perplexity"] <= limit:
                lo, best = mid, (mid, ts, res)
            else:
                hi = mid
    finally:
        restore()
    c, ts, res = best
    return {"layer_thresholds": ts, "cett": c, "tolerance": tolerance,
            "baseline_t": float(baseline_t), "baseline_perplexity": base["perplexity"],
            "baseline_sparsity": base["average_sparsity"],
            "reference_perplexity": reference_perplexity,
            "within_tolerance": res["perplexity"] <= limit, **res}
