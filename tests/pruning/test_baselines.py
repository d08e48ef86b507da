"""Magnitude, Wanda, SparseGPT and ProxSparse against independent computations."""

from __future__ import annotations

import pytest
import torch

from prosparse.core.errors import UsageError
from prosparse.pruning import nm_compliance, nm_mask, prunable_linears, weight_sparsity
from prosparse.pruning.baselines import (
    magnitude_prune_,
    sparsegpt_nm,
    sparsegpt_prune_,
    wanda_prune_,
)
from prosparse.pruning.proxsparse import ProxConfig, lambda_at, learn_masks, lr_at


def _blocks(n=6, seq=24, seed=0):
    return torch.randint(2, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_wanda_scores_by_weight_times_input_norm(llama):
    blocks = _blocks()
    name = "model.layers.0.self_attn.q_proj"
    lin = prunable_linears(llama)[name]
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        llama(input_ids=blocks)  # layer 0's inputs do not depend on any pruning
    h.remove()
    norm = torch.cat(seen).square().sum(0).sqrt()  # (in,)
    expect = nm_mask(lin.weight.detach().abs() * norm, 2, 4)
    masks = wanda_prune_(llama, prunable_linears(llama), blocks, 2, 4, progress=False)
    assert torch.equal(masks[name], expect)
    assert weight_sparsity(llama)["compliance"] == 1.0


def test_sparsegpt_with_identity_hessian_is_magnitude():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    pruned, keep = sparsegpt_nm(w, torch.eye(32), 2, 4, blocksize=8)
    torch.testing.assert_close(pruned, w * nm_mask(w.abs(), 2, 4))


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated
    w = torch.randn(16, 64, generator=gen)
    pruned, keep = sparsegpt_nm(w, x.t() @ x / len(x), 2, 4, blocksize=16)
    assert nm_compliance(pruned, 2, 4) == 1.0 and torch.equal(pruned != 0, keep)
    err = lambda wp: (x @ (w - wp).t()).square().sum().item()  # noqa: E731
    mag = w * nm_mask(w.abs(), 2, 4)
    wanda = w * nm_mask(w.abs() * x.norm(dim=0), 2, 4)
    assert err(pruned) < 0.8 * min(err(mag), err(wanda))


def test_sparsegpt_model_is_exactly_2of4(llama):
    masks = sparsegpt_prune_(llama, prunable_linears(llama), _blocks(), 2, 4, blocksize=32,
                             progress=False)
    assert len(masks) == 14
    assert weight_sparsity(llama)["compliance"] == 1.0


def test_magnitude_4of8(llama):
    magnitude_prune_(prunable_linears(llama), 4, 8)
    ws = weight_sparsity(llama, "4:8")
    assert ws["compliance"] == 1.0 and ws["zeros"] == 0.5


def test_lr_schedule_warmup_and_decay():
    assert lr_at(0, 100, 1.0, 0.1) == 0.1
    assert lr_at(9, 100, 1.0, 0.1) == 1.0  # end of warm-up (10 steps)
    assert abs(lr_at(55, 100, 1.0, 0.1) - 0.5) < 1e-9
    assert abs(lr_at(99, 100, 1.0, 0.1) - 1 / 90) < 1e-9


def test_lambda_ramp_rises_to_the_peak_and_stays():
    assert lambda_at(0, 100, 0.5, 0.0) == 0.5  # no ramp: the authors' constant lambda
    assert lambda_at(0, 100, 0.5, 0.5) == 0.5 / 50
    assert lambda_at(49, 100, 0.5, 0.5) == 0.5
    assert lambda_at(99, 100, 0.5, 0.5) == 0.5


def test_proxsparse_logs_the_ramped_lambda(llama):
    cfg = ProxConfig(lam=0.2, lambda_warmup=0.5, log_every=1)
    _, log = learn_masks(llama, prunable_linears(llama), _blocks(4), cfg, progress=False)
    assert log["prox_lambda"] == pytest.approx([0.1, 0.2, 0.2, 0.2])
    with pytest.raises(UsageError, match="--prox-lambda-warmup"):
        ProxConfig(lambda_warmup=1.5).check()


def test_proxsparse_wanda_mask_score_ranks_by_weight_times_input_norm(llama):
    """With the weights unmoved (lambda 0, lr ~0) the wanda score gives Wanda's masks on the
    tokens the run saw; a finished group (two exact zeros) keeps its two either way."""
    blocks = _blocks(4)
    name = "model.layers.0.self_attn.q_proj"
    lin = prunable_linears(llama)[name]
    w0 = lin.weight.detach().clone()
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        llama(input_ids=blocks)
    h.remove()
    norm = torch.cat(seen).square().sum(0).sqrt()
    cfg = ProxConfig(lam=0.0, lr=1e-12, mask_score="wanda")
    masks, _ = learn_masks(llama, prunable_linears(llama), blocks, cfg, progress=False)
    assert torch.equal(masks[name], nm_mask(w0.abs() * norm, 2, 4))
    assert not torch.equal(masks[name], nm_mask(w0.abs(), 2, 4))  # not magnitude's
    assert not any(h for lin in prunable_linears(llama).values()
                   for h in lin._forward_pre_hooks.values())  # hooks removed
    with pytest.raises(UsageError, match="--prox-mask-score"):
        ProxConfig(mask_score="random").check()


def test_proxsparse_wanda_reg_score_runs_the_prox_step_on_input_scaled_weights(llama):
    """One step (lr ~0): the learned weights are prox(w * s, lambda) / s, s the input norms
    over the step's tokens normalised to mean 1, and the masks their top 2."""
    from prosparse.pruning import prox_2of4

    blocks = _blocks(1)
    name = "model.layers.0.mlp.down_proj"
    lin = prunable_linears(llama)[name]
    w0 = lin.weight.detach().clone()
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        llama(input_ids=blocks)
    h.remove()
    s = torch.cat(seen).square().sum(0).sqrt()
    s = (s / s.mean()).clamp(min=1e-6)
    learned = prox_2of4(w0 * s, 0.5) / s
    cfg = ProxConfig(lam=0.5, lr=1e-12, reg_score="wanda", mask_score="magnitude")
    masks, _ = learn_masks(llama, prunable_linears(llama), blocks, cfg, progress=False)
    assert torch.equal(masks[name], nm_mask(learned.abs(), 2, 4))
    assert not torch.equal(masks[name], nm_mask(prox_2of4(w0, 0.5).abs(), 2, 4))


def test_proxsparse_masks_learned_weights_and_restores_originals(llama):
    originals = {k: v.weight.detach().clone() for k, v in prunable_linears(llama).items()}
    embed = llama.model.embed_tokens.weight.detach().clone()
    cfg = ProxConfig(lam=2.0, lr=5e-3, epochs=2, log_every=1)
    masks, log = learn_masks(llama, prunable_linears(llama), _blocks(4), cfg, progress=False)
    assert log["optimizer_steps"] == 8 and len(log["nonzero_shares"]) == 8
    assert all(abs(sum(s) - 1) < 1e-9 for s in log["nonzero_shares"])
    # The prox drives groups towards <= 2 non-zeros over the steps.
    first, last = log["nonzero_shares"][0], log["nonzero_shares"][-1]
    assert sum(last[:3]) > sum(first[:3])
    for name, lin in prunable_linears(llama).items():
        assert torch.equal(lin.weight.detach(), originals[name] * masks[name])
    assert torch.equal(llama.model.embed_tokens.weight, embed)  # not trained
    assert all(p.requires_grad for p in llama.parameters())  # restored
    assert weight_sparsity(llama)["compliance"] == 1.0
    assert log["lambda_enters"].startswith("raw")
