"""Predictor quality: paper Table 2's approximate columns and what they leave out.

- recall = true positives / all positives (App. C: truly active neurons predicted active);
- predicted sparsity = 1 - predicted actives / d_ff, averaged over tokens;
- precision = true positives / predicted actives;
- mass missed = sum of |x1| over truly active neurons predicted inactive / sum of |x1|: the share
  of the FFN's intermediate output the approximation drops.

Layers are averaged with equal weight, as the paper averages its per-layer results (Sec. 4.3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from prosparse.core.tables import format_table, pct


@dataclass
class LayerCounts:
    """Raw counts of one layer, summable over batches."""

    tokens: int = 0
    d_ff: int = 0
    positives: int = 0
    predicted: int = 0
    true_positives: int = 0
    mass: float = 0.0
    mass_missed: float = 0.0

    def add(self, predicted: torch.Tensor, labels: torch.Tensor,
            abs_x1: torch.Tensor | None = None) -> None:
        """Count one batch: ``predicted``, ``labels`` bool (tokens, d_ff); optional |x1| for mass
        (the same tokens, or None when the batch has no stored |x1|)."""
        self.tokens += labels.shape[0]
        self.d_ff = labels.shape[1]
        self.positives += int(labels.sum())
        self.predicted += int(predicted.sum())
        self.true_positives += int((predicted & labels).sum())
        if abs_x1 is not None:
            a = abs_x1.float()
            self.mass += float(a.sum())
            self.mass_missed += float(a[~predicted].sum())

    def metrics(self) -> dict:
        cells = max(self.tokens * self.d_ff, 1)
        return {
            "recall": self.true_positives / self.positives if self.positives else 1.0,
            "predicted_sparsity": 1 - self.predicted / cells,
            "true_sparsity": 1 - self.positives / cells,
            "precision": self.true_positives / self.predicted if self.predicted else 1.0,
            "mass_missed": self.mass_missed / self.mass if self.mass else None,
            "counts": asdict(self),
        }


def summarize(layers: list[dict], **extra) -> dict:
    """The JSON of ``prosparse predictors eval``: averages over layers, then the layers."""
    def mean(key):
        vals = [m[key] for m in layers if m.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        **extra,
        "average_recall": mean("recall"),
        "average_predicted_sparsity": mean("predicted_sparsity"),
        "average_true_sparsity": mean("true_sparsity"),
        "average_precision": mean("precision"),
        "average_mass_missed": mean("mass_missed"),
        "layers": layers,
    }


def metrics_table(result: dict) -> str:
    rows = []
    for i, m in enumerate(result["layers"]):
        mass = "-" if m.get("mass_missed") is None else pct(m["mass_missed"])
        rows.append([m.get("layer", i), pct(m["recall"]), pct(m["predicted_sparsity"]), pct(m["true_sparsity"]),
                     pct(m["precision"]), mass, f"{m.get('threshold', 0.0):.3f}"])
    avg_mass = result.get("average_mass_missed")
    rows.append(["avg", pct(result["average_recall"]), pct(result["average_predicted_sparsity"]),
                 pct(result["average_true_sparsity"]), pct(result["average_precision"]),
                 "-" if avg_mass is None else pct(avg_mass), ""])
    return format_table(["layer", "recall %", "pred. sparsity %", "true sparsity %",
                         "precision %", "|x1| missed %", "threshold"], rows)
