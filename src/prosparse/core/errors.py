"""The one error type for user mistakes.

:class:`UsageError` is raised where a bad value is used (a flag, a recipe field, a file, a
path); the CLI prints it as one line naming the value and the fix, and exits 2. Every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user mistake: the message names the value and what to do instead.

    It subclasses ``ValueError`` so library callers that already catch ``ValueError`` for bad
    arguments keep working.
    """


class UnknownNameError(UsageError, KeyError):
    """A name that a registry does not hold (an activation, a recipe key, a task); the message
    lists the valid ones. Also a ``KeyError``, the usual type of a failed lookup."""

    def __str__(self) -> str:  # KeyError quotes its message; a user reads it plain
        return str(self.args[0]) if self.args else ""
