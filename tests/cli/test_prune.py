"""``prosparse prune`` end to end on a tiny model folder, and its errors before any work."""

from __future__ import annotations

import json
import re

import pytest
import torch

from prosparse.cli import main
from prosparse.core.errors import UsageError
from prosparse.pruning import load_masks, nm_compliance, prunable_linears
from prosparse.pruning.run import PruneConfig, prune

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def model_dir(tmp_path, llama, tokenizer):
    from prosparse.models.saving import save_model

    return str(save_model(llama, tokenizer, tmp_path / "tiny"))


def _args(model_dir, text_file, out, *extra):
    return ["prune", model_dir, "--data", str(text_file), "--samples", "4", "--seq-len", "32",
            "--eval-data", str(text_file), "--eval-tokens", "256", "--eval-seq-len", "32",
            "--out", str(out), *extra]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "proxsparse"])
def test_prune_writes_a_2of4_checkpoint(method, model_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"out-{method}"
    extra = ["--lambda", "0.5", "--epochs", "1", "--log-every", "1"] if method == "proxsparse" \
        else []
    assert main(_args(model_dir, text_file, out, "--method", method, "--json",
                      str(tmp_path / "r.json"), *extra)) == 0
    assert "ppl before" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    linears = prunable_linears(model)
    assert {n.rsplit(".", 1)[1] for n in linears} == set(PROJ)
    for name, lin in linears.items():
        assert nm_compliance(lin.weight, 2, 4) == 1.0, name
        assert float((lin.weight == 0).float().mean()) == 0.5, name
    masks = load_masks(out / "masks.safetensors")
    assert set(masks) == set(linears)
    assert all(torch.equal(masks[n], linears[n].weight != 0) for n in linears)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result == json.loads((out / "pruning.json").read_text())
    assert result["method"] == method and result["pattern"] == "2:4"
    assert result["compliance"] == 1.0 and result["skipped"] == {}
    assert result["perplexity"]["before"] > 1 and result["perplexity"]["after"] > 1
    assert result["wall_seconds"] > 0 and len(result["layers"]) == 14
    meta = json.loads((out / "config.json").read_text())["prosparse_pruning"]
    assert meta["method"] == method and meta["samples"] == (0 if method == "magnitude" else 4)
    if method == "proxsparse":
        assert result["lambda"] == 0.5 and result["lambda_scale"] == "raw"
        shares = result["proxsparse"]["nonzero_shares"]
        assert len(shares) == result["proxsparse"]["optimizer_steps"] == 4
        assert all(len(s) == 5 for s in shares)


def test_layers_not_divisible_are_skipped_and_reported(model_dir, text_file, tmp_path):
    # 8:32 fits d_model 64 but not the FFN's 176 inputs: down_proj is skipped.
    cfg = PruneConfig(model=model_dir, method="magnitude", pattern="8:32", eval_tokens=0)
    result = prune(cfg, tmp_path / "o", progress=False)
    assert sorted(result["skipped"]) == ["model.layers.0.mlp.down_proj",
                                         "model.layers.1.mlp.down_proj"]
    assert "not divisible by M=32" in result["skipped"]["model.layers.0.mlp.down_proj"]
    assert result["layers"]["model.layers.0.mlp.down_proj"]["zeros"] == 0


@pytest.mark.parametrize("extra,message", [
    (["--pattern", "4:2"], "must be N:M with 0 < N < M"),
    (["--pattern", "2x4"], "must be N:M with 0 < N < M"),
    (["--method", "proxsparse", "--pattern", "4:8"], "2:4 masks only"),
    (["--method", "proxsparse", "--lambda", "-1"], "must be >= 0"),
    (["--method", "oops"], "choose one of magnitude, wanda"),
    (["--samples", "100000"], "is more than --data"),
])
def test_bad_input_is_one_line_and_writes_nothing(extra, message, model_dir, text_file,
                                                   tmp_path, capsys):
    out = tmp_path / "never"
    assert main(_args(model_dir, text_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading progress bar
    assert err.startswith("prosparse prune: error: ") and message in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_existing_out_needs_overwrite(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "exists"
    assert main(_args(model_dir, text_file, out, "--method", "magnitude")) == 0
    first = (out / "pruning.json").read_text()
    assert main(_args(model_dir, text_file, out, "--method", "wanda")) == 2
    assert "--overwrite" in capsys.readouterr().err.splitlines()[-1]
    assert (out / "pruning.json").read_text() == first
    assert main(_args(model_dir, text_file, out, "--method", "wanda", "--overwrite")) == 0
    assert json.loads((out / "pruning.json").read_text())["method"] == "wanda"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")  # not written by prosparse: never replaced
    assert main(_args(model_dir, text_file, mine, "--method", "magnitude", "--overwrite")) == 2
    assert (mine / "keep.txt").read_text() == "mine"


def test_model_without_linears_is_an_error(monkeypatch, tmp_path):
    from torch import nn

    import prosparse.models.loading as loading

    monkeypatch.setattr(loading, "load_model",
                        lambda *a, **k: (nn.Sequential(nn.Embedding(8, 4)), None))
    with pytest.raises(UsageError, match="no linear layers to prune"):
        prune(PruneConfig(method="magnitude", eval_tokens=0), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_config_yaml_and_flags(tmp_path):
    from prosparse.cli import build_parser
    from prosparse.cli.prune import resolve_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: proxsparse\nlambda: 0.2\nlr: 2.0e-4\nsamples: 16\n")
    args = build_parser().parse_args(["prune", "--config", str(recipe), "--lr", "5e-4",
                                      "--batch-size", "2", "--out", "x"])
    cfg = resolve_config(args)
    assert (cfg.method, cfg.prox.lam, cfg.prox.lr, cfg.samples) == ("proxsparse", 0.2, 5e-4, 16)
    assert cfg.prox.batch_size == 2
    recipe.write_text("lambada: 1\n")
    with pytest.raises(UsageError, match="unknown setting 'lambada'; choose one of .*lambda"):
        resolve_config(build_parser().parse_args(["prune", "--config", str(recipe),
                                                  "--out", "x"]))


def _config(*argv):
    from prosparse.cli import build_parser
    from prosparse.cli.prune import resolve_config

    return resolve_config(build_parser().parse_args(["prune", *argv, "--out", "x"]))


def test_config_overrides_flags_and_model_in_order(tmp_path):
    """--config, then KEY=VALUE overrides, then flags, then MODEL: each later one wins; a MODEL
    with '=' is an override; values are typed by the one config loader."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: from-file\nmethod: proxsparse\nlambda: 0.2\nsamples: 16\n"
                      "seq_len: 64\nbatch_size: 4\ndtype: bfloat16\n")
    cfg = _config("--config", str(recipe))
    assert (cfg.model, cfg.prox.lam, cfg.samples, cfg.seq_len) == ("from-file", 0.2, 16, 64)
    assert cfg.prox.batch_size == 4 and cfg.batch_size == 8  # proxsparse: per optimiser step
    assert cfg.dtype == "bf16"
    cfg = _config("lambda=0.3", "samples=8", "prox.seed=5", "--config", str(recipe))
    assert (cfg.model, cfg.prox.lam, cfg.samples, cfg.prox.seed) == ("from-file", 0.3, 8, 5)
    cfg = _config("mine", "lambda=0.3", "--config", str(recipe), "--prox-lambda", "0.4",
                  "--dtype", "fp32")
    assert (cfg.model, cfg.prox.lam, cfg.dtype) == ("mine", 0.4, "fp32")
    assert _config("mine", "--lambda", "0.6").prox.lam == 0.6  # the old spelling
    assert _config("--method", "wanda", "--batch-size", "3").batch_size == 3
    assert _config().dtype == "fp32" and _config().model == "smollm2-135m"
    for bad, message in [("samples=many", "samples must be an integer, got 'many'"),
                         ("lr=fast", "prox.lr must be a number"),
                         ("prox.lambada=1", "unknown pruning config key 'prox.lambada'"),
                         ("dtype=fp8", "unknown dtype 'fp8'"),
                         ("lr", "must look like KEY=VALUE")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            _config("--config", str(recipe), "--method", "proxsparse", *(
                [bad] if "=" in bad else ["m", bad]))


def test_bad_config_is_one_line_with_its_line_number(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: proxsparse\nlambda: [0.2\nsamples: 16\n")
    out = tmp_path / "never"
    assert main(["prune", "--config", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid YAML at line 3" in err[0], err
    assert main(["prune", "--config", str(tmp_path / "none.yaml"), "--out", str(out)]) == 2
    assert "no pruning config at" in capsys.readouterr().err
    recipe.write_text("method: wanda\npattern: 2:4\n")  # YAML 1.1 reads 2:4 as 124
    assert main(["prune", "--config", str(recipe), "--out", str(out)]) == 2
    assert 'quote it (pattern: "2:4")' in capsys.readouterr().err
    recipe.write_text("method: wanda\nsamples: many\n")
    assert main(["prune", "--config", str(recipe), "--out", str(out)]) == 2
    assert "samples must be an integer, got 'many'" in capsys.readouterr().err
    assert not out.exists()


def test_recipes_parse():
    from pathlib import Path

    import yaml

    from prosparse.pruning.run import config_from_mapping

    recipes = sorted(Path(__file__).parents[2].joinpath("configs").glob("proxsparse-*.yaml"))
    assert recipes
    for path in recipes:
        assert path.read_text().startswith("# prosparse prune")
        cfg = config_from_mapping(yaml.safe_load(path.read_text()))
        cfg.check()
        assert cfg.method == "proxsparse"


def test_cpu_recipe_is_the_default_proxsparse_run():
    """The CPU recipe the README names and `prosparse prune --method proxsparse` learn the
    same masks: the same calibration budget and ProxSparse settings."""
    from dataclasses import asdict, replace
    from pathlib import Path

    import yaml

    from prosparse.pruning.proxsparse import ProxConfig
    from prosparse.pruning.run import config_from_mapping

    path = Path(__file__).parents[2] / "configs" / "proxsparse-smollm2-cpu.yaml"
    cfg = config_from_mapping(yaml.safe_load(path.read_text()))
    default = PruneConfig()
    assert (cfg.samples, cfg.seq_len, cfg.data) == (default.samples, default.seq_len,
                                                    default.data)
    assert asdict(replace(cfg.prox, log_every=0)) == asdict(replace(ProxConfig(), log_every=0))
    assert (cfg.prox.mask_score, cfg.prox.reg_score) == ("wanda", "wanda")


@pytest.mark.slow  # two accelerate processes on gloo: about 30 s
def test_proxsparse_under_accelerate_launch(model_dir, text_file, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    # --multi_gpu runs torchrun; with no CUDA the processes come up as MULTI_CPU on gloo.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prosparse.cli",
           *_args(model_dir, text_file, out, "--method", "proxsparse", "--samples", "8",
                  "--epochs", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29641"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "pruning.json").read_text())
    assert result["proxsparse"]["optimizer_steps"] == 4  # 8 blocks over 2 ranks, batch 1
    assert result["compliance"] == 1.0


def test_out_of_domain_perplexity_is_reported_beside_in_domain(model_dir, text_file, tmp_path,
                                                               capsys):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"zeta omega {i} quartz lynx vortex." * 4 for i in range(80)))
    out = tmp_path / "o"
    argv = ["prune", model_dir, "--method", "magnitude", "--data", f"cal={text_file}",
            "--eval-data", f"far={other}", "--eval-tokens", "256", "--eval-seq-len", "32",
            "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "cal (in-domain)" in table and "far" in table
    result = json.loads((out / "pruning.json").read_text())
    held = result["heldout"]
    assert list(held) == [f"cal={text_file}", f"far={other}"]
    assert held[f"cal={text_file}"]["in_domain"] and not held[f"far={other}"]["in_domain"]
    for ppl in held.values():
        assert ppl["before"] > 1 and ppl["after"] > 1
    assert result["perplexity"] == {k: v for k, v in held[f"far={other}"].items()
                                    if k != "in_domain"}  # the --eval-data source, as before
