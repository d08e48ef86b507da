"""The one ``prosparse`` console script.

Each command group is one module here with ``register(subparsers)``, building its flags from
:mod:`prosparse.cli.args` (the flags every command shares); every handler checks its input and
calls a typed library function. Outputs for people are tables on stdout; outputs for programs
are JSON files (``--json OUT``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that define ``register(subparsers)``; order is the order of `prosparse --help`.
COMMAND_MODULES = (
    "prosparse.cli.convert",
    "prosparse.cli.sparsity",
    "prosparse.cli.bench",
    "prosparse.cli.generate",
    "prosparse.cli.predictors",
    "prosparse.cli.prune",
    "prosparse.cli.export",
    "prosparse.cli.train",
    "prosparse.cli.evaluate",
    "prosparse.cli.demo",
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prosparse convert: error: argument --threshold: 'nan'
    is not a finite number ...``), the same shape as a :class:`UsageError`; ``--help`` shows
    the usage. Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from prosparse.core import __version__

    parser = _Parser(
        prog="prosparse",
        description="High, controllable activation sparsity for gated-FFN LLMs (ProSparse).",
    )
    parser.add_argument("--version", action="version", version=f"prosparse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _name_commands(parser)
    return parser


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's namespace its prog (``prosparse bench ops``) as ``_prog``, for
    error lines; the innermost parser that runs sets it last."""
    parser.set_defaults(_prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _name_commands(sub)


def main(argv: list[str] | None = None) -> int:
    from prosparse.core.errors import UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except UsageError as e:  # a user mistake: one line; anything else is a bug (traceback)
        message = " ".join(str(e.args[0] if e.args else e).split())
        print(f"{args._prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
