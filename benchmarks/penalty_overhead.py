"""Cost of the L1 penalty: training-step time with it against without it, in the same run.

    .venv/bin/python benchmarks/penalty_overhead.py [--steps 12]

Alternates steps with and without the penalty (the hook that adds one reduction per layer and
the zero counting) on the ReLU-swapped embedded model, so drift in machine load hits both alike;
reports the median step times and their ratio (goal <= 1.05x). JSON to benchmarks/results/;
results in docs/results/throughput.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=12, help="steps of each kind (after 2 warm-up)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--normalization", default="mean", choices=["mean", "sum_scaled"])
    p.add_argument("--json", default="benchmarks/results/penalty_overhead.json")
    args = p.parse_args()

    from prosparse import load_model, relufy_
    from prosparse.data import load_texts, pack_blocks
    from prosparse.measure.hooks import capture_x1
    from prosparse.models.relufy import find_gated_ffns
    from prosparse.sparsity.penalty import PenaltyCollector
    from prosparse.training.loop import lm_loss

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    relufy_(model, act="relu")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n = 2 * (args.steps + 2)
    blocks = pack_blocks(tok, load_texts("wiki", "train"), args.seq_len,
                         n * args.batch * args.seq_len)
    n_layers = len(find_gated_ffns(model))
    times = {"with": [], "without": []}
    for i in range(n):
        kind = "with" if i % 2 == 0 else "without"
        ids = blocks[(i * args.batch) % len(blocks):][: args.batch]
        collector = PenaltyCollector(n_layers, args.normalization)
        hooks = capture_x1(model, collector) if kind == "with" else contextlib.nullcontext()
        start = time.perf_counter()
        with hooks:
            logits = model(input_ids=ids).logits
        lm = lm_loss(logits, ids)
        loss = lm + 0.5 * collector.take() if kind == "with" else lm
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if i >= 4:  # first two of each kind warm up
            times[kind].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "batch": args.batch, "seq_len": args.seq_len,
        "normalization": args.normalization, "steps_each": len(times["with"]),
        "median_step_s_with": med["with"], "median_step_s_without": med["without"],
        "ratio": med["with"] / med["without"], "goal": 1.05,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "step_s_with": times["with"], "step_s_without": times["without"],
    }
    print(f"step time with penalty {med['with']:.3f} s, without {med['without']:.3f} s, "
          f"ratio {result['ratio']:.3f}x (goal <= 1.05x)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
