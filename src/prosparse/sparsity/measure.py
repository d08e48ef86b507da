"""Activation sparsity and perplexity in one pass over packed held-out blocks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prosparse.data import DEFAULT_DATA, load_texts, pack_blocks, parse_data_spec
from prosparse.sparsity.hooks import ZeroCounter, capture_x1


@dataclass
class DatasetSparsity:
    """Sparsity and perplexity of one model on one data source."""

    tokens: int
    """Tokens whose FFN activations were counted."""
    perplexity: float
    """exp of the mean next-token NLL over the same blocks."""
    average_sparsity: float
    """Mean over layers of the fraction of exact zeros in x1."""
    layer_sparsity: list[float] = field(default_factory=list)
    """Per-layer fraction of exact zeros in x1, bottom layer first."""
    nll_sum: float = 0.0
    """Sum of token NLLs (to combine datasets exactly)."""
    nll_count: int = 0
    """Number of predicted tokens in ``nll_sum``."""

    def public(self) -> dict:
        d = asdict(self)
        d.pop("nll_sum")
        d.pop("nll_count")
        return d


@torch.no_grad()
def measure_blocks(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, desc: str | None = None
) -> DatasetSparsity:
    """Run ``blocks`` (n, seq_len) through ``model`` counting zeros of x1 and token NLL."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, nll_count = 0.0, 0
    counter = None
    try:
        with capture_x1(model, lambda i, x1: counter(i, x1)) as n_layers:
            counter = ZeroCounter(n_layers)
            for start in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False,
                              disable=desc is None):
                ids = blocks[start:start + batch_size].to(device)
                logits = model(input_ids=ids).logits.float()  # (b, seq, vocab)
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    ids[:, 1:].reshape(-1),
                    reduction="sum",
                )
                nll_sum += nll.item()
                nll_count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return DatasetSparsity(
        tokens=int(blocks.numel()),
        perplexity=math.exp(nll_sum / max(nll_count, 1)),
        average_sparsity=counter.average_sparsity(),
        layer_sparsity=counter.layer_sparsity(),
        nll_sum=nll_sum,
        nll_count=nll_count,
    )


def measure_sparsity(
    model: nn.Module,
    tokenizer,
    data: tuple[str, ...] | list[str] = (DEFAULT_DATA,),
    tokens: int = 8192,
    seq_len: int = 256,
    split: str = "heldout",
    batch_size: int = 4,
    progress: bool = True,
    model_name: str | None = None,
) -> dict:
    """Measure ``model`` on each data spec; returns the JSON of ``prosparse sparsity``.

    ``{"model", "average_sparsity", "datasets": {NAME: {"tokens", "perplexity",
    "average_sparsity", "layer_sparsity"}}}``; the top-level average is the token-weighted
    mean of the datasets' per-layer fractions, averaged over layers.
    """
    results = {}
    for spec in data:
        ds = parse_data_spec(spec) if isinstance(spec, str) else spec
        blocks = pack_blocks(tokenizer, load_texts(ds, split), seq_len, tokens)
        results[ds.name] = measure_blocks(
            model, blocks, batch_size, desc=f"sparsity {ds.name}" if progress else None
        )
    total = sum(r.tokens for r in results.values())
    n_layers = len(next(iter(results.values())).layer_sparsity)
    combined = [
        sum(r.layer_sparsity[i] * r.tokens for r in results.values()) / total
        for i in range(n_layers)
    ]
    name = model_name or getattr(model, "prosparse_source", None) or type(model).__name__
    return {
        "model": str(name),
        "average_sparsity": sum(combined) / n_layers,
        "datasets": {k: r.public() for k, r in results.items()},
    }
