"""Activation capture, counting and measurement (the L1 penalty and schedule live here too)."""

from prosparse.sparsity.hooks import ZeroCounter, capture_x1
from prosparse.sparsity.measure import DatasetSparsity, measure_blocks, measure_sparsity

__all__ = ["DatasetSparsity", "ZeroCounter", "capture_x1", "measure_blocks", "measure_sparsity"]
