"""The sparse FFN modules for decoding, and the in-place verbs that swap them into a model.

:class:`SparseFFN` is what every sparse FFN shares: it keeps the Hugging Face child names
(``gate_proj``/``up_proj`` or Phi-3's fused ``gate_up_proj``, ``down_proj``, and the activation
under its own name), so state dicts keep their keys and ``model.generate`` runs unchanged. It
prepares the weights once: ``down_proj.weight`` is re-stored as a contiguous W2^T (d_ff,
d_model), the layout the sparse down product reads row by row, and the parameter becomes its
transposed view; the original storage is released, so memory is not doubled.

- :class:`SparseMLP` (exact, paper Section 3.3 "accurate acceleration"): steps (2) and (3)
  skip the neurons whose activation is zero.
- :class:`~prosparse.inference.predicted.PredictedSparseMLP` (approximate): a predictor picks
  the neurons and every step runs over them only.

:func:`swap_ffns_` puts a module built from each :class:`~prosparse.models.GatedFFN` in its
place and returns ``restore()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prosparse.kernels import dispatch
from prosparse.models.activations import activation_params, ffn_activation
from prosparse.models.relufy import GatedFFN, find_gated_ffns
from prosparse.models.teal import teal_linears, teal_mask


class SparseFFN(nn.Module):
    """A gated FFN's children and weights in the layout the sparse products read."""

    def __init__(self, ffn: nn.Module, act_attr: str = "act_fn", fused: bool = False,
                 backend: str | None = None):
        super().__init__()
        act_mod = getattr(ffn, act_attr)
        if activation_params(act_mod) is None:
            raise ValueError(
                f"{type(self).__name__} needs a ReLU-family activation, got "
                f"{type(act_mod).__name__}; run prosparse.relufy_(model, 'fatrelu', t) first"
            )
        self.act_attr, self.fused, self.backend = act_attr, fused, backend
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
    def from_dense(cls, mlp: nn.Module, **kwargs):
        """Wrap a (ReLUfied) gated FFN, e.g. ``LlamaMLP``; raises on anything else."""
        found = [f for f in find_gated_ffns(nn.ModuleDict({"mlp": mlp})) if f.module is mlp]
        if not found:
            raise ValueError(f"{type(mlp).__name__} is not a gated FFN")
        ffn = found[0]
        return cls(mlp, act_attr=ffn.act_attr, fused=ffn.fused, **kwargs)

    @property
    def activation(self) -> tuple[str, float]:
        """``(name, param)`` of the activation module this FFN holds, read at every call: the
        module is the threshold's one home, so ``relufy_`` (or threshold-aware training, or a
        sweep) moving it after the swap is what the next forward uses."""
        params = ffn_activation(self, self.act_attr)
        if params is None:
            raise ValueError(f"{type(self).__name__} holds a {type(getattr(self, self.act_attr)).__name__} "
                             "activation; the sparse FFN needs a ReLU-family one (relufy_)")
        return params

    @property
    def w2t(self) -> torch.Tensor:
        """``down_proj.weight.T``, contiguous (d_ff, d_model)."""
        return self.down_proj.weight.t()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                               torch.Tensor | None]:
        """``(W_gate, W_up, b_gate, b_up)``, each weight (d_ff, d_model); for a fused
        ``gate_up_proj`` its row halves (Phi-3 stores gate rows first, then up rows)."""
        if self.fused:
            w, b = self.gate_up_proj.weight, self.gate_up_proj.bias
            return (w[: self.d_ff], w[self.d_ff:], None if b is None else b[: self.d_ff],
                    None if b is None else b[self.d_ff:])
        return self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias, self.up_proj.bias

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both dense projections, as the original module computes them."""
        if self.fused:
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
            return g, u
        return self.gate_proj(x), self.up_proj(x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The original module's formula (prefill)."""
        g, u = self.gate_up(x)
        return self.down_proj(getattr(self, self.act_attr)(g) * u)


def swap_ffns_(model: nn.Module, build: Callable[[GatedFFN], nn.Module],
               filter: Callable[[GatedFFN], bool] | None = None
               ) -> tuple[list[str], Callable[[], None]]:
    """Replace every gated FFN of ``model`` (that ``filter`` keeps) by ``build(ffn)``, in place.

    Returns the names swapped and ``restore()``, which puts the original modules back with
    ``down_proj.weight`` contiguous again (the layout a dense model stores).
    """
    swapped, names = [], []
    for ffn in find_gated_ffns(model):
        if isinstance(ffn.module, SparseFFN) or (filter is not None and not filter(ffn)):
            continue
        new = build(ffn)
        parent_name, _, child = ffn.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        swapped.append((parent, child, ffn.module))
        names.append(ffn.name)

    def restore() -> None:
        for parent, child, original in swapped:
            # The activation moves with the FFN: whatever the swapped module holds now (relufy_
            # may have changed it since) is what the original gets back.
            current = getattr(parent, child)
            attr = getattr(current, "act_attr", None)
            if attr is not None and hasattr(original, attr):
                setattr(original, attr, getattr(current, attr))
            setattr(parent, child, original)
            w = original.down_proj.weight
            if not w.is_contiguous():
                original.down_proj.weight = nn.Parameter(w.detach().contiguous(),
                                                         requires_grad=w.requires_grad)

    return names, restore


