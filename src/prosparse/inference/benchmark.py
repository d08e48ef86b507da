"""Benchmarks of the exact sparse FFN: steps (2) and (3) against dense, and greedy decoding.

Operator timings measure memory, not cache, as real decoding does: every call draws a fresh
active set, and calls cycle through enough weight copies ("layers") that their total exceeds the
last-level cache at least twice, so no call finds its rows still cached from the previous one.
Dense and sparse are timed in the same run, interleaved call by call; medians after warm-up;
CUDA times come from device events.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prosparse.kernels import dispatch, reference


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 size for a CUDA device, the largest CPU cache level from sysfs otherwise (32 MiB
    when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    sizes = []
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = p.read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 * 2**20)


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
    return run


def _random_gate(tokens: int, d_ff: int, active: int, dtype, device, gen) -> torch.Tensor:
    """Gate pre-activations with exactly ``active`` positive entries per token, a fresh random
    set per token (so a batch's union grows as independent tokens would make it)."""
    g = -torch.rand(tokens, d_ff, generator=gen, device="cpu") - 0.1
    for t in range(tokens):
        pick = torch.randperm(d_ff, generator=gen)[:active]
        g[t, pick] = torch.rand(active, generator=gen) + 0.1
    return g.to(dtype=dtype, device=device)


@torch.inference_mode()
def bench_ops(
    d_model: int = 4096,
    d_ff: int = 11008,
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8932),
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    batches: tuple[int, ...] = (1,),
    reps: int = 30,
    warmup: int = 5,
    backend: str | None = None,
    seed: int = 0,
) -> dict:
    """Time dense vs sparse steps (2) and (3); returns the ``bench ops`` JSON as a dict."""
    dev = torch.device(device)
    name = dispatch.resolve_backend(dev, backend)
    gen = torch.Generator().manual_seed(seed)
    elem = torch.empty((), dtype=dtype).element_size()
    matrix = d_ff * d_model * elem
    llc = last_level_cache_bytes(dev)
    copies = max(2, math.ceil(2 * llc / matrix) + 1)
    w1s = [torch.randn(d_ff, d_model, generator=gen).to(dtype=dtype, device=dev) * 0.02
           for _ in range(copies)]
    w2ts = [torch.randn(d_ff, d_model, generator=gen).to(dtype=dtype, device=dev) * 0.02
            for _ in range(copies)]
    # The dense baseline reads W2 as a dense model stores it, (d_model, d_ff) contiguous; the
    # sparse step reads W2^T contiguous (d_ff, d_model), the layout SparseMLP keeps for it.
    w2ts_dense = [w.t().contiguous().t() for w in w2ts]
    timer = _timer(dev)
    force = dict(backend=name, dense_below=0.0, max_tokens=1 << 30)  # never fall back here
    results = []
    cases = [(b, s) for b in batches for s in sparsities]
    for batch, s in tqdm(cases, desc=f"bench ops {d_model}x{d_ff} {dtype} {dev.type}"):
        active = round((1 - s) * d_ff)
        times = {k: [] for k in ("d2", "s2", "d3", "s3")}
        n_union = []
        for i in range(warmup + reps):
            # Sparse reads copy i, dense copy i + copies/2: neither finds the other's rows cached.
            j = (i + copies // 2) % copies
            w1, w2t = w1s[i % copies], w2ts[i % copies]
            x = torch.randn(batch, d_model, generator=gen).to(dtype=dtype, device=dev)
            g = _random_gate(batch, d_ff, active, dtype, dev, gen)
            u = torch.randn(batch, d_ff, generator=gen).to(dtype=dtype, device=dev)
            x1 = reference.activate(g) * u  # (batch, d_ff), exact zeros off the active set
            n_union.append(int(reference.active_neurons(x1).numel()))
            pairs = [("d2", partial(reference.up_step, x, g, w1s[j])),
                     ("s2", partial(dispatch.up_step, x, g, w1, **force)),
                     ("d3", partial(reference.down_step, x1, w2ts_dense[j])),
                     ("s3", partial(dispatch.down_step, x1, w2t, **force))]
            if i % 2:
                pairs.reverse()
            for key, fn in pairs:
                t = timer(fn)
                if i >= warmup:
                    times[key].append(t)
        union = statistics.median(n_union)
        for step in (2, 3):
            dense_us = statistics.median(times[f"d{step}"])
            sparse_us = statistics.median(times[f"s{step}"])
            results.append({
                "step": step,
                "sparsity": s,
                "batch": batch,
                "union_sparsity": 1 - union / d_ff,
                "dense_us": dense_us,
                "sparse_us": sparse_us,
                "speedup": dense_us / sparse_us,
                "gbps": union * d_model * elem / sparse_us / 1e3,
                "dense_gbps": matrix / dense_us / 1e3,
                "bound": 1 / (1 - s) if s < 1 else math.inf,
            })
    return {
        "device": _device_name(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": name,
        "d_model": d_model,
        "d_ff": d_ff,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "reps": reps,
        "warmup": warmup,
        "method": (
            f"medians of {reps} calls after {warmup} warm-up calls; a fresh random active set "
            f"every call; calls cycle through {copies} copies of each weight matrix "
            f"({copies * matrix / 2**20:.0f} MiB per step, last-level cache {llc / 2**20:.0f} MiB) "
            "so active rows come from memory, not cache; dense and sparse interleaved"
            + ("; CUDA events" if dev.type == "cuda" else "; host perf_counter per call")
        ),
        "results": results,
    }


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


def ops_table(report: dict) -> str:
    """The ``bench ops`` report as a table for people."""
    lines = [
        f"{report['device']}  {report['dtype']}  backend={report['backend']}  "
        f"d_model={report['d_model']} d_ff={report['d_ff']}",
        f"{'step':>4} {'batch':>5} {'sparsity':>8} {'union':>6} {'dense us':>9} {'sparse us':>9} "
        f"{'speedup':>7} {'bound':>6} {'GB/s':>6} {'dense GB/s':>10}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['step']:>4} {r['batch']:>5} {r['sparsity']:>8.4f} {r['union_sparsity']:>6.3f} "
            f"{r['dense_us']:>9.1f} {r['sparse_us']:>9.1f} {r['speedup']:>6.2f}x "
            f"{r['bound']:>5.2f}x {r['gbps']:>6.1f} {r['dense_gbps']:>10.1f}"
        )
    lines.append(f"method: {report['method']}")
    return "\n".join(lines)


def bench_decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int = 64,
    backend: str | None = None,
) -> dict:
    """Greedy decode dense, then swap in :class:`SparseMLP` (in place) and decode again.

    Returns ``{"dense_tokens_per_s", "sparse_tokens_per_s", "speedup", "identical", ...}``.
    """
    from prosparse.inference.decode import greedy_decode, measure_sparsity
    from prosparse.inference.sparse_mlp import sparsify_

    greedy_decode(model, input_ids, 4)  # warm-up
    dense = greedy_decode(model, input_ids, new_tokens, desc="dense decode")
    full = torch.cat([input_ids, torch.tensor([dense.tokens], device=input_ids.device)], dim=1)
    sparsity = measure_sparsity(model, full)
    swapped = sparsify_(model, backend=backend)
    greedy_decode(model, input_ids, 4)
    sparse = greedy_decode(model, input_ids, new_tokens, desc="sparse decode")
    first_diff = next((i for i, (a, b) in enumerate(zip(dense.tokens, sparse.tokens)) if a != b),
                      None)
    return {
        "dense_tokens_per_s": dense.tokens_per_s,
        "sparse_tokens_per_s": sparse.tokens_per_s,
        "speedup": sparse.tokens_per_s / dense.tokens_per_s,
        "identical": dense.tokens == sparse.tokens,
        "first_difference": first_diff,
        "new_tokens": new_tokens,
        "ffn_sparsity": sparsity,
        "ffns_swapped": len(swapped),
        "dense_tokens": dense.tokens,
        "sparse_tokens": sparse.tokens,
    }
