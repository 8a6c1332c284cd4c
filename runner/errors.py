"""Errors and exit codes: one home for what any part of runner says when it cannot go on.

* :class:`ConfigError` -- a setting that cannot work; its message names the key, the value
  and what is allowed. The app prints it as one line and exits with ``ExitCode.START``.
* :class:`BadInput` -- an item that can never succeed (empty text, corrupt file): failed at
  once, without retries, the other items go on.
* :func:`one_line` -- any exception or text as the single line a user reads.
* :class:`ExitCode` -- the app's exit codes, which the sweep launcher reads back too.
"""
from __future__ import annotations

from enum import IntEnum


class ConfigError(Exception):
    """A setting that cannot work; the message names the key, the value and what is allowed."""


class BadInput(Exception):
    """An item that can never succeed (empty text, corrupt file): failed at once, no retry."""


def one_line(exc: BaseException | str, limit: int | None = None) -> str:
    """``exc`` as one line: its message with every run of whitespace made one space (the
    class name when it has no message), cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    if not text and isinstance(exc, BaseException):
        text = type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def describe(exc: BaseException, limit: int = 500) -> str:
    """``ValueError: bad thing`` -- class and message, one line (a failure's error field)."""
    text = one_line(exc)
    return one_line(f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text,
                    limit)


class ExitCode(IntEnum):
    """What ``python -m runner`` exits with (README, "Exit codes")."""

    OK = 0  # every item done
    START = 1  # could not start: one line says why
    FAILED = 3  # finished with failed items (or items left: every worker slot was lost)
    INTERRUPTED = 130  # Ctrl-C; resumable

    @property
    def meaning(self) -> str:
        return {ExitCode.OK: "all done", ExitCode.START: "could not start",
                ExitCode.FAILED: "items failed", ExitCode.INTERRUPTED: "interrupted"}[self]

    @classmethod
    def describe(cls, code: int) -> str:
        """``exit 3 (items failed)``; ``exit 7`` for a code runner does not use."""
        try:
            return f"exit {code} ({cls(code).meaning})"
        except ValueError:
            return f"exit {code}"
