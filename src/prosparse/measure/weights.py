"""Weight sparsity of a pruned model: exact zeros and N:M compliance of every decoder linear."""

from __future__ import annotations

import re

import torch
from torch import nn

from prosparse.core.errors import UsageError
from prosparse.models.linears import prunable_linears


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; anything but N:M with 0 < N < M is a :class:`UsageError`."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise UsageError(f"--pattern {text!r} must be N:M with 0 < N < M (e.g. 2:4 or 4:8)")
    return int(m.group(1)), int(m.group(2))


def nm_compliance(w: torch.Tensor, n: int, m: int) -> float:
    """Share of groups of ``m`` along the last dim with at most ``n`` non-zeros."""
    nnz = (w.reshape(-1, m) != 0).sum(1)
    return float((nnz <= n).float().mean()) if nnz.numel() else 1.0


def weight_sparsity(model: nn.Module, pattern: str = "2:4") -> dict:
    """Zeros and N:M compliance of every prunable linear (JSON-ready).

    ``{"pattern", "zeros", "compliance", "layers": {name: {"zeros", "compliance"}}}``: zeros is
    the share of exact zeros, compliance the share of groups with at most N non-zeros (1.0 for
    an exactly N:M layer); the totals weigh layers by size. A layer whose in_features is not
    divisible by M reports ``compliance: null``.
    """
    n, m = parse_pattern(pattern)
    layers, zeros, total, ok, groups = {}, 0, 0, 0.0, 0
    for name, lin in prunable_linears(model).items():
        w = lin.weight.detach()
        z = int((w == 0).sum())
        entry = {"zeros": z / w.numel(), "compliance": None}
        if w.shape[-1] % m == 0:
            entry["compliance"] = nm_compliance(w, n, m)
            ok += entry["compliance"] * (w.numel() // m)
            groups += w.numel() // m
        layers[name] = entry
        zeros, total = zeros + z, total + w.numel()
    return {"pattern": f"{n}:{m}", "zeros": zeros / total if total else 0.0,
            "compliance": ok / groups if groups else None, "layers": layers}
