"""Activation threshold shifting sweep (paper Section 3.2, Appendix O, Table 9)."""

from __future__ import annotations

import math

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
) -> dict:
    """Sparsity and perplexity of ``model`` with FATReLU at each threshold ``t``.

    The activation is swapped in place for each ``t`` and restored at the end. ``recommended``
    is the largest ``t`` whose perplexity is within ``tolerance`` (relative: 0.01 = +1%) of
    ``t = baseline_t`` (measured even when it is not in ``thresholds``): 0 for a model trained
    under plain ReLU, the trained threshold for one trained under FATReLU (``threshold.train``),
    whose perplexity at t = 0 is off its training point. Sparsity and perplexity combine
    all data sources token-weighted. Returns the JSON of ``prosparse threshold``.
    """
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
        for t in tqdm(grid, desc="thresholds", disable=not progress):
            set_threshold_(model, t)
            rows[t] = {"t": t, **evaluate_heldout(model, batches, batch_size)}
    finally:
        restore()
    base = rows[float(baseline_t)]["perplexity"]
    ok = [t for t in grid if rows[t]["perplexity"] <= base * (1 + tolerance)]
    return {
        "thresholds": [rows[t] for t in sorted(set(thresholds))],
        "recommended": max(ok),
        "baseline_perplexity": base,
        "baseline_t": float(baseline_t),
        "tolerance": tolerance,
    }
