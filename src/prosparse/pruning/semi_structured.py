"""2:4 linears on sparse tensor cores: ``torch.sparse.to_sparse_semi_structured`` (CUDA, compute
capability 8.0+, fp16/bf16).

:class:`SemiStructuredLinear` is a module swap with the same name as the linear it replaces; its
reference twin is the masked dense ``nn.Linear`` (tests tie them on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prosparse.core.errors import UsageError
from prosparse.pruning.masks import nm_compliance, prunable_linears

DTYPES = (torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why semi-structured sparsity cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "semi-structured 2:4 needs CUDA (no GPU visible)"
    device = torch.device(device or "cuda")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"semi-structured 2:4 needs compute capability 8.0+ (this GPU has "
                f"{major}.{minor})")
    return None


class SemiStructuredLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a 2:4 ``SparseSemiStructuredTensor``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()),
                                   requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SemiStructuredLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)  # (tokens, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4"


def to_semi_structured_(model: nn.Module) -> dict:
    """Swap every exactly-2:4 prunable linear of ``model`` (on CUDA, fp16/bf16) for a
    :class:`SemiStructuredLinear`, in place. Returns ``{"converted": [names],
    "skipped": {name: reason}}``; a model with nothing 2:4 is a :class:`UsageError`."""
    linears = prunable_linears(model)
    if not linears:
        raise UsageError("the model has no linear layers inside its decoder blocks to convert")
    first = next(iter(linears.values())).weight
    reason = unavailable_reason(first.device if first.is_cuda else None)
    if reason:
        raise UsageError(reason)
    if not first.is_cuda or first.dtype not in DTYPES:
        raise UsageError(f"the model is {first.dtype} on {first.device}; move it to CUDA in "
                         "float16 or bfloat16 first (model.to('cuda', torch.float16))")
    converted, skipped = [], {}
    for name, lin in linears.items():
        w = lin.weight
        if w.shape[1] % 4 or nm_compliance(w, 2, 4) < 1.0:
            skipped[name] = "not exactly 2:4"
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            setattr(parent, child, SemiStructuredLinear.from_dense(lin))
        except RuntimeError as e:  # a shape the sparse kernels do not take
            skipped[name] = str(e).splitlines()[0]
            continue
        converted.append(name)
    if not converted:
        raise UsageError("no prunable linear is exactly 2:4; prune it first (prosparse prune "
                         "--pattern 2:4)")
    return {"converted": converted, "skipped": skipped}
