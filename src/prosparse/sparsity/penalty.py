"""The L1 term on x1 (paper Eq. 2), with its normalisation an explicit option
(``docs/conventions.md``, "The L1 term").

``mean``:       sum over layers of mean |x1| over the micro-batch's elements.
``sum_scaled``: sum over layers of sum |x1| over every token and neuron of the micro-batch, times
                ``scale`` (1e-8), divided by the gradient-accumulation count: the authors' public
                framework, against a token-mean cross-entropy. The division is that framework's
                own and comes on top of the usual averaging of accumulated micro-batch losses.

The lambdas of Tables 6 and 7 only mean something with ``sum_scaled`` at scale 1e-8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prosparse.measure.hooks import ZeroCounter


def l1_norm(x1: torch.Tensor, normalization: str = "mean", scale: float = 1e-8,
            grad_accum: int = 1) -> torch.Tensor:
    """The L1 term of one layer's ``x1`` (any shape, last dim d_ff), normalised as asked."""
    if normalization == "mean":
        return x1.abs().float().mean()
    if normalization == "sum_scaled":
        return x1.abs().float().sum() * (scale / grad_accum)
    raise KeyError(f"unknown penalty.normalization {normalization!r}; choose one of mean, "
                   "sum_scaled")


def l1_penalty(x1s: Sequence[torch.Tensor], normalization: str = "mean", scale: float = 1e-8,
               grad_accum: int = 1) -> torch.Tensor:
    """Sum over layers (no division by the layer count) of :func:`l1_norm`."""
    return torch.stack([l1_norm(x, normalization, scale, grad_accum) for x in x1s]).sum()


class PenaltyCollector:
    """A ``capture_x1`` callback: accumulates the L1 term (with its graph) and counts zeros.

    One hook does both so the penalty adds a single reduction per layer to the step; call
    :meth:`take` after the forward pass to get the micro-batch's penalty and reset it.
    """

    def __init__(self, n_layers: int, normalization: str = "mean", scale: float = 1e-8,
                 grad_accum: int = 1, enabled: bool = True):
        self.normalization = normalization
        self.scale = scale
        self.grad_accum = grad_accum
        self.enabled = enabled
        self.zeros = ZeroCounter(n_layers)
        self._terms: list[torch.Tensor] = []

    def __call__(self, layer: int, x1: torch.Tensor) -> None:
        self.zeros(layer, x1)
        if self.enabled:
            self._terms.append(l1_norm(x1, self.normalization, self.scale, self.grad_accum))
        else:
            with torch.no_grad():
                self._terms.append(l1_norm(x1, self.normalization, self.scale, self.grad_accum))

    def take(self) -> torch.Tensor:
        """The summed penalty of the forward passes since the last call."""
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()

    def reset_counts(self) -> ZeroCounter:
        """Return the zero counts since the last reset and start new ones."""
        counts = self.zeros
        self.zeros = ZeroCounter(counts.n_layers)
        return counts
