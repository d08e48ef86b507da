"""A drop-in sparse gated FFN for decoding, and the in-place verb that swaps it into a model.

:class:`SparseMLP` keeps the Hugging Face child names (``gate_proj``/``up_proj`` or Phi-3's fused
``gate_up_proj``, ``down_proj``, and the activation under its own name), so state dicts keep
their keys and ``model.generate`` runs unchanged. ``from_dense`` prepares the weights once:
``down_proj.weight`` is re-stored as a contiguous W2^T (d_ff, d_model), the layout step (3) reads
row by row, and the parameter becomes its transposed view; the original storage is released,
so memory is not doubled. Prefill (more than ``max_tokens`` tokens) runs the dense formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prosparse.kernels import dispatch
from prosparse.models.activations import activation_params
from prosparse.models.relufy import GatedFFN, find_gated_ffns


class SparseMLP(nn.Module):
    """Gated FFN whose steps (2) and (3) skip inactive neurons (paper Section 3.3)."""

    def __init__(
        self,
        ffn: nn.Module,
        act_attr: str = "act_fn",
        fused: bool = False,
        backend: str | None = None,
        dense_below: float = dispatch.DENSE_BELOW_SPARSITY,
        max_tokens: int = dispatch.MAX_SPARSE_TOKENS,
    ):
        super().__init__()
        act_mod = getattr(ffn, act_attr)
        params = activation_params(act_mod)
        if params is None:
            raise ValueError(
                f"SparseMLP needs a ReLU-family activation, got {type(act_mod).__name__}; "
                "run prosparse.relufy_(model, act='fatrelu', threshold=...) first"
            )
        self.act, self.param = params
        self.act_attr, self.fused = act_attr, fused
        self.backend, self.dense_below, self.max_tokens = backend, dense_below, max_tokens
        if fused:
            self.gate_up_proj = ffn.gate_up_proj
        else:
            self.gate_proj, self.up_proj = ffn.gate_proj, ffn.up_proj
        setattr(self, act_attr, act_mod)
        self.down_proj = ffn.down_proj
        w = self.down_proj.weight
        if not w.t().is_contiguous():
            # W2^T contiguous (d_ff, d_model); the parameter is its (d_model, d_ff) view.
            self.down_proj.weight = nn.Parameter(
                w.detach().t().contiguous().t(), requires_grad=w.requires_grad
            )
        self.d_ff = self.down_proj.weight.shape[1]

    @classmethod
    def from_dense(cls, mlp: nn.Module, **kwargs) -> SparseMLP:
        """Wrap a (ReLUfied) gated FFN, e.g. ``LlamaMLP``; raises on anything else."""
        found = [f for f in find_gated_ffns(nn.ModuleDict({"mlp": mlp})) if f.module is mlp]
        if not found:
            raise ValueError(f"{type(mlp).__name__} is not a gated FFN")
        ffn = found[0]
        return cls(mlp, act_attr=ffn.act_attr, fused=ffn.fused, **kwargs)

    @property
    def w2t(self) -> torch.Tensor:
        """``down_proj.weight.T``, contiguous (d_ff, d_model)."""
        return self.down_proj.weight.t()

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        """Step (1), dense: ``g = x Ws^T`` (tokens, d_ff)."""
        if self.fused:  # Phi-3 stores gate rows first, then up rows
            b = self.gate_up_proj.bias
            return F.linear(x, self.gate_up_proj.weight[: self.d_ff], None if b is None else b[: self.d_ff])
        return self.gate_proj(x)

    def _up(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.fused:
            b = self.gate_up_proj.bias
            return self.gate_up_proj.weight[self.d_ff:], None if b is None else b[self.d_ff:]
        return self.up_proj.weight, self.up_proj.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act_fn = getattr(self, self.act_attr)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, d_model)
        if x2.shape[0] > self.max_tokens:  # prefill: the original module's dense formula
            if self.fused:
                gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(act_fn(gate) * up)
        g = self._gate(x2)  # (tokens, d_ff)
        w1, b1 = self._up()
        kw = dict(backend=self.backend, dense_below=self.dense_below, max_tokens=self.max_tokens)
        if b1 is None:
            y = dispatch.sparse_ffn(x2, g, w1, self.w2t, self.act, self.param, **kw)
        else:  # act(g) * (x W1^T + b1) = x1 + act(g) * b1: still exactly zero where act(g) is
            x1 = dispatch.up_step(x2, g, w1, self.act, self.param, **kw) + act_fn(g) * b1
            y = dispatch.down_step(x1, self.w2t, **kw)
        if self.down_proj.bias is not None:
            y = y + self.down_proj.bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"act={self.act}, param={self.param:g}, backend={self.backend or 'auto'}"


def sparsify_(
    model: nn.Module,
    backend: str | None = None,
    filter: Callable[[GatedFFN], bool] | None = None,
    **kwargs,
) -> list[str]:
    """Swap every (ReLUfied) gated FFN of ``model`` for a :class:`SparseMLP`, in place.

    Returns the names of the FFNs swapped. ``kwargs`` go to :class:`SparseMLP`
    (``dense_below``, ``max_tokens``).
    """
    swapped = []
    for ffn in find_gated_ffns(model):
        if isinstance(ffn.module, SparseMLP) or (filter is not None and not filter(ffn)):
            continue
        new = SparseMLP(ffn.module, act_attr=ffn.act_attr, fused=ffn.fused, backend=backend, **kwargs)
        parent_name, _, child = ffn.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        swapped.append(ffn.name)
    return swapped