class SparseMLP(SparseFFN):
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
        super().__init__(ffn, act_attr, fused, backend)
        self.dense_below, self.max_tokens = dense_below, max_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, d_model)
        if x2.shape[0] > self.max_tokens:  # prefill: the original module's dense formula
            return self.dense(x)
        w_gate, w1, b_gate, b1 = self.weights()
        act, param = self.activation
        g = F.linear(x2, w_gate, b_gate)  # step (1), dense: (tokens, d_ff)
        kw = dict(backend=self.backend, dense_below=self.dense_below, max_tokens=self.max_tokens)
        if b1 is None:
            y = dispatch.sparse_ffn(x2, g, w1, self.w2t, act, param, **kw)
        elif act == "drelu":  # relu(x W1^T + b1) does not split off the bias
            raise ValueError("a dReLU FFN with an up_proj bias has no sparse path; "
                             "run it dense")
        else:  # act(g) * (x W1^T + b1) = x1 + act(g) * b1: still exactly zero where act(g) is
            a = getattr(self, self.act_attr)(g)
            x1 = dispatch.up_step(x2, g, w1, act, param, **kw) + a * b1
            y = dispatch.down_step(x1, self.w2t, **kw)
        if self.down_proj.bias is not None:
            y = y + self.down_proj.bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        act, param = self.activation
        return f"act={act}, param={param:g}, backend={self.backend or 'auto'}"


class SparseInputLinear(nn.Module):
    """A :class:`~prosparse.models.teal.TEALLinear` for decoding: up to ``max_tokens`` tokens,
    ``y = x_masked W^T + b`` reads only the columns of W (rows of W^T) whose input entry is
    non-zero, which is step (3)'s input-side sparse operator (:func:`dispatch.down_step`).
    ``weight`` is re-stored as a contiguous W^T with the parameter its transposed view, and
    keeps its name, so state dicts keep their keys."""

    def __init__(self, linear: nn.Module, backend: str | None = None,
                 dense_below: float = dispatch.DENSE_BELOW_SPARSITY,
                 max_tokens: int = dispatch.MAX_SPARSE_TOKENS):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.threshold = float(linear.threshold)
        w = linear.weight
        self.weight = (w if w.t().is_contiguous() else
                       nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad))
        self.bias = linear.bias
        self.backend, self.dense_below, self.max_tokens = backend, dense_below, max_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xm = teal_mask(x, self.threshold)
        x2 = xm.reshape(-1, self.in_features)  # (tokens, in)
        if x2.shape[0] > self.max_tokens:
            return F.linear(xm, self.weight, self.bias)
        y = dispatch.down_step(x2, self.weight.t(), backend=self.backend,
                               dense_below=self.dense_below, max_tokens=self.max_tokens)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.threshold:g}, backend={self.backend or 'auto'}")


def sparsify_(
    model: nn.Module,
    backend: str | None = None,
    filter: Callable[[GatedFFN], bool] | None = None,
    **kwargs,
) -> list[str]:
    """Swap every (ReLU-family) gated FFN of ``model`` for a :class:`SparseMLP`, and every TEAL
    linear for a :class:`SparseInputLinear`, in place.

    Returns the names swapped. ``kwargs`` go to both (``dense_below``, ``max_tokens``). In a
    TEAL model the FFNs keep their SiLU (their linears are the sparse ones); anywhere else a
    gated FFN without a ReLU-family activation is an error.
    """
    return sparsify_with_restore_(model, backend, filter, **kwargs)[0]


def sparsify_with_restore_(
    model: nn.Module,
    backend: str | None = None,
    filter: Callable[[GatedFFN], bool] | None = None,
    **kwargs,
) -> tuple[list[str], Callable[[], None]]:
    """:func:`sparsify_`, also returning ``restore()``, which puts the dense modules back (the
    layout a dense model stores), as :func:`swap_ffns_` does."""
    names, linears = [], []
    for name, lin in teal_linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseInputLinear(lin, backend=backend, **kwargs))
        names.append(name)
        linears.append((parent, child, lin))
    teal = bool(names)

    def keep(f: GatedFFN) -> bool:
        if teal and activation_params(f.act) is None:
            return False
        return filter is None or filter(f)

    swapped, restore_ffns = swap_ffns_(
        model, lambda f: SparseMLP(f.module, act_attr=f.act_attr, fused=f.fused,
                                   backend=backend, **kwargs), keep)

    def restore() -> None:
        restore_ffns()
        for parent, child, lin in linears:
            setattr(parent, child, lin)

    return names + swapped, restore
