"""Benchmarks of the sparse FFNs: steps (2) and (3) against dense, and greedy decoding dense,
exact sparse and predictor-driven (on a real model, or a LLaMA2-7B-shaped one).

Operator timings measure memory, not cache, as real decoding does: every call draws a fresh
active set, and calls cycle through enough weight copies ("layers") that their total exceeds the
last-level cache at least twice, so no call finds its rows still cached from the previous one.
Dense and sparse are timed in the same run, interleaved call by call; medians after warm-up.
On CUDA the timed calls are captured several at a time in a CUDA graph, back to back as a decode
step runs them, and each replay is timed with device events after the L2 is overwritten, so
launch overhead (which a host clock around single launches counts) is left out of both sides.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prosparse.data import load_texts, pack_blocks
from prosparse.inference.decode import calibrate_fatrelu_, greedy_decode, llama2_7b_shaped
from prosparse.inference.predicted import (
    attach_predictors_,
    calibrate_thresholds_,
    mean_predicted_sparsity,
    reset_predicted_counts,
)
from prosparse.inference.sparse_mlp import sparsify_, sparsify_with_restore_
from prosparse.kernels import activate, dense, dispatch, fused, reference
from prosparse.measure.heldout import evaluate_blocks
from prosparse.predictors.export import load_predictors
from prosparse.predictors.model import PredictorSet


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
    """``run(fn, warm=False)`` -> microseconds; on CUDA a warm call (compiles kernels) runs
    eagerly, a timed one is captured in a CUDA graph first and its replay timed."""
    if device.type == "cuda":
        def run(fn, warm=False):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph = None
            if not warm:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
            start.record()
            if graph is None:
                fn()
            else:
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
    else:
        def run(fn, warm=False):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
    return run


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30, reps: int = 10) -> float:
    """The device's achievable memory bandwidth in GB/s: the median of ``reps`` device-to-device
    copies of ``nbytes``, counting bytes read plus bytes written (CUDA only)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def graph_time_us(fns, reps: int = 5, flush: torch.Tensor | None = None) -> list[float]:
    """Microseconds per call of ``fns`` (CUDA): run once eagerly on a side stream (compiles,
    creates handles), capture them in order in one CUDA graph, then time ``reps`` replays with
    CUDA events, each after ``flush`` is overwritten (so no call finds its rows in L2). A graph
    of several calls times them as a decode step runs them: back to back, no launch gaps.
    Returns one per-call time per replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return times


GRAPH_CALLS = 8  # calls per CUDA graph in bench ops


def _random_gate(tokens: int, d_ff: int, active: int, dtype, device, gen) -> torch.Tensor:
    """Gate pre-activations with exactly ``active`` positive entries per token, a fresh random
    set per token (so a batch's union grows as independent tokens would make it)."""
    g = -torch.rand(tokens, d_ff, generator=gen, device="cpu") - 0.1
    for t in range(tokens):
        pick = torch.randperm(d_ff, generator=gen)[:active]
        g[t, pick] = torch.rand(active, generator=gen) + 0.1
    return g.to(dtype=dtype, device=device)


# The paper's GPU operators at 89.32% sparsity (host clock around single launches):
# (d_model, d_ff, step) -> speedup over dense (docs/kernels.md).
PAPER_SPEEDUP = {(4096, 11008, 2): 2.00, (4096, 11008, 3): 1.51,
                 (5120, 13824, 2): 2.44, (5120, 13824, 3): 1.70}


def _pure_torch(fn, *args, **kwargs):
    """``fn`` with the CPU backend's pure-torch kernels (the compiled ones off)."""
    with fused.disabled():
        return fn(*args, **kwargs)


def sparse_paths(dev: torch.device, backend: str) -> list[str]:
    """What ``bench ops`` and ``bench decode`` time beside dense: the backend's own path, plus
    the pure-torch CPU kernels when the backend's path is the compiled one."""
    if backend == "fused":
        return ["fused"]
    if dev.type == "cpu" and backend == "cpu":
        return ["fused", "torch"] if fused.available() else ["torch"]
    return [backend]


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
    predicted: bool = False,
) -> dict:
    """Time dense vs sparse steps (2) and (3); returns the ``bench ops`` JSON as a dict.

    ``sparse_*`` keys time the backend's path (on CPU the compiled kernels when they build);
    where that is the compiled one, ``torch_*`` keys time the pure-torch kernels in the same run.
    With ``predicted``, rows with ``"step": "predicted"`` time the predictor-driven FFN (the
    predicted rows of W_gate, W_up and W2 at each sparsity) against the dense FFN's three
    products. On CUDA the report carries the device's copy bandwidth (``peak_gbps``) and each
    row its ``peak_share``: the GB/s the sparse path achieved on the rows it reads over it.
    """
    dev = torch.device(device)
    name = dispatch.resolve_backend(dev, backend)
    paths = sparse_paths(dev, name)
    gen = torch.Generator().manual_seed(seed)
    elem = torch.empty((), dtype=dtype).element_size()
    matrix = d_ff * d_model * elem
    llc = last_level_cache_bytes(dev)
    # One copy per path timed (dense, sparse, pure torch), so consecutive calls never share one.
    copies = max(len(paths) + 1, math.ceil(2 * llc / matrix) + 1)
    w1s = [torch.randn(d_ff, d_model, generator=gen).to(dtype=dtype, device=dev) * 0.02
           for _ in range(copies)]
    w2ts = [torch.randn(d_ff, d_model, generator=gen).to(dtype=dtype, device=dev) * 0.02
            for _ in range(copies)]
    # The dense baseline reads W2 as a dense model stores it, (d_model, d_ff) contiguous; the
    # sparse step reads W2^T contiguous (d_ff, d_model), the layout SparseMLP keeps for it.
    w2ts_dense = [w.t().contiguous().t() for w in w2ts]
    wgs = ([torch.randn(d_ff, d_model, generator=gen).to(dtype=dtype, device=dev) * 0.02
            for _ in range(copies)] if predicted else [])
    peak = copy_bandwidth_gbps(dev) if dev.type == "cuda" else None
    # Overwritten before every timed graph replay: twice the L2, so nothing stays cached.
    flush = (torch.empty(2 * llc // 4 + 1, dtype=torch.float32, device=dev)
             if dev.type == "cuda" else None)
    timer = _timer(dev)
    force = dict(backend=name, dense_below=0.0, max_tokens=1 << 30)  # never fall back here
    results = []
    cases = [(b, s) for b in batches for s in sparsities]
    for batch, s in tqdm(cases, desc=f"bench ops {d_model}x{d_ff} {dtype} {dev.type}"):
        active = round((1 - s) * d_ff)
        times = {k: [] for k in ("d2", "s2", "d3", "s3", "t2", "t3", "dp", "sp")}
        pending: dict[str, list] = {}
        n_union = []
        for i in range(warmup + reps):
            # Sparse reads copy i, dense copy i + copies/2, pure torch copy i - 1: none finds
            # another's rows cached.
            j = (i + copies // 2) % copies
            w1, w2t = w1s[i % copies], w2ts[i % copies]
            k = (i - 1) % copies
            x = torch.randn(batch, d_model, generator=gen).to(dtype=dtype, device=dev)
            g = _random_gate(batch, d_ff, active, dtype, dev, gen)
            u = torch.randn(batch, d_ff, generator=gen).to(dtype=dtype, device=dev)
            x1 = activate(g) * u  # (batch, d_ff), exact zeros off the active set
            n_union.append(int(reference.active_neurons(x1).numel()))
            pairs = [("d2", partial(dense.up_step, x, g, w1s[j])),
                     ("s2", partial(dispatch.up_step, x, g, w1, **force)),
                     ("d3", partial(dense.down_step, x1, w2ts_dense[j])),
                     ("s3", partial(dispatch.down_step, x1, w2t, **force))]
            if predicted:
                mask = torch.rand(batch, d_ff, generator=gen).argsort(dim=1) < active
                mask = mask.to(dev)
                pairs += [("dp", partial(_dense_ffn, x, wgs[j], w1s[j], w2ts_dense[j])),
                          ("sp", partial(dispatch.predicted_ffn, x, mask, wgs[i % copies], w1,
                                         w2t, backend=name, max_tokens=1 << 30))]
            if "torch" in paths and len(paths) > 1:
                pairs += [("t2", partial(_pure_torch, dispatch.up_step, x, g, w1s[k], **force)),
                          ("t3", partial(_pure_torch, dispatch.down_step, x1, w2ts[k], **force))]
            if i % 2:
                pairs.reverse()
            if dev.type == "cuda" and i >= warmup:  # timed in graphs of GRAPH_CALLS calls
                for key, fn in pairs:
                    pending.setdefault(key, []).append(fn)
                if len(pending["s2"]) == GRAPH_CALLS or i == warmup + reps - 1:
                    for key in sorted(pending, reverse=bool(i % 2)):
                        times[key] += graph_time_us(pending[key], reps=3, flush=flush)
                    pending = {}
                continue
            for key, fn in pairs:
                t = timer(fn, warm=i < warmup)
                if i >= warmup:
                    times[key].append(t)
        union = statistics.median(n_union)
        for step in (2, 3, "predicted") if predicted else (2, 3):
            key = "p" if step == "predicted" else step
            dense_us = statistics.median(times[f"d{key}"])
            sparse_us = statistics.median(times[f"s{key}"])
            # The predicted FFN reads each token's predicted rows of three matrices; the
            # steps the union's rows of one.
            n_mat = 3 if step == "predicted" else 1
            rows_read = batch * active if step == "predicted" else union
            results.append({
                "step": step,
                "sparsity": s,
                "batch": batch,
                "union_sparsity": 1 - union / d_ff,
                "dense_us": dense_us,
                "sparse_us": sparse_us,
                "speedup": dense_us / sparse_us,
                "gbps": n_mat * rows_read * d_model * elem / sparse_us / 1e3,
                "dense_gbps": n_mat * matrix / dense_us / 1e3,
                "bound": 1 / (1 - s) if s < 1 else math.inf,
            })
            if peak is not None:
                results[-1].update(peak_share=results[-1]["gbps"] / peak,
                                   dense_peak_share=results[-1]["dense_gbps"] / peak)
            paper = PAPER_SPEEDUP.get((d_model, d_ff, step))
            if dev.type == "cuda" and paper is not None and abs(s - 0.8932) < 1e-9:
                results[-1]["paper_speedup"] = paper
            if times.get(f"t{step}"):
                torch_us = statistics.median(times[f"t{step}"])
                results[-1].update(torch_us=torch_us, torch_speedup=dense_us / torch_us,
                                   torch_gbps=union * d_model * elem / torch_us / 1e3)
    return {
        "device": _device_name(dev),
        "cpu_isa": fused.cpu_isa(),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": name,
        "sparse_path": paths[0],
        "d_model": d_model,
        "d_ff": d_ff,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "peak_gbps": peak,
        "reps": reps,
        "warmup": warmup,
        "method": (
            f"medians of {reps} calls after {warmup} warm-up calls; a fresh random active set "
            f"every call; calls cycle through {copies} copies of each weight matrix "
            f"({copies * matrix / 2**20:.0f} MiB per step, last-level cache {llc / 2**20:.0f} MiB) "
            "so active rows come from memory, not cache; dense and sparse interleaved"
            + (f"; calls captured {GRAPH_CALLS} at a time in a CUDA graph (back to back, as "
               "a decode step runs them), each replay timed by CUDA events after the L2 is "
               "overwritten, per-call time = replay time / calls"
               if dev.type == "cuda" else "; host perf_counter per call")
        ),
        "results": results,
    }


def _dense_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w2t: torch.Tensor
               ) -> torch.Tensor:
    """The dense FFN the predictor-driven one replaces: three dense products and the ReLU."""
    g = dense.matvec(w_gate, x[0]).unsqueeze(0) if x.shape[0] == 1 else x @ w_gate.t()
    return dense.down_step(dense.up_step(x, g, w_up), w2t)


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
    twin = any("torch_us" in r for r in report["results"])
    peak = report.get("peak_gbps")
    lines = [
        f"{report['device']}  {report['dtype']}  backend={report['backend']} "
        f"({report.get('sparse_path', report['backend'])})  "
        f"d_model={report['d_model']} d_ff={report['d_ff']}",
        f"{'step':>9} {'batch':>5} {'sparsity':>8} {'union':>6} {'dense us':>9} {'sparse us':>9} "
        f"{'speedup':>7} {'bound':>6} {'GB/s':>6} {'dense GB/s':>10}"
        + (f" {'% peak':>6}" if peak else "")
        + (f" {'torch us':>9} {'torch x':>7} {'torch GB/s':>10}" if twin else ""),
    ]
    for r in report["results"]:
        lines.append(
            f"{r['step']:>9} {r['batch']:>5} {r['sparsity']:>8.4f} {r['union_sparsity']:>6.3f} "
            f"{r['dense_us']:>9.1f} {r['sparse_us']:>9.1f} {r['speedup']:>6.2f}x "
            f"{r['bound']:>5.2f}x {r['gbps']:>6.1f} {r['dense_gbps']:>10.1f}"
            + (f" {100 * r['peak_share']:>5.1f}%" if peak else "")
            + (f" {r['torch_us']:>9.1f} {r['torch_speedup']:>6.2f}x {r['torch_gbps']:>10.1f}"
               if "torch_us" in r else "")
        )
    if peak:
        lines.append(f"device copy bandwidth (peak): {peak:.0f} GB/s")
    lines.append(f"method: {report['method']}")
    return "\n".join(lines)


def bench_decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int = 64,
    backend: str | None = None,
    repeats: int = 3,
) -> dict:
    """Greedy decode dense, then with :class:`SparseMLP` swapped in (and, where the compiled
    kernels ran, again with the pure-torch twin), alternating for ``repeats`` rounds so that
    drift in the machine's speed lands on every path alike; tokens/s are medians over the
    rounds (each round's in ``*_tokens_per_s_runs``). The model is left dense.

    Returns ``{"dense_tokens_per_s", "sparse_tokens_per_s", "speedup", "identical", ...}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be at least 1")
    dev = input_ids.device
    paths = sparse_paths(dev, dispatch.resolve_backend(dev, backend))
    runs: dict[str, list] = {"dense": [], "sparse": [], "torch": []}
    swapped: list[str] = []
    for r in range(repeats):
        greedy_decode(model, input_ids, 4)  # warm-up
        runs["dense"].append(greedy_decode(model, input_ids, new_tokens,
                                           desc=f"dense decode {r + 1}/{repeats}"))
        swapped, restore = sparsify_with_restore_(model, backend=backend)
        try:
            greedy_decode(model, input_ids, 4)
            runs["sparse"].append(greedy_decode(model, input_ids, new_tokens,
                                                desc=f"sparse decode {r + 1}/{repeats}"))
            if len(paths) > 1:  # the compiled kernels ran above: the pure-torch ones too
                with fused.disabled():
                    greedy_decode(model, input_ids, 4)
                    runs["torch"].append(greedy_decode(
                        model, input_ids, new_tokens,
                        desc=f"sparse decode, pure torch {r + 1}/{repeats}"))
        finally:
            restore()
    rate = {k: statistics.median(run.tokens_per_s for run in v) for k, v in runs.items() if v}
    dense, sparse = runs["dense"][0], runs["sparse"][0]
    full = torch.cat([input_ids, torch.tensor([dense.tokens], device=dev)], dim=1)
    sparsity = evaluate_blocks(model, full).average_sparsity  # the model is dense again
    first_diff = next((i for i, (a, b) in enumerate(zip(dense.tokens, sparse.tokens)) if a != b),
                      None)
    extra = {"sparse_path": paths[0]}
    if runs["torch"]:
        extra.update(torch_tokens_per_s=rate["torch"],
                     torch_speedup=rate["torch"] / rate["dense"],
                     torch_identical=runs["torch"][0].tokens == sparse.tokens)
    return {
        **extra,
        "dense_tokens_per_s": rate["dense"],
        "sparse_tokens_per_s": rate["sparse"],
        "speedup": rate["sparse"] / rate["dense"],
        "identical": dense.tokens == sparse.tokens,
        "first_difference": first_diff,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "ffn_sparsity": sparsity,
        "ffns_swapped": len(swapped),
        "dense_tokens": dense.tokens,
        "sparse_tokens": sparse.tokens,
        **{f"{k}_tokens_per_s_runs": [run.tokens_per_s for run in v]
           for k, v in runs.items() if v},
    }


def decode_benchmark_with_predictors(
    model: nn.Module,
    predictors: PredictorSet,
    input_ids: torch.Tensor,
    new_tokens: int = 64,
    eval_blocks: torch.Tensor | None = None,
    exact: bool = False,
    backend: str | None = None,
    repeats: int = 3,
) -> dict:
    """Greedy decode dense and with predictors attached, alternating for ``repeats`` rounds so
    drift in machine load hits both alike, then (with ``exact``) with
    :func:`sparsify_`'s exact sparse FFN, which stays swapped in.

    Returns the median tokens/s of each (every round's in ``*_runs``), the share of
    free-running greedy tokens that differ from dense, and, on ``eval_blocks`` (n, seq_len) of
    held-out text, perplexity with and without the predictors and the share of teacher-forced
    argmax tokens that differ. The model is left dense unless ``exact``.
    """
    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be at least 1")
    model.eval()
    report: dict = {"new_tokens": new_tokens, "repeats": repeats}
    if eval_blocks is not None:
        dense = evaluate_blocks(model, eval_blocks, argmax=True)
        report["eval_tokens"] = dense.nll_count
        report["dense_perplexity"] = dense.perplexity
        restore = attach_predictors_(model, predictors, backend=backend)
        try:
            pred = evaluate_blocks(model, eval_blocks, argmax=True)
        finally:
            restore()
        report["predicted_perplexity"] = pred.perplexity
        report["teacher_forced_differ"] = float((pred.argmax != dense.argmax).float().mean())
    runs: dict[str, list] = {"dense": [], "predicted": [], "exact": []}
    for r in range(repeats):
        greedy_decode(model, input_ids, 4)  # warm-up
        runs["dense"].append(greedy_decode(model, input_ids, new_tokens,
                                           desc=f"dense decode {r + 1}/{repeats}"))
        restore = attach_predictors_(model, predictors, backend=backend)
        try:
            greedy_decode(model, input_ids, 4)
            reset_predicted_counts(model)
            runs["predicted"].append(greedy_decode(model, input_ids, new_tokens,
                                                   desc=f"predicted decode {r + 1}/{repeats}"))
            report["decode_predicted_sparsity"] = mean_predicted_sparsity(model)  # last round
        finally:
            restore()
    if exact:
        sparsify_(model, backend=backend)
        for r in range(repeats):
            greedy_decode(model, input_ids, 4)
            runs["exact"].append(greedy_decode(model, input_ids, new_tokens,
                                               desc=f"exact sparse decode {r + 1}/{repeats}"))
    rate = {k: statistics.median(run.tokens_per_s for run in v) for k, v in runs.items() if v}
    dense, pred = runs["dense"][0], runs["predicted"][0]
    differ = [a != b for a, b in zip(dense.tokens, pred.tokens)]
    report.update(
        dense_tokens_per_s=rate["dense"],
        predicted_tokens_per_s=rate["predicted"],
        predicted_speedup=rate["predicted"] / rate["dense"],
        greedy_differ=sum(differ) / len(differ),
        first_difference=next((i for i, d in enumerate(differ) if d), None),
        dense_tokens=dense.tokens,
        predicted_tokens=pred.tokens,
        **{f"{k}_tokens_per_s_runs": [run.tokens_per_s for run in v]
           for k, v in runs.items() if v},
    )
    if exact:
        report.update(exact_tokens_per_s=rate["exact"],
                      exact_speedup=rate["exact"] / rate["dense"],
                      predicted_over_exact=rate["predicted"] / rate["exact"])
    return report


def predictor_decode_report(
    model: nn.Module,
    tokenizer,
    predictors: str | PredictorSet,
    input_ids: torch.Tensor,
    new_tokens: int = 64,
    eval_data: str = "wiki",
    eval_tokens: int = 2048,
    seq_len: int = 256,
    exact: bool = True,
    backend: str | None = None,
    repeats: int = 3,
) -> dict:
    """What ``prosparse bench decode MODEL --predictors PRED`` reports: dense, predictor-driven
    and (``exact``) exact sparse decoding of :func:`decode_benchmark_with_predictors`, with
    perplexity on ``eval_tokens`` held-out tokens of ``eval_data`` when a tokenizer is given.
    With ``exact`` the model is left with the exact sparse FFN swapped in."""
    pset = load_predictors(predictors) if not isinstance(predictors, PredictorSet) else predictors
    blocks = None
    if tokenizer is not None:
        blocks = pack_blocks(tokenizer, load_texts(eval_data, "heldout"), seq_len, eval_tokens)
    r = decode_benchmark_with_predictors(model, pset, input_ids, new_tokens, eval_blocks=blocks,
                                         exact=exact, backend=backend, repeats=repeats)
    r.pop("dense_tokens")
    r["predictors"] = str(predictors) if not isinstance(predictors, PredictorSet) else None
    return r


def format_predictor_report(r: dict) -> str:
    """Two lines for people: speed, then quality."""
    lines = [f"predicted {r['predicted_tokens_per_s']:.2f} tokens/s ({r['predicted_speedup']:.2f}x "
             f"dense {r['dense_tokens_per_s']:.2f}), predicted sparsity in decode "
             f"{100 * r['decode_predicted_sparsity']:.2f}%"]
    if "exact_tokens_per_s" in r:
        lines.append(f"exact sparse {r['exact_tokens_per_s']:.2f} tokens/s "
                     f"({r['exact_speedup']:.2f}x dense); predicted / exact "
                     f"{r['predicted_over_exact']:.2f}x")
    q = f"greedy tokens that differ from dense: {100 * r['greedy_differ']:.1f}%"
    if "predicted_perplexity" in r:
        q += (f"; held-out perplexity {r['dense_perplexity']:.3f} -> "
              f"{r['predicted_perplexity']:.3f}, teacher-forced argmax differs on "
              f"{100 * r['teacher_forced_differ']:.2f}%")
    return "\n".join(lines + [q])


def predicted_decode_7b_shape(
    layers: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    sparsity: float = 0.8932,
    predicted_sparsity: float = 0.7875,
    predictor_hidden: int = 1024,
    new_tokens: int = 64,
    backend: str | None = None,
    repeats: int = 3,
) -> dict:
    """Decode speed of dense, exact sparse and predictor-driven FFNs at LLaMA2-7B shapes.

    A random 7B-shaped model (:func:`llama2_7b_shaped`) gets FATReLU thresholds calibrated to
    ``sparsity`` and random predictors whose thresholds are calibrated, on the text the decode
    will see (the prompt and its dense continuation), to skip ``predicted_sparsity`` of the
    neurons: the predictors fix how much work is done, not which neurons (speed only).
    """
    model = llama2_7b_shaped(layers, dtype).to(device)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (1, 64), generator=gen)
    thresholds = calibrate_fatrelu_(model, calib.to(device), sparsity)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=gen).to(device)
    torch.manual_seed(1)
    pset = PredictorSet(model.config.hidden_size, model.config.intermediate_size, layers,
                        predictor_hidden).eval()
    cont = greedy_decode(model.eval(), input_ids, new_tokens)
    seq = torch.cat([input_ids, torch.tensor([cont.tokens], device=input_ids.device)], dim=1)
    ffn_sparsity = evaluate_blocks(model, seq).average_sparsity
    calibrate_thresholds_(model, pset, seq, predicted_sparsity)
    report = decode_benchmark_with_predictors(model.eval(), pset, input_ids, new_tokens,
                                              exact=True, backend=backend, repeats=repeats)
    report.pop("dense_tokens")
    return {**report,
            "model": f"random LLaMA2-7B shape, {layers} of 32 layers, vocab "
                     f"{model.config.vocab_size} (scaled by layers/32)",
            "layers": layers, "thresholds": thresholds, "ffn_sparsity": ffn_sparsity,
            "predictors": "random, thresholds calibrated",
            "predicted_sparsity_target": predicted_sparsity,
            "predictor_hidden": predictor_hidden, "sparsity_target": sparsity}


def exact_decode_7b_shape(layers: int = 2, dtype: torch.dtype = torch.bfloat16,
                          device: str = "cpu", sparsity: float = 0.8932, new_tokens: int = 64,
                          backend: str | None = None, repeats: int = 3) -> dict:
    """:func:`bench_decode` on a random LLaMA2-7B-shaped model with FATReLU thresholds
    calibrated to ``sparsity``."""
    model = llama2_7b_shaped(layers, dtype).to(device)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (1, 64), generator=gen)
    thresholds = calibrate_fatrelu_(model, calib.to(device), sparsity)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=gen).to(device)
    report = bench_decode(model.eval(), input_ids, new_tokens, backend=backend, repeats=repeats)
    return {**report,
            "model": f"random LLaMA2-7B shape, {layers} of 32 layers, vocab "
                     f"{model.config.vocab_size} (scaled by layers/32)",
            "layers": layers, "thresholds": thresholds, "dtype": str(dtype).removeprefix("torch."),
            "device": device, "device_name": _device_name(torch.device(device)),
            "cpu_isa": fused.cpu_isa()}


@torch.inference_mode()
def compiled_decode_7b_shape(layers: int = 2, dtype: torch.dtype = torch.bfloat16,
                             device: str = "cuda", sparsity: float = 0.8932,
                             new_tokens: int = 64, backend: str | None = None,
                             mode: str = "reduce-overhead", repeats: int = 3) -> dict:
    """Dense vs exact sparse greedy decode of a LLaMA2-7B-shaped model, both with a static KV
    cache and the decode step under ``torch.compile(mode=mode, fullgraph=True)`` (CUDA graphs
    with ``"reduce-overhead"``; the sparse step must be sync-free to be captured).

    Timed by wall clock around whole ``generate`` calls, synchronised, with no per-step hook;
    tokens/s = ``new_tokens`` / (median time of ``new_tokens + 8`` tokens - median time of 8),
    so prefill and the first steps cancel.
    """
    from transformers import CompileConfig

    model = llama2_7b_shaped(layers, dtype).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (1, 64), generator=gen)
    thresholds = calibrate_fatrelu_(model, calib.to(device), sparsity)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=gen).to(device)
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = CompileConfig(mode=mode, fullgraph=True)

    def sync():
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()

    def generate(n: int) -> tuple[float, list[int]]:
        sync()
        t = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
        sync()
        return time.perf_counter() - t, out[0, input_ids.shape[1]:].tolist()

    def rate() -> tuple[float, list[int]]:
        for n in (8, new_tokens + 8):  # compile and record both cache lengths first
            generate(n)
        short = statistics.median(generate(8)[0] for _ in range(repeats))
        runs = [generate(new_tokens + 8) for _ in range(repeats)]
        return new_tokens / (statistics.median(t for t, _ in runs) - short), runs[0][1]

    dense_rate, dense_tokens = rate()
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)  # compile the sparse model afresh
    swapped = sparsify_(model, backend=backend)
    sparse_rate, sparse_tokens = rate()
    first_diff = next((i for i, (a, b) in enumerate(zip(dense_tokens, sparse_tokens)) if a != b),
                      None)
    return {
        "dense_tokens_per_s": dense_rate, "sparse_tokens_per_s": sparse_rate,
        "speedup": sparse_rate / dense_rate, "identical": dense_tokens == sparse_tokens,
        "first_difference": first_diff, "new_tokens": new_tokens, "ffns_swapped": len(swapped),
        "compile_mode": mode, "static_cache": True, "repeats": repeats,
        "sparse_path": sparse_paths(input_ids.device,
                                    dispatch.resolve_backend(input_ids.device, backend))[0],
        "model": f"random LLaMA2-7B shape, {layers} of 32 layers, vocab "
                 f"{model.config.vocab_size} (scaled by layers/32)",
        "layers": layers, "thresholds": thresholds, "dtype": str(dtype).removeprefix("torch."),
        "device": _device_name(input_ids.device),
        "cpu_isa": fused.cpu_isa(),
        "method": "wall clock around synchronised generate calls (no per-step hook); "
                  f"tokens/s = {new_tokens} / (median of {repeats} runs of {new_tokens + 8} "
                  f"tokens - median of {repeats} runs of 8)",
    }


def decode_model(model_spec: str, *, threshold: float | None = None, dtype: str = "float32",
                 device: str = "cpu", prompt: str = "The capital of France is",
                 new_tokens: int = 64, backend: str | None = None,
                 predictors: str | None = None, repeats: int = 3) -> dict:
    """``prosparse bench decode MODEL``: load ``model_spec`` (ReLUfied with FATReLU at
    ``threshold`` when given), then :func:`bench_decode`, or with ``predictors``
    :func:`predictor_decode_report`."""
    from prosparse.models import load_model, relufy_

    model, tok = load_model(model_spec, dtype=dtype, device=device)
    if threshold is not None:
        relufy_(model, "fatrelu", threshold)
    input_ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    extra = {"model": model_spec, "threshold": threshold}
    if predictors is not None:
        report = predictor_decode_report(model.eval(), tok, predictors, input_ids, new_tokens,
                                         backend=backend, repeats=repeats)
    else:
        report = bench_decode(model.eval(), input_ids, new_tokens, backend=backend,
                              repeats=repeats)
        extra.update(dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                     device=device)
    return {**report, **extra}


def decode_table(report: dict) -> str:
    """The exact ``bench decode`` report for people."""
    twin = (f"{'torch':>8} {report['torch_tokens_per_s']:>9.2f}  ({report['torch_speedup']:.2f}x, "
            "pure-torch kernels)\n" if "torch_tokens_per_s" in report else "")
    return (f"{'':>8} {'tokens/s':>9}\n{'dense':>8} {report['dense_tokens_per_s']:>9.2f}\n"
            f"{'sparse':>8} {report['sparse_tokens_per_s']:>9.2f}  "
            f"({report.get('sparse_path', 'sparse')})\n{twin}"
            f"speedup {report['speedup']:.2f}x  identical tokens: {report['identical']}  "
            f"FFN sparsity {report['ffn_sparsity']:.4f}  ({report['new_tokens']} new tokens, "
            f"{report['ffns_swapped']} FFNs swapped)")
