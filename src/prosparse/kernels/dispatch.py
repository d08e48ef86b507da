"""Pick a backend once, fall back to dense where sparsity does not pay, and run steps (2)-(3).

Backends: ``reference`` (plain torch, dense, the truth and the dense fallback), ``cpu``
(:mod:`.cpu`) and ``triton`` (:mod:`.triton`, CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` was set before the first use). ``backend=None`` picks ``triton`` for
CUDA tensors when Triton is installed, ``cpu`` for CPU tensors, ``reference`` otherwise. A
backend asked for by name that cannot run is an error, never a silent fallback.

The dense fallback is a property of the data, not of the backend: when the union of active
neurons over the tokens is denser than ``1 - dense_below`` or there are more than
``max_tokens`` tokens, steps (2) and (3) run dense. Both defaults were measured with
``prosparse bench ops --sparsity 0,0.1,0.2,0.3,0.4,0.5 --batch 1,2,4,8,16`` on 2-core dev
VMs (``benchmarks/results/crossover_cpu_*.json``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from prosparse.kernels import cpu, reference

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("reference", "cpu", "triton")

# Measured on 2-core dev VMs, LLaMA2-7B shapes, 1 thread (benchmarks/results/ops_cpu_*.json,
# crossover_cpu_*.json): steps (2)+(3) together break even with dense at about 50% sparsity
# (bf16 step 2 1.09x, step 3 1.80x at 0.5; step 2 alone crosses at ~0.45). Tokens: at 89.3%
# with independent random active sets, session 1's VM (260 MiB LLC, torch.mv the faster dense)
# still gained 1.07-1.13x at 8 tokens, but this one (32 MiB LLC, F.linear's batched GEMM the
# faster dense) gains 1.33-1.46x at 2 tokens and loses at 4 (0.75-0.93x): 2 is safe on both.
DENSE_BELOW_SPARSITY = 0.5
MAX_SPARSE_TOKENS = 2


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend that will run tensors on ``device``; an unavailable forced backend raises."""
    device = torch.device(device)
    if backend is None or backend == "auto":
        if device.type == "cuda" and HAS_TRITON:
            return "triton"
        return "cpu" if device.type == "cpu" else "reference"
    if backend not in BACKENDS:
        raise KeyError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {device.type}; use backend='auto'")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend 'triton' asked for but triton is not installed; "
                             "pip install 'prosparse[triton]' or use backend='auto'")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(f"backend 'triton' needs CUDA tensors (got {device.type}) or "
                             "TRITON_INTERPRET=1 set before the first call")
    return backend


def _impl(backend: str):
    if backend == "triton":
        from prosparse.kernels import triton as triton_impl

        return triton_impl
    return cpu


def use_dense(n_active: int, d_ff: int, tokens: int, dense_below: float, max_tokens: int) -> bool:
    """True when the union sparsity is under ``dense_below`` or the batch is over ``max_tokens``."""
    return tokens > max_tokens or n_active > (1.0 - dense_below) * d_ff


def up_step(
    x: torch.Tensor,
    g: torch.Tensor,
    w1: torch.Tensor,
    act: str = "relu",
    param: float = 0.0,
    *,
    backend: str | None = None,
    dense_below: float = DENSE_BELOW_SPARSITY,
    max_tokens: int = MAX_SPARSE_TOKENS,
) -> torch.Tensor:
    """Step (2): ``x1 = act(g) * (x W1^T)`` computed for active neurons only.

    x (tokens, d_model), g (tokens, d_ff) the gate pre-activation, w1 = ``up_proj.weight``
    (d_ff, d_model). Exact zeros where ``act(g) == 0``. Set ``dense_below=0, max_tokens`` large
    to force the sparse path (tests and benchmarks do).
    """
    return sparse_ffn(x, g, w1, None, act, param, backend=backend, dense_below=dense_below,
                      max_tokens=max_tokens)


def down_step(
    x1: torch.Tensor,
    w2t: torch.Tensor,
    *,
    backend: str | None = None,
    dense_below: float = DENSE_BELOW_SPARSITY,
    max_tokens: int = MAX_SPARSE_TOKENS,
) -> torch.Tensor:
    """Step (3): ``y = x1 W2^T`` reading only the rows of w2t (d_ff, d_model) where x1 != 0."""
    name = resolve_backend(x1.device, backend)
    idx = reference.active_neurons(x1)
    if name == "reference" or use_dense(idx.numel(), x1.shape[1], x1.shape[0], dense_below,
                                        max_tokens):
        return reference.down_step(x1, w2t)
    return _impl(name).down_step(x1, w2t, idx)


def sparse_ffn(
    x: torch.Tensor,
    g: torch.Tensor,
    w1: torch.Tensor,
    w2t: torch.Tensor | None,
    act: str = "relu",
    param: float = 0.0,
    *,
    backend: str | None = None,
    dense_below: float = DENSE_BELOW_SPARSITY,
    max_tokens: int = MAX_SPARSE_TOKENS,
) -> torch.Tensor:
    """Steps (2) and (3) with one active set: ``y = (act(g) * x W1^T) W2^T`` (tokens, d_model).

    With ``w2t=None`` returns x1 (step 2 only).
    """
    name = resolve_backend(x.device, backend)
    tokens, d_ff = g.shape
    dense = name == "reference" or tokens > max_tokens
    if not dense:
        idx = reference.active_neurons(reference.activate(g, act, param))  # (n_active,)
        dense = use_dense(idx.numel(), d_ff, tokens, dense_below, max_tokens)
    if dense:
        x1 = reference.up_step(x, g, w1, act, param)
        return x1 if w2t is None else reference.down_step(x1, w2t)
    impl = _impl(name)
    x1 = impl.up_step(x, g, w1, idx, act, param)  # (tokens, d_ff)
    return x1 if w2t is None else impl.down_step(x1, w2t, idx)
