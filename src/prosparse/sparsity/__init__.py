"""Activation capture and counting, the L1 penalty, Algorithm 1's schedule and the lambda fit.

Measurement on held-out text goes through the one evaluator,
:mod:`prosparse.measure.heldout`; :mod:`.measure` (``prosparse sparsity``) and
:mod:`.threshold` (the threshold sweep) build on it and are imported by their paths.
"""

from prosparse.measure.hooks import ZeroCounter, capture_x1
from prosparse.sparsity.fit import SparsityFit, fit_points, lambda_for_sparsity, sparsity_for_lambda
from prosparse.sparsity.penalty import PenaltyCollector, l1_penalty
from prosparse.sparsity.schedule import (
                                         Stage,
                                         l1_factor,
                                         schedule_curve,
                                         train_threshold,
                                         validate_stages,
)

__all__ = ["PenaltyCollector", "SparsityFit", "Stage", "ZeroCounter", "capture_x1", "fit_points",
           "l1_factor", "l1_penalty", "lambda_for_sparsity", "schedule_curve",
           "sparsity_for_lambda", "train_threshold", "validate_stages"]
