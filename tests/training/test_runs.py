"""Run folders: --resume refuses a changed run, train refuses to replace one, shifted ReLU keeps
its shift through training, and kill -9 leaves every visible checkpoint loadable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prosparse.core.errors import UsageError
from prosparse.training import read_metrics, train
from prosparse.training.runs import RESUME_MAY_CHANGE, model_fingerprint, recipe_diff
from tests.training.test_loop import _reset_accelerate, tiny_recipe

LOSS_KEYS = ("lambda", "lr", "lm_loss", "penalty", "kd_loss", "loss", "train_sparsity")


def _train(recipe, out, **kw):
    _reset_accelerate()
    return train(recipe, out, progress=False, **kw)


@pytest.fixture
def stopped_run(tiny_dir, text_file, tmp_path):
    """A run stopped after 3 of its 6 steps, with a checkpoint at step 3."""
    run = tmp_path / "run"
    _train(tiny_recipe(tiny_dir, text_file), run, stop_after=3)
    return run


def _tiny_model_dir(path, **kw):
    from tests.conftest import char_tokenizer, tiny_llama

    tiny_llama(**kw).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("change, says", [
    ("seed=1", "seed (0 -> 1)"),
    ("optim.lr=2e-3", "optim.lr (0.001 -> 0.002)"),
    ("data.seq_len=16", "data.seq_len (32 -> 16)"),
    ("batch_size=1", "batch_size (2 -> 1)"),
    ("stages.2.lambda=2.0", "stages.2.lambda (1.0 -> 2.0)"),
    ("log.eval_tokens=32", "log.eval_tokens (64 -> 32)"),
])
def test_resume_refuses_a_changed_recipe(stopped_run, tiny_dir, text_file, change, says):
    before = {p: p.read_bytes() for p in (stopped_run / "recipe.yaml",
                                          stopped_run / "metrics.jsonl")}
    with pytest.raises(UsageError, match=rf"--resume: {stopped_run} was trained differently: "
                                         rf".*{__import__('re').escape(says)}.*only "
                                         r"log.eval_every, .* may change"):
        _train(tiny_recipe(tiny_dir, text_file, change), stopped_run, resume=True)
    assert {p: p.read_bytes() for p in before} == before  # nothing rewritten, nothing mixed


@pytest.mark.parametrize("kind", ["other weights", "other shapes"])
def test_resume_refuses_another_model(stopped_run, tiny_dir, text_file, kind):
    """Other weights in the same folder, or another architecture (which used to end in a
    state-dict traceback), are named before any work."""
    import shutil

    shutil.rmtree(tiny_dir)
    _tiny_model_dir(tiny_dir, **({"seed": 1} if kind == "other weights" else
                                 {"intermediate_size": 96}))
    with pytest.raises(UsageError, match=r"was trained differently: model files .*"
                                         r"model.safetensors.* differ from the run's model"):
        _train(tiny_recipe(tiny_dir, text_file), stopped_run, resume=True)


def test_resume_accepts_a_moved_model_and_cadence_changes(stopped_run, tiny_dir, text_file,
                                                          tmp_path):
    """The same model at another path, and every allow-listed change: losses bit-identical to an
    uninterrupted run, recipe.yaml records the new cadence, the marker the resume."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(tiny_dir, moved)
    full = _train(tiny_recipe(tiny_dir, text_file), tmp_path / "full")
    changes = ["log.eval_every=2", "log.measure_before=false", "checkpoint.every=1",
               "checkpoint.keep=1", "data.cache=false"]
    assert {c.split("=")[0] for c in changes} | {"log.tensorboard"} == set(RESUME_MAY_CHANGE)
    resumed = _train(tiny_recipe(moved, text_file, *changes, "log.tensorboard=true"),
                     stopped_run, resume=True)
    a, b = read_metrics(tmp_path / "full"), read_metrics(stopped_run)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for key in LOSS_KEYS:
            assert x[key] == y[key], f"step {x['step']} {key}: {x[key]} vs {y[key]}"
    assert resumed.report["final"] == full.report["final"]
    assert "eval_every: 2" in (stopped_run / "recipe.yaml").read_text()
    marker = json.loads((stopped_run / ".prosparse.json").read_text())
    assert marker["kind"] == "run" and marker["resumes"][0]["step"] == 3
    assert "log.eval_every: 3 -> 2" in marker["resumes"][0]["changed"]
    assert [p.name for p in (stopped_run / "checkpoints").iterdir()] == ["step-000006"]  # keep=1


