"""The ledger: the consequences of every executor event, and the only writer of the journal.

    Executor loop (executor.py) ──events──> Ledger ──mark_* / requeue──> Journal, Scheduler
      next_batch, sent, unsent               │
      items_done, item_failed, batch_done    ├──> logs/errors/<name>.json, progress display
      worker_ready, rung_changed             └──> SlotStats (summary.json)
      worker_gone, replies_lost, stop_requested, write_refused
      copy_for, race_lost                    └──> Speculator (speculation.py): tail copies

The executor owns the loop and its mechanics own processes or actors (starting, waiting,
killing); this module owns what follows from what they report, identically for every
executor:

* dispatch: ``next_batch`` marks items running (attempt + 1) and remembers them in flight;
* results: done -> journal; failed -> retried, or failed for good with an error file;
* deaths: every in-flight item of the dead slot goes back to the queue as a suspect (alone
  in its next batch), or is quarantined as failed once it used ``max_attempts``;
* figures per slot for the summary, and the progress display;
* speculation: an item may be in flight on two slots (a copy of a batch and its original);
  the first result is recorded and the other copy is dropped, a death of one copy leaves the
  item to the other, and RaceLost from the survivor of a dead winner requeues it.
"""
from __future__ import annotations

import json
import sqlite3
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from runner.devices import Slot
from runner.journal import Journal
from runner.messages import (BatchDone, Call, ItemDone, ItemFailed, RaceLost, Ready,
                             RungChanged, WriteRefused)
from runner.processes import exit_name
from runner.progress import Progress
from runner.rundir import RunDir, atomic_write_json
from runner.scheduler import Scheduler
from runner.speculation import CallInFlight, Speculator
from runner.tasks.base import Item

log = logging.getLogger("runner")


@dataclass
class SlotStats:
    """Figures of one slot over this invocation (summary.json)."""

    label: str
    items: int = 0
    failed: int = 0
    busy_s: float = 0.0
    first_start: float | None = None
    last_finish: float | None = None
    deaths: int = 0
    pids: list = field(default_factory=list)
    models: dict = field(default_factory=dict)  # model -> items
    metrics: dict = field(default_factory=dict)  # summed task metrics (media_s, ...)
    rungs: list = field(default_factory=list)  # OOM ladder moves: (model, batch, reason)
    last_chunk: tuple = ()



def _cost(item: Item) -> float:
    """An item's cost for speeds and estimates (an item without one counts 1)."""
    return item.cost if item.cost and item.cost > 0 else 1.0


