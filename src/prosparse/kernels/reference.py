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
    # One token: torch.mv, the fast CPU matrix-vector path (bf16 ``x @ w1.t()`` is ~1.6x slower),
    # so the dense fallback and the benchmarks' dense baseline are the best dense we have.
    u = torch.mv(w1, x[0]).unsqueeze(0) if x.shape[0] == 1 else x @ w1.t()  # (tokens, d_ff)
    return torch.where(a != 0, a * u, torch.zeros((), dtype=a.dtype, device=a.device))


def down_step(x1: torch.Tensor, w2t: torch.Tensor) -> torch.Tensor:
    """Step (3), dense: ``y = x1 W2^T`` with w2t = ``down_proj.weight.T`` (d_ff, d_model)."""
    if x1.shape[0] == 1:
        return torch.mv(w2t.t(), x1[0]).unsqueeze(0)  # (1, d_model), the fast path as above
    return x1 @ w2t  # (tokens, d_model)
