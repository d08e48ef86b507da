"""A run's metrics: ``metrics.jsonl`` (always) and TensorBoard events (optional), written by the
main process only; a resumed run drops the lines past its checkpoint and writes them again."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"

class MetricsLog:
    """JSONL (always) and TensorBoard (optional) metrics, on the main process only."""

    def __init__(self, run: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if resume_step and self.path.is_file():
            # Drop lines past the checkpoint so the resumed run's lines replace them.
            keep = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, list) and k.endswith("layer_sparsity"):
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/{i}", x, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]
