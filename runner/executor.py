"""The executor: one loop that feeds, watches and restarts a worker per device slot.

Data flow (after CPython's concurrent/futures/process.py)::

    Journal <──mark_*── Ledger (ledger.py) <── results, failures, deaths ──┐
       │                  ^  next_batch / requeue                               │
     pages                │                                                   │
       v                  │                  Call    ┌────────────────────┐   │
    Scheduler ─────> Executor loop ───mechanics.send─>│ worker 0, device A │   │
                     (this module)                    │ (worker.py)        │   │
                      dispatch, restarts,  <─mechanics.wait─ messages,      │   │
                      start timeouts,              deaths (sentinels)  ─────┼───┘
                      Ctrl-C/SIGTERM: drain, stop    ...  worker n-1, device B

The loop decides; a :class:`Mechanics` does what differs between backends -- starting a
worker, sending it a call, waiting for its messages or its death, reaping, stopping:
:class:`runner.executor_local.LocalMechanics` (spawned processes, pipes, process sentinels)
and :class:`runner.executor_ray.RayMechanics` (actors, ObjectRefs, RayActorError). The
journal is written by the ledger alone; the loop never touches it.

* Death is learnt from the mechanics' wait (a process sentinel, an actor error), never
  from a missing result; nothing blocks without a timeout.
* The slot's environment (device mask, threads) is in place when its worker is started.
* Each slot's life is a :class:`SlotState`; :func:`check_slot_move` refuses illegal moves.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, ContextManager, Iterable, Protocol

from runner.devices import Slot
from runner.messages import (BatchDone, Call, ChunkDone, ItemFailed, Ready, RungChanged,
                             SlotExhausted, StartFailed, WorkerSpec)
from runner.processes import SignalCounter, exit_name
from runner.ledger import Ledger

log = logging.getLogger("runner")


class SlotState(str, Enum):
    """A slot's life. Legal moves (:func:`check_slot_move` refuses the rest)::

        STARTING --Ready--> READY --SlotExhausted--> EXHAUSTED
           |                  |                         |
           +------ died ------+-------------------------+--> STARTING  (restarted now)
           |                  |                         |--> DORMANT   (restart when work)
           |                  |                         +--> LOST      (no restart left,
           |                  |                                         exhausted, start failed)
        DORMANT --there is work for it--> STARTING
        any state but LOST --the run ends--> STOPPED
    """

    STARTING = "starting"  # spawned, loading its model
    READY = "ready"  # takes batches
    EXHAUSTED = "exhausted"  # every model of the chain ran out of memory: it ends
    DORMANT = "dormant"  # died with restarts left and nothing to do: restarted when there is
    LOST = "lost"  # never again in this run
    STOPPED = "stopped"  # the run ended


_SLOT_MOVES: dict[SlotState, frozenset[SlotState]] = {
    SlotState.STARTING: frozenset({SlotState.READY, SlotState.STARTING, SlotState.DORMANT,
                                   SlotState.LOST, SlotState.STOPPED}),
    SlotState.READY: frozenset({SlotState.EXHAUSTED, SlotState.STARTING, SlotState.DORMANT,
                                SlotState.LOST, SlotState.STOPPED}),
    SlotState.EXHAUSTED: frozenset({SlotState.LOST, SlotState.STOPPED}),
    SlotState.DORMANT: frozenset({SlotState.STARTING, SlotState.STOPPED}),
    SlotState.LOST: frozenset(),
    SlotState.STOPPED: frozenset(),
}


class IllegalSlotMove(RuntimeError):
    pass


def check_slot_move(old: SlotState, new: SlotState) -> None:
    """The one place that says which slot moves are legal."""
    if new not in _SLOT_MOVES[old]:
        raise IllegalSlotMove(f"slot state {old.value} -> {new.value} is not allowed")


@dataclass
class Worker:
    """One incarnation of a slot's worker, as the loop and its mechanics see it."""

    slot: Slot
    incarnation: int  # 0 first, +1 per restart
    handle: Any  # the mechanics' own: a Process, an actor
    conn: Any  # the mechanics' own: a pipe (None for an actor)
    started_at: float  # time.monotonic() at start
    pid: int | None = None
    state: SlotState = SlotState.STARTING
    outstanding: int = 0  # batches sent and not yet BatchDone
    failed_to_start: str = ""
    poller: Any = None  # the mechanics' own

    def move(self, new: SlotState) -> None:
        check_slot_move(self.state, new)
        self.state = new


