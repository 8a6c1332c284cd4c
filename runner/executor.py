"""The executor: one loop that feeds, watches and restarts a worker per device slot.

Data flow (after CPython's concurrent/futures/process.py)::

    Journal <──mark_*── Ledger (ledger.py) <── results, failures, deaths ──┐
       │                  ^  next_batch / requeue                               │
     pages                │                                                   │
       v                  │                  Call    ┌────────────────────┐   │
    Scheduler ─────> Executor loop ───mechanics.send─>│ worker 0, device A │   │
                     (this module)                    │ (worker.py)        │   │
                      dispatch, restarts,  <─mechanics.wait─ messages,      │   │
                      start and item        deaths (sentinels)  ─────┼───┘
                      timeouts; Ctrl-C:      ...  worker n-1, device B
                      drain; SIGTERM/HUP,
                      a refused write: stop

The loop decides; a :class:`Mechanics` does what differs between backends -- starting a
worker, sending it a call, waiting for its messages or its death, reaping, stopping:
:class:`runner.executor_local.LocalMechanics` (spawned processes, pipes, process sentinels)
and :class:`runner.executor_ray.RayMechanics` (actors, ObjectRefs, RayActorError). The
journal is written by the ledger alone; the loop never touches it.

* Death is learnt from the mechanics' wait (a process sentinel, an actor error), never
  from a missing result; nothing blocks without a timeout.
* The slot's environment (device mask, threads) is in place when its worker is started.
* Each slot's life is a :class:`runner.slots.SlotState`; ``check_slot_move`` refuses
  illegal moves.
* Stops: the first Ctrl-C lets in-flight batches finish for ``grace_s``; SIGTERM or SIGHUP
  (to the controller or its whole process group) stop at once -- in-flight items go back
  to pending uncharged, and a worker killed by the same signal is not charged either; a
  write the file system refuses (:class:`WriteRefused`, or the journal's own) stops
  dispatching (``halt``) and ends the run with ``ExitCode.STORAGE``.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Any, Callable, ContextManager, Iterable, Protocol

from runner.devices import Slot
from runner.slots import Death, SlotState, Worker
from runner.errors import StorageError, storage_problem
from runner.messages import (BatchDone, Call, ChunkDone, ItemFailed, RaceLost, Ready,
                             RungChanged, SlotExhausted, StartFailed, WorkerSpec, WriteRefused)
from runner.processes import SignalCounter, exit_name
from runner.ledger import Ledger

log = logging.getLogger("runner")


class Mechanics(Protocol):
    """How workers are started, fed, watched and stopped on one backend."""

    #: True when a worker process ends by itself after SlotExhausted / StartFailed (its
    #: death then comes through wait); False: the loop ends it (an actor lives on)
    self_exiting: bool

    def session(self, slots: list[Slot]) -> ContextManager[None]:
        """Around a run (a Ray instance for its length; nothing for processes)."""

    def start(self, slot: Slot, spec: WorkerSpec) -> Worker:
        """Start the slot's worker with ``slot.env`` in place before anything imports torch."""

    def send(self, w: Worker, call: Call) -> bool:
        """Hand ``call`` to the worker; False if it cannot take it (its pipe broke)."""

    def wait(self, workers: list[Worker], timeout: float
             ) -> Iterable[tuple[Worker, list, Death | None]]:
        """Block up to ``timeout`` s; per worker with news: its messages and its death."""

    def drain(self, w: Worker) -> list:
        """Messages still waiting from a stopped worker."""

    def reap(self, w: Worker) -> int | None:
        """Make sure an ended worker is gone; its exit code (None: unknown)."""

    def kill(self, w: Worker) -> bool:
        """End a worker that did not start in time; True if its death comes through wait."""

    def stop_all(self, workers: list[Worker], deadline_s: float) -> None:
        """Ask every worker to stop, then stop it: by ``deadline_s`` each step."""


