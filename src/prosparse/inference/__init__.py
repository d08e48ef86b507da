"""Exact sparse inference: the drop-in sparse FFN, the in-place swap, decoding and benchmarks."""

from prosparse.inference.sparse_mlp import SparseMLP, sparsify_

__all__ = ["SparseMLP", "sparsify_"]
