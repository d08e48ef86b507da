"""Activation annealing: blend the original activation into ReLU over a ramp of steps, so the
swap does not destroy the model at once (a recipe option; not in the ProSparse paper).

``act(g) = (1 - a) * act0(g) + a * relu(g)`` with ``a = anneal_factor(step, steps, shape)`` a
pure function of the step like lambda (a resumed run lands on the same value), reaching exactly
1 at the end of the ramp, when the blend is replaced by the target module itself: from then on
the FFN is exactly the ReLU-family activation, its zeros exact, before any L1 stage starts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prosparse.models.relufy import find_gated_ffns

SHAPES = ("linear", "cosine")


def anneal_factor(step: int, steps: int, shape: str = "linear") -> float:
    """The blend weight of the target activation at 1-based ``step`` of a ``steps``-long ramp:
    ``step / steps`` (linear) or ``(1 - cos(pi * step / steps)) / 2`` (cosine), 1 from
    ``steps`` on; ``steps = 0`` is no ramp (1 at every step)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown anneal shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if steps <= 0 or step >= steps:
        return 1.0
    x = max(step, 0) / steps
    return x if shape == "linear" else (1 - math.cos(math.pi * x)) / 2


class AnnealedActivation(nn.Module):
    """``(1 - alpha) * original(g) + alpha * target(g)``; ``alpha`` is set by the loop."""

    def __init__(self, original: nn.Module, target: nn.Module, alpha: float = 0.0):
        super().__init__()
        self.original, self.target = original, target
        self.alpha = float(alpha)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        if self.alpha >= 1.0:
            return self.target(g)
        return (1 - self.alpha) * self.original(g) + self.alpha * self.target(g)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


def begin_anneal_(model: nn.Module, originals: list[nn.Module]) -> None:
    """Wrap every gated FFN's (already swapped-in) target activation with its ``originals``
    entry (the module it replaced, layer order), at alpha 0."""
    ffns = find_gated_ffns(model)
    if len(originals) != len(ffns):
        raise ValueError(f"{len(originals)} original activations for {len(ffns)} gated FFNs")
    for ffn, orig in zip(ffns, originals):
        setattr(ffn.module, ffn.act_attr, AnnealedActivation(orig, ffn.act))


def set_anneal_(model: nn.Module, alpha: float) -> bool:
    """Set every blend's alpha; at 1 put the target modules back in their place (the blend is
    gone and the model is exactly the ReLU-family model). Returns True while blends remain."""
    left = False
    for ffn in find_gated_ffns(model):
        act = ffn.act
        if not isinstance(act, AnnealedActivation):
            continue
        if alpha >= 1.0:
            setattr(ffn.module, ffn.act_attr, act.target)
        else:
            act.alpha = float(alpha)
            left = True
    return left
