"""Spare job processes: the next job's process, started while its device is still busy.

A job process pays for an interpreter, Hydra's imports and the task's module before the
job's first line runs (~0.3-0.4 s here). When more jobs wait than devices are free, the
launcher starts one *spare* per busy device lease -- spawned with that lease's environment
(device mask, threads) in place, its own process group, the task function loaded -- which
then blocks on a pipe. When the lease frees, the next job's payload goes down that pipe and
the spare runs it as any job process would (_child.py ``spare_main``): a fresh process per
job as before, only started earlier. Spares not needed at the end get EOF and exit.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import types
from typing import Any, Iterator, Optional

from hydra_plugins.runner_launcher._child import spare_main
from runner.processes import spawn_environment


@contextlib.contextmanager
def without_main() -> Iterator[None]:
    """spawn re-runs the parent's ``__main__`` script in the child (as ``__mp_main__``): a
    script without a ``__main__`` guard would start Hydra again there, and any script costs
    its imports twice. The child loads the task function itself (TaskRef), so the spawn
    sees a bare ``__main__`` while it starts."""
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


class Spares:
    """At most one spare process per lease, ready for that lease's next job."""

    def __init__(self, ctx_mp: Any, task_ref: Any, console_log: bool):
        self.ctx_mp, self.task_ref, self.console_log = ctx_mp, task_ref, console_log
        self.ready: dict[int, tuple[Any, Any, Any]] = {}  # lease index -> (process, inbox, results)

    def start(self, lease: Any) -> None:
        """Spawn a spare for ``lease`` (its environment in place) unless it has one."""
        if lease.index in self.ready:
            return
        inbox_r, inbox_w = self.ctx_mp.Pipe(duplex=False)
        results_r, results_w = self.ctx_mp.Pipe(duplex=False)
        proc = self.ctx_mp.Process(target=spare_main, name=f"runner-sweep-spare-{lease.label}",
                                   daemon=False,
                                   args=(inbox_r, results_w, self.task_ref, self.console_log))
        with spawn_environment(lease.env), without_main():
            proc.start()
        inbox_r.close()
        results_w.close()
        self.ready[lease.index] = (proc, inbox_w, results_r)

    def run(self, lease: Any, payload: bytes, job_dir: str) -> Optional[tuple[Any, Any]]:
        """Hand a job to ``lease``'s spare: (process, result pipe), or None (no live spare)."""
        got = self.ready.pop(lease.index, None)
        if got is None:
            return None
        proc, inbox, results = got
        try:
            if not proc.is_alive():
                raise OSError("the spare is gone")
            inbox.send_bytes(pickle.dumps((payload, job_dir)))
        except (OSError, ValueError):
            self._end(proc, inbox, results)
            return None
        inbox.close()
        return proc, results

    def close(self) -> None:
        """End every spare that got no job (EOF on its inbox: it exits)."""
        for proc, inbox, results in self.ready.values():
            self._end(proc, inbox, results)
        self.ready.clear()

    @staticmethod
    def _end(proc: Any, inbox: Any, results: Any) -> None:
        for pipe in (inbox, results):
            with contextlib.suppress(OSError):
                pipe.close()
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
