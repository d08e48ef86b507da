"""Pick a backend once, fall back to dense where sparsity does not pay, and run steps (2)-(3)
or the predictor-driven FFN.

Backends: ``reference`` (plain torch, dense, the truth), ``cpu`` (:mod:`.cpu`: the compiled
kernels of :mod:`.fused` where they build, its pure-torch twin otherwise), ``fused``
(:mod:`.fused` only) and ``triton`` (:mod:`.triton`, CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` was set before the first use). ``backend=None`` picks ``triton`` for
CUDA tensors when Triton is installed, ``cpu`` for CPU tensors, ``reference`` otherwise. A
backend asked for by name that cannot run is an error, never a silent fallback.

The dense fallback is a property of the data, not of the backend: when the union of active
neurons over the tokens is denser than ``1 - dense_below`` or there are more than
``max_tokens`` tokens, steps (2) and (3) run dense (:mod:`.dense`, the fastest dense product
of the machine). Both defaults were measured with
``prosparse bench ops --target-sparsity 0,0.1,0.2,0.3,0.4,0.5 --batch-size 1,2,4,8,16``
(``benchmarks/results/crossover_cpu_*.json``).

On ``triton`` the steps run sync-free (:func:`.triton.up_step_fixed`, a grid fixed by the
shapes that skips inactive rows in-kernel): no active list is compacted and the data-driven
dense fallback does not apply (the host would have to wait for the active count; at sparsity 0
the fixed grid reads every row, as dense does), so a decode step can be captured in a CUDA
graph. Only the token count, a shape, still sends a call to dense.

Every entry point checks shapes, dtypes and devices first (:func:`check_ffn_args`): a
mismatch is a ``ValueError`` naming the tensors, never an out-of-bounds read in a kernel.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from prosparse.kernels import cpu, dense, fused, reference
from prosparse.kernels.activations import activate, check_act

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("reference", "cpu", "triton", "fused")

# Crossovers at LLaMA2-7B shapes, 1 thread (benchmarks/results/crossover_cpu_*.json): steps
# (2)+(3) together break even with dense at about 50% sparsity (step 2 alone at ~0.45). With
# independent random active sets per token the union grows with the batch: at 89.3% two tokens
# still gain, four lose against a batched GEMM (docs/kernels.md).
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
    if backend in ("cpu", "fused") and device.type != "cpu":
        raise ValueError(f"backend {backend!r} needs CPU tensors, got {device.type}; "
                         "use backend='auto'")
    if backend == "fused" and not fused.available():
        raise ValueError(f"backend 'fused' asked for but the compiled CPU kernels did not "
                         f"build ({fused.unavailable_reason()}); use backend='cpu'")
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
    return fused if backend == "fused" else cpu


def check_ffn_args(x: torch.Tensor, g: torch.Tensor | None, *weights: torch.Tensor | None,
                   names: tuple[str, ...] = ("w1", "w2t")) -> None:
    """Shapes, dtypes and devices of a sparse FFN call: x (tokens, d_model), g (tokens, d_ff)
    and each weight (d_ff, d_model), all of one dtype on one device. Raises ``ValueError``."""
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, d_model), got shape {tuple(x.shape)}")
    tokens, d_model = x.shape
    d_ff = None if g is None else g.shape[-1]
    if g is not None and (g.dim() != 2 or g.shape[0] != tokens):
        raise ValueError(f"g must be (tokens={tokens}, d_ff), got shape {tuple(g.shape)}")
    for name, w in zip(names, weights):
        if w is None:
            continue
        if w.dim() != 2 or w.shape[1] != d_model or (d_ff is not None and w.shape[0] != d_ff):
            want = f"({'d_ff' if d_ff is None else d_ff}, {d_model})"
            raise ValueError(f"{name} must be {want} for x of width {d_model}"
                             + ("" if d_ff is None else f" and g of width {d_ff}")
                             + f", got shape {tuple(w.shape)}")
        d_ff = w.shape[0]
    for name, t in (("g", g), *zip(names, weights)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} but x is {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to "
                             "one device")


def active_set(name: str, g: torch.Tensor, act: str | None = "relu", param: float = 0.0
               ) -> torch.Tensor:
    """The sorted union over tokens of the neurons with ``act(g) != 0`` (``act=None``: g holds
    the activations already): one pass of the compiled kernels where the CPU backend runs them,
    :func:`.reference.active_neurons` of :func:`.activate` otherwise."""
    if name in ("cpu", "fused") and (act is None or act in fused.NATIVE_ACTS) and fused.usable(g):
        return fused.active_neurons(g, act, param)
    return reference.active_neurons(g if act is None else activate(g, act, param))


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
    if x1.dim() != 2 or w2t.dim() != 2 or w2t.shape[0] != x1.shape[1]:
        raise ValueError(f"x1 (tokens, d_ff) and w2t (d_ff, d_model) disagree: shapes "
                         f"{tuple(x1.shape)} and {tuple(w2t.shape)}")
    if (w2t.dtype, w2t.device) != (x1.dtype, x1.device):
        raise ValueError(f"w2t is {w2t.dtype} on {w2t.device} but x1 is {x1.dtype} on "
                         f"{x1.device}; cast and move them to one dtype and device")
    name = resolve_backend(x1.device, backend)
    if name == "reference":
        return reference.down_step(x1, w2t)
    if name == "triton" and x1.shape[0] <= max_tokens:
        return _impl(name).down_step_fixed(x1, w2t)  # sync-free
    idx = active_set(name, x1, None)
    if use_dense(idx.numel(), x1.shape[1], x1.shape[0], dense_below, max_tokens):
        return dense.down_step(x1, w2t)
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
    check_act(act)
    check_ffn_args(x, g, w1, w2t)
    name = resolve_backend(x.device, backend)
    if name == "reference":
        x1 = reference.up_step(x, g, w1, act, param)
        return x1 if w2t is None else reference.down_step(x1, w2t)
    tokens, d_ff = g.shape
    run_dense = tokens > max_tokens
    if name == "triton" and not run_dense:
        return _impl(name).sparse_ffn_fixed(x, g, w1, w2t, act, param)  # sync-free
    if not run_dense:
        idx = active_set(name, g, act, param)  # (n_active,)
        run_dense = use_dense(idx.numel(), d_ff, tokens, dense_below, max_tokens)
    if run_dense:
        x1 = dense.up_step(x, g, w1, act, param)
        return x1 if w2t is None else dense.down_step(x1, w2t)
    impl = _impl(name)
    x1 = impl.up_step(x, g, w1, idx, act, param)  # (tokens, d_ff)
    return x1 if w2t is None else impl.down_step(x1, w2t, idx)


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
    *,
    backend: str | None = None,
    max_tokens: int = 1,
) -> torch.Tensor:
    """The predictor-driven FFN: ``(mask * act(x Wg^T + bg) * (x Wu^T + bu)) W2^T``.

    x (tokens, d_model), mask (tokens, d_ff) bool, w_gate / w_up / w2t (d_ff, d_model). Up to
    ``max_tokens`` tokens read only the predicted rows of every matrix, each token its own;
    more tokens (prefill, perplexity) run :func:`.reference.predicted_ffn`, which gives the
    same values.
    """
    check_act(act)
    check_ffn_args(x, None, w_gate, w_up, w2t, names=("w_gate", "w_up", "w2t"))
    if mask.dtype != torch.bool or mask.shape != (x.shape[0], w_gate.shape[0]):
        raise ValueError(f"mask must be bool (tokens={x.shape[0]}, d_ff={w_gate.shape[0]}), got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    name = resolve_backend(x.device, backend)
    if name == "reference" or x.shape[0] > max_tokens:
        return reference.predicted_ffn(x, mask, w_gate, w_up, w2t, act, param, b_gate, b_up)
    return _impl(name).predicted_ffn(x, mask, w_gate, w_up, w2t, act, param, b_gate, b_up)
