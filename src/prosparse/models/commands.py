"""``prosparse convert``: swap the FFN activation and write a loadable checkpoint."""

from __future__ import annotations

import argparse

from prosparse.kernels.activations import ACTS
from prosparse.models.loading import DEFAULT_MODEL, DTYPES


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """The MODEL argument and --dtype/--device shared by every command that loads a model."""
    help_ = f"HF directory, .gguf file, hub id (online) or embedded name (default {DEFAULT_MODEL})"
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=help_)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")


def add_activation_args(p: argparse.ArgumentParser, default: str | None = "relu") -> None:
    p.add_argument("--act", default=default, choices=ACTS,
                   help="FFN activation to swap in" + ("" if default else " (default: keep)"))
    p.add_argument("--threshold", type=float, default=0.0,
                   help="FATReLU threshold t (keeps g >= t); implies --act fatrelu when > 0")
    p.add_argument("--shift", type=float, default=0.0, help="shifted ReLU bias b: relu(g - b)")


def activation_from_args(args) -> tuple[str, float] | None:
    """``(act, param)`` from --act/--threshold/--shift (a threshold implies fatrelu, a shift
    shifted_relu), or None when none of them asks for a swap."""
    act = args.act
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

    act, param = activation_from_args(args)
    out, act, param = convert(args.model, act, param, args.out, dtype=args.dtype,
                              overwrite=args.overwrite)
    print(f"wrote {out} (hidden_act={act}" + (f", hidden_act_param={param:g})" if param else ")"))
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="swap the FFN activation (ReLU/FATReLU) and save",
                       description="Swap every gated FFN's activation and write a safetensors "
                                   "checkpoint with its tokenizer (atomically).")
    add_model_args(p)
    add_activation_args(p)
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_convert)