def test_resume_refuses_another_number_of_processes(stopped_run, tiny_dir, text_file):
    trainer = stopped_run / "checkpoints/step-000003/trainer.json"
    trainer.write_text(json.dumps({**json.loads(trainer.read_text()), "world_size": 2}))
    with pytest.raises(UsageError, match=r"number of processes \(2 -> 1; launch with "
                                         r"--num_processes 2\)"):
        _train(tiny_recipe(tiny_dir, text_file), stopped_run, resume=True)


def test_train_refuses_to_replace_a_run(stopped_run, tiny_dir, text_file, tmp_path):
    recipe = tiny_recipe(tiny_dir, text_file)
    with pytest.raises(UsageError, match=rf"{stopped_run} holds a run with checkpoints \(latest "
                                         r"step-000003\); pass --resume to continue it, pass "
                                         "--overwrite to replace it"):
        _train(recipe, stopped_run)
    _train(recipe, stopped_run, resume=True)
    first = (stopped_run / "report.json").read_bytes()
    with pytest.raises(UsageError, match=rf"{stopped_run} holds a finished run \(report.json, "
                                         r"final/\); pass --overwrite to replace it"):
        _train(recipe, stopped_run)
    with pytest.raises(UsageError, match="holds a finished run .*nothing to resume"):
        _train(recipe, stopped_run, resume=True)
    with pytest.raises(UsageError, match="pass one of them"):
        _train(recipe, stopped_run, resume=True, overwrite=True)
    assert (stopped_run / "report.json").read_bytes() == first

    # A finished run with no checkpoint kept (the reproduction) is refused as well.
    done = tmp_path / "done"
    _train(tiny_recipe(tiny_dir, text_file, "log.measure_before=false"), done)
    assert not (done / "checkpoints").exists()
    with pytest.raises(UsageError, match="holds a finished run"):
        _train(recipe, done)
    # --overwrite replaces it: a fresh run, its old files gone.
    (done / "metrics.jsonl").write_text('{"step": 99}\n')
    _train(recipe, done, overwrite=True)
    assert [m["step"] for m in read_metrics(done)] == list(range(1, 7))
    assert "original" in json.loads((done / "report.json").read_text())


