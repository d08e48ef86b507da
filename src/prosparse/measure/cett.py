"""Sparsity at a fixed quality cost: the Sparsing Law's PPL-p% sparsity (Luo et al., ICML 2025),
on the CETT criterion of "ReLU^2 Wins" (Zhang et al. 2024).

In one FFN layer and one token, neuron i contributes ``x1_i * W_down[:, i]`` to the output, a
vector of norm ``|x1_i| * ||W_down[:, i]||``. Dropping the neurons whose contribution norm is
below a cut-off ``tau`` makes an error ``e`` (the sum of the dropped contributions); CETT is
``||e|| / ||FFN output||``, averaged over tokens. For a target CETT each layer gets the largest
``tau`` that keeps its CETT at or below it (on calibration tokens of the dense model), and one
CETT value shared by all layers is searched (bisection on [0, 1] to a 0.001 interval) until the
truncated model's held-out perplexity is ``(1 + p)`` times the untruncated one's. The share of
x1 that is zero there (dropped, or exactly zero already) is the model's PPL-p% sparsity. It
applies to any activation, SiLU included, so a SiLU original, a ReLU model and a
training-free one compare at equal quality.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from prosparse.measure.heldout import evaluate_blocks
from prosparse.measure.hooks import capture_x1
from prosparse.models.relufy import find_gated_ffns
from prosparse.models.teal import TEALLinear, teal_mask

CURVE_POINTS = 48  # candidate cut-offs per layer on which CETT is computed once


def down_column_norms(model: nn.Module) -> list[torch.Tensor]:
    """``||W_down[:, i]||_2`` for every neuron i of every gated FFN, in layer order (fp32)."""
    return [f.down_proj.weight.detach().float().norm(dim=0) for f in find_gated_ffns(model)]


@torch.no_grad()
def dense_x1(model: nn.Module, blocks: torch.Tensor, max_tokens: int = 1024,
             batch_size: int = 4) -> list[torch.Tensor]:
    """x1 of every gated FFN on up to ``max_tokens`` tokens of ``blocks`` (n, seq_len), as the
    model runs it (no truncation): a list of (tokens, d_ff) fp32 tensors on the CPU."""
    keep = max(1, math.ceil(max_tokens / blocks.shape[1]))
    blocks = blocks[:keep]
    device = next(model.parameters()).device
    seen: dict[int, list[torch.Tensor]] = {}

    def grab(i: int, x1: torch.Tensor) -> None:
        seen.setdefault(i, []).append(x1.detach().float().reshape(-1, x1.shape[-1]).cpu())

    was_training = model.training
    model.eval()
    try:
        with capture_x1(model, grab) as n:
            for s in range(0, len(blocks), batch_size):
                model(input_ids=blocks[s:s + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    return [torch.cat(seen[i])[:max_tokens] for i in range(n)]


@torch.no_grad()
def dense_gates(model: nn.Module, blocks: torch.Tensor, max_tokens: int = 1024,
                batch_size: int = 4) -> list[torch.Tensor]:
    """Every gated FFN's gate pre-activation on up to ``max_tokens`` tokens of ``blocks``, in
    the order :func:`dense_x1` gives x1 (separate ``gate_proj`` only)."""
    ffns = find_gated_ffns(model)
    if any(f.fused for f in ffns):
        raise ValueError("per-layer thresholds read gate_proj's output; a fused gate_up_proj "
                         "(Phi-3) has none apart")
    keep = max(1, math.ceil(max_tokens / blocks.shape[1]))
    blocks = blocks[:keep]
    device = next(model.parameters()).device
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [f.module.gate_proj.register_forward_hook(
        lambda _m, _a, out, i=i: seen.setdefault(i, []).append(
            out.detach().float().reshape(-1, out.shape[-1]).cpu()))
        for i, f in enumerate(ffns)]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(blocks), batch_size):
            model(input_ids=blocks[s:s + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [torch.cat(seen[i])[:max_tokens] for i in range(len(ffns))]


def cett_curve(x1: torch.Tensor, norms: torch.Tensor, weight: torch.Tensor,
               points: int = CURVE_POINTS, score: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(taus, cett)``: the layer's CETT (mean over tokens of ``||e|| / ||y||``) when the
    neurons whose ``score`` is below each cut-off are dropped, at cut-offs spread over the
    quantiles of the score where x1 is non-zero, ``tau = 0`` first. ``score`` defaults to the
    contribution norm ``|x1| * ||W_down[:, i]||``; the gate pre-activation gives FATReLU
    thresholds instead (:func:`prosparse.measure.threshold.per_layer_thresholds`)."""
    w = weight.detach().float()  # (d_model, d_ff)
    contrib = x1.abs() * norms if score is None else score  # (tokens, d_ff)
    y = (x1 @ w.t()).norm(dim=-1).clamp(min=1e-12)  # (tokens,)
    nonzero = contrib[(x1 != 0) & (contrib > 0)]
    if nonzero.numel() == 0:
        return torch.zeros(1), torch.zeros(1)
    sample = nonzero[torch.randperm(nonzero.numel(), generator=torch.Generator().manual_seed(0))
                     [: 1 << 20]]
    qs = torch.linspace(0, 1, points)[1:]
    taus = torch.cat([torch.zeros(1), torch.quantile(sample, qs)]).unique()
    cetts = []
    for tau in taus.tolist():
        dropped = torch.where(contrib < tau, x1, torch.zeros((), dtype=x1.dtype))
        cetts.append(float(((dropped @ w.t()).norm(dim=-1) / y).mean()))
    return taus, torch.tensor(cetts)


