"""Progressive L1 factor schedule: paper Algorithm 1 (Appendix B), Tables 6 and 7.

A pure function of the step. Stages are ``(lambda_i, T_i)`` with cumulative step counts ``T_i``:

0. stage 0 (``lambda = 0``): continual training right after the ReLU swap (Table 6, stage 0);
1. stage 1: flat at ``lambda_1`` (the warm-up stage);
2. stage i >= 2: rises from ``lambda_{i-1}`` to ``lambda_i`` along
   ``eta = (sin(-pi/2 + pi * (t - T_{i-1}) / (T_i - T_{i-1})) + 1) / 2``; equal consecutive peaks
   give a flat stage;
3. ``fixed`` stages (Table 7's decay and SFT stages, Appendix J) hold their own lambda flat, which
   may be smaller than the previous peak (SFT keeps a smaller lambda than lambda_S).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prosparse.core.errors import UsageError


@dataclass
class Stage:
    """One stage of Algorithm 1."""

    steps: int
    """Cumulative step count T_i at which this stage ends (steps are 1-based)."""
    lam: float = 0.0
    """Peak factor lambda_i reached at the end of the stage (YAML key ``lambda``)."""
    fixed: bool = False
    """Hold ``lam`` flat for the whole stage (decay / SFT stages of Table 7) instead of a sine
    ramp from the previous peak; may be below the previous peak."""
    name: str = ""
    """Label for tables and plots (``decay``, ``sft``); empty means the stage number."""


def validate_stages(stages: Sequence[Stage]) -> None:
    """Raise :class:`UsageError` naming the stage and the fix when Algorithm 1's requirements fail."""
    if not stages:
        raise UsageError("stages is empty; give at least one stage, e.g. [{lambda: 0, steps: 100}]")
    prev_steps, prev_lam = 0, 0.0
    for i, s in enumerate(stages):
        if not isinstance(s.steps, int) or isinstance(s.steps, bool):
            raise UsageError(f"stages[{i}].steps ({s.steps!r}) must be an integer step count")
        if s.steps <= prev_steps:
            what = f"stages[{i - 1}].steps ({prev_steps})" if i else "0"
            raise UsageError(
                f"stages[{i}].steps ({s.steps}) must be greater than {what}: steps are cumulative "
                f"(T_i, the step at which stage {i} ends), not per-stage lengths"
            )
        if not math.isfinite(s.lam) or s.lam < 0:
            raise UsageError(f"stages[{i}].lambda ({s.lam}) must be a finite number >= 0")
        if s.lam < prev_lam and not s.fixed:
            raise UsageError(
                f"stages[{i}].lambda ({s.lam:g}) must be >= stages[{i - 1}].lambda "
                f"({prev_lam:g}): Algorithm 1 only raises lambda; set stages[{i}].fixed: true for "
                f"a decay/SFT stage that holds a smaller lambda, or raise it"
            )
        prev_steps, prev_lam = s.steps, s.lam


def total_steps(stages: Sequence[Stage]) -> int:
    """The last step of the schedule (T_S)."""
    return stages[-1].steps if stages else 0


def stage_index(step: int, stages: Sequence[Stage]) -> int:
    """Index of the stage that step ``step`` (1-based) belongs to; past the end, the last."""
    for i, s in enumerate(stages):
        if step <= s.steps:
            return i
    return len(stages) - 1


def l1_factor(step: int, stages: Sequence[Stage]) -> float:
    """lambda at ``step`` (1-based, as in Algorithm 1); past the last stage it stays at the end."""
    i = stage_index(step, stages)
    s = stages[i]
    # 0. stage 0 (lambda 0) and 3. fixed stages: flat.
    if s.fixed or s.lam == 0:
        return float(s.lam)
    prev = stages[i - 1] if i > 0 else None
    # 1. the first stage with lambda > 0 after stage 0 (or a first stage) is the flat warm-up.
    if prev is None or prev.lam == 0 or prev.fixed:
        return float(s.lam)
    # 2. incremental stage: sine ramp from the previous peak (flat when the peaks are equal).
    start, end = prev.steps, s.steps
    t = min(max(step, start), end)
    eta = (math.sin(-math.pi / 2 + math.pi * (t - start) / (end - start)) + 1) / 2
    return float(prev.lam + eta * (s.lam - prev.lam))


def train_threshold(step: int, target: float, start: int, ramp: int, base: float = 0.0) -> float:
    """The FATReLU threshold of threshold-aware training at 1-based ``step``: ``base`` up to step
    ``start``, then a linear rise reaching exactly ``target`` at step ``start + ramp`` (at
    ``start + 1`` when ``ramp`` is 0), held from then on. A pure function of the step, like
    lambda: a resumed run lands on the same value."""
    if step <= start:
        return float(base)
    if ramp <= 0 or step >= start + ramp:
        return float(target)
    return float(base + (target - base) * (step - start) / ramp)


def schedule_curve(stages: Sequence[Stage], every: int = 1) -> dict:
    """``{"steps": [...], "lambda": [...]}`` for steps 1..T_S (every ``every``-th, last included)."""
    if every < 1:
        raise UsageError(f"--every ({every}) must be >= 1")
    last = total_steps(stages)
    steps = list(range(1, last + 1, every))
    if steps and steps[-1] != last:
        steps.append(last)
    return {"steps": steps, "lambda": [l1_factor(t, stages) for t in steps]}
