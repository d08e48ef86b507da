"""Batch-1 greedy decode of a LLaMA2-7B-shaped model: dense vs exact sparse vs predictor-driven,
each decode step captured once in a CUDA graph over a static KV cache and replayed per token.

    python benchmarks/gpu_decode.py --layers 32 --json decode.json          # on a GPU
    python benchmarks/gpu_decode.py --layers 2 --device cpu --no-graph      # dry run on a CPU

The model is random (32 layers: the full 6.7B parameters, vocabulary 32000), ReLUfied with
per-layer FATReLU thresholds calibrated to ``--sparsity`` on random tokens. Each path decodes
the same prompt: prefill eagerly, then one decode step (the model's forward for one token at
a tensor cache position, the argmax and the bookkeeping for the next step) is captured in a
CUDA graph, so a token costs one graph replay and no host work or launch gaps. Rounds alternate
between the paths (dense, exact, predicted at each ``--predicted-sparsity``); the table gives
the median tokens/s of the rounds and, beside each speedup, the byte bound: dense weight bytes
per token over the path's (the weights each step must read; the KV cache is left out).
Predictors are random, their thresholds calibrated to skip the given share of neurons: they fix
how much work is done, not which neurons (speed only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch


def weight_bytes_per_token(config, elem: int, ffn_share: float, predictor_hidden: int = 0
                           ) -> float:
    """Bytes of weights one decode step reads: attention, ``ffn_share`` of the three FFN
    matrices (``ffn_share`` is a tuple: gate, up, down), predictors, LM head."""
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = d * config.num_key_value_heads // config.num_attention_heads
    attn = 2 * d * d + 2 * d * kv
    gate, up, down = ffn_share
    pred = (d * predictor_hidden + predictor_hidden * f) if predictor_hidden else 0
    return elem * (n * (attn + (gate + up + down) * d * f + pred) + config.vocab_size * d)


class StepDecoder:
    """Greedy decode of ``new_tokens`` after a prompt through a static cache, one step a call
    or a CUDA graph replay; the tokens stay on the device until :meth:`tokens` reads them."""

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int, graph: bool):
        from transformers import StaticCache

        self.model, self.n = model, new_tokens
        dev = prompt.device
        p = prompt.shape[1]
        self.cache = StaticCache(config=model.config, max_cache_len=p + new_tokens + 8)
        with torch.inference_mode():
            out = model(input_ids=prompt, past_key_values=self.cache,
                        cache_position=torch.arange(p, device=dev), use_cache=True)
        self.first = out.logits[0, -1].argmax().view(1, 1)
        self.prompt_len = p
        # Small tensors a cache layer keeps beside its keys and values (some transformers
        # versions count the filled length on the device): restored in place at each reset.
        self.counters = [(v, v.clone()) for layer in getattr(self.cache, "layers", [])
                         for v in vars(layer).values()
                         if isinstance(v, torch.Tensor) and v.numel() <= 16]
        self.ids = self.first.clone()
        self.pos = torch.full((1,), p, dtype=torch.long, device=dev)
        self.count = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(new_tokens, dtype=torch.long, device=dev)
        self.graph = None
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile kernels, create handles, outside the capture
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.reset()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()
        self.reset()

    @torch.inference_mode()
    def step(self) -> None:
        logits = self.model(input_ids=self.ids, past_key_values=self.cache,
                            cache_position=self.pos, use_cache=True).logits
        nxt = logits[0, -1].argmax()
        self.out.scatter_(0, self.count, nxt.view(1))
        self.ids.copy_(nxt.view(1, 1))
        self.pos.add_(1)
        self.count.add_(1)

    @torch.inference_mode()
    def reset(self) -> None:
        for live, saved in self.counters:
            live.copy_(saved)
        self.ids.copy_(self.first)
        self.pos.fill_(self.prompt_len)
        self.count.zero_()

    @torch.inference_mode()
    def run(self) -> float:
        """Decode ``new_tokens`` tokens from the prompt; returns tokens/s."""
        self.reset()
        cuda = self.pos.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        for _ in range(self.n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        if cuda:
            end.record()
            end.synchronize()
            return self.n / (start.elapsed_time(end) / 1e3)
        return self.n / (time.perf_counter() - t0)

    def tokens(self) -> list[int]:
        return [int(self.first)] + self.out[:-1].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.8932)
    ap.add_argument("--predicted-sparsity", default="0.7875,0.8932",
                    help="comma-separated shares of neurons the predictors skip")
    ap.add_argument("--predictor-hidden", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-graph", action="store_true", help="step eagerly (CPU dry run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames

    from prosparse.core.io import write_json
    from prosparse.core.tables import format_table
    from prosparse.inference.benchmark import _device_name
    from prosparse.inference.decode import calibrate_fatrelu_, llama2_7b_shaped
    from prosparse.inference.predicted import (
        attach_predictors_,
        calibrate_thresholds_,
        mean_predicted_sparsity,
        reset_predicted_counts,
    )
    from prosparse.inference.sparse_mlp import sparsify_with_restore_
    from prosparse.measure.heldout import evaluate_blocks
    from prosparse.models.relufy import find_gated_ffns
    from prosparse.predictors.model import PredictorSet

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_decode: error: --device cuda but CUDA is not available; pass --device cpu "
              "--no-graph for a dry run", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    graph = not args.no_graph
    pred_sparsities = [float(v) for v in args.predicted_sparsity.split(",") if v]
    t_start = time.time()
    model = llama2_7b_shaped(args.layers, dtype, device=args.device)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg.vocab_size, (1, 64), generator=gen).to(args.device)
    thresholds = calibrate_fatrelu_(model, calib, args.sparsity)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=gen).to(args.device)
    elem = torch.empty((), dtype=dtype).element_size()

    keep_alive = []  # every weight a captured graph reads must outlive the graphs

    def alive() -> None:
        keep_alive.extend(f.down_proj.weight for f in find_gated_ffns(model))
        keep_alive.extend(m.predictor for m in model.modules() if hasattr(m, "predictor"))

    decoders: dict[str, StepDecoder] = {}
    enters = {"dense": lambda: (lambda: None)}
    info: dict[str, dict] = {}
    dense_bytes = weight_bytes_per_token(cfg, elem, (1, 1, 1))
    graph_error = None

    # Dense first: its tokens calibrate the predictors (on the text the decode will see) and
    # measure the FFN sparsity the thresholds give in decode.
    if graph:
        try:
            decoders["dense"] = StepDecoder(model, prompt, args.new_tokens, graph=True)
        except Exception as e:  # the record says why; every path then steps eagerly
            graph_error = f"{type(e).__name__}: {e}"[:500]
            print(f"gpu_decode: CUDA graph capture failed ({graph_error}); stepping eagerly",
                  flush=True)
            graph = False
            args.rounds = min(args.rounds, 2)
    if not graph:
        decoders["dense"] = StepDecoder(model, prompt, args.new_tokens, graph=False)
    alive()  # the dense graph reads these; calibrating the predictors below swaps them out
    decoders["dense"].run()
    dense_tokens = decoders["dense"].tokens()
    seq = torch.cat([prompt, torch.tensor([dense_tokens], device=prompt.device)], dim=1)
    ffn_sparsity = evaluate_blocks(model, seq).average_sparsity
    info["dense"] = {"bound": 1.0}
    # An eager dense decode of the same steps checks the captured graph computes what it should.
    check = StepDecoder(model, prompt, args.new_tokens, graph=False)
    check.run()
    graph_matches_eager = check.tokens() == dense_tokens
    del check
    psets = {}
    for p in pred_sparsities:
        torch.manual_seed(1)
        pset = PredictorSet(cfg.hidden_size, cfg.intermediate_size, args.layers,
                            args.predictor_hidden).eval()
        calibrate_thresholds_(model, pset, seq, p)
        psets[p] = pset
    alive()

    s = ffn_sparsity
    enters["exact"] = lambda: sparsify_with_restore_(model)[1]
    info["exact"] = {"bound": dense_bytes / weight_bytes_per_token(cfg, elem, (1, 1 - s, 1 - s))}
    for p, pset in psets.items():
        enters[f"predicted {p:g}"] = lambda pset=pset: attach_predictors_(model, pset)
        info[f"predicted {p:g}"] = {"bound": dense_bytes / weight_bytes_per_token(
            cfg, elem, (1 - p,) * 3, args.predictor_hidden)}
    for name, enter in enters.items():
        if name == "dense":
            continue
        restore = enter()
        alive()
        decoders[name] = StepDecoder(model, prompt, args.new_tokens, graph)
        if name.startswith("predicted"):
            reset_predicted_counts(model)
            decoders[name].run()
            info[name]["decode_predicted_sparsity"] = mean_predicted_sparsity(model)
        restore()
        alive()

    def timed(name: str) -> float:
        if graph:
            return decoders[name].run()
        restore = enters[name]()  # eager steps run whatever modules the model holds now
        try:
            return decoders[name].run()
        finally:
            restore()

    runs = {k: [] for k in decoders}
    for _ in range(args.rounds):  # alternate, so drift in clocks lands on every path alike
        for k in decoders:
            runs[k].append(timed(k))
    rates = {k: statistics.median(v) for k, v in runs.items()}
    tokens = {k: d.tokens() for k, d in decoders.items()}
    rows, paths = [], {}
    for k in decoders:
        first_diff = next((i for i, (a, b) in enumerate(zip(dense_tokens, tokens[k])) if a != b),
                          None)
        speedup = rates[k] / rates["dense"]
        paths[k] = {**info[k], "tokens_per_s": rates[k], "speedup": speedup,
                    "tokens_per_s_runs": runs[k], "identical_to_dense": tokens[k] == dense_tokens,
                    "first_difference": first_diff, "tokens": tokens[k]}
        rows.append([k, f"{rates[k]:.1f}", f"{speedup:.2f}x", f"{info[k]['bound']:.2f}x",
                     f"{speedup / info[k]['bound']:.0%}",
                     "yes" if tokens[k] == dense_tokens else f"from {first_diff}"])
    table = format_table(["path", "tokens/s", "vs dense", "byte bound", "of bound",
                          "same tokens"], rows)
    print(table)
    report = {
        "model": f"random LLaMA2-7B shape, {args.layers} of 32 layers, vocab {cfg.vocab_size}",
        "device": _device_name(torch.device(args.device)), "dtype": args.dtype,
        "torch": torch.__version__, "cuda_graphs": graph, "graph_error": graph_error,
        "static_cache": True,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "sparsity_target": args.sparsity,
        "ffn_sparsity": ffn_sparsity, "thresholds": thresholds,
        "predictor_hidden": args.predictor_hidden, "graph_matches_eager": graph_matches_eager,
        "dense_weight_bytes_per_token": dense_bytes, "paths": paths, "table": table,
        "seconds": time.time() - t_start,
        "method": (f"prefill eager, then each decode step {'replayed from a CUDA graph' if graph else 'run eagerly'} "
                   f"over a static KV cache; {args.rounds} alternating rounds of "
                   f"{args.new_tokens} tokens per path, median tokens/s; byte bound = dense "
                   "weight bytes per token over the path's (KV cache left out)"),
    }
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
