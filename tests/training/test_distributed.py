"""Scale-out: 2 processes on CPU (gloo) through ``accelerate launch``."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.test_loop import tiny_recipe  # noqa: F401  (fixture helpers)


@pytest.mark.slow  # two accelerate processes: about 20 s
def test_two_processes(tmp_path, text_file):
    from prosparse import load_model
    from prosparse.evaluation.heldout import evaluate_heldout
    from prosparse.training.data import heldout_blocks
    from prosparse.training.metrics import read_metrics
    from tests.conftest import char_tokenizer, tiny_llama

    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate"
                                                   ).exists():
        pytest.skip("accelerate CLI not installed")
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    overrides = [
        f"model={model_dir}", f"data.sources=[{text_file}]", f"data.heldout=[{text_file}]",
        "data.seq_len=32", "data.heldout_tokens=256", "log.eval_tokens=128", "log.eval_every=2",
        "log.tensorboard=false", "batch_size=2", "grad_accum=2",
        "stages=[{lambda: 0, steps: 1}, {lambda: 0.5, steps: 2}, {lambda: 1.0, steps: 4}]",
        "penalty.normalization=mean", "optim.lr=1e-3", "checkpoint.every=2",
        "threshold.value=0.01", "log.measure_before=false"]
    out = tmp_path / "run"
    # --cpu would pick the single-process launcher; --multi_gpu runs torchrun, and with no CUDA
    # the processes come up as MULTI_CPU on gloo.
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(Path(__file__).parent / "ddp_script.py"), str(out),
           *overrides]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29517"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
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
