"""Process helpers shared by the executor (one process per device slot) and the sweep
launcher (one process per job): the environment a child is spawned with, the signal
counter, reaping, and exit codes as people read them.

* :func:`spawn_environment` -- a child's variables (device mask, threads) and an ignored
  SIGINT are in place only while it is spawned, so the child never sets them itself and a
  Ctrl-C reaches only the parent, which decides.
* :class:`SignalCounter` -- the handler only counts; the parent's loop decides.
* :class:`StopSignal` / :func:`stop_signals_raise` -- SIGTERM and SIGHUP outside that loop
  (discovery, planning, the report) raise, as Ctrl-C raises KeyboardInterrupt: a stop
  request the app turns into its one line and exit 143/129, never a silent death.
* :func:`reap` -- a child that looks dead is made dead and its pipe closed; its exit code.
* :func:`exit_name` -- ``SIGKILL`` for -9, ``exit 3`` otherwise.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator


def exit_name(code: int | None) -> str:
    """A process's exit code as people read it: SIGKILL for -9, 'exit 3' otherwise."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
        return f"signal {-code}"
    return f"exit {code}"


@contextlib.contextmanager
def spawn_environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` and an ignored SIGINT, in place only while a child is spawned."""
    saved = {k: os.environ.get(k) for k in env}
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        signal.signal(signal.SIGINT, old)


# signals that ask a run to stop (SIGTERM and SIGHUP: at once; SIGINT: after a grace)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_NOW = ("SIGTERM", "SIGHUP")


class StopSignal(BaseException):
    """SIGTERM or SIGHUP arrived outside the executor's loop (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` swallows it)."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


def _raise_stop(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise StopSignal(signal.Signals(signum).name)


def stop_signals_raise() -> None:
    """From now on SIGTERM and SIGHUP raise :class:`StopSignal` in the main thread (the
    executor's loop counts them instead while it runs, then puts this back)."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, _raise_stop)


@dataclass
class SignalCounter:
    """SIGINT/SIGTERM/SIGHUP counter: the handler only counts, the loop decides."""

    count: int = 0
    handled: int = 0  # how many of them the loop has acted on
    first_at: float = 0.0  # time.monotonic() of the first
    signals: list = field(default_factory=list)  # their names, in order
    _old: dict = field(default_factory=dict)

    def handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.count += 1
        self.signals.append(signal.Signals(signum).name)
        if self.count == 1:
            self.first_at = time.monotonic()

    @property
    def now(self) -> bool:
        """The first signal asks to stop at once (SIGTERM, SIGHUP), not after a grace."""
        return bool(self.signals) and self.signals[0] in STOP_NOW

    def install(self, which: tuple = STOP_SIGNALS) -> None:
        """Count ``which`` from now on (only the main thread may set handlers)."""
        if threading.current_thread() is threading.main_thread():
            for s in which:
                self._old[s] = signal.signal(s, self.handler)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def reap(process: Any, conn: Any = None, wait_s: float = 1.0) -> int | None:
    """Make sure a child that looks dead (its sentinel fired, its pipe broke) is dead: join
    for ``wait_s``, kill it if it lingers, close its pipe. Its exit code."""
    process.join(wait_s)
    if process.is_alive():
        process.kill()
        process.join(5.0)
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()
    return process.exitcode
