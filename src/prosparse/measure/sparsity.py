"""``prosparse sparsity``: activation sparsity and perplexity of a model on held-out text, per
data source, through the one held-out evaluator (:mod:`prosparse.measure.heldout`)."""

from __future__ import annotations

from torch import nn

from prosparse.data import DEFAULT_DATA, load_texts, pack_blocks, parse_data_spec
from prosparse.measure.heldout import combine, evaluate_blocks
from prosparse.measure.weights import weight_sparsity


def heldout_sets(tokenizer, data, tokens: int, seq_len: int, split: str = "heldout") -> dict:
    """``{name: blocks (n, seq_len)}`` of ``tokens`` tokens from each data spec's ``split``."""
    out = {}
    for spec in data:
        ds = parse_data_spec(spec) if isinstance(spec, str) else spec
        out[ds.name] = pack_blocks(tokenizer, load_texts(ds, split), seq_len, tokens)
    return out


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

    ``{"model", "average_sparsity", "perplexity", "layer_sparsity", "datasets": {NAME:
    {"tokens", "perplexity", "average_sparsity", "layer_sparsity"}}}``; the top-level figures
    combine the datasets (layer fractions token-weighted, averaged over layers).
    """
    sets = heldout_sets(tokenizer, data, tokens, seq_len, split)
    result = combine({name: evaluate_blocks(model, blocks, batch_size,
                                            desc=f"sparsity {name}" if progress else None)
                      for name, blocks in sets.items()})
    name = model_name or getattr(model, "prosparse_source", None) or type(model).__name__
    out = {"model": str(name), **result}
    weights = _weight_sparsity(model)
    if weights is not None:
        out["weight_sparsity"] = weights
    return out


def _weight_sparsity(model: nn.Module) -> dict | None:
    """Zeros per block linear and N:M compliance (the pattern ``prosparse prune`` recorded,
    else 2:4) when the model's weights have any exact zeros (a pruned model); else None."""
    recorded = getattr(getattr(model, "config", None), "prosparse_pruning", None) or {}
    report = weight_sparsity(model, recorded.get("pattern", "2:4"))
    return report if report["zeros"] > 0 else None
