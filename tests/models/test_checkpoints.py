"""Checkpoints written by prosparse load back, in prosparse and in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prosparse
from prosparse import UsageError, load_model, relufy_, save_model
from prosparse.models.activations import FATReLU
from prosparse.models.relufy import find_gated_ffns


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def test_fatrelu_round_trip_gives_identical_logits(llama, tokenizer, tmp_path, ids):
    relufy_(llama, "fatrelu", 0.01)
    want = logits(llama, ids)
    save_model(llama, tokenizer, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["hidden_act"] == "fatrelu" and cfg["hidden_act_param"] == 0.01
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()

    back, tok = load_model(str(tmp_path / "ckpt"))
    assert torch.equal(logits(back, ids), want)
    assert tok("ab").input_ids == tokenizer("ab").input_ids

    # Plain transformers, once prosparse is imported: the threshold buffer restores t exactly.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    acts = [f.act for f in find_gated_ffns(plain)]
    assert all(isinstance(a, FATReLU) and torch.equal(a.threshold, torch.tensor(0.01)) for a in acts)
    assert torch.equal(logits(plain, ids), want)


def test_relu_checkpoint_is_vanilla(llama, tokenizer, tmp_path, ids):
    relufy_(llama, act="relu")
    want = logits(llama, ids)
    save_model(llama, tokenizer, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["hidden_act"] == "relu" and "hidden_act_param" not in cfg
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(logits(plain, ids), want)


def test_legacy_fatrelu_string_and_released_form_load(llama, tokenizer, tmp_path, ids):
    """Checkpoints from other tools: no threshold buffer, the threshold only in the config."""
    relufy_(llama, "fatrelu", 0.03)
    want = logits(llama, ids)
    for form in ({"hidden_act": "fatrelu_0.03"}, {"hidden_act": "fatrelu", "hidden_act_param": 0.03}):
        relufy_(llama, act="relu")  # no buffer in the state dict, as in released checkpoints
        out = tmp_path / form["hidden_act"]
        save_model(llama, tokenizer, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("hidden_act_param", None)
        cfg.update(form)
        (out / "config.json").write_text(json.dumps(cfg))
        back, _ = load_model(str(out))
        assert all(torch.equal(f.act.threshold, torch.tensor(0.03)) for f in find_gated_ffns(back))
        assert torch.equal(logits(back, ids), want)
        relufy_(llama, "fatrelu", 0.03)
    legacy = AutoModelForCausalLM.from_pretrained(tmp_path / "fatrelu_0.03").eval()
    assert torch.equal(logits(legacy, ids), want)


def test_failed_write_leaves_nothing_and_keeps_the_old_checkpoint(llama, tokenizer, tmp_path,
                                                                  monkeypatch):
    relufy_(llama, act="relu")
    target = tmp_path / "ckpt"

    def boom(*args, **kwargs):
        (args[0] / "partial.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(llama, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(llama, tokenizer, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    save_model(llama, tokenizer, target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists; choose another --out"):
        save_model(llama, tokenizer, target)
    monkeypatch.setattr(llama, "save_pretrained", boom)
    with pytest.raises(OSError):
        save_model(llama, tokenizer, target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unknown_model_error_names_what_was_tried(tmp_path):
    with pytest.raises(UsageError, match=r"no model at 'x': not a directory with "
                       r"config.json, not a .gguf file, not a known name \(smollm2-135m\)"):
        load_model("x")
    with pytest.raises(UsageError, match="no model at"):
        load_model(str(tmp_path))
    with pytest.raises(KeyError, match="unknown dtype 'fp8'; choose one of"):
        load_model("smollm2-135m", dtype="fp8")


def test_public_api():
    assert prosparse.relufy_ is relufy_ and callable(prosparse.load_model)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty, not a GGUF model"),
    (bytes(range(256)) * 16, "is not a GGUF file"),
    (b"GGUF" + (7).to_bytes(4, "little") + b"\0" * 64, "unknown GGUF version"),
    (b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64, "not a readable GGUF model"),
])
def test_malformed_gguf_is_one_line_naming_the_file(tmp_path, content, message):
    from prosparse.core.errors import UsageError
    from prosparse.models.loading import load_model

    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        load_model(str(bad))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert len(str(err.value)) < 300  # never echoes the file


def test_model_folder_without_tokenizer_says_so(llama, tokenizer, tmp_path):
    from prosparse.core.errors import UsageError
    from prosparse.models.loading import TOKENIZER_FILES, load_model

    save_model(llama, tokenizer, tmp_path / "m")
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        (tmp_path / "m" / name).unlink(missing_ok=True)
    with pytest.raises(UsageError, match="has no tokenizer files") as err:
        load_model(str(tmp_path / "m"))
    assert "sentencepiece" not in str(err.value)
