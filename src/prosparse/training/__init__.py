"""ProSparse training: data mixtures, the Accelerate loop, checkpoints/resume, the report."""

from prosparse.training.loop import TrainResult, kd_loss, lr_at, train
from prosparse.training.metrics import read_metrics

__all__ = ["TrainResult", "kd_loss", "lr_at", "read_metrics", "train"]
