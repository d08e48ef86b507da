"""The ``prosparse`` command line: :mod:`.main` builds the parser from one module per command
group, :mod:`.args` holds the flags they share. Nothing in the library imports this package."""

from prosparse.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
