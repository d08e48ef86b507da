"""The ground floor: activation math, sparse FFN operators (a plain-torch reference, the best
dense, a CPU backend, Triton kernels) and dispatch. Imports nothing of prosparse above it."""

from prosparse.kernels.activations import ACTS, activate, check_act, fatrelu, shifted_relu
from prosparse.kernels.dispatch import (
    BACKENDS,
    DENSE_BELOW_SPARSITY,
    HAS_CUDA,
    HAS_TRITON,
    MAX_SPARSE_TOKENS,
    down_step,
    predicted_ffn,
    resolve_backend,
    sparse_ffn,
    up_step,
)
from prosparse.kernels.reference import active_neurons

__all__ = [
    "ACTS",
    "BACKENDS",
    "DENSE_BELOW_SPARSITY",
    "HAS_CUDA",
    "HAS_TRITON",
    "MAX_SPARSE_TOKENS",
    "activate",
    "active_neurons",
    "check_act",
    "down_step",
    "fatrelu",
    "predicted_ffn",
    "resolve_backend",
    "shifted_relu",
    "sparse_ffn",
    "up_step",
]
