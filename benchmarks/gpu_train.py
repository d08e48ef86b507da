"""Training-step throughput of the make demo recipe on a GPU: tokens/s and peak memory with the
L1 penalty off, on, and on with distillation, on the embedded model and on a random
1B-class LLaMA, in one run.

    python benchmarks/gpu_train.py --json train.json                       # on a GPU
    python benchmarks/gpu_train.py --models smollm2 --steps 4 --json /tmp/t.json   # CPU dry run

Each variant runs ``configs/demo.yaml`` (its optimiser, FFN-only training, ReLU swap, dtype
auto = bf16 autocast on a GPU) through ``prosparse.training.train`` for ``--steps`` optimiser
steps with no held-out evaluation, and reads the per-step wall time the loop logs; medians skip
the first two steps. "L1 on" holds lambda at the recipe's lambda_S from step 1 (the penalty's
hooks and reductions run every step); "L1 off" trains at lambda 0 (no penalty hooks run); "L1 on
+ KD" adds the demo's distillation from the frozen original. The 1B model is TinyLlama's shape
(d_model 2048, d_ff 5632, 22 layers, 4 KV heads) with the embedded model's tokenizer, randomly
initialised; its blocks are ``--seq-len-1b`` tokens, ``--batch-1b`` per step.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

QUIET = ["log.measure_before=false", "log.eval_every=0", "log.tensorboard=false", "threshold.train=0",
         "eval.tasks=[]", "checkpoint.every=0", "data.cache=false"]


def variants(steps: int, lam: float) -> dict[str, list[str]]:
    def stage(v: float) -> str:
        return f"stages=[{{lambda: {v}, steps: {steps + 1}, fixed: true}}]"

    return {
        "L1 off": [stage(0.0), "distill.weight=0"],
        "L1 on": [stage(lam), "distill.weight=0"],
        "L1 on + KD": [stage(lam), "distill.weight=1.0"],
    }


def random_1b(tmp: Path) -> str:
    """A random TinyLlama-shaped model saved (bf16) with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prosparse.models.loading import load_model

    _, tok = load_model("smollm2-135m")
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=len(tok),
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = tmp / "llama-1b-random"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="configs/demo.yaml")
    ap.add_argument("--models", default="smollm2,1b", help="comma-separated: smollm2, 1b")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq-len-1b", type=int, default=1024)
    ap.add_argument("--batch-1b", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from accelerate.state import AcceleratorState, GradientState

    from prosparse.core.io import write_json
    from prosparse.core.tables import format_table
    from prosparse.inference.benchmark import _device_name
    from prosparse.training import read_metrics, train
    from prosparse.training.recipe import load_recipe

    cuda = torch.cuda.is_available()
    base = load_recipe(args.recipe, [])
    lam = max(s.lam for s in base.stages)
    results: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            extra = []
            if model_name == "1b":
                extra = [f"model={random_1b(Path(tmp))}", f"data.seq_len={args.seq_len_1b}",
                         f"batch_size={args.batch_1b}"]
            elif model_name != "smollm2":
                print(f"gpu_train: error: unknown model {model_name!r}; use smollm2 or 1b",
                      file=sys.stderr)
                return 2
            for name, over in variants(args.steps, lam).items():
                recipe = load_recipe(args.recipe, [*QUIET, *extra, *over])
                tokens = recipe.batch_size * recipe.grad_accum * recipe.data.seq_len
                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                run = Path(tmp) / f"{model_name}-{name.replace(' ', '_')}"
                t0 = time.time()
                train(recipe, run, stop_after=args.steps, progress=False)
                wall = time.time() - t0
                secs = [r["step_seconds"] for r in read_metrics(run)]
                med = statistics.median(secs[2:] if len(secs) > 3 else secs)
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                key = f"{model_name}: {name}"
                results[key] = {"model": model_name, "variant": name, "overrides": over + extra,
                                "tokens_per_step": tokens, "median_step_seconds": med,
                                "tokens_per_second": tokens / med, "step_seconds": secs,
                                "peak_memory_gib": peak, "wall_seconds": wall}
                print(f"{key}: median {med * 1e3:.1f} ms/step, {tokens / med:.0f} tokens/s"
                      + (f", peak {peak:.1f} GiB" if peak is not None else ""), flush=True)
                shutil.rmtree(run, ignore_errors=True)
            off = results[f"{model_name}: L1 off"]["median_step_seconds"]
            for name in variants(args.steps, lam):
                r = results[f"{model_name}: {name}"]
                r["cost_vs_l1_off"] = r["median_step_seconds"] / off - 1
                rows.append([model_name, name, r["tokens_per_step"],
                             f"{r['median_step_seconds'] * 1e3:.1f}",
                             f"{r['tokens_per_second']:.0f}", f"{100 * r['cost_vs_l1_off']:+.1f}%",
                             "-" if r["peak_memory_gib"] is None
                             else f"{r['peak_memory_gib']:.1f}"])
    table = format_table(["model", "variant", "tokens/step", "ms/step (median)", "tokens/s",
                          "vs L1 off", "peak GiB"], rows)
    print(table)
    dev = torch.device("cuda" if cuda else "cpu")
    report = {"recipe": args.recipe, "steps": args.steps, "lambda": lam,
              "device": _device_name(dev), "torch": torch.__version__,
              "goal": "the L1 penalty costs <= 5% of a training step",
              "variants": results, "table": table}
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
