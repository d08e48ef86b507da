"""Compiled CPU kernels: the active set, steps (2) and (3) and the predictor-driven FFN as fused
torch ops (``torch.ops.prosparse.active`` / ``up_step`` / ``down_step`` / ``predicted_ffn``,
``csrc/sparse_ffn.cpp``).

The pure-torch kernels of :mod:`.cpu` gather active rows into a scratch buffer and call a dense
product on it; these read each active row in place, once: step (2) is one gather-dot that dots
four active rows per pass over x while it prefetches the next four, step (3) an axpy over the
active rows of W2^T with threads splitting d_model's columns (so results are bit-identical at
any thread count). OpenMP threads follow ``torch.get_num_threads()``; accumulation is fp32;
float32 and bfloat16 only (other dtypes run the pure-torch kernels).

The extension is built on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler
and ninja needed) into ``$PROSPARSE_EXT_DIR`` or ``~/.cache/prosparse/ext-<hash>``, the hash
covering the source, the compile flags, torch and Python, so a later process loads it in
milliseconds. Vector ISA flags come from what the CPU reports (:func:`isa_flags`; AVX-512 where
``avx512f/bw/vl/dq`` are listed, else AVX2 + FMA, else the compiler's baseline);
``PROSPARSE_CPU_ISA=avx512|avx2|generic`` overrides; ``$PROSPARSE_CPU_CFLAGS`` adds compile
flags, e.g. the kernels' tuning knobs (``-DPROSPARSE_UP_ROWS=1``, ``-DPROSPARSE_DOWN_ROWS=8``:
active rows per pass of steps (2) and (3), ``csrc/sparse_ffn.cpp``). When the build or load
fails (no compiler, no ninja, an error), :func:`available` is False, one line says why in the
log, and :mod:`.cpu` runs its pure-torch kernels instead; ``with fused.disabled():`` asks for
those too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from prosparse.kernels.activations import activate

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "sparse_ffn.cpp"
DTYPES = (torch.float32, torch.bfloat16)
ENABLED = True
"""Set False to run :mod:`.cpu`'s pure-torch kernels even when the extension is built."""

NATIVE_ACTS = {"relu": 0, "fatrelu": 1, "shifted_relu": 2}
"""Activations the kernels compute themselves (enum Act of csrc/sparse_ffn.cpp); step (2)
takes any other as ``act(g)`` computed by torch, the predictor-driven FFN runs in torch."""
_PRE_ACTIVATED = 3  # the kernel's g already holds act(g)
_state: dict = {}  # "ok": bool once tried; "reason": why not; "path": the loaded library


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "neon", "sve")
"""The CPU features that change kernel and training speed (recorded in benchmark JSON)."""


def cpu_isa() -> list[str]:
    """The speed-relevant features of this CPU (``ISA_FLAGS`` it has, in that order): two
    2-core VMs of one cloud may differ here (AVX2 only, or AVX-512 with BF16), and with them
    every kernel ratio and the best training dtype, so every benchmark JSON records them."""
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags or (f == "neon" and "asimd" in flags)]


def isa_flags(isa: str | None = None) -> list[str]:
    """Compiler flags for the vector ISA: ``isa`` or ``$PROSPARSE_CPU_ISA``, else the best the
    CPU reports (``avx512``, ``avx2`` or ``generic``)."""
    isa = isa or os.environ.get("PROSPARSE_CPU_ISA")
    if isa is None:
        flags = cpu_flags()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isa = "avx512"
        elif {"avx2", "fma", "f16c"} <= flags:
            isa = "avx2"
        else:
            isa = "generic"
    table = {
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                   "-mf16c"],
        "avx2": ["-mavx2", "-mfma", "-mf16c"],
        "generic": [],
    }
    if isa not in table:
        raise KeyError(f"unknown PROSPARSE_CPU_ISA {isa!r}; choose one of {', '.join(table)}")
    return table[isa]