def test_train_refuses_a_folder_prosparse_did_not_write(tiny_dir, text_file, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="was not written by prosparse"):
            _train(tiny_recipe(tiny_dir, text_file), foreign, overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a run folder"):
        _train(tiny_recipe(tiny_dir, text_file), tmp_path / "file")


def test_a_run_being_trained_is_refused(tiny_dir, text_file, tmp_path):
    from prosparse.core.io import reserve

    with reserve(tmp_path / "run"):
        with pytest.raises(UsageError, match="is being written by another prosparse process"):
            _train(tiny_recipe(tiny_dir, text_file), tmp_path / "run")


def test_cli_overwrite_flag(tiny_dir, text_file, tmp_path, capsys):
    from prosparse.cli import main

    recipe = tmp_path / "r.yaml"
    overrides = [f"model={tiny_dir}", f"data.sources=[{text_file}]", f"data.heldout=[{text_file}]",
                 "data.seq_len=32", "data.heldout_tokens=128", "log.eval_tokens=64",
                 "log.tensorboard=false", "stages=[{lambda: 0, steps: 2}]", "batch_size=2",
                 "threshold.value=0.01", "log.measure_before=false", "checkpoint.every=0"]
    recipe.write_text("# prosparse train r.yaml\n")
    out = tmp_path / "run"
    _reset_accelerate()
    assert main(["train", str(recipe), *overrides, "--out", str(out)]) == 0
    capsys.readouterr()
    _reset_accelerate()
    assert main(["train", str(recipe), *overrides, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and len(err.strip().splitlines()) == 1
    _reset_accelerate()
    assert main(["train", str(recipe), *overrides, "--out", str(out), "--overwrite"]) == 0


def test_fingerprint_and_recipe_diff(tiny_dir, tmp_path):
    a = model_fingerprint(str(tiny_dir))
    assert set(a["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert a == model_fingerprint(str(tiny_dir))
    (tiny_dir / "README.md").write_text("notes do not change the model")
    assert model_fingerprint(str(tiny_dir))["files"] == a["files"]
    assert model_fingerprint("org/some-hub-id") == {"spec": "org/some-hub-id", "files": {}}
    assert recipe_diff({"a": {"b": 1}, "s": [{"x": 1}]}, {"a": {"b": 2}, "s": [{"x": 1}, {"x": 2}]}
                       ) == [("a.b", 1, 2), ("s.1.x", "(absent)", 2)]


# --- shifted ReLU through training ----------------------------------------------------------------

def test_shifted_relu_run_keeps_its_shift(tiny_dir, text_file, tmp_path):
    """configs/shifted-relu.yaml on a tiny model: the final checkpoint loads back as shifted ReLU
    with the recipe's shift, the sweep is skipped and the report says why."""
    from prosparse import load_model
    from prosparse.models.relufy import current_activation
    from prosparse.training.recipe import load_recipe

    overrides = [f"model={tiny_dir}", f"data.sources=[{text_file}]", f"data.heldout=[{text_file}]",
                 "data.seq_len=32", "data.heldout_tokens=128", "log.eval_tokens=64",
                 "log.eval_every=0", "log.tensorboard=false", "stages.0.steps=3", "grad_accum=1",
                 "batch_size=2", "optim.warmup_steps=1", "checkpoint.every=0",
                 "log.measure_before=false", "dtype=fp32"]
    recipe = load_recipe("configs/shifted-relu.yaml", overrides)
    assert recipe.activation == "shifted_relu" and recipe.activation_param == 0.1
    res = _train(recipe, tmp_path / "run")
    report = json.loads((tmp_path / "run/report.json").read_text())
    assert report["threshold"] is None and report["shift"] == 0.1
    assert "keeps its shift" in report["threshold_skipped"]
    assert "shifted ReLU kept (b=0.1, no threshold)" in report["table"]
    assert report["final"] == report["trained"] == res.report["final"]
    model, _ = load_model(str(tmp_path / "run/final"))
    assert current_activation(model) == ("shifted_relu", 0.1)
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.training.data import heldout_blocks

    _, tok = load_model(str(tiny_dir))
    again = evaluate_heldout(model, heldout_blocks(tok, [str(text_file)], 32, 128))
    assert again["average_sparsity"] == pytest.approx(report["final"]["average_sparsity"],
                                                      abs=1e-6)

    # With the default sweep (threshold.value null) the run is the same; a threshold is refused.
    _train(load_recipe("configs/shifted-relu.yaml", [*overrides, "threshold.value=null"]),
           tmp_path / "sweep")
    assert json.loads((tmp_path / "sweep/report.json").read_text())["threshold"] is None
    with pytest.raises(UsageError, match=r"threshold.value \(0.05\) would put a FATReLU threshold "
                                         r"on a shifted ReLU \(shift 0.1\)"):
        _train(load_recipe("configs/shifted-relu.yaml", [*overrides, "threshold.value=0.05"]),
               tmp_path / "never")
    assert not (tmp_path / "never").exists()


# --- kill -9 during checkpointing ----------------------------------------------------------------

_KILLED_SCRIPT = """
import sys
from prosparse.training.recipe import load_recipe
from prosparse.training import train
train(load_recipe(None, sys.argv[2:]), sys.argv[1], progress=False)
"""


@pytest.mark.slow  # a training subprocess (imports take 10-20 s on 2 busy cores)
def test_kill_9_while_checkpointing(tiny_dir, text_file, tmp_path):
    """SIGKILL while a checkpoint is being written: every visible checkpoint loads, and the
    resumed run is bit-identical to an uninterrupted one."""
    from prosparse import load_model
    from prosparse.training.checkpoint import list_checkpoints

    extra = ["checkpoint.every=1", "checkpoint.keep=3",
             "stages=[{lambda: 0, steps: 3}, {lambda: 0.5, steps: 6}, {lambda: 1.0, steps: 10}]"]
    recipe = tiny_recipe(tiny_dir, text_file, *extra)
    run = tmp_path / "run"
    overrides = [f"model={tiny_dir}", f"data.sources=[{text_file}]", f"data.heldout=[{text_file}]",
                 "data.seq_len=32", "data.heldout_tokens=128", "log.eval_tokens=64",
                 "log.eval_every=3", "log.tensorboard=false", "batch_size=2", "grad_accum=2",
                 "penalty.normalization=mean", "optim.lr=1e-3", "optim.warmup_steps=2",
                 "threshold.value=0.01", "dtype=fp32", *extra]
    assert load_recipe_equal(recipe, overrides)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SCRIPT, str(run), *overrides],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=Path(__file__).parents[2], stderr=subprocess.PIPE)
    ckpts = run / "checkpoints"
    deadline, killed_at = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        # Kill once a checkpoint from step 4 on is half-written (its temporary folder exists).
        writing = [int(p.name[6:12]) for p in ckpts.glob(".step-*.tmp")] if ckpts.is_dir() else []
        if any(step >= 4 for step in writing):
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = max(writing)
        time.sleep(0.002)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    visible = list_checkpoints(run)
    assert visible and int(visible[-1].name[5:]) in (killed_at - 1, killed_at)  # done meanwhile
    for ckpt in visible:
        load_model(str(ckpt / "model"))
        assert json.loads((ckpt / "trainer.json").read_text())["step"] == int(ckpt.name[5:])
    _train(recipe, run, resume=True)
    _train(recipe, tmp_path / "full")
    a, b = read_metrics(tmp_path / "full"), read_metrics(run)
    assert [m["step"] for m in b] == list(range(1, 11))
    for x, y in zip(a, b):
        for key in LOSS_KEYS:
            assert x[key] == y[key], f"step {x['step']} {key}: {x[key]} vs {y[key]}"


def load_recipe_equal(recipe, overrides):
    from prosparse.training.recipe import load_recipe

    return load_recipe(None, overrides) == recipe


def test_resume_refuses_training_data_that_changed(tiny_dir, text_file, tmp_path):
    from prosparse.core.errors import UsageError
    from prosparse.training import train

    recipe = tiny_recipe(tiny_dir, text_file)
    _reset_accelerate()
    train(recipe, tmp_path / "run", stop_after=2, progress=False)
    text_file.write_text(text_file.read_text() + "\n\nA new document appended later.")
    _reset_accelerate()
    with pytest.raises(UsageError, match="training data .* changed since"):
        train(recipe, tmp_path / "run", resume=True, progress=False)


def test_full_disk_during_a_checkpoint_leaves_no_half_checkpoint(tiny_dir, text_file, tmp_path,
                                                                 monkeypatch):
    import errno

    from prosparse.core.errors import UsageError
    from prosparse.training import train

    _reset_accelerate()
    calls = {"n": 0}
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    with pytest.raises(UsageError, match=r"no space left.*step 2 was not kept; --resume continues from "
                                         r".*step-000001"):
        train(tiny_recipe(tiny_dir, text_file, "checkpoint.every=1"), tmp_path / "run",
              progress=False)
    left = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert left == ["step-000001"], left  # no .step-000002.tmp holding the space


def test_a_killed_checkpoint_is_cleaned_and_said(tiny_dir, text_file, tmp_path, caplog):
    import logging

    from prosparse.training import train

    _reset_accelerate()
    train(tiny_recipe(tiny_dir, text_file), tmp_path / "run", stop_after=1, progress=False)
    stale = tmp_path / "run/checkpoints/.step-000007.tmp"
    (stale / "model").mkdir(parents=True)
    _reset_accelerate()
    with caplog.at_level(logging.INFO):
        train(tiny_recipe(tiny_dir, text_file), tmp_path / "run", resume=True, stop_after=1,
              progress=False)
    assert not stale.exists()
    assert any("interrupted checkpoint" in r.getMessage() for r in caplog.records)
