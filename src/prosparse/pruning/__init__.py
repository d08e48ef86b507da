"""Weight sparsity: N:M masks, magnitude / Wanda / SparseGPT, ProxSparse's regulariser and
proximal step, semi-structured conversion.

``sparsity/`` is about activations; this package is about weights.
"""

from prosparse.pruning.masks import (
    MaskKeeper,
    apply_masks_,
    keep_masks_,
    load_masks,
    masks_from_zeros,
    nm_compliance,
    nm_mask,
    parse_pattern,
    prunable_linears,
    save_masks,
    weight_sparsity,
)
from prosparse.pruning.prox import group_nonzeros, prox_2of4, regularizer_2of4

__all__ = [
    "MaskKeeper",
    "apply_masks_",
    "group_nonzeros",
    "keep_masks_",
    "load_masks",
    "masks_from_zeros",
    "nm_compliance",
    "nm_mask",
    "parse_pattern",
    "prox_2of4",
    "prunable_linears",
    "prune",
    "PruneConfig",
    "regularizer_2of4",
    "save_masks",
    "to_semi_structured_",
    "weight_sparsity",
]


def __getattr__(name: str):
    # The run (data, models, Accelerate) and the CUDA swap load on first use.
    if name in ("prune", "PruneConfig"):
        from prosparse.pruning import run

        return getattr(run, name)
    if name == "to_semi_structured_":
        from prosparse.pruning.semi_structured import to_semi_structured_

        return to_semi_structured_
    raise AttributeError(f"module 'prosparse.pruning' has no attribute {name!r}")
