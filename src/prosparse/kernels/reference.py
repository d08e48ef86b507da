"""Plain-torch truth for the sparse FFN operators (paper Section 3.3, Appendix D). No state.

A gated FFN computes ``g = x Ws^T`` (step 1, dense), ``x1 = act(g) * (x W1^T)`` (step 2) and
``y = x1 W2^T`` (step 3). The fast backends (:mod:`.cpu`, :mod:`.triton`) compute steps 2 and 3
only over the *active* neurons (``act(g) != 0``) and must match these functions: exact zeros in
the same places, values within floating-point rounding.

The predictor-driven FFN (paper Section 3.3, "approximate acceleration"; PowerInfer's scheme)
computes every step only over the neurons a predictor calls active: :func:`predicted_ffn`
is its truth, the dense formula with x1 masked by the prediction.
"""

from __future__ import annotations

import torch

from prosparse.kernels.activations import activate, up_activate


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
    u = up_activate(x @ w1.t(), act)  # (tokens, d_ff)
    return torch.where(a != 0, a * u, torch.zeros((), dtype=a.dtype, device=a.device))


def down_step(x1: torch.Tensor, w2t: torch.Tensor) -> torch.Tensor:
    """Step (3), dense: ``y = x1 W2^T`` with w2t = ``down_proj.weight.T`` (d_ff, d_model)."""
    return x1 @ w2t  # (tokens, d_model)


def predicted_ffn(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w2t: torch.Tensor,
    act: str = "relu",
    param: float = 0.0,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = (mask * act(x Wg^T + bg) * (x Wu^T + bu)) W2^T`` (tokens, d_model), dense.

    x (tokens, d_model); mask (tokens, d_ff) bool, the predicted-active neurons of each token;
    w_gate, w_up (d_ff, d_model); w2t = ``down_proj.weight.T`` (d_ff, d_model). A neuron
    predicted inactive contributes nothing; one predicted active but truly inactive costs time,
    not accuracy. The down projection's bias is the caller's.
    """
    g = x @ w_gate.t()  # (tokens, d_ff)
    u = x @ w_up.t()  # (tokens, d_ff)
    if b_gate is not None:
        g = g + b_gate
    if b_up is not None:
        u = u + b_up
    x1 = activate(g, act, param) * up_activate(u, act) * mask  # (tokens, d_ff)
    return x1 @ w2t
