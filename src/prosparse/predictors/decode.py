"""Approximate sparse decoding: the predictor picks the neurons, and the gate, up and down
products run only over them (paper Sec. 3.3, App. C; PowerInfer's scheme).

:class:`PredictedSparseMLP` keeps the Hugging Face child names (``gate_proj``/``up_proj`` or
``gate_up_proj``, ``down_proj``, the activation under its own name) plus ``predictor``. Its
input is the FFN input (after the norm); the predictor's input, the residual stream *before*
that norm, is handed over by a forward pre-hook on the norm that :func:`attach_predictors_`
registers (post-norm layers such as OLMo 2's have no such norm: their FFN input is the
residual stream, and the predictor reads it directly). One token (decode) takes the gather
path: the predicted-active rows of W_gate and W_up are multiplied by
:func:`prosparse.kernels.cpu.rows_mv`, which gathers them in L2-sized chunks, and the down
product is ``F.embedding_bag`` over the same rows of W_down^T
weighted by x1 (it never materialises them). More tokens (prefill, perplexity) take the
reference twin: the dense formula with x1 masked by the prediction. Both compute
``down(mask * act(gate(x)) * up(x))``, so a neuron predicted inactive contributes nothing and
one predicted active but truly inactive costs time, not accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prosparse.kernels.cpu import rows_mv
from prosparse.models.relufy import find_gated_ffns
from prosparse.predictors.collect import find_predictor_sites
from prosparse.predictors.model import Predictor, PredictorSet


class PredictedSparseMLP(nn.Module):
    """A gated FFN computing only the neurons its predictor calls active."""

    def __init__(self, mlp: nn.Module, predictor: Predictor, threshold: float,
                 act_attr: str = "act_fn", fused: bool = False, max_tokens: int = 1):
        super().__init__()
        self.act_attr, self.fused, self.max_tokens = act_attr, fused, max_tokens
        if fused:
            self.gate_up_proj = mlp.gate_up_proj
        else:
            self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        setattr(self, act_attr, getattr(mlp, act_attr))
        self.down_proj = mlp.down_proj
        w = self.down_proj.weight
        if not w.t().is_contiguous():
            # W_down^T contiguous (d_ff, d_model) for embedding_bag; the parameter is its view.
            self.down_proj.weight = nn.Parameter(w.detach().t().contiguous().t(),
                                                 requires_grad=w.requires_grad)
        self.d_ff = self.down_proj.weight.shape[1]
        self.predictor = predictor
        self.threshold = float(threshold)
        self._residual: torch.Tensor | None = None
        self.reads_input = False  # True: the predictor reads this FFN's own input (post-norm)
        self.predicted_active = 0  # neurons predicted active, summed over tokens (statistics)
        self.tokens = 0

    def set_residual(self, r: torch.Tensor) -> None:
        self._residual = r

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                torch.Tensor | None]:
        if self.fused:
            w, b = self.gate_up_proj.weight, self.gate_up_proj.bias  # gate rows first (Phi-3)
            return (w[: self.d_ff], w[self.d_ff:], None if b is None else b[: self.d_ff],
                    None if b is None else b[self.d_ff:])
        return (self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias,
                self.up_proj.bias)

    def predictor_input(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's input for FFN input ``x``: the residual handed over by the norm's
        hook, or ``x`` itself in post-norm layers."""
        r = x if self.reads_input else self._residual
        if r is None:
            raise RuntimeError("PredictedSparseMLP got no residual input: attach it with "
                               "prosparse.predictors.attach_predictors_(model, predictors)")
        return r

    def logits(self, r: torch.Tensor) -> torch.Tensor:
        """Predictor logits (tokens, d_ff) for residual inputs (..., d_model)."""
        return self.predictor(r.reshape(-1, r.shape[-1]).to(self.predictor.fc1.weight.dtype))

    def predict(self, r: torch.Tensor) -> torch.Tensor:
        """Boolean (tokens, d_ff) predicted-active mask from residual inputs (..., d_model)."""
        return self.logits(r) >= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, self._residual = self.predictor_input(x), None
        act_fn = getattr(self, self.act_attr)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, d_model)
        mask = self.predict(r)  # (tokens, d_ff)
        self.tokens += mask.shape[0]
        self.predicted_active += int(mask.sum())
        if x2.shape[0] > self.max_tokens:  # reference twin: dense, x1 masked by the prediction
            if self.fused:
                g, u = self.gate_up_proj(x2).chunk(2, dim=-1)
            else:
                g, u = self.gate_proj(x2), self.up_proj(x2)
            y = self.down_proj(act_fn(g) * u * mask)
            return y.reshape(*shape[:-1], y.shape[-1])
        ys = [self._gather_one(x2[i], mask[i], act_fn) for i in range(x2.shape[0])]
        y = torch.stack(ys) if ys else x2.new_zeros(0, self.down_proj.out_features)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _gather_one(self, x: torch.Tensor, mask: torch.Tensor, act_fn) -> torch.Tensor:
        """One token (d_model,) -> (d_model,), touching only rows ``mask`` of every matrix."""
        idx = mask.nonzero().flatten()  # (n,)
        n = idx.numel()
        w_down_t = self.down_proj.weight.t()  # (d_ff, d_model), contiguous
        bias = self.down_proj.bias
        if n == 0:
            return torch.zeros(w_down_t.shape[1], dtype=x.dtype, device=x.device) + (
                0 if bias is None else bias)
        wg, wu, bg, bu = self._weights()
        g = rows_mv(wg, idx, x)  # (n,): only the predicted rows of W_gate ...
        u = rows_mv(wu, idx, x)  # ... and of W_up, in L2-sized chunks
        if bg is not None:
            g = g + bg.index_select(0, idx)
        if bu is not None:
            u = u + bu.index_select(0, idx)
        x1 = act_fn(g) * u  # (n,)
        y = F.embedding_bag(idx.view(1, -1), w_down_t, per_sample_weights=x1.view(1, -1),
                            mode="sum")[0]  # (d_model,)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, max_tokens={self.max_tokens}"


