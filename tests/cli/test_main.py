"""The `prosparse` command: convert, sparsity, threshold on a tiny saved model; clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from prosparse import load_model, save_model
from prosparse.cli import main
from prosparse.models.relufy import find_gated_ffns


@pytest.fixture
def model_dir(llama, tokenizer, tmp_path):
    return save_model(llama, tokenizer, tmp_path / "tiny")


def test_convert_then_sparsity_and_plot(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "relu"
    assert main(["convert", str(model_dir), "--act", "fatrelu", "--threshold", "0.02",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["hidden_act_param"] == 0.02
    model, _ = load_model(str(out))
    assert all(f.act.param == 0.02 for f in find_gated_ffns(model))

    js, png = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["sparsity", str(out), "--data", f"mine={text_file}", "--data", str(text_file),
                 "--tokens", "128", "--seq-len", "32", "--json", str(js), "--plot", str(png)]) == 0
    result = json.loads(js.read_text())
    assert set(result["datasets"]) == {"mine", "corpus"}
    assert result["datasets"]["mine"]["tokens"] == 128
    assert 0 < result["average_sparsity"] < 1
    assert png.stat().st_size > 1000
    assert "| data" in capsys.readouterr().out


def test_threshold_command_json(model_dir, text_file, tmp_path):
    js = tmp_path / "t.json"
    assert main(["threshold", str(model_dir), "--act", "relu", "--data", str(text_file),
                 "--thresholds", "0,0.01,1", "--tokens", "128", "--seq-len", "32",
                 "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert [r["t"] for r in result["thresholds"]] == [0, 0.01, 1]
    assert result["recommended"] in (0, 0.01, 1)


def test_threshold_command_baseline_t(model_dir, text_file, tmp_path, capsys):
    js = tmp_path / "t.json"
    assert main(["threshold", str(model_dir), "--act", "relu", "--data", str(text_file),
                 "--thresholds", "0,0.01,1", "--tokens", "128", "--seq-len", "32",
                 "--baseline-t", "0.01", "--tolerance", "0", "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    rows = {r["t"]: r["perplexity"] for r in result["thresholds"]}
    assert result["baseline_t"] == 0.01 and result["baseline_perplexity"] == rows[0.01]
    assert "of t = 0.01:" in capsys.readouterr().out


def test_errors_are_clear_and_nothing_is_written(tmp_path, capsys):
    assert main(["sparsity", "nowhere", "--tokens", "64"]) == 2
    assert "no model at 'nowhere'" in capsys.readouterr().err
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["convert", "nowhere", "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["threshold", "--thresholds", "a,b"])
    assert "'a' is not a finite number, in 'a,b' (a comma-separated list" in capsys.readouterr().err


def test_existing_out_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(model_dir), "--out", str(out)]) == 2
    assert "taken already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("convert", "sparsity", "threshold", "generate", "prune", "demo"):
        assert cmd in text


def test_tiny_model_dir_loads(model_dir):
    model, tok = load_model(str(model_dir))
    assert model.training is False and tok.eos_token_id == 1
    assert next(model.parameters()).dtype == torch.float32


def test_threshold_command_reference_model(model_dir, text_file, tmp_path, capsys):
    """--reference judges the tolerance against another model's perplexity on the same text."""
    from prosparse import load_model
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.measure.sparsity import heldout_sets

    js = tmp_path / "t.json"
    assert main(["threshold", str(model_dir), "--act", "relu", "--data", str(text_file),
                 "--thresholds", "0,0.01,1", "--tokens", "128", "--seq-len", "32",
                 "--reference", str(model_dir), "--tolerance", "0.05", "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    ref, tok = load_model(str(model_dir))  # the SiLU model as saved
    want = evaluate_heldout(ref, heldout_sets(tok, [str(text_file)], 128, 32))["perplexity"]
    assert result["reference_perplexity"] == pytest.approx(want)
    rows = {r["t"]: r["perplexity"] for r in result["thresholds"]}
    ok = [t for t, p in rows.items() if p <= want * 1.05]
    assert result["within_tolerance"] == bool(ok)
    assert result["recommended"] == (max(ok) if ok else 0)
    assert f"reference {model_dir}: perplexity" in capsys.readouterr().out


def test_threshold_reference_with_another_tokenizer_is_refused(model_dir, llama, tokenizer,
                                                               text_file, tmp_path, capsys):
    other = tmp_path / "other"
    tok = tokenizer.__class__.from_pretrained(str(model_dir))
    tok.add_tokens(["<extra>"])
    save_model(llama, tok, other)
    assert main(["threshold", str(model_dir), "--act", "relu", "--data", str(text_file),
                 "--tokens", "128", "--seq-len", "32", "--reference", str(other)]) == 2
    assert "has another tokenizer" in capsys.readouterr().err


def test_threshold_out_saves_the_chosen_thresholds(model_dir, text_file, tmp_path, capsys):
    from prosparse.models.relufy import current_activation

    js, out = tmp_path / "t.json", tmp_path / "deploy"
    args = ["threshold", str(model_dir), "--act", "relu", "--data", str(text_file),
            "--tokens", "128", "--seq-len", "32", "--per-layer", "--tolerance", "0.05",
            "--json", str(js), "--out", str(out)]
    assert main(args) == 0
    ts = json.loads(js.read_text())["layer_thresholds"]
    model, _ = load_model(str(out))
    act, param = current_activation(model)
    assert act in ("fatrelu", "relu")
    assert (param if isinstance(param, list) else [param] * len(ts)) == pytest.approx(ts)
    assert f"wrote {out}" in capsys.readouterr().out
    keep = out / "config.json"
    before = keep.read_text()
    assert main(args) == 2  # an existing --out: refused before any work, nothing touched
    assert "--overwrite" in capsys.readouterr().err and keep.read_text() == before