def build_dir(key: str) -> Path:
    root = os.environ.get("PROSPARSE_EXT_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "prosparse")
    return Path(root) / f"ext-{key}"


def compile_flags() -> list[str]:
    """The extension's compile flags: optimisation, OpenMP, :func:`isa_flags`, then
    ``$PROSPARSE_CPU_CFLAGS`` (split as a shell would)."""
    extra = shlex.split(os.environ.get("PROSPARSE_CPU_CFLAGS", ""))
    return ["-O3", "-fopenmp", "-DNDEBUG", *isa_flags(), *extra]


def _build() -> str:
    """Compile (or find the cached build of) the extension and load its ops; returns the path."""
    from torch.utils import cpp_extension

    cflags = compile_flags()
    key = hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), " ".join(cflags).encode(), torch.__version__.encode(),
        sys.version.encode(), platform.machine().encode(),
    ])).hexdigest()[:16]
    where = build_dir(key)
    where.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name=f"prosparse_fused_{key}", sources=[str(SOURCE)], extra_cflags=cflags,
        extra_ldflags=["-fopenmp"], build_directory=str(where), is_python_module=False,
        verbose=False,
    )
    return str(path)


def available() -> bool:
    """True once the extension is built and loaded; the first call builds it (or finds the
    cached build). A failure is logged once, then this stays False."""
    if "ok" not in _state:
        try:
            _state["path"] = _build()
            _state["ok"] = True
        except Exception as e:  # no compiler, no ninja, a compile or load error: all fall back
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
            why = lines[0][:160] + (f" ... {lines[-1][:160]}" if len(lines) > 1 else "")
            _state.update(ok=False, reason=f"{type(e).__name__}: {why}")
            log.warning("prosparse: compiled CPU kernels unavailable (%s); using the pure-torch "
                        "kernels", _state["reason"])
    return _state["ok"]


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not tried)."""
    return _state.get("reason")


def usable(*tensors: torch.Tensor | None) -> bool:
    """True when :data:`ENABLED`, the extension loads, and every tensor is a CPU float32 or
    bfloat16 tensor whose rows are contiguous: what the fused ops take."""
    if not ENABLED:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype not in DTYPES or (t.dim() == 2 and t.stride(1) != 1):
            return False
    return available()


@contextmanager
def disabled() -> Iterator[None]:
    """Run :mod:`.cpu`'s pure-torch kernels inside this block (benchmarks, tests)."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


@lru_cache(maxsize=256)  # a torch.tensor per call costs microseconds on every decode step
def _rounded(param: float, dtype: torch.dtype) -> float:
    # The activation's scalar rounded to the input dtype first, as activations.activate does.
    return float(torch.tensor(float(param), dtype=dtype))


def active_neurons(g: torch.Tensor, act: str | None = "relu", param: float = 0.0
                   ) -> torch.Tensor:
    """``reference.active_neurons(activate(g, act, param))`` in one pass: the sorted union over
    the tokens of g (tokens, d_ff) of the neurons with ``act(g) != 0``. ``act=None``: g already
    holds the activations (x1 in step (3)). ``act`` must be one of :data:`NATIVE_ACTS` or None."""
    if act is None:
        return torch.ops.prosparse.active(g, _PRE_ACTIVATED, 0.0)
    return torch.ops.prosparse.active(g, NATIVE_ACTS[act], _rounded(param, g.dtype))


def up_step(x: torch.Tensor, g: torch.Tensor, w1: torch.Tensor, idx: torch.Tensor,
            act: str = "relu", param: float = 0.0) -> torch.Tensor:
    """Step (2) over the active neurons ``idx``: x (tokens, d_model), g (tokens, d_ff) ->
    x1 (tokens, d_ff), exact zeros where ``act(g) == 0``."""
    if act in NATIVE_ACTS:
        return torch.ops.prosparse.up_step(x, g, w1, idx, NATIVE_ACTS[act],
                                           _rounded(param, g.dtype))
    return torch.ops.prosparse.up_step(x, activate(g, act, param), w1, idx, _PRE_ACTIVATED, 0.0)


def down_step(x1: torch.Tensor, w2t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Step (3) reading only rows ``idx`` of w2t (d_ff, d_model): (tokens, d_model)."""
    return torch.ops.prosparse.down_step(x1, w2t, idx)


def predicted_ffn(x: torch.Tensor, mask: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w2t: torch.Tensor, act: str = "relu", param: float = 0.0,
                  b_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """:func:`.reference.predicted_ffn` over each token's predicted neurons only; W2^T rows
    are read only where x1 is non-zero. ``act`` must be one of :data:`NATIVE_ACTS`."""
    return torch.ops.prosparse.predicted_ffn(x, mask, w_gate, w_up, w2t, NATIVE_ACTS[act],
                                             _rounded(param, x.dtype), b_gate, b_up)