def cutoff_for(taus: torch.Tensor, cetts: torch.Tensor, target: float) -> float:
    """The largest ``tau`` whose CETT stays at or below ``target``: the last curve point under
    it, interpolated linearly toward the next one."""
    over = (cetts > target).nonzero()
    if len(over) == 0:
        return float(taus[-1])
    k = int(over[0])
    if k == 0:
        return 0.0
    t0, t1, c0, c1 = float(taus[k - 1]), float(taus[k]), float(cetts[k - 1]), float(cetts[k])
    return t0 + (t1 - t0) * (target - c0) / (c1 - c0) if c1 > c0 else t0


@contextmanager
def truncated(model: nn.Module, cutoffs: list[float]) -> Iterator[None]:
    """Within the block, every gated FFN sets ``x1_i = 0`` where ``|x1_i| * ||W_down[:, i]||``
    is below its layer's cut-off (a TEAL ``down_proj`` applies its own mask first, so the zeros
    counted are the ones the layer runs with)."""
    ffns = find_gated_ffns(model)
    if len(cutoffs) != len(ffns):
        raise ValueError(f"{len(cutoffs)} cut-offs for {len(ffns)} gated FFNs")
    handles = []
    for ffn, tau, norms in zip(ffns, cutoffs, down_column_norms(model)):
        def hook(module, args, _tau=tau, _norms=norms):
            x1 = args[0]
            if isinstance(module, TEALLinear):
                x1 = teal_mask(x1, module.threshold)
            keep = x1.abs().float() * _norms.to(x1.device) >= _tau
            return (torch.where(keep, x1, torch.zeros((), dtype=x1.dtype, device=x1.device)),
                    *args[1:])

        handles.append(ffn.down_proj.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ppl_p_sparsity(model: nn.Module, blocks: torch.Tensor, calib: torch.Tensor,
                   ppl_tolerance: float = 0.01, batch_size: int = 4,
                   calib_tokens: int = 1024, interval: float = 1e-3,
                   progress: bool = True) -> dict:
    """PPL-p% sparsity of ``model``: the CETT value shared by all layers at which the held-out
    perplexity on ``blocks`` is ``(1 + ppl_tolerance)`` times the untruncated one, found by
    bisection on [0, 1] to ``interval``; per-layer cut-offs from ``calib`` (n, seq_len) tokens.

    Returns the JSON of ``prosparse sparsity --ppl-tolerance``: ``ppl_tolerance``,
    ``cett_threshold``, ``average_sparsity``, ``layer_sparsity``, ``perplexity``,
    ``baseline_perplexity``, plus ``layer_cutoffs`` and ``baseline_sparsity`` (the exact zeros
    with no truncation).
    """
    if not ppl_tolerance > 0:
        raise ValueError(f"ppl_tolerance ({ppl_tolerance}) must be > 0, e.g. 0.01 for PPL-1%")
    base = evaluate_blocks(model, blocks, batch_size,
                           desc="PPL-p% baseline" if progress else None)
    limit = base.perplexity * (1 + ppl_tolerance)
    x1s = dense_x1(model, calib, calib_tokens, batch_size)
    weights = [f.down_proj.weight for f in find_gated_ffns(model)]
    curves = [cett_curve(x, n, w) for x, n, w in
              zip(tqdm(x1s, desc="CETT curves", leave=False, disable=not progress),
                  down_column_norms(model), weights)]

    def measure(c: float):
        cut = [cutoff_for(t, v, c) for t, v in curves]
        with truncated(model, cut):
            return cut, evaluate_blocks(model, blocks, batch_size)

    lo, hi = 0.0, 1.0
    best = ([0.0] * len(curves), base, 0.0)
    steps = math.ceil(math.log2(1 / interval))
    for _ in tqdm(range(steps), desc=f"PPL-{100 * ppl_tolerance:g}% search", leave=False,
                  disable=not progress):
        mid = (lo + hi) / 2
        cut, res = measure(mid)
        if res.perplexity <= limit:
            lo, best = mid, (cut, res, mid)
        else:
            hi = mid
    cut, res, c = best
    return {"ppl_tolerance": ppl_tolerance, "cett_threshold": c,
            "average_sparsity": res.average_sparsity, "layer_sparsity": res.layer_sparsity,
            "perplexity": res.perplexity, "baseline_perplexity": base.perplexity,
            "baseline_sparsity": base.average_sparsity, "layer_cutoffs": cut,
            "calibration_tokens": int(sum(x.shape[0] for x in x1s[:1])),
            "tokens": int(blocks.numel())}
