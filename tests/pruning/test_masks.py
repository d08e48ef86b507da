"""N:M masks, prunable linears, weight sparsity, and masks kept exact through AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prosparse.core.errors import UsageError
from prosparse.pruning import (
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
from prosparse.pruning.baselines import magnitude_prune_

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 4 : 8 ") == (4, 8)
    for bad in ("4:2", "2:2", "0:4", "2-4", "two:four", ""):
        with pytest.raises(UsageError, match="must be N:M with 0 < N < M"):
            parse_pattern(bad)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_n_largest_per_group(n, m):
    s = torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(n * m))
    mask = nm_mask(s, n, m)
    for row in range(s.shape[0]):
        for g in range(0, s.shape[1], m):
            kept = set(torch.nonzero(mask[row, g:g + m]).flatten().tolist())
            expect = set(s[row, g:g + m].argsort(descending=True)[:n].tolist())
            assert kept == expect
    assert nm_compliance(s * mask, n, m) == 1.0
    assert nm_compliance(s, n, m) == 0.0  # dense random: no group complies


def test_prunable_linears_are_the_decoder_projections(llama):
    names = prunable_linears(llama)
    assert len(names) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in names} == set(PROJ)
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert prunable_linears(nn.Sequential(nn.Embedding(4, 4))) == {}


def test_weight_sparsity_reports_zeros_and_compliance(llama):
    dense = weight_sparsity(llama)
    assert dense["zeros"] == 0 and dense["compliance"] == 0
    lin = prunable_linears(llama)
    magnitude_prune_({k: v for k, v in lin.items() if "layers.0." in k}, 2, 4)
    ws = weight_sparsity(llama, "2:4")
    l0 = ws["layers"]["model.layers.0.mlp.down_proj"]
    l1 = ws["layers"]["model.layers.1.mlp.down_proj"]
    assert l0 == {"zeros": 0.5, "compliance": 1.0} and l1["compliance"] == 0.0
    assert ws["compliance"] == pytest.approx(0.5, abs=0.01)
    q0 = weight_sparsity(llama, "4:8")["layers"]["model.layers.0.self_attn.q_proj"]
    assert q0["compliance"] == 1.0  # 2:4 implies 4:8


def test_masks_round_trip(tmp_path, llama):
    magnitude_prune_(prunable_linears(llama), 2, 4)
    masks = masks_from_zeros(llama)
    assert len(masks) == 14
    save_masks(masks, tmp_path / "m.safetensors")
    back = load_masks(tmp_path / "m.safetensors")
    assert set(back) == set(masks) and all(torch.equal(back[k], masks[k]) for k in masks)


def test_keep_masks_exact_zeros_under_adamw(llama):
    """A plain AdamW loop (weight decay on, lr high) never moves a masked weight off zero."""
    magnitude_prune_(prunable_linears(llama), 2, 4)
    masks = masks_from_zeros(llama)
    keep_masks_(llama)
    before = {k: v.weight.detach().clone() for k, v in prunable_linears(llama).items()}
    opt = torch.optim.AdamW(llama.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    llama.train()
    for _ in range(5):
        llama(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, lin in prunable_linears(llama).items():
        w = lin.weight.detach()
        assert torch.all(w[~masks[name]] == 0), f"{name}: a masked weight moved"
        assert not torch.equal(w[masks[name]], before[name][masks[name]]), f"{name} froze"
    assert weight_sparsity(llama)["compliance"] == 1.0


def test_keep_masks_remask_and_errors(llama):
    lin = prunable_linears(llama)
    name = "model.layers.0.mlp.up_proj"
    mask = nm_mask(lin[name].weight.abs(), 2, 4)
    keeper = keep_masks_(llama, {name: mask})
    assert torch.all(lin[name].weight[~mask] == 0)
    with torch.no_grad():
        lin[name].weight.add_(1.0)  # something outside the optimiser moved it
    keeper.remask()
    assert torch.all(lin[name].weight[~mask] == 0)
    keeper.remove()
    with pytest.raises(UsageError, match="does not have"):
        keep_masks_(llama, {"nope.q_proj": mask})
    with pytest.raises(UsageError, match="has shape"):
        keep_masks_(llama, {name: mask[:, :8]})
