"""Approximate sparse decoding: a predictor picks the neurons, and the gate, up and down
products run only over them (paper Section 3.3, Appendix C; PowerInfer's scheme).

:class:`PredictedSparseMLP` is a :class:`~prosparse.inference.sparse_mlp.SparseFFN` plus
``predictor``. Its input is the FFN input (after the norm); the predictor's input, the residual
stream *before* that norm, is handed over by a forward pre-hook on the norm that
:func:`attach_predictors_` registers (post-norm layers such as OLMo 2's have no such norm:
their FFN input is the residual stream, and the predictor reads it directly). The products run
through :func:`prosparse.kernels.dispatch.predicted_ffn`: one token (decode) reads only the
predicted rows of every matrix; more tokens (prefill, perplexity) take its reference twin, the
dense formula with x1 masked by the prediction. Both compute ``down(mask * act(gate(x)) *
up(x))``, so a neuron predicted inactive contributes nothing and one predicted active but truly
inactive costs time, not accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from prosparse.inference.sparse_mlp import SparseFFN, swap_ffns_
from prosparse.kernels import dispatch
from prosparse.models.relufy import find_gated_ffns
from prosparse.predictors.collect import find_predictor_sites
from prosparse.predictors.model import Predictor, PredictorSet


class PredictedSparseMLP(SparseFFN):
    """A gated FFN computing only the neurons its predictor calls active."""

    def __init__(self, mlp: nn.Module, predictor: Predictor, threshold: float,
                 act_attr: str = "act_fn", fused: bool = False, max_tokens: int = 1,
                 backend: str | None = None):
        super().__init__(mlp, act_attr, fused, backend)
        self.max_tokens = max_tokens
        self.predictor = predictor
        self.threshold = float(threshold)
        self._residual: torch.Tensor | None = None
        self.reads_input = False  # True: the predictor reads this FFN's own input (post-norm)
        # Statistics kept on the device, so a decode step never waits for the host and a CUDA
        # graph's replays count too: [neurons predicted active summed over tokens, tokens].
        self.register_buffer("counts", torch.zeros(2, dtype=torch.long,
                                                   device=self.down_proj.weight.device),
                             persistent=False)

    @property
    def predicted_active(self) -> int:
        """Neurons predicted active, summed over tokens, since the last reset."""
        return int(self.counts[0])

    @property
    def tokens(self) -> int:
        """Tokens seen since the last reset."""
        return int(self.counts[1])

    def set_residual(self, r: torch.Tensor) -> None:
        self._residual = r

    def predictor_input(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's input for FFN input ``x``: the residual handed over by the norm's
        hook, or ``x`` itself in post-norm layers."""
        r = x if self.reads_input else self._residual
        if r is None:
            raise RuntimeError("PredictedSparseMLP got no residual input: attach it with "
                               "prosparse.inference.attach_predictors_(model, predictors)")
        return r

    def logits(self, r: torch.Tensor) -> torch.Tensor:
        """Predictor logits (tokens, d_ff) for residual inputs (..., d_model)."""
        return self.predictor(r.reshape(-1, r.shape[-1]).to(self.predictor.fc1.weight.dtype))

    def predict(self, r: torch.Tensor) -> torch.Tensor:
        """Boolean (tokens, d_ff) predicted-active mask from residual inputs (..., d_model)."""
        return self.logits(r) >= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, self._residual = self.predictor_input(x), None
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, d_model)
        mask = self.predict(r)  # (tokens, d_ff)
        self.counts[0].add_(mask.sum())
        self.counts[1].add_(mask.shape[0])
        w_gate, w_up, b_gate, b_up = self.weights()
        act, param = self.activation
        y = dispatch.predicted_ffn(x2, mask, w_gate, w_up, self.w2t, act, param,
                                   b_gate, b_up, backend=self.backend,
                                   max_tokens=self.max_tokens)  # (tokens, d_model)
        if self.down_proj.bias is not None:
            y = y + self.down_proj.bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, max_tokens={self.max_tokens}"


