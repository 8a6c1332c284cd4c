"""Local mechanics: one spawned process per slot, a duplex pipe each, process sentinels.

What :class:`runner.executor.Executor` asks of a backend, done with ``multiprocessing``'s
spawn context:

* start: the slot's environment (device mask, threads) and an ignored SIGINT are in place
  while the process is spawned (:func:`runner.processes.spawn_environment`), so the child
  never sets them itself and a Ctrl-C reaches only the controller;
* wait: one ``poll`` over every pipe and every process sentinel together, so a death is
  learnt in the same wait as a result, never from a missing one; a worker killed mid-write
  corrupts only its own pipe (an unreadable message is its death);
* stop: Stop on every pipe, join by the deadline, then SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import select
import time
from typing import Iterable

from runner.devices import Slot
from runner.executor import no_session
from runner.slots import Death, Worker
from runner.messages import Call, Stop, WorkerSpec
from runner.processes import reap, spawn_environment
from runner.worker import pipe_poller, worker_main

log = logging.getLogger("runner")


class LocalMechanics:
    self_exiting = True  # a worker process exits after SlotExhausted / StartFailed
    session = staticmethod(no_session)

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")

    def start(self, slot: Slot, spec: WorkerSpec) -> Worker:
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=worker_main, args=(spec, child_conn),
                                name=f"runner-worker-{slot.index}", daemon=True)
        with spawn_environment(slot.env):
            proc.start()
        child_conn.close()
        return Worker(slot, spec.incarnation, proc, parent_conn, time.monotonic(), pid=proc.pid,
                      poller=pipe_poller(parent_conn))

    def send(self, w: Worker, call: Call) -> bool:
        try:
            w.conn.send(call)
            return True
        except (OSError, ValueError):
            return False

    def wait(self, workers: list[Worker], timeout: float
             ) -> Iterable[tuple[Worker, list, Death | None]]:
        # A raw poll object per wait: multiprocessing's wait() builds a selectors object
        # (a key per fd) each time, which cost the controller ~0.2 ms per item on 8 slots.
        poller, waitables = select.poll(), {}
        for w in workers:
            for fd, is_pipe in ((w.conn.fileno(), True), (w.handle.sentinel, False)):
                poller.register(fd, select.POLLIN)
                waitables[fd] = (w, is_pipe)
        for fd, _events in poller.poll(max(0, int(timeout * 1000))):
            w, is_pipe = waitables[fd]
            messages, intact = self._read(w)
            yield w, messages, (None if is_pipe and intact else Death())

    def _read(self, w: Worker) -> tuple[list, bool]:
        """Every message waiting on ``w``'s pipe; False when the pipe broke."""
        out: list = []
        try:
            while w.poller.poll(0):
                out.append(w.conn.recv())
        except (EOFError, OSError, ValueError):
            return out, False
        except Exception as exc:  # a half-written message from a killed worker
            log.warning("unreadable message from worker %s: %s", w.slot.label, exc)
            return out, False
        return out, True

    def drain(self, w: Worker) -> list:
        return self._read(w)[0]

    def reap(self, w: Worker) -> int | None:
        return reap(w.handle, w.conn)  # a broken pipe with the process lingering: a death

    def kill(self, w: Worker) -> bool:
        w.handle.kill()
        return True  # its sentinel reports the death through wait

    def stop_all(self, workers: list[Worker], deadline_s: float) -> None:
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(Stop())
        end = time.monotonic() + deadline_s
        for w in workers:
            w.handle.join(max(0.0, end - time.monotonic()))
        for w in workers:
            if w.handle.is_alive():
                w.handle.terminate()
        end = time.monotonic() + deadline_s
        for w in workers:
            w.handle.join(max(0.0, end - time.monotonic()))
            if w.handle.is_alive():
                w.handle.kill()
                w.handle.join(5)
