"""The four commands end to end on a tiny saved model: collect, train, eval (+plot), export."""

from __future__ import annotations

import json

import pytest
import torch

from prosparse import save_model
from prosparse.cli import main


@pytest.fixture
def model_dir(llama, tokenizer, tmp_path):
    return save_model(llama, tokenizer, tmp_path / "tiny")


def test_collect_train_eval_export(model_dir, text_file, tmp_path, capsys):
    pairs, pred = tmp_path / "pairs", tmp_path / "pred"
    assert main(["predictors", "collect", str(model_dir), "--act", "relu", "--data",
                 f"mine={text_file}", "--tokens", "1024", "--seq-len", "64",
                 "--clip-top", "0.15", "--out", str(pairs)]) == 0
    meta = json.loads((pairs / "meta.json").read_text())
    assert meta["tokens"] == 1024 and meta["clip_top"] == 0.15
    assert all(r <= 27 / 176 for r in meta["positive_rate"])  # at most ceil(0.15 * 176) a token
    assert main(["predictors", "train", str(pairs), "--out", str(pred), "--hidden", "16",
                 "--epochs", "2", "--target-recall", "0.9", "--json", str(tmp_path / "t.json"),
                 "--plot", str(tmp_path / "t.png")]) == 0
    train = json.loads((tmp_path / "t.json").read_text())
    assert train["average_recall"] >= 0.9 and len(train["layers"]) == 2
    assert (tmp_path / "t.png").stat().st_size > 0
    assert main(["predictors", "eval", str(pred), str(pairs), "--json",
                 str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert set(ev) >= {"average_recall", "average_predicted_sparsity", "layers"}
    assert {"recall", "predicted_sparsity", "precision", "mass_missed"} <= set(ev["layers"][0])
    assert ev["average_recall"] == pytest.approx(train["average_recall"])
    out = capsys.readouterr().out
    assert "| layer | recall %" in out and "average recall" in out
    assert "start: the gate's rank-8 truncation in 2 layer(s)" in out  # hidden 16, auto init
    # one trained set, another recall: thresholds move, weights stay
    assert main(["predictors", "calibrate", str(pred), str(pairs), "--target-recall", "0.99",
                 "--out", str(tmp_path / "p99"), "--json", str(tmp_path / "c.json")]) == 0
    cal = json.loads((tmp_path / "c.json").read_text())
    assert all(m["recall"] >= 0.99 for m in cal["layers"])
    assert cal["average_predicted_sparsity"] <= ev["average_predicted_sparsity"]
    p99 = json.loads((tmp_path / "p99" / "predictors.json").read_text())
    assert p99["target_recall"] == 0.99 and p99["calibrated_from"] == str(pred)
    capsys.readouterr()
    pi = tmp_path / "pi"
    thresholds = torch.tensor(json.loads((pred / "predictors.json").read_text())["thresholds"])
    code = main(["predictors", "export", str(pred), "--powerinfer", str(pi)])
    if (thresholds > 0).all() or (thresholds < 0).all():
        assert code == 0 and (pi / "model_1.pt").is_file()
        assert main(["predictors", "eval", str(pi), str(pairs), "--json",
                     str(tmp_path / "pi.json")]) == 0
        back = json.loads((tmp_path / "pi.json").read_text())
        # folding per-layer thresholds into fc2 rescales logits: only float rounding moves
        assert back["average_recall"] == pytest.approx(ev["average_recall"], abs=2e-3)
    else:
        assert code == 2 and "mix signs" in capsys.readouterr().err


def test_collect_refuses_a_model_without_relu(model_dir, text_file, tmp_path, capsys):
    assert main(["predictors", "collect", str(model_dir), "--data", str(text_file),
                 "--tokens", "256", "--seq-len", "64", "--out", str(tmp_path / "p")]) == 2
    assert "not a ReLU-family activation" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def _train_config(*argv):
    from prosparse.cli import build_parser
    from prosparse.cli.predictors import train_config

    return train_config(build_parser().parse_args(["predictors", "train", "pairs", *argv,
                                                   "--out", "x"]))


def test_train_config_file_overrides_and_flags(tmp_path):
    """--config FILE, then KEY=VALUE overrides, then the flags given: each later one wins."""
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("hidden: 8\nepochs: 0\ntarget_recall: 0.9\nnegative_offset: 0.01\n")
    cfg = _train_config("--config", str(cfg_file))
    assert (cfg.hidden, cfg.epochs, cfg.target_recall, cfg.negative_offset) == (8, 0, 0.9, 0.01)
    assert cfg.lr == 1e-3 and cfg.device == "auto"  # TrainConfig's defaults
    cfg = _train_config("hidden=12", "max_train_tokens=100", "--config", str(cfg_file))
    assert (cfg.hidden, cfg.max_train_tokens) == (12, 100)
    cfg = _train_config("hidden=12", "--config", str(cfg_file), "--hidden", "16",
                        "--max-tokens", "50", "--device", "cpu")
    assert (cfg.hidden, cfg.max_train_tokens, cfg.device, cfg.epochs) == (16, 50, "cpu", 0)
    assert _train_config("lr=2e-3").lr == 2e-3  # overrides without a file


@pytest.mark.parametrize("text,override,message", [
    ("hiden: 8\n", None, "unknown predictor training config key 'hiden'; choose one of hidden"),
    ("hidden: [8\nepochs: 1\n", None, "is not valid YAML at line 2"),
    ("hidden: 8\n", "epochs=many", "epochs must be an integer, got 'many'"),
    ("hidden: 8\n", "target_recall=1.5", "target_recall (1.5) must be in (0, 1]"),
])
def test_train_config_errors_are_one_line(text, override, message, tmp_path, capsys):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(text)
    out = tmp_path / "never"
    argv = ["predictors", "train", str(tmp_path), *([override] if override else []),
            "--config", str(cfg_file), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_train_with_a_config_file_end_to_end(model_dir, text_file, tmp_path):
    pairs, pred = tmp_path / "pairs", tmp_path / "pred"
    assert main(["predictors", "collect", str(model_dir), "--act", "relu", "--data",
                 str(text_file), "--tokens", "512", "--seq-len", "64", "--out", str(pairs)]) == 0
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("hidden: 32\nepochs: 0\ntarget_recall: 0.9\n")
    assert main(["predictors", "train", str(pairs), "seed=2", "--config", str(cfg_file),
                 "--hidden", "8", "--out", str(pred), "--json", str(tmp_path / "t.json")]) == 0
    config = json.loads((tmp_path / "t.json").read_text())["config"]
    assert (config["hidden"], config["epochs"], config["seed"]) == (8, 0, 2)
    assert json.loads((pred / "predictors.json").read_text())["hidden"] == 8
