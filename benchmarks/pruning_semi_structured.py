"""2:4 sparse tensor cores vs dense: prefill (2048 tokens) and batch-1 decode on one model.

    .venv/bin/python benchmarks/pruning_semi_structured.py runs/wanda-2of4 \
        --json benchmarks/results/pruning_semi_structured.json

MODEL is a 2:4 checkpoint (``prosparse prune ... --pattern 2:4``); ``--llama2-7b-shape``
instead builds a random LLaMA2-7B-shaped model of ``--layers`` layers and prunes every decoder
linear 2:4 by magnitude (speed only). Needs CUDA with compute capability 8.0+; without it the
script stops with the reason. Each side is timed with CUDA events after warm-up; the median of
``--repeats`` runs is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch


def _time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


@torch.no_grad()
def measure(model, prefill: int, new_tokens: int, repeats: int) -> dict:
    ids = torch.randint(10, 1000, (1, prefill), device="cuda")
    prefill_s = _time(lambda: model(input_ids=ids, use_cache=False), repeats)

    def decode():
        out = model(input_ids=ids[:, :16], use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    decode_s = _time(decode, repeats)
    return {"prefill_seconds": prefill_s, "prefill_tokens_per_s": prefill / prefill_s,
            "decode_tokens_per_s": new_tokens / decode_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="a 2:4 checkpoint folder")
    p.add_argument("--llama2-7b-shape", action="store_true",
                   help="a random LLaMA2-7B-shaped model, magnitude-pruned 2:4, instead of MODEL")
    p.add_argument("--layers", type=int, default=8, help="layers of the 7B-shaped model")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()

    from prosparse.pruning.semi_structured import to_semi_structured_, unavailable_reason

    if args.llama2_7b_shape == (args.model is not None):
        p.error("give either MODEL or --llama2-7b-shape")
    reason = unavailable_reason()
    if reason:
        print(f"pruning_semi_structured: error: {reason}; run it on an Ampere or newer GPU",
              file=sys.stderr)
        return 2
    from prosparse.core.io import write_json
    from prosparse.core.tables import format_table
    from prosparse.models.loading import load_model

    dtype = getattr(torch, args.dtype)
    if args.llama2_7b_shape:
        from prosparse.inference.decode import llama2_7b_shaped
        from prosparse.pruning import prunable_linears
        from prosparse.pruning.baselines import magnitude_prune_

        model = llama2_7b_shaped(args.layers, dtype, device="cuda")
        magnitude_prune_(prunable_linears(model), 2, 4)
        args.model = f"random LLaMA2-7B shape, {args.layers} of 32 layers, magnitude 2:4"
    else:
        model, _ = load_model(args.model, dtype=args.dtype, device="cuda")
    model.eval()
    dense = measure(model, args.prefill, args.new_tokens, args.repeats)
    report = to_semi_structured_(model)
    sparse = measure(model, args.prefill, args.new_tokens, args.repeats)
    result = {"model": args.model, "dtype": str(dtype), "gpu": torch.cuda.get_device_name(),
              "prefill_tokens": args.prefill, "new_tokens": args.new_tokens,
              "dense": dense, "semi_structured": sparse,
              "prefill_speedup": dense["prefill_seconds"] / sparse["prefill_seconds"],
              "decode_speedup": sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
              "converted": len(report["converted"]), "skipped": report["skipped"]}
    rows = [[k, f"{v['prefill_tokens_per_s']:.0f}", f"{v['decode_tokens_per_s']:.1f}"]
            for k, v in (("dense", dense), ("2:4 semi-structured", sparse))]
    print(format_table(["model", "prefill tok/s", "decode tok/s"], rows))
    print(f"prefill {result['prefill_speedup']:.2f}x, decode {result['decode_speedup']:.2f}x "
          f"({result['converted']} linears converted)")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
