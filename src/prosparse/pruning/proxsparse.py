"""ProxSparse (Liu et al., ICML 2025): learn a 2:4 mask end to end, then apply it to the original
weights.

Every prunable linear trains with AdamW on the LM loss over the calibration blocks; after every
optimiser step the proximal operator of ``lam * R`` (:func:`.prox.prox_2of4`) pulls each group of
4 towards at most 2 non-zeros. At the end the top 2 ``|w|`` of each group of the LEARNED weights
make the mask, applied to the ORIGINAL weights: no weight update survives (paper Sec. 3.3).
With ``mask_score="wanda"`` the top 2 are by ``|w| * ||x_j||`` instead: the same two wherever
the regulariser has finished a group, Wanda's choice among the learned weights where it has not.

Lambda enters the prox step raw (``prox(w, lam)``), as the authors' code does, by default;
``lambda_scale="lr"`` uses ``prox(w, lr_t * lam)``, the textbook proximal-gradient step. Either
way it is recorded in the result.

The optional frozen-weight term (the authors' ``lambda2``, ``epsilon``) adds
``lambda2 * sum ||(W / (W0 + eps sign W0)) * (W - W0)||^2`` to the loss, keeping the weights
that survive near their originals.

It runs on Accelerate: the same command under ``accelerate launch`` trains data-parallel (each
process takes its share of the blocks; gradients are averaged, so every replica applies the same
prox step to the same weights).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prosparse.core.errors import UsageError
from prosparse.pruning.masks import nm_mask
from prosparse.pruning.prox import group_nonzeros, prox_2of4

LAMBDA_SCALES = ("raw", "lr")
MASK_SCORES = ("magnitude", "wanda")


@dataclass
class ProxConfig:
    """Settings of one ProxSparse mask-learning run."""

    lam: float = 0.05
    """Weight of the 2:4 regulariser R in the prox step (the CPU recipe's; the paper: 0.25 on
    LLaMA-2-7B, whose weights are ~10x smaller)."""
    lambda_scale: str = "raw"
    """``raw``: prox(w, lam) as the authors' code; ``lr``: prox(w, lr_t * lam)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (the paper: 1e-4)."""
    epochs: int = 1
    """Passes over the calibration blocks (the paper: 1)."""
    batch_size: int = 1
    """Blocks per optimiser step (the paper: 1)."""
    warmup: float = 0.1
    """Share of the steps with linear warm-up; then linear decay to 0 (HF's default)."""
    mask_score: str = "wanda"
    """How the top 2 of each group are picked from the learned weights: ``magnitude`` (|w|, the
    paper's) or ``wanda`` (|w| times the L2 norm of the linear's input channel over the
    calibration tokens the run saw). Groups the regulariser has finished (two zeros) keep the
    same two either way; the score decides the groups still holding three or four non-zeros."""
    reg_score: str = "wanda"
    """What the regulariser pulls towards 2:4: the weights themselves (``magnitude``, the
    paper's) or the weights scaled per input channel by the channel's input norm over the
    tokens seen so far, normalised to mean 1 (``wanda``: the prox step runs on ``w * s`` and
    maps back, so a weight fed large inputs is shrunk less). ``wanda`` for both scores is the
    CPU default: on SmolLM2-135M it turns masks that lose to Wanda on other domains into masks
    that beat Wanda and SparseGPT on every held-out source (docs/results/pruning.md)."""
    lambda_warmup: float = 0.0
    """Share of the steps over which lambda rises linearly from 0 to ``lam`` (a ramp: the LM
    loss moves the weights before the regulariser settles the groups); 0 = full lambda from
    the first step, as the authors' code."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    lambda2: float = 0.0
    """Frozen-weight term weight (0 = off)."""
    epsilon: float = 0.1
    """Frozen-weight term's epsilon."""
    log_every: int = 10
    """Steps between entries of the group non-zero log."""
    val_samples: int = 0
    """Blocks of the calibration source held back (disjoint from the calibration blocks) to
    choose the masks by: every ``val_every`` steps the masks of the learned weights are applied
    to the original weights, as they will be deployed, and the best validation perplexity's
    masks are kept (early stopping). 0 = the masks of the last step."""
    val_every: int = 16
    """Steps between validations (with ``val_samples``)."""
    seed: int = 0
    """Shuffling seed of the blocks."""

    def check(self) -> None:
        if self.lam < 0:
            raise UsageError(f"--prox-lambda ({self.lam:g}) must be >= 0")
        if self.lambda_scale not in LAMBDA_SCALES:
            raise UsageError(f"--prox-lambda-scale {self.lambda_scale!r}: choose one of "
                             f"{', '.join(LAMBDA_SCALES)}")
        for name in ("lr", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be "
                                 "positive")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup ({self.warmup:g}) must be in [0, 1)")
        if self.mask_score not in MASK_SCORES:
            raise UsageError(f"--prox-mask-score {self.mask_score!r}: choose one of "
                             f"{', '.join(MASK_SCORES)}")
        if self.reg_score not in MASK_SCORES:
            raise UsageError(f"--prox-reg-score {self.reg_score!r}: choose one of "
                             f"{', '.join(MASK_SCORES)}")
        if not 0 <= self.lambda_warmup <= 1:
            raise UsageError(f"--prox-lambda-warmup ({self.lambda_warmup:g}) must be in [0, 1]")
        if self.val_samples < 0 or self.val_every < 1:
            raise UsageError(f"val_samples ({self.val_samples}) must be >= 0 and val_every "
                             f"({self.val_every}) >= 1")
        if self.lambda2 < 0 or self.epsilon <= 0:
            raise UsageError(f"--prox-lambda2 ({self.lambda2:g}) must be >= 0 and --prox-epsilon "
                             f"({self.epsilon:g}) > 0")


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total``: (1) linear warm-up over
    the first ``ceil(warmup * total)`` steps, (2) linear decay to 0 at ``total``."""
    n_warm = math.ceil(warmup * total)
    if step < n_warm:  # 1: warm-up
        return peak * (step + 1) / n_warm
    return peak * max(0.0, (total - step) / max(1, total - n_warm))  # 2: decay


def lambda_at(step: int, total: int, peak: float, ramp: float) -> float:
    """Lambda of the prox step after optimiser step ``step`` (0-based): ``peak`` times
    ``min(1, (step + 1) / ceil(ramp * total))``; ``peak`` throughout when ``ramp`` is 0."""
    n_ramp = math.ceil(ramp * total)
    return peak if n_ramp == 0 else peak * min(1.0, (step + 1) / n_ramp)


def frozen_weight_term(weights: dict[str, nn.Parameter], originals: dict[str, torch.Tensor],
                       epsilon: float) -> torch.Tensor:
    """``sum ||(W / (W0 + eps sign W0)) * (W - W0)||^2`` (sign 0 taken as +1), the authors'
    term that keeps the weights near their originals."""
    total = 0.0
    for name, w in weights.items():
        w0 = originals[name]
        sign = torch.where(w0 >= 0, 1.0, -1.0).to(w0)
        total = total + ((w / (w0 + epsilon * sign)) * (w - w0)).square().sum()
    return total


def nonzero_shares(weights: dict[str, nn.Parameter]) -> list[float]:
    """Share of all groups of 4 holding 0, 1, 2, 3, 4 non-zeros."""
    counts = sum(group_nonzeros(w.detach()) for w in weights.values())
    return (counts.double() / counts.sum()).tolist()


class _InputNorms:
    """Sum of squares of each linear's input, per input channel, over every token the forward
    passes see (Wanda's ``||X_j||_2``, squared), collected by forward pre-hooks."""

    def __init__(self, linears: dict[str, nn.Module]):
        self.sq: dict[str, torch.Tensor] = {}
        self.active = True
        self.handles = [lin.register_forward_pre_hook(self._hook(name))
                        for name, lin in linears.items()]

    def _hook(self, name):
        def hook(_module, args):
            if not self.active:
                return
            x = args[0].detach()
            s = x.float().square().reshape(-1, x.shape[-1]).sum(0)
            self.sq[name] = self.sq[name] + s if name in self.sq else s
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _summed(sq: torch.Tensor, accelerator=None) -> torch.Tensor:
    if accelerator is not None and accelerator.num_processes > 1:  # every replica the same
        return accelerator.reduce(sq.clone(), "sum")
    return sq


def _channel_scale(sq: torch.Tensor) -> torch.Tensor:
    """Input norms per channel, normalised to mean 1 (a dead channel's kept above 0)."""
    s = sq.sqrt()
    return (s / s.mean().clamp(min=1e-30)).clamp(min=1e-6)


@torch.no_grad()
def _masks(weights: dict[str, nn.Parameter], norms: _InputNorms | None, accelerator=None
           ) -> dict[str, torch.Tensor]:
    """Top 2 of every group of 4 of the learned weights, by |w| or (with ``norms``) by
    |w| * ||x_j||."""
    masks = {}
    for name, w in weights.items():
        score = w.detach().abs().float()
        if norms is not None and name in norms.sq:
            score = score * _summed(norms.sq[name], accelerator).sqrt()
        masks[name] = nm_mask(score, 2, 4)
    return masks


@torch.no_grad()
def _deployed_perplexity(model, weights, originals, val_blocks, norms=None, accelerator=None,
                         wanda_masks: bool = False) -> tuple[float, dict]:
    """Perplexity on ``val_blocks`` of the original weights under the current learned masks
    (what the run would deploy if it stopped now), and those masks; the learned weights are put
    back afterwards."""
    from prosparse.measure.heldout import evaluate_blocks

    masks = _masks(weights, norms if wanda_masks else None, accelerator)
    learned = {name: w.detach().clone() for name, w in weights.items()}
    for name, w in weights.items():
        w.copy_(originals[name] * masks[name])
    if norms is not None:  # validation tokens are not calibration tokens
        norms.active = False
    try:
        ppl = evaluate_blocks(model, val_blocks).perplexity
    finally:
        if norms is not None:
            norms.active = True
        for name, w in weights.items():
            w.copy_(learned[name])
    return ppl, masks


def learn_masks(model: nn.Module, linears: dict[str, nn.Linear], blocks: torch.Tensor,
                cfg: ProxConfig, accelerator=None, progress: bool = True,
                val_blocks: torch.Tensor | None = None
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """Learn 2:4 masks for ``linears`` of ``model`` on ``blocks`` (n, seq_len).

    With ``val_blocks`` the masks are chosen by the deployed model's perplexity on them (every
    ``cfg.val_every`` steps and at the end), else they are the last step's. On return
    ``model`` holds its ORIGINAL weights masked (other parameters untouched); the result is
    (keep-masks by linear name, a JSON-ready log).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg.check()
    accelerator = accelerator or Accelerator()
    set_seed(cfg.seed)
    weights = {name: lin.weight for name, lin in linears.items()}
    trainable = {id(w) for w in weights.values()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    loader = torch.utils.data.DataLoader(blocks, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    optim = torch.optim.AdamW(list(weights.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    prepared, optim, loader = accelerator.prepare(model, optim, loader)
    originals = {name: w.detach().clone() for name, w in weights.items()}  # on the device
    total = cfg.epochs * len(loader)
    log = {"steps": [], "loss": [], "lr": [], "prox_lambda": [], "nonzero_shares": []}
    best: tuple[float, int, dict] | None = None  # (validation perplexity, step, masks)
    if val_blocks is not None:
        log["validation"] = []
    # Wanda's input norms, over the calibration tokens as the run sees them.
    norms = _InputNorms(linears) if "wanda" in (cfg.mask_score, cfg.reg_score) else None
    mask_norms = norms if cfg.mask_score == "wanda" else None
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=total, desc="proxsparse", disable=not (progress and
                                                             accelerator.is_main_process))
    step = 0
    try:
        for _ in range(cfg.epochs):
            for ids in loader:
                lr = lr_at(step, total, cfg.lr, cfg.warmup)
                for group in optim.param_groups:
                    group["lr"] = lr
                with accelerator.autocast():
                    loss = prepared(input_ids=ids, labels=ids, use_cache=False).loss
                objective = loss
                if cfg.lambda2 > 0:
                    objective = loss + cfg.lambda2 * frozen_weight_term(weights, originals,
                                                                        cfg.epsilon)
                accelerator.backward(objective)
                optim.step()
                optim.zero_grad(set_to_none=True)
                # The prox step on every weight after every optimiser step (paper Alg. 1).
                lam = lambda_at(step, total, cfg.lam, cfg.lambda_warmup)
                lam = lam if cfg.lambda_scale == "raw" else lam * lr
                with torch.no_grad():
                    for name, w in weights.items():
                        if cfg.reg_score == "wanda":  # the prox step on w * s, mapped back
                            scale = _channel_scale(_summed(norms.sq[name], accelerator))
                            w.copy_(prox_2of4(w * scale, lam) / scale)
                        else:
                            w.copy_(prox_2of4(w, lam))
                step += 1
                if step % cfg.log_every == 0 or step == total or step == 1:
                    shares = nonzero_shares(weights)
                    log["steps"].append(step)
                    log["loss"].append(float(accelerator.reduce(loss.detach(), "mean")))
                    log["lr"].append(lr)
                    log["prox_lambda"].append(lam)
                    log["nonzero_shares"].append(shares)
                    bar.set_postfix(loss=f"{log['loss'][-1]:.3f}", two_of_four=f"{sum(shares[:3]):.3f}")
                if val_blocks is not None and (step % cfg.val_every == 0 or step == total):
                    model.eval()
                    ppl, masks_now = _deployed_perplexity(prepared, weights, originals,
                                                          val_blocks, norms, accelerator,
                                                          mask_norms is not None)
                    model.train()
                    log["validation"].append({"step": step, "perplexity": ppl})
                    if best is None or ppl < best[0]:
                        best = (ppl, step, masks_now)
                bar.update(1)
    finally:
        bar.close()
        if norms is not None:
            norms.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
    model.eval()
    # Top 2 of each group of 4 of the LEARNED weights, applied to the ORIGINAL weights.
    with torch.no_grad():
        masks = _masks(weights, mask_norms, accelerator)
        if best is not None:  # early stopping: the masks the validation text liked best
            masks = best[2]
            log.update(chosen_step=best[1], chosen_validation_perplexity=best[0])
        for name, w in weights.items():
            w.copy_(originals[name] * masks[name])
    log.update({"config": asdict(cfg), "optimizer_steps": total,
                "train_seconds": time.perf_counter() - start,
                "lambda_enters": "raw: prox(w, lambda)" if cfg.lambda_scale == "raw"
                else "times lr: prox(w, lr_t * lambda)"})
    return masks, log
