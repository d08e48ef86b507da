"""CATS and TEAL: calibrated sparsity on held-out text, the masked dense computation, exact
sparse decoding through sparsify_, and checkpoints that load back."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import prosparse
from prosparse import find_gated_ffns
from prosparse.inference import SparseInputLinear, SparseMLP, sparsify_
from prosparse.inference.decode import greedy_decode
from prosparse.measure.heldout import evaluate_blocks
from prosparse.models.activations import CATS
from prosparse.models.teal import TEALLinear, block_linears, teal_mask
from prosparse.sparsity.training_free import calibrate_cats, cats_, teal_
from tests.conftest import tiny_llama


def blocks(n, seq=32, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", [0.4, 0.5, 0.7])
def test_cats_heldout_sparsity_is_the_target(target):
    model = tiny_llama()
    thresholds = cats_(model, blocks(16), target)
    assert len(thresholds) == 2 and all(t > 0 for t in thresholds)
    got = evaluate_blocks(model, blocks(8, seed=1))  # other tokens than calibration
    assert got.average_sparsity == pytest.approx(target, abs=0.02)


def test_cats_is_the_masked_silu_ffn():
    model = tiny_llama()
    x = torch.randn(3, 5, 64)
    ffn = find_gated_ffns(model)[0].module
    dense = ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
    (t,) = calibrate_cats(model, blocks(8), 0.6)[:1]
    cats_(model, blocks(8), 0.6)
    g = F.silu(ffn.gate_proj(x))
    mask = g.abs() >= t
    want = ffn.down_proj(torch.where(mask, g, 0.0) * ffn.up_proj(x))
    torch.testing.assert_close(ffn(x), want)
    assert not torch.allclose(ffn(x), dense)  # it did change something
    assert isinstance(ffn.act_fn, CATS)


@pytest.mark.parametrize("target", [0.4, 0.5, 0.7])
def test_teal_heldout_input_sparsity_is_the_target(target):
    model = tiny_llama()
    thresholds = teal_(model, blocks(16), target)
    assert len(thresholds) == 14  # 2 layers x q, k, v, o, gate, up, down
    got = evaluate_blocks(model, blocks(8, seed=1)).public()
    assert set(got["input_sparsity"]) == set(thresholds)
    assert got["average_input_sparsity"] == pytest.approx(target, abs=0.02)
    # every linear skips inputs; each is near the target up to how well 512 random calibration
    # tokens describe its held-out inputs (o_proj's, the attention output, least well)
    assert all(abs(v - target) < 0.15 for v in got["input_sparsity"].values())


def test_teal_second_pass_calibrates_on_the_thresholded_model():
    """passes=2 re-reads the inputs the lower layers' thresholds make: upper layers' thresholds
    move, the first layer's cannot (its input is the embedding either way), and the held-out
    sparsity stays on target."""
    one = teal_(tiny_llama(), blocks(16), 0.6)
    model = tiny_llama()
    two = teal_(model, blocks(16), 0.6, passes=2)
    assert all(two[k] == pytest.approx(one[k]) for k in one if k.startswith("model.layers.0.")
               and k.endswith(("q_proj", "k_proj", "v_proj")))
    assert any(two[k] != pytest.approx(one[k]) for k in one if k.startswith("model.layers.1."))
    got = evaluate_blocks(model, blocks(8, seed=1)).public()
    assert got["average_input_sparsity"] == pytest.approx(0.6, abs=0.02)


def test_teal_linear_is_the_masked_dense_linear():
    model = tiny_llama()
    teal_(model, blocks(8), 0.5)
    name, lin = block_linears(model)[0]
    assert isinstance(lin, TEALLinear) and "embed" not in name
    x = torch.randn(2, 7, lin.in_features)
    masked = torch.where(x.abs() < lin.threshold, 0.0, x)
    torch.testing.assert_close(lin(x), F.linear(masked, lin.weight, lin.bias))
    assert torch.equal(teal_mask(x, lin.threshold), masked)
    assert not any(isinstance(m, TEALLinear) for m in (model.lm_head, model.model.embed_tokens))


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_decoding_gives_the_masked_dense_tokens(method):
    model = tiny_llama()
    (cats_ if method == "cats" else teal_)(model, blocks(8), 0.5)
    prompt = blocks(1, seq=6, seed=3)
    dense = greedy_decode(model, prompt, 12)
    logits = model(prompt).logits
    swapped = sparsify_(model, dense_below=0.0)
    kinds = {type(model.get_submodule(n)) for n in swapped}
    assert kinds == ({SparseMLP} if method == "cats" else {SparseInputLinear})
    assert len(swapped) == (2 if method == "cats" else 14)
    sparse = greedy_decode(model, prompt, 12)
    assert sparse.tokens == dense.tokens
    torch.testing.assert_close(model(prompt).logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_checkpoint_loads_back_with_its_thresholds(method, tmp_path):
    from tests.conftest import char_tokenizer

    model = tiny_llama()
    (cats_ if method == "cats" else teal_)(model, blocks(8), 0.5)
    ids = blocks(2, seed=4)
    want = model(ids).logits
    prosparse.save_model(model, char_tokenizer(), tmp_path / "m")
    back, _ = prosparse.load_model(str(tmp_path / "m"))
    torch.testing.assert_close(back(ids).logits, want)
    if method == "cats":
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # prosparse imported
        torch.testing.assert_close(plain(ids).logits, want)
        assert back.config.hidden_act == "cats" and len(back.config.hidden_act_param) == 2


def test_cats_refuses_a_relu_model_and_a_full_target():
    model = tiny_llama()
    prosparse.relufy_(model)
    with pytest.raises(ValueError, match="SiLU"):
        calibrate_cats(model, blocks(4), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        calibrate_cats(tiny_llama(), blocks(4), 1.0)


def test_convert_cli_calibrates_and_writes(tmp_path, capsys):
    from prosparse.cli import main
    from tests.conftest import char_tokenizer

    src = tmp_path / "tiny"
    tiny_llama().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog "
                                f"{i * 7} times." for i in range(400)))
    for method, passes in (("cats", 1), ("teal", 2)):
        out = tmp_path / method
        assert main(["convert", str(src), "--act", method, "--sparsity", "0.5", "--data",
                     f"c={text}", "--calib-tokens", "2048", "--seq-len", "64", "--out",
                     str(out), "--json", str(tmp_path / f"{method}.json"),
                     "--passes", str(passes)]) == 0
        assert json.loads((tmp_path / f"{method}.json").read_text())["passes"] == passes
        config = json.loads((out / "config.json").read_text())
        assert config["prosparse_training_free"]["calibration"]["passes"] == passes
    assert main(["convert", str(src), "--act", "cats", "--out", str(tmp_path / "x")]) == 2
    assert "--target-sparsity" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparsify_with_restore_puts_the_dense_modules_back(method):
    from prosparse.inference import sparsify_with_restore_

    model = tiny_llama()
    (cats_ if method == "cats" else teal_)(model, blocks(8), 0.5)
    before = {n: type(m) for n, m in model.named_modules()}
    ids = blocks(2, seed=5)
    want = model(ids).logits
    names, restore = sparsify_with_restore_(model, dense_below=0.0)
    assert {type(model.get_submodule(n)) for n in names} <= {SparseMLP, SparseInputLinear}
    restore()
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(m.down_proj.weight.is_contiguous() for m in
               (f.module for f in find_gated_ffns(model))), "dense layout back"
    torch.testing.assert_close(model(ids).logits, want)