def attach_predictors_(model: nn.Module, predictors: PredictorSet,
                       max_tokens: int = 1) -> Callable[[], None]:
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
    swapped, handles = [], []
    for site, ffn in zip(sites, ffns):
        thr = float(predictors.thresholds[site.layer])
        if not math.isfinite(thr):
            raise ValueError(f"layer {site.layer} has no trained predictor (threshold {thr})")
        pred = Predictor(d_model, d_ff, predictors.hidden)
        pred.load_state_dict(predictors.layers[site.layer].state_dict())
        pred = pred.to(device=param.device, dtype=param.dtype).eval()
        new = PredictedSparseMLP(ffn.module, pred, thr, ffn.act_attr, ffn.fused, max_tokens)
        if site.norm is None:  # post-norm layer: the FFN input is the residual stream
            new.reads_input = True
        else:
            handles.append(site.norm.register_forward_pre_hook(
                lambda _m, args, _new=new: _new.set_residual(args[0])))
        parent_name, _, child = ffn.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        swapped.append((parent, child, ffn.module))

    def restore() -> None:
        for h in handles:
            h.remove()
        for parent, child, original in swapped:
            setattr(parent, child, original)
            w = original.down_proj.weight
            if not w.is_contiguous():
                original.down_proj.weight = nn.Parameter(w.detach().contiguous(),
                                                         requires_grad=w.requires_grad)

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


def mean_predicted_sparsity(model: nn.Module) -> float:
    """Share of neurons the attached predictors skipped since their counters were last reset,
    averaged over layers (with equal weight, as the paper averages)."""
    mods = [m for m in model.modules() if isinstance(m, PredictedSparseMLP)]
    if not mods:
        raise ValueError("no predictors attached: use attach_predictors_ first")
    return sum(1 - m.predicted_active / max(m.tokens * m.d_ff, 1) for m in mods) / len(mods)


@torch.no_grad()
def teacher_forced(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4):
    """Summed next-token NLL, its count, and the argmax predictions (n, seq - 1)."""
    nll, count, argmax = 0.0, 0, []
    device = next(model.parameters()).device
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += ids[:, 1:].numel()
        argmax.append(logits.argmax(-1).cpu())
    return nll, count, torch.cat(argmax)


