"""Activation predictors (paper Sec. 3.3, App. C and F): collect pairs, train one MLP per layer,
measure recall and predicted sparsity, export to PowerInfer, and decode with them."""

from prosparse.predictors.collect import PairData, collect_pairs, find_predictor_sites
from prosparse.predictors.decode import (
    PredictedSparseMLP,
    attach_predictors_,
    decode_benchmark_with_predictors,
    format_predictor_report,
    predictor_decode_report,
)
from prosparse.predictors.export import export_powerinfer, load_predictors, save_predictors
from prosparse.predictors.model import Predictor, PredictorSet
from prosparse.predictors.train import TrainConfig, evaluate_predictors, train_predictors

__all__ = [
    "PairData",
    "PredictedSparseMLP",
    "Predictor",
    "PredictorSet",
    "TrainConfig",
    "attach_predictors_",
    "collect_pairs",
    "decode_benchmark_with_predictors",
    "evaluate_predictors",
    "export_powerinfer",
    "find_predictor_sites",
    "format_predictor_report",
    "load_predictors",
    "predictor_decode_report",
    "save_predictors",
    "train_predictors",
]
