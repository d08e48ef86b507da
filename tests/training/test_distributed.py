"""Scale-out: 2 processes on CPU (gloo) through ``accelerate launch``."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.test_loop import tiny_recipe  # noqa: F401  (fixture helpers)


def _accelerate() -> str:
    exe = Path(sys.executable).parent / "accelerate"
    if not exe.exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not installed")
    return str(exe) if exe.exists() else shutil.which("accelerate")


def _tiny_overrides(tmp_path, text_file) -> list[str]:
    from tests.conftest import char_tokenizer, tiny_llama

    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        tiny_llama().save_pretrained(model_dir)
        char_tokenizer().save_pretrained(model_dir)
    return [
        f"model={model_dir}", f"data.sources=[{text_file}]", f"data.heldout=[{text_file}]",
        "data.seq_len=32", "data.heldout_tokens=256", "log.eval_tokens=128", "log.eval_every=2",
        "log.tensorboard=false", "batch_size=2", "grad_accum=2",
        "stages=[{lambda: 0, steps: 1}, {lambda: 0.5, steps: 2}, {lambda: 1.0, steps: 4}]",
        "penalty.normalization=mean", "optim.lr=1e-3", "checkpoint.every=2",
        "threshold.value=0.01", "log.measure_before=false"]


def _launch(out: Path, overrides: list[str], *flags: str, port: int) -> None:
    """``accelerate launch`` of ddp_script.py on 2 CPU processes (gloo)."""
    # --cpu would pick the single-process launcher; --multi_gpu runs torchrun, and with no CUDA
    # the processes come up as MULTI_CPU on gloo.
    # --use_fsdp takes the place of --multi_gpu (the launcher accepts one of them).
    mode = [] if "--use_fsdp" in flags else ["--multi_gpu"]
    cmd = [_accelerate(), "launch", *mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *flags,
           str(Path(__file__).parent / "ddp_script.py"), str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # two accelerate processes: about 20 s
def test_two_processes(tmp_path, text_file):
    from prosparse import load_model
    from prosparse.measure.heldout import evaluate_heldout
    from prosparse.training.data import heldout_blocks
    from prosparse.training.metrics import read_metrics

    out = tmp_path / "run"
    _launch(out, _tiny_overrides(tmp_path, text_file), port=29517)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["lambdas"] == ranks[1]["lambdas"] == [0.0, 0.5, 0.75, 1.0]
    metrics = read_metrics(out)
    assert metrics[-1]["tokens"] == 4 * 2 * 2 * 2 * 32  # steps x accum x batch x ranks x seq
    # Held-out numbers were computed on half the blocks per rank and summed across ranks: they
    # must equal one process measuring every block with the saved final model.
    report = json.loads((out / "report.json").read_text())
    model, tok = load_model(str(out / "final"))
    blocks = heldout_blocks(tok, [str(text_file)], 32, 256)

    single = evaluate_heldout(model, blocks)  # one process, all blocks
    # Batching differs (halves vs all blocks): fp32 sums agree to ~1e-5, not bit for bit.
    assert single["perplexity"] == pytest.approx(report["final"]["perplexity"], rel=1e-4)
    assert single["average_sparsity"] == pytest.approx(report["final"]["average_sparsity"], abs=1e-4)
    ckpt, _ = load_model(str(out / "checkpoints/step-000004/model"))
    assert ckpt.config.num_hidden_layers == 2


FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
        "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true"]


@pytest.mark.slow  # two accelerate launches of 2 processes: about a minute
def test_fsdp_matches_ddp(tmp_path, text_file):
    """FSDP (parameters, gradients and optimizer state sharded over 2 gloo processes) follows the
    same losses as DDP: the shards reduce in another order, so within fp32 rounding, not bit
    for bit. The final model it saves loads and measures like DDP's."""
    from prosparse import load_model
    from prosparse.training.metrics import read_metrics

    # No checkpoint mid-run: accelerator.save_state of an FSDP2 model fails on CPU (Accelerate
    # 1.15 reads the DTensors' storage); the final model is saved (gathered) as usual.
    overrides = [*_tiny_overrides(tmp_path, text_file), "checkpoint.every=0"]
    _launch(tmp_path / "ddp", overrides, port=29518)
    _launch(tmp_path / "fsdp", overrides, *FSDP, port=29519)
    ranks = {k: [json.loads((tmp_path / k / f"rank-{r}.json").read_text()) for r in (0, 1)]
             for k in ("ddp", "fsdp")}
    assert ranks["fsdp"][0]["param_types"] == ["DTensor"]  # FSDP2 shards every parameter
    full = ranks["ddp"][0]["local_numel"]
    assert [r["local_numel"] for r in ranks["fsdp"]] != [full, full]
    assert sum(r["local_numel"] for r in ranks["fsdp"]) == pytest.approx(full, rel=0.01)
    ddp, fsdp = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp")
    assert [m["step"] for m in fsdp] == [m["step"] for m in ddp] == [1, 2, 3, 4]
    for a, b in zip(ddp, fsdp):
        for key in ("lm_loss", "penalty", "loss", "train_sparsity"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (
                f"step {a['step']} {key}: DDP {a[key]!r} vs FSDP {b[key]!r}")
        assert b["lambda"] == a["lambda"] and b["lr"] == a["lr"]
    r_ddp, r_fsdp = (json.loads((tmp_path / k / "report.json").read_text()) for k in ("ddp", "fsdp"))
    assert r_fsdp["final"]["perplexity"] == pytest.approx(r_ddp["final"]["perplexity"], rel=1e-5)
    a, _ = load_model(str(tmp_path / "ddp/final"))
    b, _ = load_model(str(tmp_path / "fsdp/final"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow  # two accelerate processes: about 20 s
def test_two_processes_train_one_budgeted_schedule(tmp_path, text_file):
    """Each process times its own steps; both must train the same compressed schedule (a
    process that stopped earlier would leave the other waiting in a collective)."""
    from prosparse.training.metrics import read_metrics

    out = tmp_path / "run"
    overrides = [*_tiny_overrides(tmp_path, text_file), "time_budget=0.0001", "log.eval_every=0",
                 "stages=[{lambda: 0, steps: 14}, {lambda: 0.5, steps: 20}, "
                 "{lambda: 1.0, steps: 24}]", "checkpoint.every=0"]
    _launch(out, overrides, port=29520)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["lambdas"]) == len(ranks[1]["lambdas"]) == 12
    assert ranks[0]["lambdas"] == ranks[1]["lambdas"]
    report = json.loads((out / "report.json").read_text())
    assert report["time_budget"]["steps"] == 12 < report["time_budget"]["planned_steps"]
    assert [r["step"] for r in read_metrics(out)][-1] == 12
