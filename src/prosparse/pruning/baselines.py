"""One-shot N:M baselines: magnitude, Wanda (Sun et al., 2024), SparseGPT (Frantar and Alistarh,
2023). Each prunes ``linears`` in place and returns their bool keep-masks.

Wanda and SparseGPT see the calibration inputs layer by layer, each block's inputs coming from
the already-pruned blocks below (:func:`.calibration.layer_by_layer`).
"""

from __future__ import annotations

import torch
from torch import nn

from prosparse.pruning.calibration import layer_by_layer
from prosparse.pruning.masks import decoder_layers, nm_mask


@torch.no_grad()
def magnitude_prune_(linears: dict[str, nn.Linear], n: int, m: int) -> dict[str, torch.Tensor]:
    """Keep the ``n`` largest ``|W|`` of every ``m`` along the input dimension."""
    masks = {}
    for name, lin in linears.items():
        masks[name] = nm_mask(lin.weight.abs(), n, m)
        lin.weight.mul_(masks[name])
    return masks


@torch.no_grad()
def wanda_prune_(model: nn.Module, linears: dict[str, nn.Linear], blocks: torch.Tensor, n: int,
                 m: int, batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """Wanda: score ``|W_ij| * ||X_j||_2`` (the input's L2 norm over calibration tokens, per
    input channel j), keep the ``n`` best of every ``m`` in a row (Wanda Eq. (1), N:M)."""
    sq: dict[str, torch.Tensor] = {}
    masks = {}

    def observe(name, x):  # x: (tokens, in_features)
        s = x.float().square().sum(0)
        sq[name] = sq[name] + s if name in sq else s

    def prune(names):
        for name in names:
            lin = linears[name]
            score = lin.weight.abs().float() * sq.pop(name).sqrt()  # (out, in)
            masks[name] = nm_mask(score, n, m)
            lin.weight.mul_(masks[name])

    layer_by_layer(model, decoder_layers(model), blocks, linears, observe, prune, batch_size,
                   desc="wanda" if progress else None)
    return masks


class _Hessians:
    """``H = X^T X / tokens`` per linear; linears fed the same tensor (q/k/v, gate/up) share
    one product."""

    def __init__(self):
        self.h: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its X^T X)

    def observe(self, name: str, x: torch.Tensor) -> None:  # x: (tokens, in_features)
        # The last input is held, so its memory cannot be reused: same pointer, same tensor.
        last = self._last
        if last is not None and last[0].data_ptr() == x.data_ptr() and last[0].shape == x.shape:
            xtx = last[1]
        else:
            xf = x.float()
            xtx = (xf.t() @ xf).double()  # (in, in), summed over batches in fp64
            self._last = (x, xtx)
        self.h[name] = self.h[name] + xtx if name in self.h else xtx.clone()
        self.count[name] = self.count.get(name, 0) + x.shape[0]

    def pop(self, name: str) -> torch.Tensor:
        self._last = None
        return self.h.pop(name) / self.count.pop(name)


@torch.no_grad()
def sparsegpt_prune_(model: nn.Module, linears: dict[str, nn.Linear], blocks: torch.Tensor,
                     n: int, m: int, blocksize: int = 128, damp: float = 0.01,
                     batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """SparseGPT: prune each linear column by column with the OBS update of the weights not yet
    visited, using the layer's Hessian ``X^T X`` from calibration inputs (SparseGPT Alg. 1):
    blocks of ``blocksize`` columns, ``damp`` times the mean diagonal added, the N:M mask of
    every ``m`` columns chosen by ``w^2 / [H^-1]_jj^2`` when the sweep reaches them."""
    hessians = _Hessians()
    masks = {}

    def prune(names):
        for name in names:
            lin = linears[name]
            w, masks[name] = sparsegpt_nm(lin.weight, hessians.pop(name), n, m, blocksize, damp)
            lin.weight.copy_(w)

    layer_by_layer(model, decoder_layers(model), blocks, linears, hessians.observe, prune,
                   batch_size, desc="sparsegpt" if progress else None)
    return masks


def sparsegpt_nm(weight: torch.Tensor, h: torch.Tensor, n: int, m: int, blocksize: int = 128,
                 damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep-mask) of one linear ``weight`` (out, in) given ``h`` (in, in)."""
    w = weight.detach().float().clone()  # (out, in)
    cols = w.shape[1]
    h = h.double().clone()
    dead = torch.diag(h) == 0  # inputs never active: any weight there is free to prune
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    # Rows of the upper Cholesky factor of H^-1 give every column's OBS update in one pass.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()
    keep = torch.ones_like(w, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        wb = w[:, b0:b1].clone()
        hb = hinv[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            if i % m == 0:
                # Lowest saliency w^2 / [H^-1]_jj^2 of each group of m is pruned.
                sal = wb[:, i:i + m].square() / hb.diagonal()[i:i + m].square()
                keep[:, b0 + i:b0 + i + m] = nm_mask(sal, n, m)
            col = wb[:, i]
            q = col * keep[:, b0 + i]
            e = (col - q) / hb[i, i]  # (out,)
            wb[:, i:] -= e.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            wb[:, i] = q
            err[:, i] = e
        w[:, b0:b1] = wb
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    w *= keep
    return w.to(weight.dtype), keep