def attach_predictors_(model: nn.Module, predictors: PredictorSet, max_tokens: int = 1,
                       backend: str | None = None) -> Callable[[], None]:
    """Swap every gated FFN of ``model`` for a :class:`PredictedSparseMLP` driven by its layer's
    predictor (cast to the model's dtype), in place. Returns ``restore()``, which puts the
    original modules back and removes the hooks."""
    sites = find_predictor_sites(model)
    ffns = find_gated_ffns(model)
    if len(sites) != len(predictors):
        raise ValueError(f"the model has {len(sites)} gated FFNs but the predictors have "
                         f"{len(predictors)} layers")
    d_ff = ffns[0].down_proj.in_features
    d_model = ffns[0].down_proj.out_features
    if (predictors.d_model, predictors.d_ff) != (d_model, d_ff):
        raise ValueError(f"predictors are for d_model {predictors.d_model}, d_ff "
                         f"{predictors.d_ff}; the model has d_model {d_model}, d_ff {d_ff}")
    param = next(model.parameters())
    site_of = {site.mlp_name: site for site in sites}
    handles = []

    def build(ffn) -> PredictedSparseMLP:
        site = site_of[ffn.name]
        thr = float(predictors.thresholds[site.layer])
        if not math.isfinite(thr):
            raise ValueError(f"layer {site.layer} has no trained predictor (threshold {thr})")
        pred = Predictor(d_model, d_ff, predictors.hidden)
        pred.load_state_dict(predictors.layers[site.layer].state_dict())
        pred = pred.to(device=param.device, dtype=param.dtype).eval()
        new = PredictedSparseMLP(ffn.module, pred, thr, ffn.act_attr, ffn.fused, max_tokens,
                                 backend)
        if site.norm is None:  # post-norm layer: the FFN input is the residual stream
            new.reads_input = True
        else:
            handles.append(site.norm.register_forward_pre_hook(
                lambda _m, args, _new=new: _new.set_residual(args[0])))
        return new

    try:
        _, restore_modules = swap_ffns_(model, build)
    except BaseException:
        for h in handles:
            h.remove()
        raise

    def restore() -> None:
        for h in handles:
            h.remove()
        restore_modules()

    return restore


@torch.no_grad()
def calibrate_thresholds_(model: nn.Module, predictors: PredictorSet, input_ids: torch.Tensor,
                          sparsity: float) -> list[float]:
    """Set each layer's threshold to the ``sparsity`` quantile of its predictor's logits on
    ``input_ids`` (1, n), so the predictors call about ``1 - sparsity`` of the neurons active.

    One forward pass with the predictors attached: each layer's threshold is set just before
    that layer masks its FFN, so it sees the residual stream the predicted FFNs before it
    produce, as in predictor-driven decoding. For timing only: it fixes how much work the
    predictor-driven FFN does, not whether the neurons it picks are the right ones.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity ({sparsity}) must be in [0, 1), e.g. 0.7875")
    predictors.thresholds.fill_(-1e30)  # finite, so attach_predictors_ accepts it
    restore = attach_predictors_(model, predictors)

    def set_threshold(layer: int, m: PredictedSparseMLP, args) -> None:
        logits = m.logits(m.predictor_input(args[0])).float().flatten()
        k = min(max(1, round(sparsity * logits.numel())), logits.numel())
        m.threshold = float(logits.kthvalue(k).values) + 1e-6  # the k lowest fall below it
        predictors.thresholds[layer] = m.threshold

    hooks = []
    try:
        for site in find_predictor_sites(model):
            m = model.get_submodule(site.mlp_name)  # the PredictedSparseMLP swapped in
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, _layer=site.layer: set_threshold(_layer, mod, args)))
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        restore()
    return [float(t) for t in predictors.thresholds]


def reset_predicted_counts(model: nn.Module) -> None:
    """Zero every attached predictor's counters (before the run to be measured)."""
    for m in model.modules():
        if isinstance(m, PredictedSparseMLP):
            m.counts.zero_()


def mean_predicted_sparsity(model: nn.Module) -> float:
    """Share of neurons the attached predictors skipped since their counters were last reset,
    averaged over layers (with equal weight, as the paper averages)."""
    mods = [m for m in model.modules() if isinstance(m, PredictedSparseMLP)]
    if not mods:
        raise ValueError("no predictors attached: use attach_predictors_ first")
    return sum(1 - m.predicted_active / max(m.tokens * m.d_ff, 1) for m in mods) / len(mods)
