"""The one held-out evaluator: perplexity and per-layer activation sparsity in one pass.

Training, ``prosparse sparsity``, the threshold sweep and predictor evaluation all call it, so
their numbers are the same numbers. Sparsity is the fraction of exact zeros of x1 per layer,
counted on the fly (paper Section 3.1); perplexity is exp of the mean next-token NLL over the
same blocks. Under Accelerate the blocks are split across processes and the counts summed
over them, so every process gets the whole set's figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prosparse.measure.hooks import ZeroCounter, capture_x1
from prosparse.models.teal import count_teal


@dataclass
class HeldoutResult:
    """Perplexity and sparsity of one model on one set of blocks."""

    tokens: int
    """Tokens run through the model (blocks x seq_len)."""
    perplexity: float
    """exp of the mean next-token NLL."""
    average_sparsity: float
    """Mean over layers of the fraction of exact zeros in x1."""
    layer_sparsity: list[float] = field(default_factory=list)
    """Per-layer fraction of exact zeros in x1, bottom layer first."""
    nll_sum: float = 0.0
    """Sum of token NLLs (to combine sets exactly)."""
    nll_count: int = 0
    """Number of predicted tokens in ``nll_sum``."""
    argmax: torch.Tensor | None = None
    """Teacher-forced argmax predictions (n, seq_len - 1), when asked for."""
    input_sparsity: dict[str, float] = field(default_factory=dict)
    """TEAL models: the fraction of each block linear's input entries skipped, by name."""

    def public(self) -> dict:
        """The JSON keys: tokens, perplexity, average_sparsity, layer_sparsity, and for TEAL
        models input_sparsity (per linear) and average_input_sparsity."""
        d = asdict(self)
        for k in ("nll_sum", "nll_count", "argmax", "input_sparsity"):
            d.pop(k)
        if self.input_sparsity:
            d["input_sparsity"] = dict(self.input_sparsity)
            d["average_input_sparsity"] = _mean(self.input_sparsity.values())
        return d


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


@torch.no_grad()
def evaluate_blocks(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 4,
    *,
    accelerator=None,
    argmax: bool = False,
    desc: str | None = None,
) -> HeldoutResult:
    """Run ``blocks`` (n, seq_len) through ``model``, counting zeros of x1 and token NLL.

    With ``accelerator`` each process runs every world-th block under its autocast and the
    counts are summed over processes. Every process runs the same number of forward passes
    (sharded models such as FSDP's communicate inside each one): a process with one block
    fewer repeats a block whose tokens are left out of every count (TEAL's per-linear input
    counts excepted, which see it). ``argmax`` keeps the teacher-forced predictions (single
    process only). The model's training mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    if argmax and accelerator is not None and accelerator.num_processes > 1:
        raise ValueError("argmax=True needs a single process")
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index,
                                                      accelerator.num_processes)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    mine = blocks[rank::world]
    real = len(mine)  # rows past this are padding, to give every process the same batches
    per = -(-len(blocks) // world)
    if real < per:
        mine = torch.cat([mine, blocks[:per - real]])
    was_training = model.training
    model.eval()
    nll = torch.zeros(2, dtype=torch.float64)  # sum, count
    predictions = []
    counter = None
    try:
        with capture_x1(model, lambda i, x1: counter(i, x1)) as n_layers, \
                count_teal(model) as teal:
            counter = ZeroCounter(n_layers)
            for start in tqdm(range(0, len(mine), batch_size), desc=desc, leave=False,
                              disable=desc is None):
                ids = mine[start:start + batch_size].to(device)
                keep = torch.arange(start, start + len(ids)) < real  # (b,) real rows
                counter.set_mask(None if keep.all() else keep[:, None].expand(ids.shape))
                if accelerator is not None:
                    with accelerator.autocast():
                        logits = model(input_ids=ids, use_cache=False).logits
                else:
                    logits = model(input_ids=ids, use_cache=False).logits
                logits = logits[:, :-1].float()[keep.to(logits.device)]  # (real b, seq - 1, vocab)
                targets = ids[:, 1:][keep.to(ids.device)]
                nll[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          targets.reshape(-1), reduction="sum").item()
                nll[1] += targets.numel()
                if argmax:
                    predictions.append(logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    teal_counts = torch.tensor([[m.skipped, m.seen] for m in teal.values()],
                               dtype=torch.float64).reshape(-1)
    counts = torch.cat([counter.zeros, counter.total, teal_counts, nll])
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    zeros, total = counts[:n_layers], counts[n_layers:2 * n_layers]
    skipped = counts[2 * n_layers:2 * n_layers + teal_counts.numel()].view(-1, 2)
    layer = (zeros / total.clamp(min=1)).tolist()
    nll_sum, nll_count = float(counts[-2]), int(counts[-1])
    return HeldoutResult(
        tokens=int(blocks.numel()),
        perplexity=math.exp(nll_sum / max(nll_count, 1)),
        average_sparsity=sum(layer) / max(len(layer), 1),
        layer_sparsity=layer,
        nll_sum=nll_sum,
        nll_count=nll_count,
        argmax=torch.cat(predictions) if argmax and predictions else None,
        input_sparsity={name: float(k / max(n, 1)) for name, (k, n) in
                        zip(teal, skipped.tolist())},
    )


def combine(results: dict[str, HeldoutResult]) -> dict:
    """Several sets' results as one JSON: ``perplexity`` over all their tokens,
    ``layer_sparsity`` token-weighted, ``average_sparsity`` its mean over layers, and each set
    under ``datasets``."""
    if not results:
        raise ValueError("no held-out sets to combine")
    tokens = sum(r.tokens for r in results.values())
    n_layers = len(next(iter(results.values())).layer_sparsity)
    layer = [sum(r.layer_sparsity[i] * r.tokens for r in results.values()) / tokens
             for i in range(n_layers)]
    nll = sum(r.nll_sum for r in results.values())
    count = sum(r.nll_count for r in results.values())
    out = {"perplexity": math.exp(nll / max(count, 1)),
           "average_sparsity": sum(layer) / max(n_layers, 1), "layer_sparsity": layer}
    first = next(iter(results.values()))
    if first.input_sparsity:
        per = {n: sum(r.input_sparsity[n] * r.tokens for r in results.values()) / tokens
               for n in first.input_sparsity}
        out.update(input_sparsity=per, average_input_sparsity=_mean(per.values()))
    return {**out, "datasets": {k: r.public() for k, r in results.items()}}


def evaluate_heldout(
    model: nn.Module,
    blocks: dict[str, torch.Tensor],
    batch_size: int = 4,
    *,
    accelerator=None,
    progress: bool = False,
) -> dict:
    """:func:`evaluate_blocks` on each named set of blocks, :func:`combine`-d."""
    return combine({name: evaluate_blocks(model, b, batch_size, accelerator=accelerator,
                                          desc=f"held-out {name}" if progress else None)
                    for name, b in blocks.items()})
