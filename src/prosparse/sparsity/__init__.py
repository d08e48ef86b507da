"""Activation capture, counting and measurement (the L1 penalty and schedule live here too)."""

from prosparse.sparsity.fit import SparsityFit, fit_points, lambda_for_sparsity, sparsity_for_lambda
from prosparse.sparsity.hooks import ZeroCounter, capture_x1
from prosparse.sparsity.measure import DatasetSparsity, measure_blocks, measure_sparsity
from prosparse.sparsity.penalty import PenaltyCollector, l1_penalty
from prosparse.sparsity.schedule import Stage, l1_factor, schedule_curve, validate_stages

__all__ = ["DatasetSparsity", "PenaltyCollector", "SparsityFit", "Stage", "ZeroCounter",
           "capture_x1", "fit_points", "l1_factor", "l1_penalty", "lambda_for_sparsity",
           "measure_blocks", "measure_sparsity", "schedule_curve", "sparsity_for_lambda",
           "validate_stages"]
