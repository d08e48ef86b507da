"""``prosparse convert``: swap the FFN activation and write a loadable checkpoint."""

from __future__ import annotations

import argparse

from prosparse.core import checks
from prosparse.core.errors import UsageError
from prosparse.kernels.activations import ACTS
from prosparse.models.loading import DEFAULT_MODEL, DTYPES


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """The MODEL argument and --dtype/--device shared by every command that loads a model."""
    help_ = f"HF directory, .gguf file, hub id (online) or embedded name (default {DEFAULT_MODEL})"
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=help_)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype")
    p.add_argument("--device", default="cpu", type=checks.device,
                   help="torch device (cpu, cuda, cuda:1, ...)")


# Activations a plain swap can apply; CATS and TEAL calibrate thresholds on data (convert).
SWAP_ACTS = tuple(a for a in ACTS if a != "cats")
TRAINING_FREE = ("cats", "teal")


def add_activation_args(p: argparse.ArgumentParser, default: str | None = "relu",
                        choices: tuple[str, ...] = SWAP_ACTS) -> None:
    p.add_argument("--act", default=default, choices=choices,
                   help="FFN activation to swap in" + ("" if default else " (default: keep)"))
    p.add_argument("--threshold", type=checks.threshold, default=0.0,
                   help="FATReLU threshold t (keeps g >= t); implies --act fatrelu when > 0")
    p.add_argument("--shift", type=checks.act_scalar, default=0.0,
                   help="shifted ReLU bias b: relu(g - b); implies --act shifted_relu when set")


def activation_from_args(args) -> tuple[str, float] | None:
    """``(act, param)`` from --act/--threshold/--shift (a threshold implies fatrelu, a shift
    shifted_relu), or None when none of them asks for a swap."""
    act = args.act
    if args.threshold and args.shift:
        raise UsageError(f"--threshold {args.threshold:g} and --shift {args.shift:g} name two "
                         "activations; give --threshold (fatrelu) or --shift (shifted_relu)")
    if args.threshold and act == "shifted_relu":
        raise UsageError(f"--threshold {args.threshold:g} applies to --act fatrelu; give "
                         "shifted_relu its shift with --shift")
    if args.shift and act == "fatrelu":
        raise UsageError(f"--shift {args.shift:g} applies to --act shifted_relu; give fatrelu "
                         "its threshold with --threshold")
    if args.threshold and act in (None, "relu"):
        act = "fatrelu"
    if args.shift and act in (None, "relu"):
        act = "shifted_relu"
    if act is None:
        return None
    return act, args.threshold if act == "fatrelu" else args.shift if act == "shifted_relu" else 0.0


def apply_activation_args(model, args) -> None:
    """relufy_ from --act/--threshold/--shift, when any of them asks for a swap."""
    from prosparse.models.relufy import relufy_

    swap = activation_from_args(args)
    if swap is not None:
        relufy_(model, *swap)


def _convert(args) -> int:
    from prosparse.models.saving import convert

    if args.act in TRAINING_FREE:
        return _convert_training_free(args)
    if args.sparsity is not None:
        raise UsageError(f"--sparsity {args.sparsity:g} calibrates --act cats or teal; "
                         f"--act {args.act} takes --threshold / --shift")
    act, param = activation_from_args(args)
    checks.check_output_dir(args.out, args.overwrite)
    out, act, param = convert(args.model, act, param, args.out, dtype=args.dtype,
                              overwrite=args.overwrite)
    shown = (f"{len(param)} per-layer values, {min(param):g}..{max(param):g}"
             if isinstance(param, list) else f"{param:g}")
    print(f"wrote {out} (hidden_act={act}" + (f", hidden_act_param={shown})" if param else ")"))
    return 0


def _convert_training_free(args) -> int:
    import json

    from prosparse.sparsity.training_free import convert_training_free

    if args.sparsity is None:
        raise UsageError(f"--act {args.act} needs --sparsity S (the fraction to make zero, "
                         "e.g. 0.5) and --data SRC to calibrate on")
    if args.threshold or args.shift:
        raise UsageError(f"--act {args.act} calibrates its own thresholds from --sparsity; "
                         "drop --threshold / --shift")
    checks.check_output_dir(args.out, args.overwrite)
    r = convert_training_free(args.model, args.act, args.sparsity, args.out,
                              args.data or ["wiki"], tokens=args.calib_tokens,
                              seq_len=args.seq_len, dtype=args.dtype, overwrite=args.overwrite,
                              passes=args.passes)
    t = r["thresholds"]
    values = list(t.values()) if isinstance(t, dict) else t
    print(f"wrote {r['out']} ({args.act} at {100 * args.sparsity:g}% target: {len(values)} "
          f"thresholds, {min(values):.4g}..{max(values):.4g})")
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
                                   "calibrates training-free thresholds on --data to --sparsity.")
    add_model_args(p)
    add_activation_args(p, choices=SWAP_ACTS + TRAINING_FREE)
    p.add_argument("--sparsity", type=checks.open_fraction,
                   default=None,
                   help="cats / teal: target fraction of zeros, calibrated on --data (e.g. 0.5)")
    p.add_argument("--data", action="append", metavar="SRC",
                   help="cats / teal: calibration data (wiki, qa, NAME=PATH); train split; "
                        "repeatable (default wiki)")
    p.add_argument("--calib-tokens", type=checks.positive_int, default=16384,
                   help="cats / teal: calibration tokens (default 16384)")
    p.add_argument("--seq-len", type=checks.positive_int, default=256,
                   help="cats / teal: calibration block length")
    p.add_argument("--passes", type=checks.positive_int, default=1,
                   help="cats / teal: calibration passes; 1 reads the original model (as the "
                        "papers do), each further pass re-reads the thresholded model, whose "
                        "upper layers then see what the lower thresholds make (TEAL's measured "
                        "sparsity overshoots its target past 50%% with 1)")
    p.add_argument("--json", default=None, help="cats / teal: write the thresholds as JSON here")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_convert)
