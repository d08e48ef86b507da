"""Collection: pairs match an independent recomputation, shards stay bounded, labels round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prosparse import UsageError, find_gated_ffns, relufy_
from prosparse.predictors.collect import (
    PairData,
    collect_pairs,
    find_predictor_sites,
    labels_from_x1,
    pack_labels,
    unpack_labels,
)


def blocks(n=6, seq=16, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_label_packing_round_trips_odd_widths():
    gen = torch.Generator().manual_seed(0)
    for d_ff in (1, 7, 8, 13, 176):
        labels = torch.rand(5, d_ff, generator=gen) < 0.3
        packed = pack_labels(labels)
        assert packed.shape == (5, (d_ff + 7) // 8) and packed.dtype == np.uint8
        assert (unpack_labels(packed, d_ff) == labels.numpy()).all()


def test_clip_top_keeps_the_largest_nonzero_per_token():
    x1 = torch.tensor([[0.0, -5.0, 1.0, 0.5, 0.0, 3.0, 0.0, 0.1, 0.0, 0.0]])
    assert torch.equal(labels_from_x1(x1), x1 != 0)
    top = labels_from_x1(x1, clip_top=0.2)  # ceil(0.2 * 10) = 2: |-5| and 3
    assert top.nonzero()[:, 1].tolist() == [1, 5]
    # fewer nonzeros than k: only the nonzeros stay positive
    assert labels_from_x1(torch.tensor([[0.0, 2.0, 0.0]]), clip_top=1.0).tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match="clip_top"):
        labels_from_x1(x1, clip_top=1.5)


def test_pairs_match_an_independent_recomputation(llama, tmp_path):
    relufy_(llama)
    b = blocks()
    info = collect_pairs(llama, b, tmp_path / "c", batch_size=4, shard_tokens=40,
                         progress=False)
    # independent: residual stream = input of post_attention_layernorm, x1 from the FFN's input
    resid, ffn_in = {}, {}
    hooks = []
    for i, layer in enumerate(llama.model.layers):
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: resid.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: ffn_in.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        llama(input_ids=b)
    for h in hooks:
        h.remove()
    data = PairData(tmp_path / "c")
    assert data.tokens == b.numel() == 96 and info["n_val"] == round(96 * 0.05)
    for i, f in enumerate(find_gated_ffns(llama)):
        x1 = f.act(f.module.gate_proj(ffn_in[i])) * f.module.up_proj(ffn_in[i])
        got_x = torch.from_numpy(np.array(data.inputs(i)[0:96]))
        assert torch.equal(got_x, resid[i].half())
        got_y = unpack_labels(np.array(data.labels_packed(i)[0:96]), data.d_ff)
        assert (got_y == (x1 != 0).numpy()).all()
        mass = data.mass(i)
        assert mass.shape == (info["mass_tokens"], 176)
        want = x1[96 - info["n_val"]:][: info["mass_tokens"]].abs().half().detach().numpy()
        assert np.array_equal(mass, want)
        assert info["positive_rate"][i] == pytest.approx(float((x1 != 0).float().mean()))


def test_memory_and_shards_are_bounded(llama, tmp_path):
    relufy_(llama)
    b = blocks(n=12, seq=16)
    collect_pairs(llama, b, tmp_path / "c", batch_size=2, shard_tokens=50, progress=False)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["shards"] == [50, 50, 50, 42]  # 192 tokens in shards of at most 50 rows
    for layer in range(2):
        folder = tmp_path / "c" / f"layer_{layer:02d}"
        xs = sorted(folder.glob("x_*.bin"))
        ys = sorted(folder.glob("y_*.bin"))
        assert len(xs) == len(ys) == 4
        for f, rows in zip(xs, meta["shards"]):
            assert f.stat().st_size == rows * 64 * 2  # fp16 inputs
        for f, rows in zip(ys, meta["shards"]):
            assert f.stat().st_size == rows * 22  # 176 labels -> 22 bytes
    # what the hooks hold at once is one forward batch, whatever the token count
    big = collect_pairs(llama, blocks(n=40, seq=16), tmp_path / "d", batch_size=2,
                        shard_tokens=50, progress=False)
    assert big["max_rows_held"] == meta["max_rows_held"] == 2 * 16


def test_rows_read_back_across_shards(llama, tmp_path):
    relufy_(llama)
    collect_pairs(llama, blocks(), tmp_path / "c", batch_size=4, shard_tokens=40, progress=False)
    whole = collect_pairs(llama, blocks(), tmp_path / "w", batch_size=4, shard_tokens=1000,
                          progress=False)
    a, b = PairData(tmp_path / "c"), PairData(tmp_path / "w")
    assert whole["shards"] == [96]
    assert np.array_equal(a.inputs(1)[30:70], b.inputs(1)[30:70])
    assert np.array_equal(a.labels_packed(0)[0:96], b.labels_packed(0)[0:96])


def test_errors_name_the_problem(llama, tmp_path):
    with pytest.raises(ValueError, match="not a ReLU-family activation"):
        collect_pairs(llama, blocks(), tmp_path / "c", progress=False)
    relufy_(llama)
    for layer in llama.model.layers:
        layer.ffn_ln = layer.post_attention_layernorm
        del layer.post_attention_layernorm
    with pytest.raises(ValueError, match="no norm feeding the FFN 'model.layers.0.mlp'"):
        find_predictor_sites(llama)
    with pytest.raises(UsageError, match="meta.json"):
        PairData(tmp_path)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "olmo2", "phi3", "qwen3"])
def test_every_family_collects_its_gate_and_decodes_with_predictors(family, tmp_path):
    # the predictor input and the gate map are right for pre-norm layouts (Gemma's 1 + w,
    # Gemma 2/3's pre_feedforward_layernorm, Phi-3's fused gate_up_proj) and for OLMo 2's
    # post-norm one, whose FFN reads the residual stream itself
    from prosparse.inference import (
        PredictedSparseMLP,
        attach_predictors_,
        calibrate_thresholds_,
    )
    from prosparse.predictors import PredictorSet
    from tests.models.test_relufy import build

    model = build(family)
    relufy_(model)
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    meta = collect_pairs(model, blocks, tmp_path / "c", batch_size=4, val_fraction=0.25,
                         progress=False)
    assert meta["gate_init"] == [True, True], meta["gate_init_notes"]
    assert all(name.endswith("(input)") == (family == "olmo2") for name in meta["inputs"])
    with torch.no_grad():
        dense = model(input_ids=blocks[:1]).logits
        pset = PredictorSet(64, 176, 2, 8)
        pset.thresholds.fill_(-1e9)  # every neuron predicted active: exactly the dense model
        restore = attach_predictors_(model, pset)
        try:
            torch.testing.assert_close(model(input_ids=blocks[:1]).logits, dense,
                                       rtol=1e-4, atol=1e-4)
        finally:
            restore()
        calibrate_thresholds_(model, pset, blocks[:1], 0.5)  # hooks the right input, in order
        restore = attach_predictors_(model, pset)
        try:
            model(input_ids=blocks[:1])
            mods = [m for m in model.modules() if isinstance(m, PredictedSparseMLP)]
            assert [1 - m.predicted_active / (m.tokens * m.d_ff) for m in mods] == \
                pytest.approx([0.5, 0.5], abs=1e-2)
        finally:
            restore()
