"""The best dense FFN steps this machine runs: the dense fallback of :mod:`.dispatch` and the
baseline every benchmark compares the sparse paths against.

On CPU the faster of ``torch.mv`` and ``F.linear`` for one matrix-vector product differs by
machine and dtype (one VM ran bf16 ``torch.mv`` 1.6x faster than ``F.linear``, another ran
``F.linear`` 2x faster), so :func:`matvec` times both once per dtype and layout and keeps the
faster. That choice is the only state in the kernels; :mod:`.reference` stays plain torch.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from prosparse.kernels.activations import activate, up_activate

_LINEAR_FASTER: dict[tuple[torch.dtype, bool], bool] = {}


def matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` for a matrix ``w`` (n, k), any strides, and a vector ``x`` (k,): (n,)."""
    if w.device.type != "cpu":
        return torch.mv(w, x)
    key = (w.dtype, w.is_contiguous())
    if key not in _LINEAR_FASTER:
        _LINEAR_FASTER[key] = _time_linear_vs_mv(*key)
    if _LINEAR_FASTER[key]:
        return F.linear(x.view(1, -1), w)[0]
    return torch.mv(w, x)


def _time_linear_vs_mv(dtype: torch.dtype, contiguous: bool) -> bool:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 4096, generator=gen).to(dtype)  # 4-8 MiB: a few chunks' worth
    if not contiguous:
        w = torch.randn(4096, 1024, generator=gen).to(dtype).t()
    x = torch.randn(w.shape[1], generator=gen).to(dtype)

    def median_time(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with torch.inference_mode():
        lin = median_time(lambda: F.linear(x.view(1, -1), w))
        mv = median_time(lambda: torch.mv(w, x))
    return lin < mv


def up_step(x: torch.Tensor, g: torch.Tensor, w1: torch.Tensor, act: str = "relu",
            param: float = 0.0) -> torch.Tensor:
    """Step (2), dense: ``x1 = act(g) * (x W1^T)`` with exact zeros where ``act(g) == 0``."""
    a = activate(g, act, param)  # (tokens, d_ff)
    u = matvec(w1, x[0]).unsqueeze(0) if x.shape[0] == 1 else x @ w1.t()  # (tokens, d_ff)
    u = up_activate(u, act)
    return torch.where(a != 0, a * u, torch.zeros((), dtype=a.dtype, device=a.device))


def down_step(x1: torch.Tensor, w2t: torch.Tensor) -> torch.Tensor:
    """Step (3), dense: ``y = x1 W2^T`` with w2t = ``down_proj.weight.T`` (d_ff, d_model)."""
    if x1.shape[0] == 1:
        return matvec(w2t.t(), x1[0]).unsqueeze(0)  # (1, d_model)
    return x1 @ w2t  # (tokens, d_model)
