"""The activation math of ReLUfied FFNs, and the one registry of their names.

Everything above the kernels (model modules, configs, the CLI, saving, Triton) reads the names
from :data:`ACTS`, so a new activation is added here once.

- ``relu``: ``max(g, 0)``.
- ``fatrelu``: ``g`` where ``g >= t``, exact zero elsewhere (paper Eq. (3); the released Hugging
  Face code keeps ``g >= t`` too: ``docs/conventions.md``).
- ``shifted_relu``: ``relu(g - b)`` (the "ReLU Strikes Back" baseline, paper Table 4).
- ``cats``: ``silu(g)`` where ``|silu(g)| >= t``, exact zero elsewhere (CATS, Lee et al. 2024: a
  training-free threshold on the original SiLU model's gate activation).
- ``drelu``: dReLU (TurboSparse, Song et al. 2024): ReLU on the up projection too,
  ``x1 = fatrelu(g, t) * relu(u)`` (t = 0: ``relu(g) * relu(u)``), so x1 is zero where either
  factor is. :func:`activate` gives the gate factor, :func:`up_activate` the up one.

The scalar (threshold ``t`` or shift ``b``) is rounded to ``g``'s dtype before use, so every
backend compares the same numbers. NaN follows IEEE semantics on every path: a NaN gate gives
NaN (``g < t`` is false for NaN, so the zeroing rule "zero where ``g < t``" keeps it), exactly
as ``torch.relu`` and the dense SiLU model do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTS = ("relu", "fatrelu", "shifted_relu", "cats", "drelu")
"""Activation names every kernel, module, config and checkpoint understands."""


def check_act(act: str) -> None:
    """Raise ``KeyError`` naming the valid activations when ``act`` is not one of them."""
    if act not in ACTS:
        raise KeyError(f"unknown activation {act!r}; choose one of {', '.join(ACTS)}")


def fatrelu(g: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """``g`` where ``g >= threshold``, exact zero where ``g < threshold`` (NaN stays NaN)."""
    return torch.where(g < threshold, torch.zeros((), dtype=g.dtype, device=g.device), g)


def shifted_relu(g: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """``relu(g - shift)``."""
    return torch.relu(g - shift)


def cats(g: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """``silu(g)`` where ``|silu(g)| >= threshold``, exact zero elsewhere (NaN stays NaN)."""
    a = F.silu(g)
    return torch.where(a.abs() < threshold, torch.zeros((), dtype=g.dtype, device=g.device), a)


def activate(g: torch.Tensor, act: str = "relu", param: float = 0.0) -> torch.Tensor:
    """``act(g)`` in ``g``'s dtype, with the scalar ``param`` first rounded to that dtype (for
    ``drelu``, the gate factor ``fatrelu(g, param)``)."""
    check_act(act)
    if act == "relu" or (act == "drelu" and not param):
        return torch.relu(g)
    p = torch.tensor(float(param), dtype=g.dtype, device=g.device)
    if act in ("fatrelu", "drelu"):
        return fatrelu(g, p)
    return shifted_relu(g, p) if act == "shifted_relu" else cats(g, p)


def up_activate(u: torch.Tensor, act: str = "relu") -> torch.Tensor:
    """The up projection's factor of x1: ``relu(u)`` for ``drelu``, ``u`` itself otherwise."""
    return torch.relu(u) if act == "drelu" else u
