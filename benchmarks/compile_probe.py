"""What ``torch.compile`` could buy make demo's training step on this CPU, before wiring it in.

    .venv/bin/python benchmarks/compile_probe.py [--steps 8]

The step as the loop runs it (the embedded SmolLM2-135M after the ReLU swap, 2 x 128 tokens,
student forward + backward under ``dtype`` autocast, the teacher's no-grad forward, LM + KL
loss, fused AdamW), timed eager and with every decoder layer compiled (regional compilation:
one graph shared by the repeated blocks), the same batches and seed in each. The x1 hooks
the L1 penalty needs are left out of both: this is the ceiling of what compilation can buy,
not a loop option. Reports median step seconds (first two steps of each variant skipped, and
the compile time apart), the ratio to eager, and the losses step by step. JSON to
benchmarks/results/compile_probe.json; results in docs/results/throughput.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--json", default="benchmarks/results/compile_probe.json")
    args = ap.parse_args()

    from prosparse.core.io import write_json
    from prosparse.inference.benchmark import _device_name
    from prosparse.kernels.fused import cpu_isa
    from prosparse.models.loading import load_model
    from prosparse.models.relufy import relufy_
    from prosparse.training.loop import kd_loss, lm_loss

    base, _ = load_model("smollm2-135m")
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    relufy_(base, "relu")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, base.config.vocab_size, (2, 128), generator=g)
               for _ in range(args.steps)]
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def run(compiled: bool) -> dict:
        torch.manual_seed(0)
        model = copy.deepcopy(base).train()
        if compiled:
            # one graph per distinct layer signature; the default limit (8) would leave the
            # rest of the 30 layers eager
            torch._dynamo.config.recompile_limit = 64
            for layer in model.model.layers:
                layer.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=True)
        secs, losses = [], []
        for ids in batches:
            t = time.perf_counter()
            with torch.autocast(**amp):
                logits = model(input_ids=ids, use_cache=False).logits
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
            loss = lm_loss(logits, ids) + kd_loss(logits, t_logits)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            secs.append(time.perf_counter() - t)
        return {"step_seconds": secs, "median_step_seconds": statistics.median(secs[2:]),
                "first_step_seconds": secs[0], "loss": losses}

    results = {"eager": run(False), "compiled layers": run(True)}
    eager = results["eager"]["median_step_seconds"]
    for name, r in results.items():
        r["speedup"] = eager / r["median_step_seconds"]
        r["max_rel_loss_diff"] = max(abs(a - b) / abs(b) for a, b in
                                     zip(r["loss"], results["eager"]["loss"]))
        print(f"{name}: median {r['median_step_seconds']:.3f} s/step ({r['speedup']:.2f}x), "
              f"first step {r['first_step_seconds']:.1f} s, max rel. loss diff "
              f"{r['max_rel_loss_diff']:.1e}", flush=True)
    write_json(args.json, {"dtype": args.dtype, "steps": args.steps,
                           "threads": torch.get_num_threads(),
                           "cpu": _device_name(torch.device("cpu")), "cpu_isa": cpu_isa(),
                           "torch": torch.__version__, "variants": results})


if __name__ == "__main__":
    main()
