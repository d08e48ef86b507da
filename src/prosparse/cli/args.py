"""The flags commands share: one builder per flag, so a flag name means one thing everywhere.

Each builder adds its flag with the help stem in :data:`HELP` (the flag's one meaning), then
what this command does with it (``role``) and its default: ``add_dtype(p, default="bf16")``
gives ``--dtype {bf16,fp16,fp32}`` with help ``weights dtype: bf16, fp16 or fp32 (default
bf16)`` in every command. ``tests/cli/test_args.py`` reads every parser and holds them to it.

A flag that was renamed keeps its old spelling as a hidden alias (:func:`add_renamed`): same
destination, no help line, so command lines written before the rename run unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prosparse.core import checks
from prosparse.core.assets import DEFAULT_MODEL
from prosparse.core.errors import UsageError
from prosparse.kernels.activations import ACTS

HELP = {
    "model": "HF folder, .gguf file, hub id (online) or embedded name",
    "--data": "text to read: wiki, qa or NAME=PATH (.txt, .jsonl or folder)",
    "--tokens": "tokens of --data to read",
    "--seq-len": "tokens per block",
    "--dtype": "weights dtype: bf16, fp16 or fp32",
    "--device": "torch device: cpu, cuda or cuda:N",
    "--batch-size": "batch size",
    "--json": "write JSON to OUT",
    "--plot": "write a PNG plot to OUT",
    "--out": "folder to write",
    "--overwrite": "replace existing outputs (an --out folder only if prosparse wrote it)",
    "--threads": "CPU threads (default: torch's)",
    "--act": "FFN activation to swap in",
    "--threshold": "FATReLU threshold t (keeps g >= t)",
    "--shift": "shifted ReLU bias b: relu(g - b)",
    "--repeats": "timed repetitions",
    "--backend": "sparse kernels: auto, reference, cpu, fused or triton",
    "--seed": "random seed",
    "--prompt": "prompt text",
    "--predictors": "activation predictors (a `prosparse predictors train` folder, or "
                    "PowerInfer's)",
}
"""Each shared flag's meaning: the start of its help in every command that has it."""

DTYPES = ("bf16", "fp16", "fp32")
_DTYPE_SPELLINGS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
BACKENDS = ("auto", "reference", "cpu", "triton", "fused")  # kernels.dispatch.BACKENDS + auto
# Activations a plain swap can apply; CATS and TEAL calibrate thresholds on data (convert).
SWAP_ACTS = tuple(a for a in ACTS if a != "cats")
TRAINING_FREE = ("cats", "teal")


def _help(flag: str, role: str | None = None, default=None) -> str:
    text = HELP[flag] + (f"; {role}" if role else "")
    return text + (f" (default {default})" if default is not None else "")


def add_renamed(p: argparse.ArgumentParser, flag: str, old: str | tuple[str, ...],
                **kwargs) -> argparse.Action:
    """Add ``flag``, and ``old`` (one spelling or several) as hidden aliases with the same
    destination, type and action: ``--sparsity`` still parses as ``--target-sparsity`` did."""
    action = p.add_argument(flag, **kwargs)
    hidden = {k: v for k, v in kwargs.items() if k not in ("help", "default", "required")}
    for name in (old,) if isinstance(old, str) else old:
        p.add_argument(name, **{**hidden, "dest": action.dest, "help": argparse.SUPPRESS,
                                "default": argparse.SUPPRESS})
    return action


# --- the model ------------------------------------------------------------------------------

def add_model(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
              role: str | None = None, required: bool = False) -> None:
    """The MODEL positional (optional unless ``required``)."""
    shown = default if default is not None and not required else None
    p.add_argument("model", metavar="MODEL", nargs=None if required else "?", default=default,
                   help=_help("model", role, shown))


def dtype(text: str) -> str:
    """A ``type=`` for --dtype: ``float32`` -> ``fp32``, ``bfloat16`` -> ``bf16``,
    ``float16`` -> ``fp16``; anything else is left for ``choices`` to refuse."""
    return _DTYPE_SPELLINGS.get(text, text)


def canonical_dtype(name: str) -> str:
    """``bf16`` / ``fp16`` / ``fp32`` from any spelling the loaders take; an unknown one is a
    :class:`UsageError` listing the names."""
    value = dtype(str(name))
    if value not in DTYPES:
        raise UsageError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return value


def add_dtype(p: argparse.ArgumentParser, default: str | None = "fp32",
              role: str | None = None) -> None:
    p.add_argument("--dtype", type=dtype, choices=DTYPES, default=default,
                   help=_help("--dtype", role, default))


def add_device(p: argparse.ArgumentParser, default: str | None = "cpu", role: str | None = None,
               auto: bool = False) -> None:
    """--device, a torch device that exists here (``auto`` too when ``auto``)."""
    p.add_argument("--device", default=default, type=_device_or_auto if auto else checks.device,
                   help=_help("--device", role, default))