class Ledger:
    def __init__(self, journal: Journal, scheduler: Scheduler, rundir: RunDir, slots: list[Slot],
                 max_attempts: int, progress: Progress, speculate: bool = False):
        self.journal = journal
        self.scheduler = scheduler
        self.rundir = rundir
        self.max_attempts = max_attempts
        self.progress = progress
        self.stats = {s.index: SlotStats(s.label) for s in slots}
        self.labels = {s.index: s.label for s in slots}
        self.inflight: dict[int, dict[str, Item]] = {s.index: {} for s in slots}
        # batches sent to each slot and not yet BatchDone, oldest first: a worker runs them
        # in order, so at its death only the oldest one with items in flight had started.
        self.calls: dict[int, list[tuple[int, tuple[str, ...]]]] = {s.index: [] for s in slots}
        self.notes: list[str] = []
        self.stop_requested_at: float | None = None
        self.stop_signal: str | None = None
        # tail speculation (speculation.py): calls in flight by batch_no, when each slot's
        # running call began, speeds; copies made and won
        self.speculate = speculate
        self.speculator = Speculator({s.index: float(getattr(s, "speed", 1.0)) for s in slots})
        self.flight: dict[int, CallInFlight] = {}
        self.running_since: dict[int, float] = {}
        self.copies = {"made": 0, "won": 0}

    # ---- dispatch ------------------------------------------------------------------------
    def next_batch(self, slot: Slot, pid: int | None) -> list[Item]:  # noqa: ARG002
        batch = self.scheduler.next_batch(slot.index)
        self.journal.mark_running_many([item.id for item in batch], slot.index, slot.label,
                                       time.time())
        for item in batch:
            self.inflight[slot.index][item.id] = item
        return batch

    def sent(self, slot: Slot, call: Call) -> None:
        if not self.calls[slot.index]:
            self.running_since[slot.index] = time.monotonic()
        self.calls[slot.index].append((call.batch_no, tuple(item.id for item in call.items)))
        self.flight[call.batch_no] = CallInFlight(
            call.batch_no, slot.index, call.race_id, sum(_cost(i) for i in call.items),
            copy=call.race is not None)
        self.progress.slot_state(slot.index, "running")

    def _elsewhere(self, item_id: str, slot: int) -> bool:
        """``item_id`` is in flight on another slot too (a speculative copy)."""
        return any(item_id in f for s, f in self.inflight.items() if s != slot)

    def copy_for(self, slot: Slot, number: Callable[[], int]) -> Call | None:
        """Speculation: a copy, for idle ``slot``, of the call expected to finish last, or
        None (off, nothing worth copying). The caller sends it like any call."""
        if not self.speculate:
            return None
        queues = {s: [self.flight[b] for b, _ in calls if b in self.flight]
                  for s, calls in self.calls.items()}
        target = self.speculator.pick(slot.index, queues, self.running_since, time.monotonic())
        if target is None:
            return None
        ids = next(ids for b, ids in self.calls[target.slot] if b == target.batch_no)
        items = [self.inflight[target.slot][i] for i in ids if i in self.inflight[target.slot]]
        if not items:
            return None
        target.copied = True
        for item in items:
            self.inflight[slot.index][item.id] = item
        self.copies["made"] += 1
        log.info("speculation: %s runs a copy of batch %d (%d item(s)) of %s", slot.label,
                 target.batch_no, len(items), self.labels[target.slot])
        return Call(number(), tuple(items), race=target.race)

    def unsent(self, slot: Slot, batch: list[Item]) -> None:
        for item in batch:
            self.inflight[slot.index].pop(item.id, None)
        batch = [i for i in batch if not self._elsewhere(i.id, slot.index)]  # (not a copy's)
        for item in batch:
            self.journal.mark_pending(item.id, refund=True)
        self.scheduler.requeue(batch, suspect=False)

    def in_flight(self) -> int:
        return sum(len(v) for v in self.inflight.values())

    # ---- results -------------------------------------------------------------------------
    def _busy(self, st: SlotStats, batch_no: int, started: float, finished: float) -> None:
        key = (batch_no, started)
        if st.last_chunk != key:
            st.last_chunk = key
            st.busy_s += max(0.0, finished - started)
        st.first_start = started if st.first_start is None else min(st.first_start, started)
        st.last_finish = finished if st.last_finish is None else max(st.last_finish, finished)

    def item_done(self, msg: ItemDone) -> None:
        self.items_done([msg])

    def items_done(self, msgs: Sequence[ItemDone]) -> None:
        """A chunk's results: one journal write for all of them."""
        fresh, moved = [], []
        for msg in msgs:
            item = self.inflight[msg.slot].pop(msg.item_id, None)
            if item is None:
                log.warning("result for %s from %s that was not in flight; ignored",
                            msg.item_id, self.labels[msg.slot])
                continue
            fresh.append(msg)
            self.speculator.record(msg.slot, _cost(item),
                                   (msg.finished - msg.started) / max(1, msg.batch_size))
            if self._elsewhere(msg.item_id, msg.slot):  # this copy won: drop the other
                for s, f in self.inflight.items():
                    if s != msg.slot:
                        f.pop(msg.item_id, None)
            if self.flight.get(msg.batch_no) is not None and self.flight[msg.batch_no].copy:
                moved.append(msg)
        if moved:
            self.copies["won"] += len({m.batch_no for m in moved})
            for slot in {m.slot for m in moved}:
                self.journal.moved([m.item_id for m in moved if m.slot == slot], slot,
                                   self.labels[slot])
        rows = [(m.item_id, m.output, m.model, m.batch_size, m.started, m.finished,
                 json.dumps(list(m.placed)) if m.placed else None, m.warning or None)
                for m in fresh]
        try:
            self.journal.mark_done_many(rows)
        except sqlite3.IntegrityError:  # an output path already recorded for another item
            fresh = [m for m, row in zip(fresh, rows) if self._done_alone(m, row)]
        for msg in fresh:
            if msg.warning:
                log.warning("%s: %s", msg.item_id, msg.warning)
            st = self.stats[msg.slot]
            st.items += 1
            st.models[msg.model] = st.models.get(msg.model, 0) + 1
            for k, v in msg.metrics.items():
                st.metrics[k] = st.metrics.get(k, 0.0) + float(v)
            self._busy(st, msg.batch_no, msg.started, msg.finished)
            self.progress.advance(msg.slot, 1)

    def _done_alone(self, msg: ItemDone, row: tuple) -> bool:
        """One item of a chunk the journal refused: done, or failed if its output path is
        another item's (the journal's UNIQUE output key: a task wrote two items to one path)."""
        try:
            self.journal.mark_done_many([row])
            return True
        except sqlite3.IntegrityError:
            self._fail(msg.item_id, msg.slot, None, self.journal.attempts(msg.item_id),
                       f"its output {msg.output} is already another item's output in this run; "
                       f"the task must name each item's files apart (item.name)", "", None,
                       msg.model)
            return False

    def item_failed(self, msg: ItemFailed, pid: int | None) -> None:
        item = self.inflight[msg.slot].pop(msg.item_id, None)
        if item is None or self._elsewhere(msg.item_id, msg.slot):
            return  # (a copy runs it elsewhere: that one's outcome counts)
        st = self.stats[msg.slot]
        self._busy(st, msg.batch_no, msg.started, msg.finished)
        attempt = self.journal.attempts(msg.item_id)
        if msg.permanent or attempt >= self.max_attempts:
            self._fail(item.id, msg.slot, pid, attempt, msg.error, msg.traceback, None, msg.model)
        else:
            self.journal.mark_pending(item.id, error=msg.error)
            self.scheduler.requeue([item], suspect=False)
            log.warning("item %s failed on %s (attempt %d/%d), will retry: %s",
                        item.id, self.labels[msg.slot], attempt, self.max_attempts, msg.error)

    def _fail(self, item_id: str, slot: int, pid: int | None, attempt: int, error: str,
              tb: str, exit_code: int | None, model: str | None) -> None:
        now = time.time()
        self.journal.mark_failed(item_id, error, now, model)
        atomic_write_json(self.rundir.error_file(self.journal.name_of(item_id)), {
            "item": item_id, "device": self.labels[slot], "slot": slot, "pid": pid,
            "attempt": attempt, "max_attempts": self.max_attempts, "exit_code": exit_code,
            "exit": exit_name(exit_code) if exit_code is not None else None,
            "error": error, "traceback": tb or None, "time": now,
        })
        self.stats[slot].failed += 1
        self.progress.advance(slot, 0, failed=1)
        log.error("FAILED %s on %s: %s", item_id, self.labels[slot], error)

    def batch_done(self, msg: BatchDone) -> None:
        self.calls[msg.slot] = [c for c in self.calls[msg.slot] if c[0] != msg.batch_no]
        self.flight.pop(msg.batch_no, None)
        self.running_since[msg.slot] = time.monotonic()  # its next call begins now
        if not self.inflight[msg.slot]:
            self.progress.slot_state(msg.slot, "idle")

    def worker_ready(self, slot: Slot, msg: Ready) -> None:
        self.stats[slot.index].pids.append(msg.pid)
        self.progress.slot_state(slot.index, f"ready ({msg.model}, {msg.load_s:.1f}s)")
        log.info("worker %s ready: %s", slot.label, msg.identity)

    def rung_changed(self, msg: RungChanged) -> None:
        self.stats[msg.slot].rungs.append((msg.model, msg.batch_size, msg.reason))
        self.note(f"{self.labels[msg.slot]}: {msg.reason} -> model {msg.model}, batch {msg.batch_size}")

    # ---- deaths and stops ------------------------------------------------------------------
    def worker_gone(self, slot: Slot, pid: int | None, why: str, restartable: bool,
                    quiet: bool, exit_code: int | None = None, timed_out: bool = False) -> None:
        """A worker process ended. ``quiet``: an orderly end (stop, exhausted chain).
        ``timed_out``: the loop killed it for executor.item_timeout_s -- a lone item that ran
        over fails at once (it would again); a batch's items are retried alone."""
        inflight = self.inflight[slot.index]
        items = list(inflight.values())
        # Only the oldest unfinished batch had started: its items are the suspects, charged
        # an attempt and retried alone. Batches queued behind it never ran: refunded.
        started = next((set(i for i in ids if i in inflight)
                        for _, ids in self.calls[slot.index] if any(i in inflight for i in ids)),
                       set(inflight))
        for batch_no, _ in self.calls[slot.index]:
            self.flight.pop(batch_no, None)
        self.calls[slot.index] = []
        inflight.clear()
        # an item a copy still runs on another slot is that copy's business
        items = [i for i in items if not self._elsewhere(i.id, slot.index)]
        if not quiet:
            self.stats[slot.index].deaths += 1
            self.note(f"worker {slot.label} (pid {pid}) died: {why}; {len(items)} item(s) in "
                      f"flight go back to the queue" + ("" if restartable else "; slot lost"))
        requeue, unstarted = [], []
        for item in items:
            if quiet or item.id not in started:
                self.journal.mark_pending(item.id, refund=True)
                unstarted.append(item)
                continue
            attempt = self.journal.attempts(item.id)
            error = (f"worker died ({why}) on {slot.label} (pid {pid}) while processing a batch "
                     f"of {len(started)} with {item.id}, attempt {attempt}/{self.max_attempts}")
            if timed_out and len(started) == 1:
                self._fail(item.id, slot.index, pid, attempt,
                           f"item {item.id} took too long on {slot.label}: {why}; split it, or "
                           f"raise executor.item_timeout_s", "", exit_code, None)
            elif attempt >= self.max_attempts:
                self._fail(item.id, slot.index, pid, attempt,
                           error + "; quarantined: it killed every worker that ran it", "",
                           exit_code, None)
            else:
                self.journal.mark_pending(item.id, error=error)
                requeue.append(item)
        self.scheduler.requeue(requeue, suspect=True)
        self.scheduler.requeue(unstarted, suspect=False)
        self.progress.slot_state(slot.index, "stopped" if quiet else f"died: {why}")

    def replies_lost(self, slot: Slot, running_batch: int) -> None:
        """The calls sent to ``slot`` before ``running_batch`` finished, but their replies died
        with the worker (a Ray actor killed mid-call can lose the reply of the call before):
        their items go back uncharged, so that :meth:`worker_gone` charges the running one."""
        calls = self.calls[slot.index]
        n = next((k for k, (batch_no, _) in enumerate(calls) if batch_no == running_batch), 0)
        inflight = self.inflight[slot.index]
        items = [inflight.pop(i) for _, ids in calls[:n] for i in ids if i in inflight]
        for item in items:
            self.journal.mark_pending(item.id, refund=True)
        self.scheduler.requeue(items, suspect=False)
        self.calls[slot.index] = calls[n:]

    def write_refused(self, msg: WriteRefused) -> None:
        """The file system refused a batch's outputs: its items not yet done go back to
        pending uncharged (nothing is wrong with them); the call is over."""
        inflight = self.inflight[msg.slot]
        items = [inflight.pop(i) for i in msg.item_ids if i in inflight]
        for item in items:
            self.journal.mark_pending(item.id, refund=True)
        self.scheduler.requeue(items, suspect=False)
        self.batch_done(BatchDone(msg.slot, msg.batch_no))

    def race_lost(self, msg: RaceLost) -> None:
        """The other call of the race claimed it first. Its items are normally done by then;
        one whose winner died after claiming goes back to the queue (charged: it was in a
        worker that died)."""
        inflight = self.inflight[msg.slot]
        items = [inflight.pop(i) for i in msg.item_ids if i in inflight]
        orphans = [it for it in items if not self._elsewhere(it.id, msg.slot)]
        for item in orphans:
            self.journal.mark_pending(item.id, error="its batch's other copy died after "
                                                     "claiming it; retried")
        self.scheduler.requeue(orphans, suspect=True)
        self.batch_done(BatchDone(msg.slot, msg.batch_no))

    def stop_requested(self, signame: str, grace_s: float) -> None:
        self.stop_requested_at = time.time()
        self.stop_signal = signame
        if grace_s <= 0:
            self.note(f"{signame}: stopping now; items in flight go back to pending, not "
                      f"charged an attempt")
        else:
            self.note(f"{signame}: no new work; in-flight batches may finish for {grace_s:.0f}s "
                      f"(press Ctrl-C again to stop now)")

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.warning(text)
        self.progress.message(text)

    def tick(self) -> None:
        self.journal.maybe_commit()
        self.progress.refresh()
