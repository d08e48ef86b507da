"""Deployment: a prosparse model and its predictors, made ready for the engines people run ReLU
LLMs in (PowerInfer), with the function the engine will compute measured, not assumed."""

from prosparse.export.powerinfer import (
    PowerInferExport,
    export_powerinfer_dir,
    powerinfer_function,
    stride_blocks,
    write_checkpoint,
)

__all__ = [
    "PowerInferExport",
    "export_powerinfer_dir",
    "powerinfer_function",
    "stride_blocks",
    "write_checkpoint",
]
