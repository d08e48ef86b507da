"""Activation threshold shifting sweep (paper Section 3.2, Appendix O, Table 9)."""

from __future__ import annotations

import math

from torch import nn
from tqdm.auto import tqdm

from prosparse.errors import UsageError
from prosparse.evaluation.heldout import evaluate_heldout
from prosparse.models.relufy import activation_state, current_activation, relufy_
from prosparse.sparsity.measure import heldout_sets


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
) -> dict:
    """Sparsity and perplexity of ``model`` with FATReLU at each threshold ``t``.

    The activation is swapped in place for each ``t`` and restored at the end. ``recommended``
    is the largest ``t`` whose perplexity is within ``tolerance`` (relative: 0.01 = +1%) of
    ``t = 0`` (measured even when 0 is not in ``thresholds``). Sparsity and perplexity combine
    all data sources token-weighted. Returns the JSON of ``prosparse threshold``.
    """
    if not thresholds or any(not math.isfinite(t) or t < 0 for t in thresholds):
        raise UsageError(f"--thresholds must be finite and >= 0 (got {thresholds})")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise UsageError(f"--tolerance ({tolerance}) must be a finite number >= 0")
    original = current_activation(model)
    if original[0] not in ("relu", "fatrelu"):
        # Threshold shifting applies to a ReLU model; on SiLU/GELU it is a swap too. Say so.
        print(f"note: the model's activation is {original[0]}; each t also swaps it to FATReLU")
    batches = heldout_sets(tokenizer, data, tokens, seq_len)
    grid = sorted(set(thresholds) | {0.0})
    rows = {}
    restore = activation_state(model)
    try:
        for t in tqdm(grid, desc="thresholds", disable=not progress):
            relufy_(model, "fatrelu", t)
            rows[t] = {"t": t, **evaluate_heldout(model, batches, batch_size)}
    finally:
        restore()
    base = rows[0.0]["perplexity"]
    ok = [t for t in grid if rows[t]["perplexity"] <= base * (1 + tolerance)]
    return {
        "thresholds": [rows[t] for t in sorted(set(thresholds))],
        "recommended": max(ok),
        "baseline_perplexity": base,
        "tolerance": tolerance,
    }