def _device_or_auto(text: str) -> str:
    return text if text == "auto" else checks.device(text)


def add_model_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
                   role: str | None = None) -> None:
    """MODEL, --dtype and --device: every command that loads one model."""
    add_model(p, default, role)
    add_dtype(p)
    add_device(p)


# --- the activation group -------------------------------------------------------------------

def add_activation_args(p: argparse.ArgumentParser, default: str | None = "relu",
                        choices: tuple[str, ...] = SWAP_ACTS) -> None:
    """--act / --threshold / --shift: the activation the loaded model runs with."""
    g = p.add_argument_group("activation", "swap the FFN activation after loading")
    g.add_argument("--act", default=default, choices=choices,
                   help=_help("--act", None if default else "default: keep the model's"))
    g.add_argument("--threshold", type=checks.threshold, default=0.0,
                   help=_help("--threshold", "implies --act fatrelu when > 0"))
    g.add_argument("--shift", type=checks.act_scalar, default=0.0,
                   help=_help("--shift", "implies --act shifted_relu when set"))


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


def describe_activation(act: str, param: float | list[float]) -> str:
    """``hidden_act=...`` (and ``hidden_act_param=...`` when set) as a saved config names them,
    per-layer values as their range."""
    if not param:
        return f"hidden_act={act}"
    shown = (f"{len(param)} per-layer values, {min(param):g}..{max(param):g}"
             if isinstance(param, list) else f"{param:g}")
    return f"hidden_act={act}, hidden_act_param={shown}"


def apply_activation_args(model, args) -> None:
    """relufy_ from --act/--threshold/--shift, when any of them asks for a swap."""
    from prosparse.models.relufy import relufy_

    swap = activation_from_args(args)
    if swap is not None:
        relufy_(model, *swap)


# --- data -----------------------------------------------------------------------------------

def add_data(p: argparse.ArgumentParser, role: str | None = None, default=None,
             repeatable: bool = True) -> None:
    """--data SRC: text sources (repeatable unless ``repeatable`` is False)."""
    role = "; ".join(r for r in (role, "repeatable" if repeatable else None) if r) or None
    p.add_argument("--data", action="append" if repeatable else "store", metavar="SRC",
                   default=default, help=_help("--data", role, default))


def add_tokens(p: argparse.ArgumentParser, default: int | None, role: str | None = None,
               old: str | tuple[str, ...] = (), type=checks.positive_int) -> None:
    add_renamed(p, "--tokens", old, type=type, default=default,
                help=_help("--tokens", role, default))


def seq_len(text) -> int:
    """A block length: an integer >= 2 (one next-token prediction needs two tokens)."""
    value = checks.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is too short a block; use >= 2 tokens")
    return value


def add_seq_len(p: argparse.ArgumentParser, default: int | None, role: str | None = None,
                type=seq_len) -> None:
    p.add_argument("--seq-len", type=type, default=default, help=_help("--seq-len", role, default))


def add_batch_size(p: argparse.ArgumentParser, default, role: str, type=checks.positive_int,
                   old: str | tuple[str, ...] = (), metavar: str | None = None) -> None:
    add_renamed(p, "--batch-size", old, type=type, default=default, metavar=metavar,
                help=_help("--batch-size", role, None if isinstance(default, tuple) else default))


def add_data_args(p: argparse.ArgumentParser, tokens: int = 8192, seq_len_: int = 256) -> None:
    """--data / --tokens / --seq-len / --batch-size of the commands that measure on text."""
    from prosparse.data import DEFAULT_DATA

    add_data(p, f"default {DEFAULT_DATA}")
    add_tokens(p, tokens, "per source, in whole blocks, at least one")
    add_seq_len(p, seq_len_)
    add_batch_size(p, 4, "blocks per forward pass")


# --- outputs --------------------------------------------------------------------------------

def add_json(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--json", type=checks.output_file, default=None, metavar="OUT",
                   help=_help("--json", role))


def add_plot(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--plot", type=checks.output_file, default=None, metavar="OUT",
                   help=_help("--plot", role))


def add_out(p: argparse.ArgumentParser, role: str | None = None, required: bool = True,
            default: str | None = None, overwrite_role: str | None = None) -> None:
    """--out DIR and --overwrite."""
    p.add_argument("--out", required=required, default=default, metavar="DIR",
                   help=_help("--out", role, default))
    p.add_argument("--overwrite", action="store_true", help=_help("--overwrite", overwrite_role))


# --- runs -----------------------------------------------------------------------------------

def add_time_budget(p: argparse.ArgumentParser) -> None:
    """--time-budget MIN: the recipe's ``time_budget`` (an override appended after the others)."""
    p.add_argument("--time-budget", type=checks.nonneg_float, default=None, metavar="MIN",
                   help="minutes the whole run may take (measurements, training, sweep, report): "
                        "after timing its first steps it trains fewer steps, the schedule "
                        "compressed, where the recipe would take longer; 0 = the recipe as "
                        "written (default: the recipe's time_budget)")


