"""``prosparse convert``: swap the FFN activation and write a loadable checkpoint."""

from __future__ import annotations

from prosparse.cli import args as a
from prosparse.core import checks
from prosparse.core.errors import UsageError


def _convert(args) -> int:
    from prosparse.models.saving import convert

    if args.act in a.TRAINING_FREE:
        return _convert_training_free(args)
    if args.target_sparsity is not None:
        raise UsageError(f"--target-sparsity {args.target_sparsity:g} calibrates --act cats or "
                         f"teal; --act {args.act} takes --threshold / --shift")
    act, param = a.activation_from_args(args)
    checks.check_output_dir(args.out, args.overwrite)
    out, act, param = convert(args.model, act, param, args.out, dtype=args.dtype,
                              overwrite=args.overwrite)
    print(f"wrote {out} ({a.describe_activation(act, param)})")
    return 0


def _convert_training_free(args) -> int:
    import json

    from prosparse.sparsity.training_free import convert_training_free

    if args.target_sparsity is None:
        raise UsageError(f"--act {args.act} needs --target-sparsity S (the fraction to make "
                         "zero, e.g. 0.5) and --data SRC to calibrate on")
    if args.threshold or args.shift:
        raise UsageError(f"--act {args.act} calibrates its own thresholds from "
                         "--target-sparsity; drop --threshold / --shift")
    checks.check_output_dir(args.out, args.overwrite)
    r = convert_training_free(args.model, args.act, args.target_sparsity, args.out,
                              args.data or ["wiki"], tokens=args.tokens,
                              seq_len=args.seq_len, dtype=args.dtype, overwrite=args.overwrite,
                              passes=args.passes)
    t = r["thresholds"]
    values = list(t.values()) if isinstance(t, dict) else t
    print(f"wrote {r['out']} ({args.act} at {100 * args.target_sparsity:g}% target: "
          f"{len(values)} thresholds, {min(values):.4g}..{max(values):.4g})")
    if args.json:
        from prosparse.core.io import write_json

        write_json(args.json, r)
    else:
        print(json.dumps({"method": r["method"], "sparsity_target": r["sparsity_target"]}))
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="swap the FFN activation (ReLU/FATReLU), or calibrate "
                                       "CATS / TEAL, and save",
                       description="Swap every gated FFN's activation and write a safetensors "
                                   "checkpoint with its tokenizer (atomically). --act cats | teal "
                                   "calibrates training-free thresholds on --data to "
                                   "--target-sparsity.")
    a.add_model_args(p)
    a.add_activation_args(p, choices=a.SWAP_ACTS + a.TRAINING_FREE)
    a.add_renamed(p, "--target-sparsity", "--sparsity", type=checks.open_fraction, default=None,
                  metavar="S", help="cats / teal: the fraction of x1 to make zero, calibrated "
                                    "on --data (e.g. 0.5)")
    a.add_data(p, "cats / teal: calibration text, its train split (default wiki)")
    a.add_tokens(p, 16384, "cats / teal: calibration tokens", old="--calib-tokens")
    a.add_seq_len(p, 256, "cats / teal: calibration blocks", type=checks.positive_int)
    p.add_argument("--passes", type=checks.positive_int, default=1,
                   help="cats / teal: calibration passes; 1 reads the original model (as the "
                        "papers do), each further pass re-reads the thresholded model, whose "
                        "upper layers then see what the lower thresholds make (TEAL's measured "
                        "sparsity overshoots its target past 50%% with 1)")
    a.add_json(p, "cats / teal: the calibrated thresholds")
    a.add_out(p, "the converted checkpoint")
    p.set_defaults(func=_convert)
