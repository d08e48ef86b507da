"""Exact sparse FFN operators: a plain-torch reference, a CPU backend, Triton kernels, dispatch."""

from prosparse.kernels.dispatch import (
    BACKENDS,
    DENSE_BELOW_SPARSITY,
    HAS_CUDA,
    HAS_TRITON,
    MAX_SPARSE_TOKENS,
    down_step,
    resolve_backend,
    sparse_ffn,
    up_step,
)
from prosparse.kernels.reference import ACTS, activate, active_neurons

__all__ = [
    "ACTS",
    "BACKENDS",
    "DENSE_BELOW_SPARSITY",
    "HAS_CUDA",
    "HAS_TRITON",
    "MAX_SPARSE_TOKENS",
    "activate",
    "active_neurons",
    "down_step",
    "resolve_backend",
    "sparse_ffn",
    "up_step",
]
