"""Triton backend: steps (2) and (3), and the predictor-driven FFN.

Two families of kernels, both loading fp16/bf16/fp32 and accumulating in fp32:

- **Fixed grid, sync-free** (what :mod:`.dispatch` runs): the grid depends only on the shapes
  (d_ff, d_model, tokens), never on how many neurons are active, and each program skips its
  inactive rows in-kernel (their loads are masked off, so their bytes are never read; a block
  with no active row reads none). Nothing waits for a device-to-host copy of an active count,
  so a decode step can be captured in a CUDA graph or run under
  ``torch.compile(mode="reduce-overhead")`` with a static KV cache.

  - step (2) (:func:`up_step_fixed`): one program per (block of ``BLOCK_N`` neurons, token)
    applies the activation to ``g`` (rounded to the input dtype, as the reference does) and
    dots the active rows of W1 with x.
  - step (3) (:func:`down_step_fixed`): each program reduces ``ROWS`` consecutive rows of W2^T
    (those where some token's x1 is non-zero) over a ``BLOCK_D`` slice of d_model into fp32
    partials, summed afterwards: partials rather than atomics keep the result deterministic,
    so greedy decoding is reproducible.
  - the predictor-driven FFN (:func:`predicted_ffn`): the same step (2) grid over the
    predicted rows of W_gate and W_up, then step (3).

- **Compacted lists** (:func:`up_step`, :func:`down_step`: the interface of :mod:`.cpu`): launch
  only over a list of active neurons compacted first (``docs/kernels.md``); the list's length
  sets the grid, so the host must know it.

Importing this module imports triton; :mod:`prosparse.kernels.dispatch` does so only when the
backend is asked for. Under ``TRITON_INTERPRET=1`` (set before this module is imported) the
kernels run on CPU tensors, which is how CI checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prosparse.kernels.activations import ACTS, check_act

_ACT_CODE = {name: code for code, name in enumerate(ACTS)}  # relu, fatrelu, shifted_relu, cats, drelu


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
    elif ACT == 1 or ACT == 4:  # fatrelu; drelu's gate factor
        a = tl.where(g < param, 0.0, g)
    elif ACT == 2:
        d = (g - param).to(g_raw.dtype).to(tl.float32)
        a = tl.where(d < 0, 0.0, d)
    else:  # cats: silu(g) rounded to the dtype, zero where its magnitude is below t
        sg = (g / (1.0 + tl.exp(-g))).to(g_raw.dtype).to(tl.float32)
        a = tl.where(tl.abs(sg) < param, 0.0, sg)
    if ACT == 4:  # drelu: ReLU on the up projection too
        acc = tl.maximum(acc, 0.0)
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


@triton.jit
def _round_like(v, like):
    """fp32 ``v`` rounded to ``like``'s dtype (round to nearest even, as torch rounds), back in
    fp32. bf16 is rounded on the bits: the interpreter's bf16 cast truncates instead. ``v`` is
    made fp32 first: under torch.compile a Python float argument arrives as fp64."""
    v = v.to(tl.float32)
    if like.dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(like.dtype).to(tl.float32)


@triton.jit
def _activate(g_raw, param, ACT: tl.constexpr):
    """act(g) in fp32 from the gate in its own dtype, the scalar first rounded to that dtype
    (as activations.activate rounds it). "Zero where below" keeps a NaN gate NaN."""
    g = g_raw.to(tl.float32)
    p = _round_like(tl.zeros_like(g) + param, g_raw)
    if ACT == 0:
        a = tl.where(g < 0, 0.0, g)
    elif ACT == 1 or ACT == 4:  # fatrelu; drelu's gate factor
        a = tl.where(g < p, 0.0, g)
    elif ACT == 2:
        d = _round_like(g - p, g_raw)
        a = tl.where(d < 0, 0.0, d)
    else:  # cats: silu(g) rounded to the dtype, zero where its magnitude is below t
        sg = _round_like(g / (1.0 + tl.exp(-g)), g_raw)
        a = tl.where(tl.abs(sg) < p, 0.0, sg)
    return a


@triton.jit
def _up_fixed_kernel(
    x_ptr, g_ptr, w1_ptr, out_ptr, d_model, d_ff, param,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs_n < d_ff
    g_raw = tl.load(g_ptr + t * d_ff + offs_n, mask=in_range, other=0.0)
    a = _activate(g_raw, param, ACT)
    on = in_range & (a != 0)  # (BLOCK_N,) the rows of W1 this program reads
    x1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if tl.max(on.to(tl.int32), axis=0) > 0:  # a block with no active neuron reads nothing
        rows = offs_n.to(tl.int64) * d_model
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, d_model, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d_model
            xv = tl.load(x_ptr + t * d_model + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(w1_ptr + rows[:, None] + offs_k[None, :],
                        mask=on[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * xv[None, :], axis=1)
        if ACT == 4:  # drelu: ReLU on the up projection too
            acc = tl.maximum(acc, 0.0)
        x1 = tl.where(on, a * acc, 0.0)
    tl.store(out_ptr + t * d_ff + offs_n, x1.to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _down_fixed_kernel(
    x1_ptr, w2t_ptr, part_ptr, d_model, d_ff, tokens,
    ROWS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_model
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < tokens
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for r0 in range(pid_a * ROWS, pid_a * ROWS + ROWS, BLOCK_A):
        offs_a = r0 + tl.arange(0, BLOCK_A)
        v = tl.load(x1_ptr + offs_t[:, None] * d_ff + offs_a[None, :],
                    mask=mask_t[:, None] & (offs_a[None, :] < d_ff),
                    other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_A)
        on = tl.max((v != 0).to(tl.int32), axis=0) > 0  # (BLOCK_A,) active for some token
        if tl.max(on.to(tl.int32), axis=0) > 0:
            w = tl.load(w2t_ptr + offs_a.to(tl.int64)[:, None] * d_model + offs_d[None, :],
                        mask=on[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(v[:, :, None] * w[None, :, :], axis=1)  # (BLOCK_T, BLOCK_D)
    tl.store(part_ptr + (pid_a * tokens + offs_t[:, None]) * d_model + offs_d[None, :], acc,
             mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _predicted_up_kernel(
    x_ptr, mask_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, out_ptr, d_model, d_ff, param,
    HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs_n < d_ff
    on = in_range & (tl.load(mask_ptr + t * d_ff + offs_n, mask=in_range, other=0) != 0)
    x1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if tl.max(on.to(tl.int32), axis=0) > 0:
        rows = offs_n.to(tl.int64) * d_model
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, d_model, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d_model
            m2 = on[:, None] & mask_k[None, :]
            xv = tl.load(x_ptr + t * d_model + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            off = rows[:, None] + offs_k[None, :]
            acc_g += tl.sum(tl.load(wg_ptr + off, mask=m2, other=0.0).to(tl.float32)
                            * xv[None, :], axis=1)
            acc_u += tl.sum(tl.load(wu_ptr + off, mask=m2, other=0.0).to(tl.float32)
                            * xv[None, :], axis=1)
        dtype = out_ptr.dtype.element_ty
        g = acc_g.to(dtype)  # x Wg^T (+ bg) in the input dtype, as the reference rounds it
        u = acc_u.to(dtype)
        if HAS_BG:
            g = (g.to(tl.float32) + tl.load(bg_ptr + offs_n, mask=on, other=0.0).to(tl.float32)
                 ).to(dtype)
        if HAS_BU:
            u = (u.to(tl.float32) + tl.load(bu_ptr + offs_n, mask=on, other=0.0).to(tl.float32)
                 ).to(dtype)
        uf = u.to(tl.float32)
        if ACT == 4:  # drelu: ReLU on the up projection too
            uf = tl.maximum(uf, 0.0)
        x1 = tl.where(on, _activate(g, param, ACT) * uf, 0.0)
    tl.store(out_ptr + t * d_ff + offs_n, x1.to(out_ptr.dtype.element_ty), mask=in_range)


def up_step_fixed(
    x: torch.Tensor,
    g: torch.Tensor,
    w1: torch.Tensor,
    act: str = "relu",
    param: float = 0.0,
    block_n: int = 2,
    block_k: int = 2048,
    num_warps: int | None = 4,
) -> torch.Tensor:
    """Step (2) on a grid fixed by d_ff, inactive rows skipped in-kernel (no host sync):
    x (tokens, d_model), g (tokens, d_ff) -> x1 (tokens, d_ff). The defaults read the active
    rows fastest on an H200 at LLaMA2-7B shapes (``benchmarks/gpu_kernel_sweep.py``): few rows
    per program, long row segments per load."""
    check_act(act)
    x, g, w1 = x.contiguous(), g.contiguous(), w1.contiguous()
    tokens, d_ff = g.shape
    out = torch.empty(tokens, d_ff, dtype=x.dtype, device=x.device)  # (tokens, d_ff)
    grid = (triton.cdiv(d_ff, block_n), tokens)
    _up_fixed_kernel[grid](x, g, w1, out, x.shape[1], d_ff, float(param), ACT=_ACT_CODE[act],
                           BLOCK_N=block_n, BLOCK_K=block_k, **_warps(num_warps))
    return out


def _warps(num_warps: int | None) -> dict:
    return {} if num_warps is None else {"num_warps": num_warps}


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, splits, n, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = sum over s of part[s, j] in fp32, in a fixed order, stored in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        v = tl.load(part_ptr + offs_s[:, None] * n + offs[None, :],
                    mask=(offs_s[:, None] < splits) & m[None, :], other=0.0)
        acc += tl.sum(v, axis=0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def down_step_fixed(
    x1: torch.Tensor, w2t: torch.Tensor, rows: int = 128, block_a: int = 32, block_d: int = 512,
    num_warps: int | None = 4, fused_sum: bool = False,
) -> torch.Tensor:
    """Step (3) on a grid fixed by (d_ff / rows, d_model / block_d), reading only the rows of
    w2t (d_ff, d_model) where some token's x1 is non-zero (no host sync): (tokens, d_model).
    The per-split fp32 partials are summed by torch, or with ``fused_sum`` by one Triton
    kernel that also casts (one launch instead of two). Defaults: the fastest measured on an
    H200 at LLaMA2-7B shapes (``benchmarks/gpu_kernel_sweep.py``)."""
    if rows % block_a:
        raise ValueError(f"rows ({rows}) must be a multiple of block_a ({block_a})")
    x1, w2t = x1.contiguous(), w2t.contiguous()
    tokens, d_ff = x1.shape
    d_model = w2t.shape[1]
    splits = triton.cdiv(d_ff, rows)
    part = torch.empty(splits, tokens, d_model, dtype=torch.float32, device=x1.device)
    grid = (splits, triton.cdiv(d_model, block_d))
    _down_fixed_kernel[grid](x1, w2t, part, d_model, d_ff, tokens, ROWS=rows, BLOCK_A=block_a,
                             BLOCK_D=block_d, BLOCK_T=triton.next_power_of_2(tokens),
                             **_warps(num_warps))
    if fused_sum:
        out = torch.empty(tokens, d_model, dtype=x1.dtype, device=x1.device)
        n = tokens * d_model
        _sum_splits_kernel[(triton.cdiv(n, 256),)](part, out, splits, n, BLOCK_S=16, BLOCK=256)
        return out
    return part.sum(dim=0).to(x1.dtype)  # (tokens, d_model), fp32 accumulation


def sparse_ffn_fixed(x: torch.Tensor, g: torch.Tensor, w1: torch.Tensor,
                     w2t: torch.Tensor | None, act: str = "relu", param: float = 0.0
                     ) -> torch.Tensor:
    """Steps (2) and (3) sync-free; with ``w2t=None`` returns x1."""
    x1 = up_step_fixed(x, g, w1, act, param)
    return x1 if w2t is None else down_step_fixed(x1, w2t)


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
    block_n: int = 2,
    block_k: int = 2048,
    num_warps: int | None = 4,
) -> torch.Tensor:
    """:func:`prosparse.kernels.reference.predicted_ffn` over each token's predicted neurons
    only, sync-free: x (tokens, d_model), mask (tokens, d_ff) -> (tokens, d_model)."""
    check_act(act)
    x, w_gate, w_up = x.contiguous(), w_gate.contiguous(), w_up.contiguous()
    tokens, d_model = x.shape
    d_ff = w_gate.shape[0]
    x1 = torch.empty(tokens, d_ff, dtype=x.dtype, device=x.device)  # (tokens, d_ff)
    bg = b_gate.contiguous() if b_gate is not None else x1  # any pointer when absent
    bu = b_up.contiguous() if b_up is not None else x1
    grid = (triton.cdiv(d_ff, block_n), tokens)
    _predicted_up_kernel[grid](
        x, mask.contiguous().view(torch.uint8), w_gate, w_up, bg, bu, x1, d_model, d_ff,
        float(param), HAS_BG=b_gate is not None, HAS_BU=b_up is not None, ACT=_ACT_CODE[act],
        BLOCK_N=block_n, BLOCK_K=block_k, **_warps(num_warps))
    return down_step_fixed(x1, w2t)
