"""``prosparse bench ops`` and ``prosparse bench decode``."""

from __future__ import annotations

from pathlib import Path

from prosparse.core import checks
from prosparse.core.errors import UsageError
from prosparse.models.loading import DTYPES

_BACKENDS = ("auto", "reference", "cpu", "triton", "fused")  # kernels.dispatch.BACKENDS + auto
_sparsities = checks.comma_list(checks.fraction, "0.5,0.7,0.8932")
_batches = checks.comma_list(checks.positive_int, "1,4,16")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark the exact sparse FFN (ops, decode)")
    sub = bench.add_subparsers(dest="bench", metavar="WHAT")
    sub.required = True

    ops = sub.add_parser("ops", help="steps (2) and (3): dense vs sparse time, GB/s, bound")
    ops.add_argument("--d-model", type=checks.positive_int, default=4096, help="4096 = LLaMA2-7B, 5120 = 13B")
    ops.add_argument("--d-ff", type=checks.positive_int, default=11008, help="11008 = LLaMA2-7B, 13824 = 13B")
    ops.add_argument("--sparsity", type=_sparsities, default=(0.5, 0.7, 0.8932),
                     help="comma-separated activation sparsities (default 0.5,0.7,0.8932)")
    ops.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="bf16, fp16 or fp32")
    ops.add_argument("--device", default="cpu", type=checks.device, help="cpu or cuda")
    ops.add_argument("--batch", type=_batches, default=(1,),
                     help="tokens per call; comma-separated for a sweep (default 1)")
    ops.add_argument("--backend", default=None, choices=_BACKENDS,
                     help="auto (default), cpu, fused, triton or reference")
    ops.add_argument("--reps", type=checks.positive_int, default=30,
                     help="timed calls per case (default 30)")
    ops.add_argument("--warmup", type=checks.nonneg_int, default=5,
                     help="untimed calls first (default 5)")
    ops.add_argument("--threads", type=checks.positive_int, default=None,
                     help="CPU threads (default: torch's)")
    ops.add_argument("--predicted", action="store_true",
                     help="also time the predictor-driven FFN (gate, up and down rows of the "
                          "predicted neurons) against the dense FFN")
    ops.add_argument("--json", type=checks.output_file, default=None, metavar="OUT",
                     help="write results here")
    ops.set_defaults(func=run_ops)

    dec = sub.add_parser("decode", help="greedy decode dense vs sparse: tokens/s, identical?")
    dec.add_argument("model", nargs="?", default=None,
                     help="a ReLUfied model: directory, .gguf or embedded name; omit with "
                     "--llama2-7b-shape")
    dec.add_argument("--llama2-7b-shape", action="store_true",
                     help="random LLaMA2-7B-shaped bf16 model, FATReLU calibrated to --sparsity")
    dec.add_argument("--layers", type=checks.positive_int, default=2,
                     help="layers of the 7B-shaped model")
    dec.add_argument("--sparsity", type=checks.fraction, default=0.8932,
                     help="target FFN sparsity of the 7B-shaped model (default 0.8932)")
    dec.add_argument("--threshold", type=checks.threshold, default=None,
                     help="ReLUfy MODEL with FATReLU at this threshold first (unconverted models)")
    dec.add_argument("--device", default="cpu", type=checks.device, help="cpu or cuda")
    dec.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="fp32 (default for MODEL) or bf16 / fp16")
    dec.add_argument("--new-tokens", type=checks.positive_int, default=64,
                     help="tokens to generate (default 64)")
    dec.add_argument("--prompt", default="The capital of France is", help="prompt text")
    dec.add_argument("--backend", default=None, choices=_BACKENDS,
                     help="auto (default), cpu, fused, triton or reference")
    dec.add_argument("--threads", type=checks.positive_int, default=None,
                     help="CPU threads (default: torch's)")
    dec.add_argument("--predictors", default=None, metavar="PRED",
                     help="also decode with these activation predictors (prosparse predictors); "
                          "with --llama2-7b-shape: 'random', timed at --predicted-sparsity")
    dec.add_argument("--repeats", type=checks.positive_int, default=3,
                     help="rounds of dense / sparse (/ predicted) decode, alternating, "
                          "medians reported (default 3)")
    dec.add_argument("--predicted-sparsity", type=checks.fraction, default=0.7875,
                     help="share of neurons the 7B-shaped run's random predictors skip "
                          "(default 0.7875, ProSparse-7B's predicted sparsity in paper Table 2)")
    dec.add_argument("--predictor-hidden", type=checks.positive_int, default=1024,
                     help="hidden width of the 7B-shaped run's predictors (default 1024)")
    dec.add_argument("--compile", default=None, metavar="MODE",
                     help="with --llama2-7b-shape: decode dense and sparse with a static KV cache "
                          "and torch.compile(mode=MODE), e.g. reduce-overhead (CUDA graphs)")
    dec.add_argument("--json", type=checks.output_file, default=None, metavar="OUT",
                     help="write results here")
    dec.set_defaults(func=run_decode)


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _write(report: dict, out: Path | None) -> None:
    from prosparse.core.io import write_json

    if out is not None:
        write_json(out, report)
        print(f"wrote {out}")


def _check_backend(device: str, backend: str | None) -> None:
    """A forced backend that cannot run here fails now, as a usage error, not mid-benchmark."""
    from prosparse.kernels import dispatch

    try:
        dispatch.resolve_backend(device, backend)
    except (KeyError, ValueError) as e:
        raise UsageError(f"--backend {backend}: {e.args[0] if e.args else e}") from None


def run_ops(args) -> int:
    from prosparse.inference.benchmark import bench_ops, ops_table
    from prosparse.models.loading import resolve_dtype

    _check_backend(args.device, args.backend)
    _threads(args.threads)
    report = bench_ops(
        d_model=args.d_model, d_ff=args.d_ff, sparsities=args.sparsity,
        dtype=resolve_dtype(args.dtype), device=args.device, batches=args.batch,
        reps=args.reps, warmup=args.warmup, backend=args.backend, predicted=args.predicted,
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
        from prosparse.cli.predictors import check_predictor_dir

        check_predictor_dir(args.predictors)
    if args.compile is not None and not args.llama2_7b_shape:
        raise UsageError("--compile needs --llama2-7b-shape")
    _check_backend(args.device, args.backend)
    _threads(args.threads)
    common = dict(new_tokens=args.new_tokens, backend=args.backend)
    if args.llama2_7b_shape:
        shape = dict(layers=args.layers, dtype=resolve_dtype(args.dtype or "bf16"),
                     device=args.device, sparsity=args.sparsity, **common)
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
                                dtype=args.dtype or "float32", device=args.device,
                                prompt=args.prompt, predictors=args.predictors,
                                repeats=args.repeats, **common)
    report["threads"] = torch.get_num_threads()
    print(b.format_predictor_report(report) if args.predictors is not None
          else b.decode_table(report))
    _write(report, args.json)
    return 0
