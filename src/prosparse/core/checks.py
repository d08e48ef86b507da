"""Small validators shared by every command: numbers, comma lists, devices, output locations.

The number validators are ``argparse`` ``type=`` functions: a bad value fails while the command
line is parsed, before anything is loaded, with argparse's one-line error
(``prosparse sparsity: error: argument --tokens: -5 is not a positive integer``). The same
checks back recipe fields (:mod:`prosparse.training.recipe`), so a flag and its recipe twin say the same
thing. The path checks run in handlers, before the work, and raise :class:`UsageError`.

Nothing here creates or changes a file: a check that passes leaves the disk as it found it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from prosparse.core.errors import UsageError

FLOAT32_MAX = 3.4028234663852886e38
"""Largest finite float32: a larger activation scalar cannot be stored in a checkpoint buffer."""


def _number(text, kind: type, what: str):
    if isinstance(text, bool):  # YAML true/false are not numbers
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    if kind is int:
        if isinstance(text, float) and text.is_integer():
            return int(text)
        try:
            return int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} (finite numbers only)")
    return value


def positive_int(text) -> int:
    """An integer >= 1 (a count of tokens, layers, steps)."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (>= 1)")
    return value


def nonneg_int(text) -> int:
    """An integer >= 0 (a count that may be zero: shots, warm-up calls)."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


def finite_float(text) -> float:
    """Any finite number (no nan, inf)."""
    return _number(text, float, "a finite number")


def nonneg_float(text) -> float:
    """A finite number >= 0."""
    value = _number(text, float, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def positive_float(text) -> float:
    """A finite number > 0."""
    value = _number(text, float, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def fraction(text) -> float:
    """A fraction in [0, 1] (a sparsity, a recall); percent values are refused."""
    value = _number(text, float, "a fraction in [0, 1]")
    if not 0 <= value <= 1:
        hint = f" (is it a percentage? use {value / 100:g})" if 1 < value <= 100 else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1]{hint}")
    return value


def open_fraction(text) -> float:
    """A fraction in (0, 1] (a recall target, a top share)."""
    value = fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in (0, 1], not 0")
    return value


def act_scalar(text) -> float:
    """An activation threshold or shift: finite, storable in float32 (``|x| <= 3.4e38``)."""
    value = finite_float(text)
    if abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r} does not fit in float32 (largest {FLOAT32_MAX:.3g}); thresholds are "
            "a little above typical gate values, e.g. 0.01")
    return value


def threshold(text) -> float:
    """A FATReLU threshold: finite, >= 0, storable in float32."""
    value = act_scalar(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a threshold >= 0")
    return value


def comma_list(item: Callable, example: str) -> Callable[[str], tuple]:
    """A ``type=`` for comma-separated values, each checked by ``item``: ``comma_list(fraction,
    "0.5,0.7")``. Empty items and an empty list are refused."""

    def parse(text: str) -> tuple:
        parts = [p.strip() for p in str(text).split(",")]
        if not parts or any(not p for p in parts):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list (e.g. {example})")
        out = []
        for p in parts:
            try:
                out.append(item(p))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(
                    f"{e}, in {text!r} (a comma-separated list such as {example})") from None
        return tuple(out)

    parse.__name__ = f"list of {item.__name__}"
    return parse


def device(text: str) -> str:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``); ``cuda`` without CUDA
    is refused at once rather than after the model is loaded."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} asked for but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type not in ("cpu", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu or cuda[:N]")
    return text


def check_field(key: str, value, check: Callable):
    """Run a ``type=`` validator on a recipe field: ``check_field("batch_size", 0,
    positive_int)`` raises ``UsageError("batch_size: 0 is not a positive integer (>= 1)")``."""
    try:
        return check(value)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{key}: {e}") from None


# --- output locations ----------------------------------------------------------------------
# The rules live in :func:`prosparse.core.io.check_output` (markers, reservations); these are the
# spellings commands use: a ``type=`` for result files, a call for ``--out`` folders.


def output_file(text: str) -> Path:
    """A result file to write (``--json``, ``--plot``): not a folder, its folder writable or
    creatable; an existing file is replaced, as every command always has. An ``argparse``
    ``type=``; nothing is created."""
    from prosparse.core.io import check_output

    try:
        return check_output(Path(text).expanduser(), kind="file", overwrite=True)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise :class:`UsageError` unless a ``--out`` folder can be written at ``path`` (absent or
    empty, or a folder prosparse wrote with ``overwrite``). Nothing is created."""
    from prosparse.core.io import check_output

    return check_output(Path(path).expanduser(), kind="dir", overwrite=overwrite)
