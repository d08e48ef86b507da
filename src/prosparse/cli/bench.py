"""``prosparse bench ops`` and ``prosparse bench decode``."""

from __future__ import annotations

from pathlib import Path

from prosparse.cli import args as a
from prosparse.core import checks
from prosparse.core.errors import UsageError

_sparsities = checks.comma_list(checks.fraction, "0.5,0.7,0.8932")
_batches = checks.comma_list(checks.positive_int, "1,4,16")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark the exact sparse FFN (ops, decode)")
    sub = bench.add_subparsers(dest="bench", metavar="WHAT")
    sub.required = True

    ops = sub.add_parser("ops", help="steps (2) and (3): dense vs sparse time, GB/s, bound")
    ops.add_argument("--d-model", type=checks.positive_int, default=4096,
                     help="4096 = LLaMA2-7B, 5120 = 13B")
    ops.add_argument("--d-ff", type=checks.positive_int, default=11008,
                     help="11008 = LLaMA2-7B, 13824 = 13B")
    a.add_renamed(ops, "--target-sparsity", "--sparsity", type=_sparsities,
                  default=(0.5, 0.7, 0.8932), metavar="S[,S...]",
                  help="comma-separated activation sparsities to time (default 0.5,0.7,0.8932)")
    a.add_dtype(ops, default="bf16")
    a.add_device(ops)
    a.add_batch_size(ops, (1,), "tokens per call; comma-separated for a sweep (default 1)",
                     type=_batches, old="--batch", metavar="N[,N...]")
    a.add_backend(ops)
    a.add_repeats(ops, 30, "calls per case", old="--reps")
    ops.add_argument("--warmup", type=checks.nonneg_int, default=5,
                     help="untimed calls first (default 5)")
    a.add_threads(ops)
    ops.add_argument("--predicted", action="store_true",
                     help="also time the predictor-driven FFN (gate, up and down rows of the "
                          "predicted neurons) against the dense FFN")
    a.add_json(ops, "the results")
    ops.set_defaults(func=run_ops)

    dec = sub.add_parser("decode", help="greedy decode dense vs sparse: tokens/s, identical?")
    a.add_model(dec, default=None, role="a ReLUfied model; omit with --llama2-7b-shape")
    dec.add_argument("--llama2-7b-shape", action="store_true",
                     help="random LLaMA2-7B-shaped bf16 model, FATReLU calibrated to "
                          "--target-sparsity")
    dec.add_argument("--layers", type=checks.positive_int, default=2,
                     help="layers of the 7B-shaped model")
    a.add_renamed(dec, "--target-sparsity", "--sparsity", type=checks.fraction, default=0.8932,
                  metavar="S", help="FFN sparsity the 7B-shaped model's FATReLU thresholds are "
                                    "calibrated to (default 0.8932)")
    dec.add_argument("--threshold", type=checks.threshold, default=None,
                     help=a.HELP["--threshold"] + "; ReLUfy MODEL with FATReLU at t first, "
                          "0 = plain ReLU (default: keep MODEL's activation)")
    a.add_device(dec)
    a.add_dtype(dec, default=None, role="default fp32 for MODEL, bf16 for --llama2-7b-shape")
    dec.add_argument("--new-tokens", type=checks.positive_int, default=64,
                     help="tokens to generate (default 64)")
    a.add_prompt(dec, default="The capital of France is")
    a.add_backend(dec)
    a.add_threads(dec)
    a.add_predictors(dec, "also decode through them; with --llama2-7b-shape: 'random', timed "
                          "at --predicted-sparsity")
    a.add_repeats(dec, 3, "rounds of dense / sparse (/ predicted) decode, alternating, medians "
                          "reported")
    dec.add_argument("--predicted-sparsity", type=checks.fraction, default=0.7875,
                     help="share of neurons the 7B-shaped run's random predictors skip "
                          "(default 0.7875, ProSparse-7B's predicted sparsity in paper Table 2)")
    dec.add_argument("--predictor-hidden", type=checks.positive_int, default=1024,
                     help="hidden width of the 7B-shaped run's predictors (default 1024)")
    dec.add_argument("--compile", default=None, metavar="MODE",
                     help="with --llama2-7b-shape: decode dense and sparse with a static KV cache "
                          "and torch.compile(mode=MODE), e.g. reduce-overhead (CUDA graphs)")
    a.add_json(dec, "the results")
    dec.set_defaults(func=run_decode)


def _write(report: dict, out: Path | None) -> None:
    from prosparse.core.io import write_json

    if out is not None:
        write_json(out, report)
        print(f"wrote {out}")


def run_ops(args) -> int:
    from prosparse.inference.benchmark import bench_ops, ops_table
    from prosparse.models.loading import resolve_dtype

    a.check_backend(args.device, args.backend)
    a.set_threads(args.threads)
    report = bench_ops(
        d_model=args.d_model, d_ff=args.d_ff, sparsities=args.target_sparsity,
        dtype=resolve_dtype(args.dtype), device=args.device, batches=args.batch_size,
        reps=args.repeats, warmup=args.warmup, backend=args.backend, predicted=args.predicted,
    )
    print(ops_table(report))
    _write(report, args.json)
    return 0


def run_decode(args) -> int:
    import torch

    from prosparse.inference import benchmark as b
    from prosparse.models.loading import resolve_dtype

    if args.llama2_7b_shape == (args.model is not None):
        raise UsageError("give either MODEL or --llama2-7b-shape (not both)")
    if args.llama2_7b_shape and args.predictors not in (None, "random"):
        raise UsageError("with --llama2-7b-shape, --predictors takes 'random': random "
                         "predictors whose thresholds give --predicted-sparsity")
    if not args.llama2_7b_shape and args.predictors is not None:
        from prosparse.inference.generate import check_predictors_fit

        check_predictors_fit(args.model, a.check_predictor_dir(args.predictors))
    if args.compile is not None and not args.llama2_7b_shape:
        raise UsageError("--compile needs --llama2-7b-shape")
    a.check_backend(args.device, args.backend)
    a.set_threads(args.threads)
    common = dict(new_tokens=args.new_tokens, backend=args.backend)
    if args.llama2_7b_shape:
        shape = dict(layers=args.layers, dtype=resolve_dtype(args.dtype or "bf16"),
                     device=args.device, sparsity=args.target_sparsity, **common)
        if args.compile is not None:
            if args.predictors is not None:
                raise UsageError("--compile times exact sparse decode; drop --predictors")
            report = b.compiled_decode_7b_shape(mode=args.compile, repeats=args.repeats, **shape)
        elif args.predictors is not None:
            report = b.predicted_decode_7b_shape(
                predicted_sparsity=args.predicted_sparsity,
                predictor_hidden=args.predictor_hidden, repeats=args.repeats, **shape)
        else:
            report = b.exact_decode_7b_shape(repeats=args.repeats, **shape)
    else:
        report = b.decode_model(args.model, threshold=args.threshold,
                                dtype=args.dtype or "fp32", device=args.device,
                                prompt=args.prompt, predictors=args.predictors,
                                repeats=args.repeats, **common)
    report["threads"] = torch.get_num_threads()
    print(b.format_predictor_report(report) if args.predictors is not None
          else b.decode_table(report))
    _write(report, args.json)
    return 0
