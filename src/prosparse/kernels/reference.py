"""Plain-torch truth for the exact sparse FFN operators (paper Section 3.3, Appendix D).

A gated FFN computes ``g = x Ws^T`` (step 1, dense), ``x1 = act(g) * (x W1^T)`` (step 2) and
``y = x1 W2^T`` (step 3). The fast backends (:mod:`.cpu`, :mod:`.triton`) compute steps 2 and 3
only over the *active* neurons (``act(g) != 0``) and must match these functions: exact zeros in
the same places, values within floating-point rounding.

The activation is applied in ``g``'s dtype, exactly as :class:`prosparse.models.FATReLU` does in
a model: the threshold (or shift) is first rounded to that dtype, and FATReLU keeps ``g >= t``.
"""

from __future__ import annotations

import torch

from prosparse.models.activations import fatrelu, shifted_relu

ACTS = ("relu", "fatrelu", "shifted_relu")


def check_act(act: str) -> None:
    if act not in ACTS:
        raise KeyError(f"unknown activation {act!r}; choose one of {', '.join(ACTS)}")


def activate(g: torch.Tensor, act: str = "relu", param: float = 0.0) -> torch.Tensor:
    """``act(g)`` in ``g``'s dtype: relu, fatrelu (keeps ``g >= param``) or ``relu(g - param)``."""
    check_act(act)
    p = torch.tensor(float(param), dtype=g.dtype, device=g.device)
    if act == "relu":
        return torch.relu(g)
    if act == "fatrelu":
        return fatrelu(g, p)
    return shifted_relu(g, p)


_LINEAR_FASTER: dict[tuple[torch.dtype, bool], bool] = {}


def matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` for a matrix ``w`` (n, k), any strides, and a vector ``x`` (k,): (n,).

    On CPU the faster of ``torch.mv`` and ``F.linear`` differs by machine and dtype (measured:
    one VM ran bf16 ``torch.mv`` 1.6x faster than ``x @ w.t()``, another ran ``F.linear`` 2x
    faster than ``torch.mv``), so both are timed once per dtype and layout and the faster is
    kept: the dense baseline is the best dense we have, and the sparse path multiplies its
    gathered rows the same way.
    """
    if w.device.type != "cpu":
        return torch.mv(w, x)
    key = (w.dtype, w.is_contiguous())
    if key not in _LINEAR_FASTER:
        _LINEAR_FASTER[key] = _time_linear_vs_mv(*key)
    if _LINEAR_FASTER[key]:
        return torch.nn.functional.linear(x.view(1, -1), w)[0]
    return torch.mv(w, x)


def _time_linear_vs_mv(dtype: torch.dtype, contiguous: bool) -> bool:
    import statistics
    import time

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
        lin = median_time(lambda: torch.nn.functional.linear(x.view(1, -1), w))
        mv = median_time(lambda: torch.mv(w, x))
    return lin < mv


def active_neurons(a: torch.Tensor) -> torch.Tensor:
    """Sorted indices of neurons active for any token of ``a`` (tokens, d_ff): the union."""
    mask = a != 0 if a.dim() == 1 else (a != 0).any(dim=0)
    return mask.nonzero().flatten()  # (n_active,)


def up_step(
    x: torch.Tensor, g: torch.Tensor, w1: torch.Tensor, act: str = "relu", param: float = 0.0
) -> torch.Tensor:
    """Step (2), dense: ``x1 = act(g) * (x W1^T)`` with exact zeros where ``act(g) == 0``.

    x (tokens, d_model), g (tokens, d_ff), w1 = ``up_proj.weight`` (d_ff, d_model).
    """
    a = activate(g, act, param)  # (tokens, d_ff)
    # One token: matvec, the faster matrix-vector path of this machine, so the dense fallback
    # and the benchmarks' dense baseline are the best dense we have.
    u = matvec(w1, x[0]).unsqueeze(0) if x.shape[0] == 1 else x @ w1.t()  # (tokens, d_ff)
    return torch.where(a != 0, a * u, torch.zeros((), dtype=a.dtype, device=a.device))


def down_step(x1: torch.Tensor, w2t: torch.Tensor) -> torch.Tensor:
    """Step (3), dense: ``y = x1 W2^T`` with w2t = ``down_proj.weight.T`` (d_ff, d_model)."""
    if x1.shape[0] == 1:
        return matvec(w2t.t(), x1[0]).unsqueeze(0)  # (1, d_model), the fast path as above
    return x1 @ w2t  # (tokens, d_model)
