"""Forward pre-hooks on every ``down_proj``: its input is x1 = act(gate) * up, the FFN
intermediate output whose exact zeros are the activation sparsity (paper Section 3.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prosparse.models.relufy import find_gated_ffns


@contextmanager
def capture_x1(
    model: nn.Module, fn: Callable[[int, torch.Tensor], None]
) -> Iterator[int]:
    """Call ``fn(layer_index, x1)`` for every gated FFN's ``down_proj`` input while active.

    ``x1`` keeps its autograd graph (the L1 penalty needs it). Yields the number of layers.
    """
    ffns = find_gated_ffns(model)
    handles = []
    for i, ffn in enumerate(ffns):
        def hook(_module, args, _i=i):
            fn(_i, args[0])

        handles.append(ffn.down_proj.register_forward_pre_hook(hook))
    try:
        yield len(ffns)
    finally:
        for h in handles:
            h.remove()


class ZeroCounter:
    """Counts exact zeros of x1 per layer on the fly: memory does not grow with tokens.

    The zero counts accumulate on x1's device and are read back once, when :attr:`zeros` is
    asked for: counting adds no host-device synchronisation to a training or evaluation step.
    ``mask`` (set per batch with :meth:`set_mask`, shape (batch, seq)) excludes padding.
    """

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self._zeros: torch.Tensor | None = None  # (n_layers,) int64 on x1's device
        self.total = torch.zeros(n_layers, dtype=torch.float64)
        self.tokens = torch.zeros(n_layers, dtype=torch.long)
        self._mask: torch.Tensor | None = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = mask

    @torch.no_grad()
    def __call__(self, layer: int, x1: torch.Tensor) -> None:
        x1 = x1.detach()  # (batch, seq, d_ff)
        if self._mask is not None:
            x1 = x1[self._mask.to(x1.device).bool()]
        x1 = x1.reshape(-1, x1.shape[-1])  # (tokens, d_ff)
        if self._zeros is None or self._zeros.device != x1.device:
            start = None if self._zeros is None else self._zeros.to(x1.device)
            self._zeros = start if start is not None else torch.zeros(
                self.n_layers, dtype=torch.long, device=x1.device)
        self._zeros[layer] += (x1 == 0).sum()
        self.total[layer] += x1.numel()
        self.tokens[layer] += x1.shape[0]

    @property
    def zeros(self) -> torch.Tensor:
        """Exact zeros of x1 per layer (float64, on the CPU)."""
        if self._zeros is None:
            return torch.zeros(self.n_layers, dtype=torch.float64)
        return self._zeros.double().cpu()

    def layer_sparsity(self) -> list[float]:
        """Fraction of exact zeros of x1, per layer."""
        return (self.zeros / self.total.clamp(min=1)).tolist()

    def average_sparsity(self) -> float:
        """Mean over layers of the per-layer fraction (paper Section 3.1)."""
        return float((self.zeros / self.total.clamp(min=1)).mean())
