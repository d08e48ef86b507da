"""Sparse inference: the exact and predictor-driven sparse FFNs, the in-place swaps, decoding
and benchmarks."""

from prosparse.inference.generate import generate
from prosparse.inference.predicted import (
    PredictedSparseMLP,
    attach_predictors_,
    calibrate_thresholds_,
    mean_predicted_sparsity,
    reset_predicted_counts,
)
from prosparse.inference.sparse_mlp import (
    SparseFFN,
    SparseInputLinear,
    SparseMLP,
    sparsify_,
    sparsify_with_restore_,
    swap_ffns_,
)

__all__ = [
    "PredictedSparseMLP",
    "SparseFFN",
    "SparseInputLinear",
    "SparseMLP",
    "attach_predictors_",
    "calibrate_thresholds_",
    "generate",
    "mean_predicted_sparsity",
    "reset_predicted_counts",
    "sparsify_",
    "sparsify_with_restore_",
    "swap_ffns_",
]