def decode_benchmark_with_predictors(
    model: nn.Module,
    predictors: PredictorSet,
    input_ids: torch.Tensor,
    new_tokens: int = 64,
    eval_blocks: torch.Tensor | None = None,
    exact: bool = False,
    backend: str | None = None,
    repeats: int = 3,
) -> dict:
    """Greedy decode dense and with predictors attached, alternating for ``repeats`` rounds so
    drift in machine load hits both alike, then (with ``exact``) with
    :func:`prosparse.inference.sparsify_`'s exact sparse FFN, which stays swapped in.

    Returns the median tokens/s of each (every round's in ``*_runs``), the share of
    free-running greedy tokens that differ from dense, and, on ``eval_blocks`` (n, seq_len) of
    held-out text, perplexity with and without the predictors and the share of teacher-forced
    argmax tokens that differ. The model is left dense unless ``exact``.
    """
    import statistics

    from prosparse.inference.decode import greedy_decode

    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be at least 1")
    model.eval()
    report: dict = {"new_tokens": new_tokens, "repeats": repeats}
    if eval_blocks is not None:
        nll, count, dense_argmax = teacher_forced(model, eval_blocks)
        report["eval_tokens"] = count
        report["dense_perplexity"] = math.exp(nll / count)
        restore = attach_predictors_(model, predictors)
        try:
            nll, count, pred_argmax = teacher_forced(model, eval_blocks)
        finally:
            restore()
        report["predicted_perplexity"] = math.exp(nll / count)
        report["teacher_forced_differ"] = float((pred_argmax != dense_argmax).float().mean())
    runs: dict[str, list] = {"dense": [], "predicted": [], "exact": []}
    for r in range(repeats):
        greedy_decode(model, input_ids, 4)  # warm-up
        runs["dense"].append(greedy_decode(model, input_ids, new_tokens,
                                           desc=f"dense decode {r + 1}/{repeats}"))
        restore = attach_predictors_(model, predictors)
        try:
            greedy_decode(model, input_ids, 4)
            for m in model.modules():
                if isinstance(m, PredictedSparseMLP):
                    m.predicted_active = m.tokens = 0
            runs["predicted"].append(greedy_decode(model, input_ids, new_tokens,
                                                   desc=f"predicted decode {r + 1}/{repeats}"))
            report["decode_predicted_sparsity"] = mean_predicted_sparsity(model)  # last round
        finally:
            restore()
    if exact:
        from prosparse.inference import sparsify_

        sparsify_(model, backend=backend)
        for r in range(repeats):
            greedy_decode(model, input_ids, 4)
            runs["exact"].append(greedy_decode(model, input_ids, new_tokens,
                                               desc=f"exact sparse decode {r + 1}/{repeats}"))
    rate = {k: statistics.median(run.tokens_per_s for run in v) for k, v in runs.items() if v}
    dense, pred = runs["dense"][0], runs["predicted"][0]
    differ = [a != b for a, b in zip(dense.tokens, pred.tokens)]
    report.update(
        dense_tokens_per_s=rate["dense"],
        predicted_tokens_per_s=rate["predicted"],
        predicted_speedup=rate["predicted"] / rate["dense"],
        greedy_differ=sum(differ) / len(differ),
        first_difference=next((i for i, d in enumerate(differ) if d), None),
        dense_tokens=dense.tokens,
        predicted_tokens=pred.tokens,
        **{f"{k}_tokens_per_s_runs": [run.tokens_per_s for run in v]
           for k, v in runs.items() if v},
    )
    if exact:
        report.update(exact_tokens_per_s=rate["exact"],
                      exact_speedup=rate["exact"] / rate["dense"],
                      predicted_over_exact=rate["predicted"] / rate["exact"])
    return report


def predictor_decode_report(
    model: nn.Module,
    tokenizer,
    predictors: str | PredictorSet,
    input_ids: torch.Tensor,
    new_tokens: int = 64,
    eval_data: str = "wiki",
    eval_tokens: int = 2048,
    seq_len: int = 256,
    exact: bool = True,
    backend: str | None = None,
    repeats: int = 3,
) -> dict:
    """What ``prosparse bench decode MODEL --predictors PRED`` reports: dense, predictor-driven
    and (``exact``) exact sparse decoding of :func:`decode_benchmark_with_predictors`, with
    perplexity on ``eval_tokens`` held-out tokens of ``eval_data`` when a tokenizer is given.
    With ``exact`` the model is left with the exact sparse FFN swapped in."""
    from prosparse.predictors.export import load_predictors

    pset = load_predictors(predictors) if not isinstance(predictors, PredictorSet) else predictors
    blocks = None
    if tokenizer is not None:
        from prosparse.data import load_texts, pack_blocks

        blocks = pack_blocks(tokenizer, load_texts(eval_data, "heldout"), seq_len, eval_tokens)
    r = decode_benchmark_with_predictors(model, pset, input_ids, new_tokens, eval_blocks=blocks,
                                         exact=exact, backend=backend, repeats=repeats)
    r.pop("dense_tokens")
    r["predictors"] = str(predictors) if not isinstance(predictors, PredictorSet) else None
    return r


def format_predictor_report(r: dict) -> str:
    """Two lines for people: speed, then quality."""
    lines = [f"predicted {r['predicted_tokens_per_s']:.2f} tokens/s ({r['predicted_speedup']:.2f}x "
             f"dense {r['dense_tokens_per_s']:.2f}), predicted sparsity in decode "
             f"{100 * r['decode_predicted_sparsity']:.2f}%"]
    if "exact_tokens_per_s" in r:
        lines.append(f"exact sparse {r['exact_tokens_per_s']:.2f} tokens/s "
                     f"({r['exact_speedup']:.2f}x dense); predicted / exact "
                     f"{r['predicted_over_exact']:.2f}x")
    q = f"greedy tokens that differ from dense: {100 * r['greedy_differ']:.1f}%"
    if "predicted_perplexity" in r:
        q += (f"; held-out perplexity {r['dense_perplexity']:.3f} -> "
              f"{r['predicted_perplexity']:.3f}, teacher-forced argmax differs on "
              f"{100 * r['teacher_forced_differ']:.2f}%")
    return "\n".join(lines + [q])
