"""Triton backend: steps (2) and (3), and the predictor-driven FFN, over a compacted list of
active neurons.

The kernels launch only over the active neurons (the list is compacted first:
``docs/kernels.md``), load fp16/bf16/fp32 and accumulate in fp32.

- step (2): one program per (block of active neurons, token); it dots each active row of W1 with
  x, applies the activation to ``g`` in-kernel (rounded to the input dtype, as the reference
  does) and scatters ``act(g) * u`` into a zeroed output.
- step (3): split-K over the active rows: each program reduces ``BLOCK_A`` active rows of W2^T
  over a ``BLOCK_D`` slice of d_model into fp32 partials, summed afterwards. Partials rather
  than atomics keep the result deterministic, so greedy decoding is reproducible.
- the predictor-driven FFN: one program per block of predicted neurons dots each of their rows
  of W_gate and W_up with x; the activation and product run on the compact (n,) vectors, and
  the down product is the step (3) kernel over the same neurons.

Importing this module imports triton; :mod:`prosparse.kernels.dispatch` does so only when the
backend is asked for. Under ``TRITON_INTERPRET=1`` (set before this module is imported) the
kernels run on CPU tensors, which is how CI checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prosparse.kernels.activations import ACTS, activate, check_act

_ACT_CODE = {name: code for code, name in enumerate(ACTS)}  # relu 0, fatrelu 1, shifted_relu 2


@triton.jit
def _up_kernel(
    x_ptr, g_ptr, w1_ptr, idx_ptr, out_ptr,
    n_active, d_model, d_ff, param,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_active
    rows = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)  # (BLOCK_N,) neuron ids
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d_model
        xv = tl.load(x_ptr + t * d_model + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(
            w1_ptr + rows[:, None].to(tl.int64) * d_model + offs_k[None, :],
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_K)
        acc += tl.sum(w * xv[None, :], axis=1)
    g_raw = tl.load(g_ptr + t * d_ff + rows, mask=mask_n, other=0.0)
    g = g_raw.to(tl.float32)
    # The activation in the input dtype: ``param`` arrives already rounded to it, so comparing
    # in fp32 is exact; shifted ReLU rounds g - b back to the dtype, as torch does. "Zero where
    # below" rather than "keep where above" lets a NaN gate through as NaN, as torch does.
    if ACT == 0:
        a = tl.where(g < 0, 0.0, g)
    elif ACT == 1:
        a = tl.where(g < param, 0.0, g)
    else:
        d = (g - param).to(g_raw.dtype).to(tl.float32)
        a = tl.where(d < 0, 0.0, d)
    x1 = tl.where(a != 0, a * acc, 0.0)
    tl.store(out_ptr + t * d_ff + rows, x1.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _down_kernel(
    x1_ptr, w2t_ptr, idx_ptr, part_ptr,
    n_active, d_model, d_ff, tokens,
    BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < n_active
    rows = tl.load(idx_ptr + offs_a, mask=mask_a, other=0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_model
    w = tl.load(
        w2t_ptr + rows[:, None].to(tl.int64) * d_model + offs_d[None, :],
        mask=mask_a[:, None] & mask_d[None, :], other=0.0,
    ).to(tl.float32)  # (BLOCK_A, BLOCK_D), read once for every token
    for t in range(0, tokens):
        v = tl.load(x1_ptr + t * d_ff + rows, mask=mask_a, other=0.0).to(tl.float32)
        partial = tl.sum(w * v[:, None], axis=0)  # (BLOCK_D,)
        tl.store(part_ptr + (pid_a * tokens + t) * d_model + offs_d, partial, mask=mask_d)


@triton.jit
def _rows_dot2_kernel(
    x_ptr, wa_ptr, wb_ptr, idx_ptr, outa_ptr, outb_ptr, n_active, d_model,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_active
    rows = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)  # (BLOCK_N,)
    acc_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d_model
        m2 = mask_n[:, None] & mask_k[None, :]
        xv = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        off = rows[:, None] * d_model + offs_k[None, :]
        wa = tl.load(wa_ptr + off, mask=m2, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K)
        wb = tl.load(wb_ptr + off, mask=m2, other=0.0).to(tl.float32)
        acc_a += tl.sum(wa * xv[None, :], axis=1)
        acc_b += tl.sum(wb * xv[None, :], axis=1)
    tl.store(outa_ptr + offs_n, acc_a.to(outa_ptr.dtype.element_ty), mask=mask_n)
    tl.store(outb_ptr + offs_n, acc_b.to(outb_ptr.dtype.element_ty), mask=mask_n)


def _rounded(param: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(float(param), dtype=dtype))


def up_step(
    x: torch.Tensor,
    g: torch.Tensor,
    w1: torch.Tensor,
    idx: torch.Tensor,
    act: str = "relu",
    param: float = 0.0,
    block_n: int = 32,
    block_k: int = 128,
) -> torch.Tensor:
    """Step (2) over the active neurons ``idx``; x (tokens, d_model), g (tokens, d_ff)."""
    check_act(act)
    x, g, w1 = x.contiguous(), g.contiguous(), w1.contiguous()
    tokens, d_ff = g.shape
    out = torch.zeros(tokens, d_ff, dtype=x.dtype, device=x.device)  # (tokens, d_ff)
    n = idx.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, block_n), tokens)
    _up_kernel[grid](
        x, g, w1, idx, out, n, x.shape[1], d_ff, _rounded(param, g.dtype),
        ACT=_ACT_CODE[act], BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def down_step(
    x1: torch.Tensor, w2t: torch.Tensor, idx: torch.Tensor, block_a: int = 64, block_d: int = 128
) -> torch.Tensor:
    """Step (3) reading only rows ``idx`` of w2t (d_ff, d_model); x1 (tokens, d_ff)."""
    x1, w2t = x1.contiguous(), w2t.contiguous()
    tokens, d_ff = x1.shape
    d_model = w2t.shape[1]
    n = idx.numel()
    if n == 0:
        return torch.zeros(tokens, d_model, dtype=x1.dtype, device=x1.device)
    splits = triton.cdiv(n, block_a)
    part = torch.empty(splits, tokens, d_model, dtype=torch.float32, device=x1.device)
    grid = (splits, triton.cdiv(d_model, block_d))
    _down_kernel[grid](x1, w2t, idx, part, n, d_model, d_ff, tokens, BLOCK_A=block_a, BLOCK_D=block_d)
    return part.sum(dim=0).to(x1.dtype)  # (tokens, d_model), fp32 accumulation


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
    block_n: int = 32,
    block_k: int = 128,
) -> torch.Tensor:
    """:func:`prosparse.kernels.reference.predicted_ffn` token by token over the predicted
    neurons only: x (tokens, d_model), mask (tokens, d_ff) -> (tokens, d_model)."""
    check_act(act)
    x, w_gate, w_up, w2t = x.contiguous(), w_gate.contiguous(), w_up.contiguous(), w2t.contiguous()
    tokens, d_model = x.shape
    d_ff = w2t.shape[0]
    out = torch.zeros(tokens, w2t.shape[1], dtype=x.dtype, device=x.device)
    for t in range(tokens):
        idx = mask[t].nonzero().flatten()  # (n,)
        n = idx.numel()
        if n == 0:
            continue
        g = torch.empty(n, dtype=x.dtype, device=x.device)
        u = torch.empty(n, dtype=x.dtype, device=x.device)
        _rows_dot2_kernel[(triton.cdiv(n, block_n),)](
            x[t], w_gate, w_up, idx, g, u, n, d_model, BLOCK_N=block_n, BLOCK_K=block_k)
        if b_gate is not None:
            g = g + b_gate.index_select(0, idx)
        if b_up is not None:
            u = u + b_up.index_select(0, idx)
        x1 = torch.zeros(1, d_ff, dtype=x.dtype, device=x.device)  # (1, d_ff)
        x1[0, idx] = activate(g, act, param) * u
        out[t] = down_step(x1, w2t, idx)[0]
    return out
