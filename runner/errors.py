"""Errors and exit codes: one home for what any part of runner says when it cannot go on.

* :class:`ConfigError` -- a setting that cannot work; its message names the key, the value
  and what is allowed. The app prints it as one line and exits with ``ExitCode.START``.
* :class:`BadInput` -- an item that can never succeed (empty text, corrupt file): failed at
  once, without retries, the other items go on.
* :func:`one_line` -- any exception or text as the single line a user reads.
* :class:`StorageError` -- the file system refused a write (full, read-only, no permission):
  the run stops dispatching, nothing is charged to an item, ``ExitCode.STORAGE``.
  :func:`storage_problem` recognises one in any exception (OSError, SQLite's own).
* :class:`ExitCode` -- the app's exit codes, which the sweep launcher reads back too.
"""
from __future__ import annotations

import errno
import os
import signal
from enum import IntEnum


class ConfigError(Exception):
    """A setting that cannot work; the message names the key, the value and what is allowed."""


class BadInput(Exception):
    """An item that can never succeed (empty text, corrupt file): failed at once, no retry."""


class StorageError(Exception):
    """A write the file system refused (disk full, read-only, no permission). Arguments:
    the problem (one line) and, once the app knows it, the command that resumes the run."""


# errnos that say "this place cannot take the write", not "this item is bad"
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                            errno.EPERM, errno.EFBIG})
# SQLite's messages for the same (sqlite3.OperationalError carries no errno)
_SQLITE_STORAGE = ("database or disk is full", "readonly database", "disk i/o error",
                   "unable to open database file")


def storage_problem(exc: BaseException) -> str | None:
    """``No space left on device (ENOSPC): /path`` when ``exc`` -- or an exception it was
    raised from -- is the file system refusing a write; else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            where = f": {exc.filename}" if exc.filename else ""
            return f"{os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}){where}"
        text = str(exc).lower()
        if type(exc).__name__ in ("OperationalError", "DatabaseError") and any(
                m in text for m in _SQLITE_STORAGE):
            return one_line(exc)
        if isinstance(exc, OSError) and "no space left on device" in text:  # pyarrow & co
            return "No space left on device (ENOSPC)"
        exc = exc.__cause__ or exc.__context__
    return None


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
    STORAGE = 4  # stopped: an output or the journal could not be written (full, read-only)
    HANGUP = 129  # SIGHUP (the terminal went away); resumable
    INTERRUPTED = 130  # Ctrl-C (SIGINT); resumable
    TERMINATED = 143  # SIGTERM (timeout, systemd, a scheduler's preemption); resumable

    @property
    def meaning(self) -> str:
        return {ExitCode.OK: "all done", ExitCode.START: "could not start",
                ExitCode.FAILED: "items failed", ExitCode.STORAGE: "could not write",
                ExitCode.HANGUP: "hung up", ExitCode.INTERRUPTED: "interrupted",
                ExitCode.TERMINATED: "terminated"}[self]

    @classmethod
    def for_signal(cls, name: str) -> "ExitCode":
        """The code a run stopped by signal ``name`` (SIGINT, SIGTERM, SIGHUP) exits with:
        128 + the signal's number, as a shell reports it."""
        return cls(128 + signal.Signals[name].value)

    @classmethod
    def describe(cls, code: int) -> str:
        """``exit 3 (items failed)``; ``exit 7`` for a code runner does not use."""
        try:
            return f"exit {code} ({cls(code).meaning})"
        except ValueError:
            return f"exit {code}"
