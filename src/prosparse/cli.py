"""The one ``prosparse`` console script.

Each capability registers its own subcommands (``<capability>/commands.py`` with
``register(subparsers)``); every handler parses its flags and calls a typed library function.
Outputs for people are tables on stdout; outputs for programs are JSON files (``--json OUT``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that define ``register(subparsers)``; order is the order of `prosparse --help`.
COMMAND_MODULES = (
    "prosparse.models.commands",
    "prosparse.sparsity.commands",
    "prosparse.inference.commands",
    "prosparse.predictors.commands",
    "prosparse.deploy.commands",
    "prosparse.training.commands",
    "prosparse.evaluation.commands",
    "prosparse.demo",
)


def build_parser() -> argparse.ArgumentParser:
    from prosparse import __version__

    parser = argparse.ArgumentParser(
        prog="prosparse",
        description="High, controllable activation sparsity for gated-FFN LLMs (ProSparse).",
    )
    parser.add_argument("--version", action="version", version=f"prosparse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"prosparse {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
