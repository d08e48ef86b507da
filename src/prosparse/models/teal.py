"""TEAL (Liu et al., 2024): training-free magnitude sparsity of the hidden state entering every
linear of every decoder block.

:class:`TEALLinear` is an ``nn.Linear`` (same ``weight``/``bias`` parameters, so state dicts
keep their keys) that zeroes the input entries with ``|x| < t`` before the product:
``y = W (x * [|x| >= t]) + b``. A zero input entry means a column of W that need not be read,
so at batch 1 the product is the input-side sparse operator of step (3)
(:class:`prosparse.inference.SparseInputLinear`). The thresholds live in the config
(``prosparse_teal``), so :func:`prosparse.load_model` restores them; plain transformers loads
the same checkpoint as the dense original.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_KEY = "prosparse_teal"


def teal_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with the entries of magnitude below ``threshold`` set to exact zero (NaN kept)."""
    t = torch.tensor(float(threshold), dtype=x.dtype, device=x.device)
    return torch.where(x.abs() < t, torch.zeros((), dtype=x.dtype, device=x.device), x)


class TEALLinear(nn.Linear):
    """``F.linear(teal_mask(x, threshold), weight, bias)``."""

    def __init__(self, linear: nn.Linear, threshold: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.threshold = float(threshold)
        self.counting = False  # count skipped input entries (evaluation), off in decoding
        self.skipped = 0
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xm = teal_mask(x, self.threshold)
        if self.counting:
            self.skipped += int((xm == 0).sum())
            self.seen += xm.numel()
        return F.linear(xm, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}"


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every linear of every decoder block (attention and FFN projections), in module order:
    every ``nn.Linear`` under the model's layer stack, so embeddings and the LM head are not."""
    stacks = [m for n, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and n.split(".")[-1] in ("layers", "h", "blocks")]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no decoder layer stack (a ModuleList "
                         "named layers, h or blocks): TEAL sparsifies the linears inside it")
    inside = {id(m) for stack in stacks for m in stack.modules()}
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) in inside]


def tealify_(model: nn.Module, thresholds: dict[str, float]) -> list[str]:
    """Swap each named block linear for a :class:`TEALLinear` with its threshold, in place, and
    record the thresholds in the config. A :class:`TEALLinear` already there gets the new
    threshold. Returns the names changed."""
    names = dict(block_linears(model))
    missing = sorted(set(thresholds) - set(names))
    if missing:
        raise ValueError(f"no block linear named {missing[0]!r} (and {len(missing) - 1} more)")
    for name, t in thresholds.items():
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"TEAL threshold of {name} must be finite and >= 0, got {t}")
        lin = names[name]
        if isinstance(lin, TEALLinear):
            lin.threshold = float(t)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TEALLinear(lin, t))
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, {"thresholds": {k: float(v) for k, v in
                                                          thresholds.items()}})
    return list(thresholds)


def teal_linears(model: nn.Module) -> list[tuple[str, TEALLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TEALLinear)]


def restore_teal_(model: nn.Module) -> bool:
    """Re-apply the thresholds a checkpoint's config records; True when it had any."""
    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not recorded:
        return False
    tealify_(model, dict(recorded["thresholds"]))
    return True


@contextmanager
def count_teal(model: nn.Module) -> Iterator[dict[str, TEALLinear]]:
    """Count the input entries every :class:`TEALLinear` skips while active; yields them by
    name (read ``skipped / seen`` afterwards)."""
    mods = dict(teal_linears(model))
    for m in mods.values():
        m.counting, m.skipped, m.seen = True, 0, 0
    try:
        yield mods
    finally:
        for m in mods.values():
            m.counting = False