@dataclass(frozen=True)
class Death:
    """What a mechanics' wait says of a worker that ended."""

    reason: str = ""  # "" = its exit code says it (exit_name)
    running_batch: int | None = None  # the call it died in, when the mechanics knows (Ray)


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
                 start_timeout_s: float, prefetch: int):
        self.mech = mechanics
        self.ledger: Ledger | None = None  # the ledger, given by run()
        self.make_spec = make_spec
        self.max_restarts = max_restarts
        self.grace_s = grace_s
        self.stop_timeout_s = stop_timeout_s
        self.start_timeout_s = start_timeout_s
        self.prefetch = prefetch
        self.workers: dict[int, Worker] = {}
        # slots whose worker died while there was no work for it: restarted (within
        # max_restarts) as soon as there is, e.g. when another slot's death requeues items
        self.dormant: dict[int, tuple[Slot, int]] = {}
        self.restarts: dict[int, int] = {}
        self.interrupts = SignalCounter()
        self.spawned_at = 0.0  # time.time() of the first spawn (start or run)

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
    def run(self, slots: list[Slot], ledger: Ledger) -> None:
        """Run the plan's slots until the ledger has no work left, or a stop."""
        self.ledger = ledger
        self.interrupts.install()
        try:
            with self.mech.session(slots):
                try:
                    self.start(slots)
                    self._loop()
                finally:
                    self._stop()
        finally:
            self.interrupts.restore()

    def _stop(self) -> None:
        workers = list(self.workers.values())
        self.mech.stop_all(workers, self.stop_timeout_s if self.interrupts.count < 2 else 0.5)
        for w in workers:
            self._handle_all(w, self.mech.drain(w))
            w.move(SlotState.STOPPED)
            self.ledger.worker_gone(w.slot, w.pid, "stopped", restartable=False, quiet=True)
        self.workers.clear()

    def _loop(self) -> None:
        while True:
            stopping = self.interrupts.count >= 1
            if self.interrupts.count >= 2:
                self.ledger.note(f"second {self.interrupts.signals[-1]}: stopping workers now")
                return
            if stopping and self.ledger.stop_requested_at is None:
                self.ledger.stop_requested(self.interrupts.signals[0], self.grace_s)
            if stopping and (not self.ledger.in_flight()
                             or time.monotonic() - self.interrupts.first_at > self.grace_s):
                return
            if not stopping:
                self._wake_dormant()
                self._dispatch()
            if not stopping and not self.ledger.in_flight() and not self.ledger.scheduler.has_work():
                return  # done (even if the last workers died idle after the last item)
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
            self.ledger.tick()

    def _dispatch(self) -> None:
        for w in list(self.workers.values()):
            while w.state == SlotState.READY and w.outstanding < self.prefetch:
                batch = self.ledger.next_batch(w.slot, w.pid)
                if not batch:
                    break
                call = Call(self.ledger.journal.next_batch_no(), tuple(batch))
                if not self.mech.send(w, call):
                    self.ledger.unsent(w.slot, batch)
                    break
                self.ledger.sent(w.slot, call)
                w.outstanding += 1

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
            w.outstanding -= 1
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
        else:
            log.warning("unknown message from %s: %r", w.slot.label, msg)

    def _died(self, w: Worker, reason: str = "") -> None:
        code = self.mech.reap(w)
        del self.workers[w.slot.index]
        exhausted = w.state == SlotState.EXHAUSTED
        why = w.failed_to_start or reason or exit_name(code)
        restartable = not (exhausted or w.failed_to_start)
        restartable = restartable and self.restarts[w.slot.index] < self.max_restarts
        self.ledger.worker_gone(w.slot, w.pid, why, restartable=restartable,
                             quiet=exhausted and code == 0, exit_code=code)
        if restartable and self.interrupts.count == 0 and self.ledger.scheduler.has_work_for(w.slot.index):
            w.move(SlotState.STARTING)
            self._restart(w.slot, w.incarnation + 1)
        elif restartable:  # nothing for it to do now; maybe later
            w.move(SlotState.DORMANT)
            self.dormant[w.slot.index] = (w.slot, w.incarnation + 1)
        else:
            w.move(SlotState.LOST)
            self.ledger.scheduler.slot_lost(w.slot.index)

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


class LocalExecutor(Executor):
    """The executor over spawned processes (the default, ``executor=local``)."""

    def __init__(self, make_spec: Callable[[Slot, int], WorkerSpec], max_restarts: int,
                 grace_s: float, stop_timeout_s: float, start_timeout_s: float, prefetch: int):
        from runner.executor_local import LocalMechanics

        super().__init__(LocalMechanics(), make_spec, max_restarts, grace_s, stop_timeout_s,
                         start_timeout_s, prefetch)


@contextlib.contextmanager
def no_session(slots: list[Slot]):  # noqa: ARG001
    """A mechanics' session that needs nothing around the run."""
    yield
