"""Activation predictors (paper Sec. 3.3, App. C and F): collect pairs, train one MLP per layer,
measure recall and predicted sparsity, export to PowerInfer. Decoding with them is
:mod:`prosparse.inference.predicted`'s."""

from prosparse.predictors.collect import (
    PairData,
    collect_pairs,
    effective_gate,
    find_predictor_sites,
)
from prosparse.predictors.export import export_powerinfer, load_predictors, save_predictors
from prosparse.predictors.model import Predictor, PredictorSet
from prosparse.predictors.train import (
    TrainConfig,
    evaluate_predictors,
    init_from_gate,
    train_predictors,
)

__all__ = [
    "PairData",
    "Predictor",
    "PredictorSet",
    "TrainConfig",
    "collect_pairs",
    "effective_gate",
    "evaluate_predictors",
    "export_powerinfer",
    "find_predictor_sites",
    "init_from_gate",
    "load_predictors",
    "save_predictors",
    "train_predictors",
]
