"""Training-free activation sparsity on the original (SiLU) model, calibrated on data: the
peers a user would pick instead of ProSparse's training.

- CATS (Lee et al., 2024): one threshold per layer on ``|silu(g)|`` so that the target fraction
  of x1 is exactly zero; stored like FATReLU's threshold (:class:`prosparse.models.CATS`), and
  run through :class:`prosparse.SparseMLP` (x1 zeros skip rows of up and of down).
- TEAL (Liu et al., 2024): one magnitude threshold per linear of every block, on its input
  (:class:`prosparse.models.teal.TEALLinear`), with uniform allocation: every linear's input
  the target fraction zero. TEAL's greedy per-layer allocation is not implemented.

Thresholds are quantiles of the dense model's own activations on calibration blocks; the
quantiles are taken over a random subsample of at most ``max_samples`` values per site,
which keeps memory flat (a few hundred MB for a 135M model) at a quantile error far below the
2-point tolerance users hold these methods to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prosparse.core.errors import UsageError
from prosparse.models.activations import CATS
from prosparse.models.relufy import find_gated_ffns, relufy_
from prosparse.models.teal import block_linears, tealify_


class _Reservoir:
    """A random subsample of the values seen, at most ``cap`` of them: each batch is thinned to
    the share the cap allows so far, and the pool trimmed uniformly when it doubles."""

    def __init__(self, cap: int, gen: torch.Generator):
        self.cap, self.gen = cap, gen
        self.parts: list[torch.Tensor] = []
        self.seen = 0

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().float().flatten().cpu()
        self.seen += v.numel()
        # keep each value with probability cap / seen-so-far, then trim to cap at the end
        keep = min(1.0, self.cap / max(self.seen, 1))
        if keep < 1.0:
            v = v[torch.rand(v.numel(), generator=self.gen) < keep]
        self.parts.append(v)
        if sum(p.numel() for p in self.parts) > 2 * self.cap:
            self._trim()

    def _trim(self) -> None:
        v = torch.cat(self.parts)
        idx = torch.randperm(v.numel(), generator=self.gen)[: self.cap]
        self.parts = [v[idx]]

    def quantile(self, q: float) -> float:
        self._trim()
        v = self.parts[0]
        k = min(max(1, round(q * v.numel())), v.numel())
        return float(v.kthvalue(k).values) if q > 0 else 0.0


def _run(model: nn.Module, blocks: torch.Tensor, batch_size: int, desc: str | None) -> None:
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False,
                      disable=desc is None):
        model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)


def _check(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise UsageError(f"sparsity ({sparsity}) must be in [0, 1), e.g. 0.5")


def _site_quantiles(model: nn.Module, blocks: torch.Tensor, sites: list[nn.Module], value,
                    sparsity: float, batch_size: int, max_samples: int, seed: int,
                    desc: str | None) -> list[float]:
    """Run ``blocks`` once with a forward pre-hook on each of ``sites`` feeding
    ``value(its input)`` to its reservoir; the ``sparsity`` quantile of each."""
    gen = torch.Generator().manual_seed(seed)
    res = [_Reservoir(max_samples, gen) for _ in sites]
    hooks = [m.register_forward_pre_hook(lambda _m, args, _r=r: _r.add(value(args[0])))
             for m, r in zip(sites, res)]
    was = model.training
    model.eval()
    try:
        _run(model, blocks, batch_size, desc)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return [r.quantile(sparsity) for r in res]


@torch.no_grad()
def calibrate_cats(model: nn.Module, blocks: torch.Tensor, sparsity: float, batch_size: int = 4,
                   max_samples: int = 1 << 20, seed: int = 0, progress: bool = False
                   ) -> list[float]:
    """Per-layer CATS thresholds: the ``sparsity`` quantile of ``|silu(g)|`` of each gated FFN
    of the original (SiLU) model, or of a CATS model (its gates as its thresholds leave them),
    on ``blocks`` (n, seq_len)."""
    _check(sparsity)
    probe = torch.linspace(-6, 6, 97)
    for f in find_gated_ffns(model):
        is_silu = torch.allclose(f.act(probe.to(f.down_proj.weight)).float(), F.silu(probe))
        if not (is_silu or isinstance(f.act, CATS)):
            raise UsageError(f"CATS thresholds |silu(gate)|: {f.name} uses "
                             f"{type(f.act).__name__}; convert the original SiLU model")
    acts = [f.act for f in find_gated_ffns(model)]  # their input is the gate pre-activation
    return _site_quantiles(model, blocks, acts, lambda g: F.silu(g).abs(), sparsity, batch_size,
                           max_samples, seed, "calibrate CATS" if progress else None)


@torch.no_grad()
def calibrate_teal(model: nn.Module, blocks: torch.Tensor, sparsity: float, batch_size: int = 4,
                   max_samples: int = 1 << 18, seed: int = 0, progress: bool = False
                   ) -> dict[str, float]:
    """Per-linear TEAL thresholds (uniform allocation): the ``sparsity`` quantile of ``|x|`` of
    each block linear's input on ``blocks``."""
    _check(sparsity)
    names, linears = zip(*block_linears(model))
    values = _site_quantiles(model, blocks, list(linears), torch.abs, sparsity, batch_size,
                             max_samples, seed, "calibrate TEAL" if progress else None)
    return dict(zip(names, values))


