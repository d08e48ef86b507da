"""CPU backend: steps (2) and (3), and the predictor-driven FFN, reading only the active rows,
without a fresh copy per call.

``W[idx]`` allocates and page-faults a fresh 10-20 MB tensor every call at LLaMA2-7B shapes,
which is what makes the naive gather swing (``prosparse bench ops``). Here

- step (3) is one fused gather-weighted-sum, ``F.embedding_bag(..., per_sample_weights=x1,
  mode="sum")``: it streams each active row of W2^T once and never materialises the gathered
  rows (batch 1);
- step (2) gathers the active rows of W1 with ``index_select(out=...)``, ~1 MiB at a time,
  into a scratch buffer allocated once that stays in L2, and multiplies each chunk there
  (:func:`rows_mv`);
- the predictor-driven FFN (:func:`predicted_ffn`) gathers the predicted rows of W_gate and
  W_up with :func:`rows_mv` and reduces the same rows of W2^T with ``embedding_bag``.

Small batches use the union of the tokens' active neurons; tokens for which a union neuron is
inactive get an exact zero from the activation.

Each entry point (:func:`up_step`, :func:`down_step`, :func:`predicted_ffn`) runs the compiled
kernels of :mod:`.fused` when they are built and take the tensors (float32 or bfloat16, rows
contiguous), and the pure-torch code below otherwise: that code is their twin, the fallback
where no compiler is present, and what runs inside ``fused.disabled()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prosparse.kernels import fused
from prosparse.kernels.activations import activate, up_activate
from prosparse.kernels.dense import matvec

CHUNK_BYTES = 1 << 20
_scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable (rows, cols) buffer; grown, never shrunk, so steady-state calls allocate nothing."""
    key = (dtype, torch.device(device))
    buf = _scratch.get(key)
    if buf is None or buf.numel() < rows * cols:
        # A normal tensor, even when first asked for under torch.inference_mode(): an inference
        # tensor could not be written by a later call made outside that mode.
        with torch.inference_mode(False):
            buf = torch.empty(rows * cols, dtype=dtype, device=device)
        _scratch[key] = buf
    return buf[: rows * cols].view(rows, cols)


def rows_mv(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w[idx] @ x``, reading only rows ``idx`` of ``w``: x (d_model,) -> (n,), or x
    (tokens, d_model) -> (tokens, n).

    The rows are gathered ~1 MiB at a time into a scratch buffer that stays in L2: a buffer of
    all of them (10-30 MB at 7B shapes) is evicted by the other layers' weights between tokens
    and then costs a DRAM read-for-ownership and a write-back. One token multiplies each chunk
    with :func:`.dense.matvec` (torch.mv or F.linear, the faster on this machine), more with a
    GEMM.
    """
    n = idx.numel()
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    step = max(16, CHUNK_BYTES // (w.shape[1] * w.element_size()))
    buf = scratch(min(step, n), w.shape[1], w.dtype, w.device)
    for j in range(0, n, step):
        part = idx[j : j + step]
        rows = torch.index_select(w, 0, part, out=buf[: part.numel()])
        out[..., j : j + part.numel()] = matvec(rows, x) if x.dim() == 1 else x @ rows.t()
    return out


def up_step(
    x: torch.Tensor,
    g: torch.Tensor,
    w1: torch.Tensor,
    idx: torch.Tensor,
    act: str = "relu",
    param: float = 0.0,
) -> torch.Tensor:
    """Step (2) over the active neurons ``idx`` only; x (tokens, d_model), g (tokens, d_ff)."""
    if act != "drelu" and fused.usable(x, w1):  # the compiled step has no ReLU on the up side
        return fused.up_step(x, g, w1, idx, act, param)
    tokens, d_ff = g.shape
    x1 = torch.zeros(tokens, d_ff, dtype=x.dtype, device=x.device)  # (tokens, d_ff)
    if idx.numel() == 0:
        return x1
    a = activate(g.index_select(1, idx), act, param)  # (tokens, n_active)
    u = up_activate(rows_mv(w1, idx, x[0] if tokens == 1 else x).view(tokens, -1),
                    act)  # (tokens, n_active)
    x1.index_copy_(1, idx, torch.where(a != 0, a * u, torch.zeros((), dtype=a.dtype)))
    return x1


def down_step(x1: torch.Tensor, w2t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Step (3) reading only rows ``idx`` of w2t (d_ff, d_model); x1 (tokens, d_ff)."""
    if fused.usable(x1, w2t):
        return fused.down_step(x1, w2t, idx)
    tokens = x1.shape[0]
    if idx.numel() == 0:
        return torch.zeros(tokens, w2t.shape[1], dtype=x1.dtype, device=x1.device)
    v = x1.index_select(1, idx)  # (tokens, n_active)
    if tokens == 1:
        return F.embedding_bag(idx.view(1, -1), w2t, per_sample_weights=v, mode="sum")
    rows = torch.index_select(
        w2t, 0, idx, out=scratch(idx.numel(), w2t.shape[1], w2t.dtype, w2t.device)
    )
    return v @ rows  # (tokens, d_model)


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
    """:func:`.reference.predicted_ffn` token by token, touching only the predicted rows of every
    matrix: x (tokens, d_model), mask (tokens, d_ff) -> (tokens, d_model)."""
    if act in fused.NATIVE_ACTS and fused.usable(x, w_gate, w_up, w2t, b_gate, b_up):
        return fused.predicted_ffn(x, mask, w_gate, w_up, w2t, act, param, b_gate, b_up)
    out = torch.zeros(x.shape[0], w2t.shape[1], dtype=x.dtype, device=x.device)
    for t in range(x.shape[0]):
        idx = mask[t].nonzero().flatten()  # (n,)
        if idx.numel() == 0:
            continue
        g = rows_mv(w_gate, idx, x[t])  # (n,): only the predicted rows of W_gate ...
        u = rows_mv(w_up, idx, x[t])  # ... and of W_up, in L2-sized chunks
        if b_gate is not None:
            g = g + b_gate.index_select(0, idx)
        if b_up is not None:
            u = u + b_up.index_select(0, idx)
        x1 = activate(g, act, param) * up_activate(u, act)  # (n,)
        out[t] = F.embedding_bag(idx.view(1, -1), w2t, per_sample_weights=x1.view(1, -1),
                                 mode="sum")[0]  # (d_model,)
    return out
