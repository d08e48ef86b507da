"""N:M weight masks: which linears are pruned, the masks themselves, compliance, keeping them.

An N:M mask keeps at most N of every M consecutive weights along the input dimension (the last
dim of an ``nn.Linear`` weight ``[out, in]``), the layout of sparse tensor cores (2:4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prosparse.core.errors import UsageError
from prosparse.measure.weights import (  # noqa: F401  (re-exported)
    nm_compliance,
    parse_pattern,
    weight_sparsity,
)
from prosparse.models.linears import decoder_layers, prunable_linears  # noqa: F401

MASKS_FILE = "masks.safetensors"


def split_divisible(linears: dict[str, nn.Linear], m: int
                    ) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """(linears whose in_features divide into groups of ``m``, {skipped name: reason})."""
    keep, skipped = {}, {}
    for name, lin in linears.items():
        if lin.in_features % m:
            skipped[name] = f"in_features {lin.in_features} is not divisible by M={m}"
        else:
            keep[name] = lin
    return keep, skipped


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest ``scores`` of every ``m`` consecutive entries along the last dim:
    a bool tensor of the same shape (ties go to the lower index)."""
    if scores.shape[-1] % m:
        raise UsageError(f"last dimension ({scores.shape[-1]}) is not divisible by M={m}")
    groups = scores.reshape(-1, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, groups.topk(n, dim=1, sorted=False).indices, True)
    return keep.view(scores.shape)


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero every weight of ``model``'s linears where ``masks[name]`` is False (in place)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        w = modules[name].weight
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
    return model


def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of a pruned model (e.g. a checkpoint written by ``prosparse prune``): True where
    a prunable linear's weight is non-zero. Layers with no zero are left out."""
    out = {}
    for name, lin in prunable_linears(model).items():
        keep = lin.weight.detach() != 0
        if not bool(keep.all()):
            out[name] = keep
    return out


def save_masks(masks: dict[str, torch.Tensor], path) -> None:
    """Masks as safetensors: one uint8 tensor per linear, keyed by module name."""
    from safetensors.torch import save_file

    save_file({k: v.to(torch.uint8).contiguous().cpu() for k, v in masks.items()}, str(path))


def load_masks(path) -> dict[str, torch.Tensor]:
    """Read :func:`save_masks`'s file back as bool masks."""
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(str(path)).items()}


@dataclass
class MaskKeeper:
    """Handle returned by :func:`keep_masks_`: ``remask()`` re-applies the masks, ``remove()``
    takes the gradient hooks off."""

    masks: dict[str, torch.Tensor]
    weights: dict[str, nn.Parameter]
    handles: list = field(default_factory=list)

    @torch.no_grad()
    def remask(self) -> None:
        for name, w in self.weights.items():
            w.mul_(self.masks[name].to(w))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __call__(self) -> None:
        self.remask()


def keep_masks_(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> MaskKeeper:
    """Keep every masked weight of ``model`` exactly zero while it trains (in place).

    ``masks`` maps linear names to bool keep-masks; None takes them from the zeros of the
    prunable linears (:func:`masks_from_zeros`). The masks are applied once, then a gradient
    hook on each masked weight zeroes its gradient where the mask is False.

    Why gradient hooks rather than re-masking after each step: a weight whose gradient is
    always zero gets a zero AdamW update (its moments stay exactly zero; decoupled weight decay
    scales zero to zero), so the training loop needs no change and works as prepared by
    Accelerate, with accumulation and clipping (the clipping norm then counts only the weights
    that train). The returned :class:`MaskKeeper` also re-masks on call, for an optimizer that
    can move a weight with zero gradient (e.g. one resumed with non-zero moments): call it after
    ``optimizer.step()`` when in doubt.
    """
    if masks is None:
        masks = masks_from_zeros(model)
    modules = dict(model.named_modules())
    unknown = sorted(set(masks) - set(modules))
    if unknown:
        raise UsageError(f"masks name {len(unknown)} module(s) the model does not have "
                         f"(first: {unknown[0]}); were they made for another model?")
    weights, keep = {}, {}
    for name, mask in masks.items():
        w = modules[name].weight
        if tuple(mask.shape) != tuple(w.shape):
            raise UsageError(f"mask for {name} has shape {tuple(mask.shape)}, the weight "
                             f"{tuple(w.shape)}")
        keep[name] = mask.to(device=w.device, dtype=w.dtype)
        weights[name] = w
    keeper = MaskKeeper(keep, weights)
    keeper.remask()
    for name, w in weights.items():
        keeper.handles.append(w.register_hook(_zero_masked(keep[name])))
    return keeper


def _zero_masked(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda grad: grad * mask.to(grad)
