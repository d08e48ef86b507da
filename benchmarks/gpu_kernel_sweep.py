"""Launch shapes of the sync-free Triton kernels, timed against cuBLAS at one shape: which
block sizes and warp counts read the active rows fastest.

    python benchmarks/gpu_kernel_sweep.py --json sweep.json     # on a GPU (about a minute)

Each variant is first checked against the plain-torch reference on fresh inputs, then timed:
a CUDA graph holds ``--calls`` calls, each on its own weight copy and its own random active
set, and each replay is timed with CUDA events after the L2 is overwritten (so rows come
from memory); medians of ``--reps`` replays, per call. Step (2) variants are (block_n, block_k, num_warps); step (3)
variants are (rows, block_a, block_d, num_warps, fused_sum).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

UP = [(2, 2048, 4), (1, 4096, 4), (2, 4096, 4), (4, 1024, 4), (2, 1024, 4), (2, 2048, 2),
      (1, 2048, 4), (4, 2048, 4), (16, 256, None)]
DOWN = [(128, 32, 512, 4, False), (128, 32, 512, 4, True), (64, 64, 512, 4, True),
        (64, 32, 512, 4, True), (32, 32, 512, 4, True), (64, 64, 256, 4, True),
        (128, 64, 512, 4, True), (128, 32, 1024, 8, True), (256, 32, 512, 4, True),
        (64, 64, 1024, 8, True), (32, 32, 1024, 4, True), (128, 16, 512, 4, True),
        (512, 64, 128, None, False)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=11008)
    ap.add_argument("--sparsity", type=float, default=0.8932)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernel_sweep: error: needs a CUDA device", file=sys.stderr)
        return 2
    from prosparse.inference.benchmark import copy_bandwidth_gbps
    from prosparse.inference.benchmark import graph_time_us as graph_times
    from prosparse.kernels import dense, reference
    from prosparse.kernels import triton as tk

    dev, dt = torch.device("cuda"), torch.bfloat16
    d, f, n = args.d_model, args.d_ff, args.calls
    gen = torch.Generator(device="cuda").manual_seed(0)
    active = round((1 - args.sparsity) * f)
    copies = max(n, 2)
    w1 = [torch.randn(f, d, device=dev, dtype=dt, generator=gen) * 0.02 for _ in range(copies)]
    w2t = [torch.randn(f, d, device=dev, dtype=dt, generator=gen) * 0.02 for _ in range(copies)]
    w2_dense = [w.t().contiguous().t() for w in w2t]
    xs = [torch.randn(1, d, device=dev, dtype=dt, generator=gen) for _ in range(n)]
    gs = []
    for _ in range(n):
        g = -torch.rand(1, f, device=dev, generator=gen) - 0.1
        pick = torch.randperm(f, device=dev, generator=gen)[:active]
        g[0, pick] = torch.rand(active, device=dev, generator=gen) + 0.1
        gs.append(g.to(dt))
    x1s = [reference.up_step(x, g, w1[i]) for i, (x, g) in enumerate(zip(xs, gs))]
    peak = copy_bandwidth_gbps(dev)
    flush = torch.empty(2 * torch.cuda.get_device_properties(dev).L2_cache_size // 4 + 1,
                        device=dev)

    def graph_time_us(fns, reps):
        return statistics.median(graph_times(fns, reps, flush))

    elem = 2
    read = active * d * elem

    def row(name, us, bytes_):
        return {"variant": name, "us": us, "gbps": bytes_ / us / 1e3,
                "peak_share": bytes_ / us / 1e3 / peak}

    results = {"peak_gbps": peak, "shape": [d, f], "sparsity": args.sparsity, "up": [],
               "down": []}
    dense_up = graph_time_us([lambda i=i: dense.up_step(xs[i], gs[i], w1[i]) for i in range(n)],
                             args.reps)
    dense_down = graph_time_us([lambda i=i: dense.down_step(x1s[i], w2_dense[i])
                                for i in range(n)], args.reps)
    results["dense_up"] = row("cuBLAS", dense_up, f * d * elem)
    results["dense_down"] = row("cuBLAS", dense_down, f * d * elem)
    for bn, bk, nw in UP:
        name = f"block_n={bn} block_k={bk} warps={nw or 'default'}"
        try:
            out = tk.up_step_fixed(xs[0], gs[0], w1[0], block_n=bn, block_k=bk, num_warps=nw)
            err = float((out.float() - x1s[0].float()).norm() / x1s[0].float().norm())
            us = graph_time_us([partial(tk.up_step_fixed, xs[i], gs[i], w1[i], block_n=bn,
                                        block_k=bk, num_warps=nw) for i in range(n)], args.reps)
            r = {**row(name, us, read), "speedup": dense_up / us, "rel_err": err}
        except Exception as e:  # a shape the compiler refuses: recorded, the sweep goes on
            r = {"variant": name, "error": f"{type(e).__name__}: {e}"[:300]}
        results["up"].append(r)
        print("up  ", json.dumps(r), flush=True)
    for rows, ba, bd, nw, fs in DOWN:
        name = (f"rows={rows} block_a={ba} block_d={bd} warps={nw or 'default'} "
                f"sum={'triton' if fs else 'torch'}")
        try:
            ref = reference.down_step(x1s[0].float(), w2t[0].float())
            out = tk.down_step_fixed(x1s[0], w2t[0], rows=rows, block_a=ba, block_d=bd,
                                     num_warps=nw, fused_sum=fs)
            err = float((out.float() - ref).norm() / ref.norm())
            us = graph_time_us([partial(tk.down_step_fixed, x1s[i], w2t[i], rows=rows,
                                        block_a=ba, block_d=bd, num_warps=nw, fused_sum=fs)
                                for i in range(n)], args.reps)
            r = {**row(name, us, read), "speedup": dense_down / us, "rel_err": err}
        except Exception as e:
            r = {"variant": name, "error": f"{type(e).__name__}: {e}"[:300]}
        results["down"].append(r)
        print("down", json.dumps(r), flush=True)
    for k in ("up", "down"):
        ok = [r for r in results[k] if "us" in r and r["rel_err"] < 1e-2 and math.isfinite(r["us"])]
        results[f"best_{k}"] = min(ok, key=lambda r: r["us"]) if ok else None
        if ok:
            b = results[f"best_{k}"]
            print(f"best {k}: {b['variant']}: {b['us']:.2f} us, {b['speedup']:.2f}x cuBLAS, "
                  f"{100 * b['peak_share']:.0f}% of {peak:.0f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
