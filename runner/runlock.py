"""One controller per run dir (and one launcher per sweep dir): an OS file lock.

A run dir holds a journal that exactly one controller may write. :class:`RunLock` takes an
exclusive ``flock`` on the dir's lock file (``RunDir.lock`` / ``SweepDir.lock``) and holds it
for as long as the lock object lives -- in practice the controller's life. The kernel drops
it when the process ends, however it ends: a SIGKILLed controller never leaves a stale lock,
and nothing has to be cleaned up. The holder writes ``pid=<pid> host=<host> since=<time>``
into the file so that a refused second controller can name it.

The lock file's descriptor is not inherited by workers (Python's descriptors are not
inheritable and workers are spawned), so a worker that outlives its controller for a moment
never holds the run.

Who takes it:

* a new run: :func:`runner.resume.claim_for` right after making the run dir, before Hydra;
* a resume: :func:`runner.resume.check_resume`, before Hydra writes anything into the dir;
* every job again in :func:`runner.context.prepare` (a no-op when this process holds it
  already): sweep jobs and command lines that bypass the two above;
* a sweep: the launcher, on its sweep dir, before it adopts the dir for a resume.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from runner.errors import ConfigError


class RunLock:
    """An exclusive lock on ``path`` held while this object lives (or until :meth:`release`)."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd  # None: this process held the lock already through another RunLock

    @classmethod
    def acquire(cls, path: Path, what: str = "run dir") -> "RunLock":
        """Take the lock or raise ConfigError naming the process that holds it."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ConfigError(f"{what} {path.parent}: cannot open its lock file {path.name} "
                              f"({exc.strerror}); check that the folder is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{what} {path.parent}: cannot lock {path.name} "
                                  f"({exc.strerror})") from None
            if holder.get("pid") == str(os.getpid()):
                return cls(path, None)  # ours: held by an earlier RunLock of this process
            pid = holder.get("pid", "?")
            raise ConfigError(
                f"{what} {path.parent} is in use by another runner (pid {pid}"
                f"{', host ' + holder['host'] if holder.get('host') else ''}); wait for it "
                f"to end or stop it (kill -INT {pid}), then run this again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()} host={socket.gethostname()} "
                     f"since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock now (the kernel does it anyway when the process ends)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def _read(fd: int) -> dict[str, str]:
    """The holder's ``key=value`` words, as written by :meth:`RunLock.acquire`."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 512, 0).decode()
        return dict(w.split("=", 1) for w in text.split() if "=" in w)
    return {}
