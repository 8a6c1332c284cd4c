"""The local executor: one spawned process per device slot, supervised.

Data flow (after CPython's concurrent/futures/process.py)::

    Journal ──pages──> Scheduler ──next_batch(slot)──┐
       ^                    ^ requeue / slot_lost    │
       │ mark_*             │                        v
    ┌──┴────────────────────┴──────────┐    Call   ┌──────────────┐
    │ Supervisor loop (this module)    │ ───pipe──>│ worker 0     │ device A
    │  wait(pipes + sentinels, 0.2s)   │ <──pipe───│ (worker.py)  │
    │  results -> journal, progress    │  ItemDone └──────────────┘
    │  sentinel -> death: in-flight    │  ...      ┌──────────────┐
    │   items back to the queue,       │ ───pipe──>│ worker n-1   │ device B
    │   slot restarted (bounded)       │ <──pipe───└──────────────┘
    │  SIGINT/SIGTERM -> drain / stop  │
    └──────────────────────────────────┘

* One duplex pipe per worker: a worker killed mid-write corrupts only its own pipe.
* Death is learnt from ``Process.sentinel`` in the same ``wait`` as the pipes, never from a
  missing result; nothing blocks without a timeout.
* The slot's environment (device mask, threads) and an ignored SIGINT are in place when
  the process is spawned, so the child never sets them itself; Ctrl-C reaches only the
  controller, which decides.
* Messages are frozen dataclasses (runner/messages.py); the journal is written here alone.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import select
import time
from dataclasses import dataclass
from typing import Any, Callable

from runner.devices import Slot
from runner.messages import (BatchDone, Call, ChunkDone, ItemFailed, Ready, RungChanged,
                             SlotExhausted, StartFailed, Stop, WorkerSpec)
from runner.processes import SignalCounter, exit_name, reap, spawn_environment
from runner.supervisor import Supervisor
from runner.worker import pipe_poller, worker_main

log = logging.getLogger("runner")


@dataclass
class _Worker:
    slot: Slot
    incarnation: int
    process: Any
    conn: Any
    started_at: float
    pid: int | None = None
    ready: bool = False
    outstanding: int = 0  # batches sent and not yet BatchDone
    exhausted: bool = False
    failed_to_start: str = ""
    poller: Any = None  # select.poll on the pipe alone: "anything more to read?" is one syscall
    #                     (LocalExecutor sets it; the Ray executor has no pipe and no _drain)


class LocalExecutor:
    """Spawns, feeds, watches and restarts the worker processes of a plan."""

    def __init__(self, make_spec: Callable[[Slot, int], WorkerSpec], max_restarts: int,
                 grace_s: float, stop_timeout_s: float, start_timeout_s: float, prefetch: int):
        self.sup: Supervisor | None = None  # the ledger, given by run()
        self.make_spec = make_spec
        self.max_restarts = max_restarts
        self.grace_s = grace_s
        self.stop_timeout_s = stop_timeout_s
        self.start_timeout_s = start_timeout_s
        self.prefetch = prefetch
        self.ctx = mp.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        # slots whose worker died while there was no work for it: restarted (within
        # max_restarts) as soon as there is, e.g. when another slot's death requeues items
        self.dormant: dict[int, tuple[Slot, int]] = {}
        self.restarts: dict[int, int] = {}
        self.interrupts = SignalCounter()
        self.spawned_at = 0.0  # time.time() of the first spawn (start or run)

    # ---- process mechanics -------------------------------------------------------------
    def _start(self, slot: Slot, incarnation: int) -> None:
        self.spawned_at = self.spawned_at or time.time()
        spec = self.make_spec(slot, incarnation)
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=worker_main, args=(spec, child_conn),
                                name=f"runner-worker-{slot.index}", daemon=True)
        with spawn_environment(slot.env):
            proc.start()
        child_conn.close()
        self.workers[slot.index] = _Worker(slot, incarnation, proc, parent_conn, time.monotonic(),
                                           pid=proc.pid, poller=pipe_poller(parent_conn))

    def _stop_all(self, deadline_s: float) -> None:
        for w in self.workers.values():
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(Stop())
        end = time.monotonic() + deadline_s
        for w in self.workers.values():
            w.process.join(max(0.0, end - time.monotonic()))
        for w in self.workers.values():
            if w.process.is_alive():
                w.process.terminate()
        end = time.monotonic() + deadline_s
        for w in self.workers.values():
            w.process.join(max(0.0, end - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)

    def start(self, slots: list[Slot]) -> None:
        """Spawn the slots' workers now, before there is a supervisor to feed them: they boot
        and load their models while the controller discovers and plans. Their Ready waits in
        the pipe for :meth:`run`; :meth:`close` stops them if the run never gets there."""
        for slot in slots:
            if slot.index not in self.workers:
                self.restarts[slot.index] = 0
                self._start(slot, 0)

    def close(self) -> None:
        """Stop any worker still running: workers started early whose run never came (an
        empty input, an error or Ctrl-C during discovery). They were given no item, so
        they are not waited for long. Idempotent."""
        if self.workers:
            self._stop_all(min(0.5, self.stop_timeout_s))
            self.workers.clear()

    # ---- the loop ----------------------------------------------------------------------
    def run(self, slots: list[Slot], sup: Supervisor) -> None:
        """Run the plan's slots until the ledger has no work left, or a stop."""
        self.sup = sup
        self.interrupts.install()
        try:
            self.start(slots)
            self._loop()
        finally:
            self._stop_all(self.stop_timeout_s if self.interrupts.count < 2 else 0.5)
            for w in list(self.workers.values()):
                self._drain(w)
                self.sup.worker_gone(w.slot, w.pid, "stopped", restartable=False, quiet=True)
            self.workers.clear()
            self.interrupts.restore()

    def _loop(self) -> None:
        while True:
            stopping = self.interrupts.count >= 1
            if self.interrupts.count >= 2:
                self.sup.note(f"second {self.interrupts.signals[-1]}: stopping workers now")
                return
            if stopping and self.sup.stop_requested_at is None:
                self.sup.stop_requested(self.interrupts.signals[0], self.grace_s)
            if stopping and (not self.sup.in_flight()
                             or time.monotonic() - self.interrupts.first_at > self.grace_s):
                return
            if not stopping:
                self._wake_dormant()
                self._dispatch()
            if not stopping and not self.sup.in_flight() and not self.sup.scheduler.has_work():
                return  # done (even if the last workers died idle after the last item)
            if not self.workers:
                self.sup.note("every worker slot is lost")
                return
            self._wait_once(0.2)
            self._check_start_timeouts()
            self.sup.tick()

    def _wait_once(self, timeout: float) -> None:
        """Wait for results or deaths (pipes and sentinels together), handle what came."""
        # A raw poll object per wait: multiprocessing's wait() builds a selectors object
        # (a key per fd) each time, which cost the controller ~0.2 ms per item on 8 slots.
        poller, waitables = select.poll(), {}
        for w in self.workers.values():
            for fd, is_pipe in ((w.conn.fileno(), True), (w.process.sentinel, False)):
                poller.register(fd, select.POLLIN)
                waitables[fd] = (w, is_pipe)
        for fd, _events in poller.poll(max(0, int(timeout * 1000))):
            w, is_pipe = waitables[fd]
            if self.workers.get(w.slot.index) is not w:
                continue
            if is_pipe:
                if not self._drain(w):
                    self._died(w)
            else:
                self._drain(w)
                self._died(w)

    def _send(self, w: _Worker, call: Call) -> bool:
        try:
            w.conn.send(call)
            return True
        except (OSError, ValueError):
            return False

    def _dispatch(self) -> None:
        for w in list(self.workers.values()):
            while w.ready and not w.exhausted and w.outstanding < self.prefetch:
                batch = self.sup.next_batch(w.slot, w.pid)
                if not batch:
                    break
                call = Call(self.sup.journal.next_batch_no(), tuple(batch))
                if not self._send(w, call):
                    self.sup.unsent(w.slot, batch)
                    break
                self.sup.sent(w.slot, call)
                w.outstanding += 1

    def _drain(self, w: _Worker) -> bool:
        """Handle every message waiting on ``w``'s pipe; False if the pipe broke."""
        try:
            while w.poller.poll(0):
                self._handle(w, w.conn.recv())
        except (EOFError, OSError, ValueError):
            return False
        except Exception as exc:  # a half-written message from a killed worker
            log.warning("unreadable message from worker %s: %s", w.slot.label, exc)
            return False
        return True

    def _handle(self, w: _Worker, msg: Any) -> None:
        if isinstance(msg, ChunkDone):
            self.sup.items_done(msg.done)
            if msg.last:  # it stands for the call's BatchDone
                self._handle(w, BatchDone(msg.slot, msg.batch_no))
        elif isinstance(msg, ItemFailed):
            self.sup.item_failed(msg, w.pid)
        elif isinstance(msg, BatchDone):
            w.outstanding -= 1
            self.sup.batch_done(msg)
        elif isinstance(msg, Ready):
            w.ready, w.pid = True, msg.pid
            self.sup.worker_ready(w.slot, msg)
        elif isinstance(msg, RungChanged):
            self.sup.rung_changed(msg)
        elif isinstance(msg, SlotExhausted):
            w.exhausted = True
            self.sup.note(f"{w.slot.label}: {msg.error}; this slot stops, the others go on")
        elif isinstance(msg, StartFailed):
            w.failed_to_start = msg.error
        else:
            log.warning("unknown message from %s: %r", w.slot.label, msg)

    def _reap(self, w: _Worker) -> int | None:
        """A worker that looks dead (sentinel, broken pipe) made dead; its exit code."""
        return reap(w.process, w.conn)

    def _died(self, w: _Worker, reason: str = "") -> None:
        code = self._reap(w)
        del self.workers[w.slot.index]
        why = w.failed_to_start or reason or exit_name(code)
        restartable = not (w.exhausted or w.failed_to_start)
        restartable = restartable and self.restarts[w.slot.index] < self.max_restarts
        expected = w.exhausted and code == 0
        self.sup.worker_gone(w.slot, w.pid, why, restartable=restartable, quiet=expected,
                             exit_code=code)
        if restartable and self.interrupts.count == 0 and self.sup.scheduler.has_work_for(w.slot.index):
            self._restart(w.slot, w.incarnation + 1)
        elif restartable:  # nothing for it to do now; maybe later
            self.dormant[w.slot.index] = (w.slot, w.incarnation + 1)
        else:
            self.sup.scheduler.slot_lost(w.slot.index)

    def _restart(self, slot: Slot, incarnation: int) -> None:
        self.restarts[slot.index] += 1
        self.sup.note(f"restarting {slot.label} (restart {self.restarts[slot.index]}"
                      f"/{self.max_restarts})")
        self._start(slot, incarnation)

    def _wake_dormant(self) -> None:
        """Restart a slot whose worker died idle once there is work it could be given."""
        if not self.dormant or not self.sup.scheduler.has_work():  # (has_work reads the
            return  # journal: has_work_for alone takes an unread page for work)
        for index, (slot, incarnation) in list(self.dormant.items()):
            if self.sup.scheduler.has_work_for(index):
                del self.dormant[index]
                self._restart(slot, incarnation)

    def _check_start_timeouts(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if not w.ready and now - w.started_at > self.start_timeout_s:
                self.sup.note(f"{w.slot.label} did not load its model within "
                              f"{self.start_timeout_s:.0f}s; killing it")
                self._kill_unstarted(w)

    def _kill_unstarted(self, w: _Worker) -> None:
        """Its sentinel then reports the death through the usual path."""
        w.process.kill()
