"""ProSparse training: data mixtures, the Accelerate loop, checkpoints/resume, the report."""

from prosparse.training.loop import TrainResult, evaluate, kd_loss, lr_at, train

__all__ = ["TrainResult", "evaluate", "kd_loss", "lr_at", "train"]