class Executor:
    """Spawns, feeds, watches and restarts the workers of a plan through ``mechanics``."""

    def __init__(self, mechanics: Mechanics, make_spec: Callable[[Slot, int], WorkerSpec],
                 max_restarts: int, grace_s: float, stop_timeout_s: float,
                 start_timeout_s: float, prefetch: int, item_timeout_s: float | None = None):
        self.mech = mechanics
        self.ledger: Ledger | None = None  # the ledger, given by run()
        self.make_spec = make_spec
        self.max_restarts = max_restarts
        self.grace_s = grace_s
        self.stop_timeout_s = stop_timeout_s
        self.start_timeout_s = start_timeout_s
        self.prefetch = prefetch
        # the longest one item may run: a call of n items is stopped after n x this (None: no limit)
        self.item_timeout_s = item_timeout_s
        self.workers: dict[int, Worker] = {}
        # slots whose worker died while there was no work for it: restarted (within
        # max_restarts) as soon as there is, e.g. when another slot's death requeues items
        self.dormant: dict[int, tuple[Slot, int]] = {}
        self.restarts: dict[int, int] = {}
        self.interrupts = SignalCounter()
        self.spawned_at = 0.0  # time.time() of the first spawn (start or run)
        # why the run stopped dispatching without a signal: a write the file system refused
        self.halt: str | None = None
        self.refill: Callable[[], bool] | None = None  # watch=true: more work when idle

    def _start(self, slot: Slot, incarnation: int) -> None:
        self.spawned_at = self.spawned_at or time.time()
        self.workers[slot.index] = self.mech.start(slot, self.make_spec(slot, incarnation))

    def start(self, slots: list[Slot]) -> None:
        """Spawn the slots' workers now, before there is a ledger to feed them: they boot and
        load their models while the controller discovers and plans. Their Ready waits for
        :meth:`run`; :meth:`close` stops them if the run never gets there."""
        for slot in slots:
            if slot.index not in self.workers:
                self.restarts[slot.index] = 0
                self._start(slot, 0)

    def close(self) -> None:
        """Stop any worker still running: workers started early whose run never came (an
        empty input, an error or Ctrl-C during discovery). They were given no item, so
        they are not waited for long. Idempotent."""
        if self.workers:
            self.mech.stop_all(list(self.workers.values()), min(0.5, self.stop_timeout_s))
            self.workers.clear()

    # ---- the loop ----------------------------------------------------------------------
    def run(self, slots: list[Slot], ledger: Ledger,
            refill: Callable[[], bool] | None = None) -> None:
        """Run the plan's slots until the ledger has no work left, or a stop. ``refill``
        (watch=true): called while idle instead of ending; True when it found new work."""
        self.ledger = ledger
        self.refill = refill
        self.interrupts.install()
        try:
            with self.mech.session(slots):
                try:
                    self.start(slots)
                    self._loop()
                except Exception as exc:  # the controller's own write refused (journal, ...)
                    self.halt = storage_problem(exc)
                    if self.halt is None:
                        raise
                    raise StorageError(self.halt) from None  # (app.py adds the resume)
                finally:
                    self._stop()
        finally:
            self.interrupts.restore()

    def _stop(self) -> None:
        workers = list(self.workers.values())
        self.mech.stop_all(workers, self.stop_timeout_s if self.interrupts.count < 2 else 0.5)
        for w in workers:
            try:
                self._handle_all(w, self.mech.drain(w))
                w.move(SlotState.STOPPED)
                self.ledger.worker_gone(w.slot, w.pid, "stopped", restartable=False, quiet=True)
            except Exception as exc:  # the journal is refused too: what it lacks is redone
                if self.halt is None or storage_problem(exc) is None:
                    raise
        self.workers.clear()

    def _loop(self) -> None:
        halted_at = 0.0
        while True:
            signalled = self.interrupts.count >= 1
            stopping = signalled or self.halt is not None
            if self.interrupts.count >= 2:
                self.ledger.note(f"second {self.interrupts.signals[-1]}: stopping workers now")
                return
            if signalled and self.ledger.stop_requested_at is None:
                self.ledger.stop_requested(self.interrupts.signals[0],
                                           0.0 if self.interrupts.now else self.grace_s)
            if self.interrupts.now:
                return  # SIGTERM/SIGHUP: in-flight items go back to pending (_stop)
            if self.halt is not None and not halted_at:
                halted_at = time.monotonic()
            since = self.interrupts.first_at if signalled else halted_at
            if stopping and (not self.ledger.in_flight()
                             or time.monotonic() - since > self.grace_s):
                return
            if not stopping:
                self._wake_dormant()
                self._dispatch()
            if not stopping and not self.ledger.in_flight() and not self.ledger.scheduler.has_work():
                if self.refill is None:
                    return  # done (even if the last workers died idle after the last item)
                if self.refill():
                    continue  # (a new look at the input found work: dispatch it)
            if not self.workers:
                self.ledger.note("every worker slot is lost")
                return
            for w, messages, death in self.mech.wait(list(self.workers.values()), 0.2):
                if self.workers.get(w.slot.index) is not w:
                    continue  # already reaped
                self._handle_all(w, messages)
                ended = (not self.mech.self_exiting
                         and (w.state == SlotState.EXHAUSTED or w.failed_to_start))
                if death is not None or ended:
                    if death is not None and death.running_batch is not None:
                        self.ledger.replies_lost(w.slot, death.running_batch)
                    self._died(w, death.reason if death else "")
            self._check_start_timeouts()
            self._check_item_timeouts()
            self.ledger.tick()

    def _dispatch(self) -> None:
        for w in list(self.workers.values()):
            while w.state == SlotState.READY and w.outstanding < self.prefetch:
                batch = self.ledger.next_batch(w.slot, w.pid)
                if batch:
                    call = Call(self.ledger.journal.next_batch_no(), tuple(batch))
                elif w.outstanding == 0 and self.interrupts.count == 0:
                    # nothing left for it: maybe a copy of the batch expected to end last
                    call = self.ledger.copy_for(w.slot, self.ledger.journal.next_batch_no)
                    if call is None:
                        break
                    batch = list(call.items)
                else:
                    break
                if not self.mech.send(w, call):
                    self.ledger.unsent(w.slot, batch)
                    break
                self.ledger.sent(w.slot, call)
                w.call_sent(len(batch), time.monotonic())

    def _handle_all(self, w: Worker, messages: list) -> None:
        for msg in messages:
            self._handle(w, msg)

    def _handle(self, w: Worker, msg: Any) -> None:
        if isinstance(msg, ChunkDone):
            self.ledger.items_done(msg.done)
            if msg.last:  # it stands for the call's BatchDone
                self._handle(w, BatchDone(msg.slot, msg.batch_no))
        elif isinstance(msg, ItemFailed):
            self.ledger.item_failed(msg, w.pid)
        elif isinstance(msg, BatchDone):
            w.call_over(time.monotonic())
            self.ledger.batch_done(msg)
        elif isinstance(msg, Ready):
            w.pid = msg.pid
            w.move(SlotState.READY)
            self.ledger.worker_ready(w.slot, msg)
        elif isinstance(msg, RungChanged):
            self.ledger.rung_changed(msg)
        elif isinstance(msg, SlotExhausted):
            w.move(SlotState.EXHAUSTED)
            self.ledger.note(f"{w.slot.label}: {msg.error}; this slot stops, the others go on")
        elif isinstance(msg, StartFailed):
            w.failed_to_start = msg.error
        elif isinstance(msg, RaceLost):
            w.call_over(time.monotonic())
            self.ledger.race_lost(msg)
        elif isinstance(msg, WriteRefused):
            w.call_over(time.monotonic())
            self.ledger.write_refused(msg)
            if self.halt is None:
                self.halt = msg.error
                self.ledger.note(f"{w.slot.label}: could not write outputs: {msg.error}; no "
                                 f"new work is handed out")
        else:
            log.warning("unknown message from %s: %r", w.slot.label, msg)

    def _died(self, w: Worker, reason: str = "") -> None:
        code = self.mech.reap(w)
        del self.workers[w.slot.index]
        if self._stopped_with_us(code):  # SIGTERM/SIGHUP to the whole process group
            w.move(SlotState.STOPPED)
            self.ledger.worker_gone(w.slot, w.pid, "stopped", restartable=False, quiet=True)
            return
        exhausted = w.state == SlotState.EXHAUSTED
        why = w.failed_to_start or w.killed_for or reason or exit_name(code)
        restartable = not (exhausted or w.failed_to_start)
        restartable = restartable and self.restarts[w.slot.index] < self.max_restarts
        self.ledger.worker_gone(w.slot, w.pid, why, restartable=restartable,
                                quiet=exhausted and code == 0, exit_code=code,
                                timed_out=bool(w.killed_for))
        if restartable and self.interrupts.count == 0 and self.ledger.scheduler.has_work_for(w.slot.index):
            w.move(SlotState.STARTING)
            self._restart(w.slot, w.incarnation + 1)
        elif restartable:  # nothing for it to do now; maybe later
            w.move(SlotState.DORMANT)
            self.dormant[w.slot.index] = (w.slot, w.incarnation + 1)
        else:
            w.move(SlotState.LOST)
            self.ledger.scheduler.slot_lost(w.slot.index)

    def _stopped_with_us(self, code: int | None, wait_s: float = 0.5) -> bool:
        """A worker ended by SIGTERM/SIGHUP (or of an unknown cause) while this controller got
        the same signal: one stop request to the process group, not a crash of the worker.
        The controller's own handler may run a moment after the worker's death is seen:
        wait up to ``wait_s`` for it. A worker signalled alone is a death as any other."""
        if code is not None and code not in (-signal.SIGTERM, -signal.SIGHUP):
            return False
        deadline = time.monotonic() + wait_s
        while not self.interrupts.now and time.monotonic() < deadline:
            time.sleep(0.02)  # (a signal handler runs between these sleeps)
        return self.interrupts.now

    def _restart(self, slot: Slot, incarnation: int) -> None:
        self.restarts[slot.index] += 1
        self.ledger.note(f"restarting {slot.label} (restart {self.restarts[slot.index]}"
                      f"/{self.max_restarts})")
        self._start(slot, incarnation)

    def _wake_dormant(self) -> None:
        """Restart a slot whose worker died idle once there is work it could be given."""
        if not self.dormant or not self.ledger.scheduler.has_work():  # (has_work reads the
            return  # journal: has_work_for alone takes an unread page for work)
        for index, (slot, incarnation) in list(self.dormant.items()):
            if self.ledger.scheduler.has_work_for(index):
                del self.dormant[index]
                self._restart(slot, incarnation)

    def _check_start_timeouts(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.state == SlotState.STARTING and now - w.started_at > self.start_timeout_s:
                self.ledger.note(f"{w.slot.label} did not load its model within "
                              f"{self.start_timeout_s:.0f}s; killing it")
                if not self.mech.kill(w):  # no sentinel will say it: its death is now
                    self._died(w, reason="start timeout")


    def _check_item_timeouts(self) -> None:
        """A call running longer than its items' share of ``item_timeout_s``: its worker is
        killed; the ledger fails a lone item at once and retries a batch's items alone."""
        if self.item_timeout_s is None:
            return
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.state != SlotState.READY or not w.call_sizes or w.killed_for:
                continue
            limit = self.item_timeout_s * w.call_sizes[0]
            if now - w.running_since > limit:
                w.killed_for = (f"a batch of {w.call_sizes[0]} ran over {limit:g}s "
                                f"(executor.item_timeout_s={self.item_timeout_s:g} per item)")
                self.ledger.note(f"{w.slot.label}: {w.killed_for}; killing its worker")
                if not self.mech.kill(w):
                    self._died(w)


class LocalExecutor(Executor):
    """The executor over spawned processes (the default, ``executor=local``)."""

    def __init__(self, make_spec: Callable[[Slot, int], WorkerSpec], max_restarts: int,
                 grace_s: float, stop_timeout_s: float, start_timeout_s: float, prefetch: int,
                 item_timeout_s: float | None = None):
        from runner.executor_local import LocalMechanics

        super().__init__(LocalMechanics(), make_spec, max_restarts, grace_s, stop_timeout_s,
                         start_timeout_s, prefetch, item_timeout_s)


@contextlib.contextmanager
def no_session(slots: list[Slot]):  # noqa: ARG001
    """A mechanics' session that needs nothing around the run."""
    yield
