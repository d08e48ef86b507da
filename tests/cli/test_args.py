"""One CLI vocabulary: every renamed flag still parses under its old spelling onto the same
value, the old spellings are hidden, and each shared flag has one meaning (one help stem, one
set of --dtype choices) in every command that takes it."""

from __future__ import annotations

import argparse
import re

import pytest

from prosparse.cli import build_parser
from prosparse.cli.args import DTYPES, HELP

OUT = ["--out", "o"]

# (command line before the flag, new spelling + value, old spelling + value, dest, expected)
RENAMES = [
    (["prune"] + OUT, ["--prox-lambda", "0.3"], ["--lambda", "0.3"], "prox_lambda", 0.3),
    (["prune"] + OUT, ["--prox-lambda2", "0.2"], ["--lambda2", "0.2"], "prox_lambda2", 0.2),
    (["prune"] + OUT, ["--prox-lambda-scale", "lr"], ["--lambda-scale", "lr"],
     "prox_lambda_scale", "lr"),
    (["prune"] + OUT, ["--prox-epsilon", "0.5"], ["--epsilon", "0.5"], "prox_epsilon", 0.5),
    (["convert"] + OUT, ["--target-sparsity", "0.5"], ["--sparsity", "0.5"], "target_sparsity",
     0.5),
    (["convert"] + OUT, ["--tokens", "4096"], ["--calib-tokens", "4096"], "tokens", 4096),
    (["bench", "ops"], ["--target-sparsity", "0.5,0.9"], ["--sparsity", "0.5,0.9"],
     "target_sparsity", (0.5, 0.9)),
    (["bench", "ops"], ["--repeats", "7"], ["--reps", "7"], "repeats", 7),
    (["bench", "ops"], ["--batch-size", "1,4"], ["--batch", "1,4"], "batch_size", (1, 4)),
    (["bench", "decode"], ["--target-sparsity", "0.7"], ["--sparsity", "0.7"],
     "target_sparsity", 0.7),
    (["eval"], ["--measure-sparsity"], ["--sparsity"], "measure_sparsity", True),
    (["eval"], ["--tokens", "512"], ["--sparsity-tokens", "512"], "tokens", 512),
    (["eval-table", "r.json"], ["--label-sparsity", "a=0.5"], ["--sparsity", "a=0.5"],
     "label_sparsity", ["a=0.5"]),
]


@pytest.mark.parametrize("prefix,new,old,dest,want", RENAMES,
                         ids=[f"{' '.join(r[0][:2])} {r[2][0]}" for r in RENAMES])
def test_old_and_new_spellings_land_on_the_same_value(prefix, new, old, dest, want):
    parser = build_parser()
    a = parser.parse_args(prefix + new)
    b = parser.parse_args(prefix + old)
    assert getattr(a, dest) == getattr(b, dest) == want
    default = parser.parse_args(prefix)
    assert getattr(default, dest) != want  # the flag did something


def test_old_and_new_spellings_mix_in_one_list():
    args = build_parser().parse_args(["eval-table", "r.json", "--label-sparsity", "a=0.5",
                                      "--sparsity", "b=0.1"])
    assert args.label_sparsity == ["a=0.5", "b=0.1"]


def _parsers(parser: argparse.ArgumentParser, name: str = "prosparse"):
    """Every (sub)command parser, by its command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


COMMANDS_WITH_DTYPE = ["convert", "sparsity", "threshold", "bench ops", "bench decode",
                       "generate", "predictors collect", "prune", "export powerinfer", "eval"]


@pytest.mark.parametrize("command", COMMANDS_WITH_DTYPE)
@pytest.mark.parametrize("spelling,canonical", [("float32", "fp32"), ("fp32", "fp32"),
                                                ("bfloat16", "bf16"), ("float16", "fp16")])
def test_dtype_spellings_are_normalised(command, spelling, canonical):
    words = command.split()
    extra = {"convert": OUT, "prune": OUT, "predictors collect": OUT,
             "export powerinfer": ["m", *OUT],
             "generate": ["--prompt", "x"]}.get(command, [])
    args = build_parser().parse_args([*words, *extra, "--dtype", spelling])
    assert args.dtype == canonical


def test_every_shared_flag_has_one_meaning():
    helps: dict[str, dict[str, str]] = {}
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            flags = action.option_strings or ([action.dest] if action.dest == "model" else [])
            for flag in flags:
                if flag in HELP:
                    helps.setdefault(flag, {})[name] = action.help
            if "--dtype" in action.option_strings:
                assert tuple(action.choices) == DTYPES, name
            if action.dest == "model":
                assert action.metavar == "MODEL", name
    for flag, by_command in helps.items():
        wrong = {c: h for c, h in by_command.items() if not h.startswith(HELP[flag])}
        assert not wrong, f"{flag} must mean {HELP[flag]!r} everywhere; these differ: {wrong}"
    shared = {f for f, c in helps.items() if len(c) >= 2}
    assert {"model", "--data", "--tokens", "--seq-len", "--dtype", "--device", "--batch-size",
            "--json", "--plot", "--out", "--overwrite", "--threads", "--act", "--threshold",
            "--shift", "--repeats"} <= shared
    assert set(helps["--dtype"]) == {f"prosparse {c}" for c in COMMANDS_WITH_DTYPE}


OLD = ["--lambda", "--lambda2", "--lambda-scale", "--epsilon", "--sparsity", "--reps",
       "--batch", "--calib-tokens", "--sparsity-tokens", "float32", "bfloat16"]


def test_help_lists_the_new_names_only():
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        for old in OLD:
            assert not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text), \
                f"`{name} --help` shows the old spelling {old}"
        if any(a.dest == "model" for a in parser._actions):
            assert "--dtype {bf16,fp16,fp32}" in text, name
