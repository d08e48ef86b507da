"""The activation predictor: one two-layer MLP per FFN layer (paper App. F, after DejaVu).

``fc1``/``fc2`` are PowerInfer's tensor names, so export is a rename-free copy. A neuron is
predicted active when its logit is at least the layer's ``threshold`` (logit space; 0 is the
paper's probability >= 0.5 and PowerInfer's default ``sparse_threshold``).
"""

from __future__ import annotations

import torch
from torch import nn


class Predictor(nn.Module):
    """``d_model -> hidden -> ReLU -> d_ff`` logits, no bias."""

    def __init__(self, d_model: int, d_ff: int, hidden: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # (..., d_ff) logits


class PredictorSet(nn.Module):
    """Every layer's predictor and its decision threshold, in layer order."""

    def __init__(self, d_model: int, d_ff: int, n_layers: int, hidden: int = 1024):
        super().__init__()
        self.d_model, self.d_ff, self.hidden = d_model, d_ff, hidden
        self.layers = nn.ModuleList(Predictor(d_model, d_ff, hidden) for _ in range(n_layers))
        self.register_buffer("thresholds", torch.zeros(n_layers))

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Boolean (..., d_ff): neurons predicted active for residual-stream inputs ``x``."""
        p = self.layers[layer]
        return p(x.to(p.fc1.weight.dtype)) >= self.thresholds[layer]