def budget_overrides(args) -> list[str]:
    """The dotted overrides with ``--time-budget`` last, so it wins."""
    extra = [] if args.time_budget is None else [f"time_budget={args.time_budget:g}"]
    return [*args.overrides, *extra]


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=checks.positive_int, default=None, help=HELP["--threads"])


def set_threads(n: int | None) -> None:
    """torch's CPU threads from --threads (left alone when not given)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


def add_repeats(p: argparse.ArgumentParser, default: int, role: str,
                old: str | tuple[str, ...] = ()) -> None:
    add_renamed(p, "--repeats", old, type=checks.positive_int, default=default,
                help=_help("--repeats", role, default))


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help=_help("--backend", None, "auto"))


def check_backend(device: str, backend: str | None) -> None:
    """A forced backend that cannot run here fails now, as a usage error, not mid-run."""
    from prosparse.kernels import dispatch

    try:
        dispatch.resolve_backend(device, backend)
    except (KeyError, ValueError) as e:
        raise UsageError(f"--backend {backend}: {e.args[0] if e.args else e}") from None


def add_seed(p: argparse.ArgumentParser, default: int | None, role: str) -> None:
    p.add_argument("--seed", type=checks.nonneg_int, default=default,
                   help=_help("--seed", role, default))


def add_prompt(p: argparse.ArgumentParser, default: str | None = None,
               role: str | None = None) -> None:
    p.add_argument("--prompt", default=default, required=default is None, metavar="TEXT",
                   help=_help("--prompt", role, None if default is None else repr(default)))


def add_predictors(p: argparse.ArgumentParser, role: str | None = None) -> None:
    p.add_argument("--predictors", default=None, metavar="PRED",
                   help=_help("--predictors", role))


def check_predictor_dir(path: str) -> Path:
    """A predictor folder to read: ours (``predictors.json``) or PowerInfer's (``model_0.pt``)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"no predictor folder at {path!r}; write one with `prosparse predictors "
                         "train` (or give PowerInfer's)")
    if not (folder / "predictors.json").is_file() and not (folder / "model_0.pt").is_file():
        raise UsageError(f"{folder} holds neither predictors.json (prosparse) nor model_0.pt "
                         "(PowerInfer); give the --out of `prosparse predictors train`")
    return folder


# --- outputs ---------------------------------------------------------------------------------

INPUT_DESTS = ("model", "data", "eval_data", "recipe", "config", "predictors", "data_dir",
               "results", "run", "data_root", "reference")
"""Arguments that name things a command reads (a path, or ``NAME=PATH`` for data)."""
RESULT_DESTS = ("json", "plot")
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".eps", ".ps", ".tif",
                 ".tiff", ".webp", ".pgf", ".raw", ".rgba")
"""What matplotlib's ``savefig`` writes."""


def _paths(value) -> list[Path]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, (str, Path)) and str(v):
            text = str(v)
            if "=" in text and not Path(text).exists():
                text = text.split("=", 1)[1]
            path = Path(text).expanduser()
            if path.exists():
                out.append(path.resolve())
    return out


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: no output may be one of the command's inputs (nor an ``--out`` folder
    hold one), a ``--plot`` must have a suffix matplotlib writes, and an existing ``--json`` /
    ``--plot`` file is replaced only when prosparse wrote it or ``--overwrite`` is given."""
    from prosparse.core.io import is_prosparse_result

    inputs = [p for d in INPUT_DESTS if hasattr(args, d) for p in _paths(getattr(args, d))]
    outputs = {d: Path(getattr(args, d)).expanduser() for d in (*RESULT_DESTS, "out")
               if getattr(args, d, None)}
    for dest, out in outputs.items():
        target = out.resolve()
        flag = f"--{dest}"
        for src in inputs:
            # the same path, or an --out folder that holds an input (replacing it would
            # destroy what the command reads)
            if target == src or (dest == "out" and _within(src, target)):
                raise UsageError(f"{flag} {out} is also an input of this command ({src}); "
                                 "write the output somewhere else")
    plot = outputs.get("plot")
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {plot}: matplotlib cannot write a {plot.suffix or 'suffix-less'}"
                         f" file; use one of {', '.join(PLOT_SUFFIXES[:4])}, ...")
    if plot is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install 'prosparse[plots]', or drop "
                             "--plot")
    for dest in RESULT_DESTS:
        out = outputs.get(dest)
        if out is None or not out.is_file() or getattr(args, "overwrite", False):
            continue
        if is_prosparse_result(out) is False:
            raise UsageError(f"--{dest} {out} already exists and was not written by prosparse; "
                             "choose another path, or pass --overwrite to replace it")
