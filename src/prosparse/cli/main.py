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
import signal
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
    _add_overwrite(parser)
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


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    """Every command that writes a result file (``--json``, ``--plot``) takes ``--overwrite``
    (to replace a file prosparse did not write)."""
    from prosparse.cli.args import _help

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for sub in set(action.choices.values()):
            _add_overwrite(sub)
    opts = {o for a in parser._actions for o in a.option_strings}
    if not subs and ({"--json", "--plot"} & opts) and "--overwrite" not in opts:
        parser.add_argument("--overwrite", action="store_true", help=_help("--overwrite"))


def _terminate(signum, _frame):
    """SIGTERM ends the command as Ctrl-C does: cleanup handlers run (temporary folders,
    locks), then exit 143."""
    raise SystemExit(128 + signum)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e.args[0] if e.args else e).split())


def main(argv: list[str] | None = None) -> int:
    from prosparse.cli.args import check_outputs
    from prosparse.core.errors import UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s"
    )
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        check_outputs(args)
        return int(args.func(args) or 0)
    except UsageError as e:  # a user mistake: one line
        print(f"{args._prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # The library's own validation (shapes, activations, files): one line too; -v shows
        # where it was raised.
        if args.verbose:
            raise
        print(f"{args._prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args._prog}: interrupted; partial outputs were removed", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
