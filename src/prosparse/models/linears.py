"""The decoder blocks' linear layers: what weight pruning, its masks and weight-sparsity
measurement all walk."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's stack of blocks: the longest ``ModuleList`` whose entries hold linears."""
    best = None
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module)
                and all(any(isinstance(c, nn.Linear) for c in b.modules()) for b in module)
                and (best is None or len(module) > len(best))):
            best = module
    return best


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks, by full module name (for LLaMA-style
    models: q/k/v/o_proj and gate/up/down_proj). Embeddings and the LM head sit outside the
    blocks and are never pruned."""
    layers = decoder_layers(model)
    if layers is None:
        return {}
    inside = {id(m) for m in layers.modules()}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) in inside}
