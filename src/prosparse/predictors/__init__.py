"""Activation predictors (paper Sec. 3.3, App. C and F): collect pairs, train one MLP per layer,
measure recall and predicted sparsity, export to PowerInfer, and decode with them."""

from prosparse.predictors.collect import (
    PairData,
    collect_pairs,
    effective_gate,
    find_predictor_sites,
)
from prosparse.predictors.decode import (
    PredictedSparseMLP,
    attach_predictors_,
    calibrate_thresholds_,
    decode_benchmark_with_predictors,
    format_predictor_report,
    mean_predicted_sparsity,
    predictor_decode_report,
    teacher_forced,
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
    "PredictedSparseMLP",
    "Predictor",
    "PredictorSet",
    "TrainConfig",
    "attach_predictors_",
    "calibrate_thresholds_",
    "collect_pairs",
    "decode_benchmark_with_predictors",
    "effective_gate",
    "evaluate_predictors",
    "export_powerinfer",
    "find_predictor_sites",
    "format_predictor_report",
    "init_from_gate",
    "load_predictors",
    "mean_predicted_sparsity",
    "predictor_decode_report",
    "save_predictors",
    "teacher_forced",
    "train_predictors",
]