def cats_(model: nn.Module, blocks: torch.Tensor, sparsity: float, passes: int = 1,
          **kwargs) -> list[float]:
    """Calibrate CATS thresholds on ``blocks`` and swap them in (``hidden_act: "cats"``).

    The first pass reads the original model, as CATS does; each further pass (``passes`` > 1)
    re-reads the gates of the thresholded model, whose upper layers see the inputs the lower
    layers' thresholds make."""
    thresholds = calibrate_cats(model, blocks, sparsity, **kwargs)
    relufy_(model, "cats", thresholds)
    for _ in range(passes - 1):
        thresholds = calibrate_cats(model, blocks, sparsity, **kwargs)
        relufy_(model, "cats", thresholds)
    return thresholds


def teal_(model: nn.Module, blocks: torch.Tensor, sparsity: float, passes: int = 1,
          **kwargs) -> dict[str, float]:
    """Calibrate TEAL thresholds on ``blocks`` and swap in the thresholded linears; further
    passes re-read the thresholded model's inputs (as :func:`cats_` does)."""
    thresholds = calibrate_teal(model, blocks, sparsity, **kwargs)
    tealify_(model, thresholds)
    for _ in range(passes - 1):
        thresholds = calibrate_teal(model, blocks, sparsity, **kwargs)
        tealify_(model, thresholds)
    return thresholds


METHODS = ("cats", "teal")


def convert_training_free(model: str, method: str, sparsity: float, out, data: list[str],
                          tokens: int = 16384, seq_len: int = 256, dtype: str = "float32",
                          overwrite: bool = False, seed: int = 0, progress: bool = True,
                          passes: int = 1) -> dict:
    """``prosparse convert MODEL --act cats|teal --sparsity S --data SRC``: calibrate on
    ``tokens`` tokens of the data's train split (``passes`` calibration passes: see
    :func:`cats_`), save the checkpoint to ``out``, and return
    ``{"method", "sparsity_target", "thresholds", "out", "passes"}``."""
    from prosparse.data import load_texts, pack_blocks, parse_data_spec
    from prosparse.models.loading import load_model
    from prosparse.models.saving import save_model

    if method not in METHODS:
        raise UsageError(f"unknown training-free method {method!r}; choose one of "
                         f"{', '.join(METHODS)}")
    m, tok = load_model(model, dtype=dtype, device="cpu")
    per = max(seq_len, tokens // len(data))
    blocks = torch.cat([pack_blocks(tok, load_texts(parse_data_spec(d), "train"), seq_len, per,
                                    seed=seed) for d in data])
    calibrate = cats_ if method == "cats" else teal_
    thresholds = calibrate(m, blocks, sparsity, passes=passes, seed=seed, progress=progress)
    if hasattr(m, "config"):
        m.config.prosparse_training_free = {"method": method, "sparsity_target": sparsity,
                                            "calibration": {"data": list(data),
                                                            "tokens": int(blocks.numel()),
                                                            "passes": passes}}
    path = save_model(m, tok, out, overwrite=overwrite)
    return {"method": method, "sparsity_target": sparsity, "thresholds": thresholds,
            "out": str(path), "passes": passes}
