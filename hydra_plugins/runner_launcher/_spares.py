"""Spare job processes: the next jobs' processes, started while their device is still busy.

A job process pays for an interpreter, Hydra's imports, the task's module and the sweep's
context (~0.15-0.4 s), then Hydra's job set-up (``run_job``: job dir, .hydra/, logging),
before the job's first line runs. When more jobs wait than devices are free, the launcher
starts *spares* for each busy lease -- spawned with that lease's environment (device mask,
threads) in place, in their own process group -- which load all that and say Ready
(_child.py ``spare_main``). A ready spare is then given the next waiting job *staged*: it
runs Hydra's job set-up at once and calls the task function only when the lease frees
(Go). Each job still gets a fresh process of its own; it is only started earlier.

How many spares a busy lease keeps: ``hydra.launcher.spares`` (0: none); null (auto): as
many as cover a spare's start-up at the pace jobs on that lease end -- start-up time over
the last staged job's run time, rounded up, 1 to MAX_AHEAD (2 before anything is known).

Staging is skipped when the app has Hydra callbacks (``on_job_start`` must not fire before
the job holds its device). A staged job whose lease stays busy while another lease is free
and nothing else waits is taken back (Cancel: the spare leaves, removing the job dir if the
staging made it) and runs on the free lease once that spare has exited. A spare that dies
before its job ran gives the job back; it then runs in a process of its own, unstaged.

Spare states (:func:`check_spare_move` refuses other moves)::

    STARTING --Ready--> READY --Order(go=False)--> STAGED --Go--> LAUNCHED (a running job)
       |                  |  \\--Order(go=True)-------------------^
       |                  |                          \\--Cancel--> CANCELLED --exit--> ENDED
       +--died------------+--EOF / died--> ENDED      STAGED --died--> ENDED
    (a STARTING spare bound to a job whose lease is free sends Order(go=True) on Ready)
"""
from __future__ import annotations

import contextlib
import math
import pickle
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional

from hydra_plugins.runner_launcher._child import spare_main
from hydra_plugins.runner_launcher._messages import Cancel, Common, Go, Order, Ready
from runner.processes import reap

CANCEL_WAIT_S = 5.0  # a cancelled spare that has not left by then is killed
MAX_AHEAD = 4  # spares per busy lease, at most, when hydra.launcher.spares is null


class SpareState(str, Enum):
    STARTING = "starting"  # spawned; importing, loading the task and the sweep's context
    READY = "ready"  # waiting for an order
    STAGED = "staged"  # has its job, Hydra's set-up done or under way; waits for Go
    LAUNCHED = "launched"  # runs its job: the launcher's loop owns it as a running job
    CANCELLED = "cancelled"  # told to leave without running its job
    ENDED = "ended"  # exited (or was never needed)


_MOVES: dict[SpareState, frozenset[SpareState]] = {
    SpareState.STARTING: frozenset({SpareState.READY, SpareState.ENDED}),
    SpareState.READY: frozenset({SpareState.STAGED, SpareState.LAUNCHED, SpareState.ENDED}),
    SpareState.STAGED: frozenset({SpareState.LAUNCHED, SpareState.CANCELLED, SpareState.ENDED}),
    SpareState.CANCELLED: frozenset({SpareState.ENDED}),
    SpareState.LAUNCHED: frozenset(),
    SpareState.ENDED: frozenset(),
}


class IllegalSpareMove(RuntimeError):
    pass


def check_spare_move(old: SpareState, new: SpareState) -> None:
    """The one place that says which moves of a spare are legal."""
    if new not in _MOVES[old]:
        raise IllegalSpareMove(f"spare state {old.value} -> {new.value} is not allowed")


@dataclass
class Spare:
    """One spare process, as the launcher sees it (parent-side only)."""

    lease: Any  # _pool.Lease whose environment it was spawned with
    proc: Any
    inbox: Any  # launcher -> spare: Order, Go, Cancel
    results: Any  # spare -> launcher: Ready, then the JobReturn
    born: float  # time.monotonic() at spawn
    state: SpareState = SpareState.STARTING
    job: Any = None  # the _loop._Job bound to it (staged, or launched on Ready)
    cancelled_at: float = 0.0
    went: bool = False  # launched by Go: set up before, so Go -> result is the job alone

    def move(self, new: SpareState) -> None:
        check_spare_move(self.state, new)
        self.state = new

    def send(self, msg: Any) -> bool:
        try:
            self.inbox.send_bytes(pickle.dumps(msg))
            return True
        except (OSError, ValueError):
            return False


@dataclass(frozen=True)
class Hooks:
    """What the spares ask of the launcher's loop (_loop._Loop)."""

    take: Callable[[], Any]  # the next waiting job that may be staged, or None
    order: Callable[[Any, Any, bool], Order]  # (job, lease, go) -> its Order
    launched: Callable[[Spare], None]  # a spare now runs spare.job on spare.lease
    requeue: Callable[[Any, bool], None]  # (job, may_stage): the job waits again


class Spares:
    """The spare processes of one launch() call, per lease."""

    def __init__(self, servers: Any, common: Common, hooks: Hooks, ahead: Optional[int],
                 stage: bool, ctx_mp: Any):
        self.servers, self.common, self.hooks, self.ctx_mp = servers, common, hooks, ctx_mp
        self.fixed_ahead, self.stage = ahead, stage
        self.spares: list[Spare] = []  # not yet LAUNCHED or ENDED, oldest first
        self.start_s = 0.0  # the longest spawn -> Ready seen
        self.job_s: dict[int, float] = {}  # lease index -> its last staged job's run time

    # ---- how many ------------------------------------------------------------------------
    def ahead(self, lease: Any) -> int:
        if self.fixed_ahead is not None:
            return self.fixed_ahead
        job_s = self.job_s.get(lease.index)
        if job_s is None or not self.start_s:
            return 2
        return max(1, min(MAX_AHEAD, math.ceil(self.start_s / max(job_s, 1e-3))))

    def job_ran(self, lease: Any, seconds: float) -> None:
        """A staged job on ``lease`` ran ``seconds`` (Go to its result)."""
        self.job_s[lease.index] = seconds

    def top_up(self, lease: Any) -> None:
        """Start spares for ``lease`` until it has ``ahead(lease)``."""
        while sum(1 for s in self.spares if s.lease.index == lease.index) < self.ahead(lease):
            self._spawn(lease)

    def _spawn(self, lease: Any) -> None:
        inbox_r, inbox_w = self.ctx_mp.Pipe(duplex=False)
        results_r, results_w = self.ctx_mp.Pipe(duplex=False)
        proc = self.servers.process(lease, spare_main, (self.common, inbox_r, results_w),
                                    f"runner-sweep-spare-{lease.label}")
        inbox_r.close()
        results_w.close()
        self.spares.append(Spare(lease, proc, inbox_w, results_r, time.monotonic()))

    # ---- events ------------------------------------------------------------------------
    def waitables(self) -> dict[Any, Spare]:
        out: dict[Any, Spare] = {}
        for s in self.spares:
            out[s.proc.sentinel] = s
            if s.state == SpareState.STARTING:
                out[s.results] = s
        return out

    def event(self, spare: Spare, obj: Any) -> None:
        """``obj`` (its result pipe or its sentinel) of ``spare`` is ready."""
        if spare not in self.spares:
            return
        if obj is spare.results:
            try:
                msg = pickle.loads(spare.results.recv_bytes())
            except (EOFError, OSError, pickle.UnpicklingError):
                msg = None
            if isinstance(msg, Ready):
                spare.move(SpareState.READY)
                self.start_s = max(self.start_s, time.monotonic() - spare.born)
                self._use(spare)
                return
        self._ended(spare)

    def _use(self, spare: Spare) -> None:
        """A READY spare: launch its bound job, or stage the next waiting one."""
        if spare.job is not None:  # bound while it started: its lease is free
            self._launch(spare, self.hooks.order(spare.job, spare.lease, True))
            return
        job = self.hooks.take() if self.stage else None
        if job is None:
            return
        spare.job = job
        if spare.send(self.hooks.order(job, spare.lease, False)):
            spare.move(SpareState.STAGED)
        else:
            self._ended(spare)

    def _launch(self, spare: Spare, msg: Any) -> bool:
        if not spare.send(msg):
            self._ended(spare)
            return False
        spare.move(SpareState.LAUNCHED)
        spare.went = isinstance(msg, Go)
        self.spares.remove(spare)
        with contextlib.suppress(OSError):
            spare.inbox.close()
        self.hooks.launched(spare)
        return True

    def _ended(self, spare: Spare) -> None:
        """The spare is gone (or not needed): reap it; an unlaunched job waits again."""
        was = spare.state
        spare.move(SpareState.ENDED)
        if spare in self.spares:
            self.spares.remove(spare)
        with contextlib.suppress(OSError):
            spare.inbox.close()
        reap(spare.proc, spare.results, wait_s=2.0)
        if spare.job is not None:
            # a spare that died with its job staged: run that job unstaged next time
            self.hooks.requeue(spare.job, was == SpareState.CANCELLED)
            spare.job = None

    # ---- what the loop asks ----------------------------------------------------------------
    def go(self, lease: Any) -> bool:
        """Launch the first job (in the sweep's order) staged on ``lease``, if there is one."""
        staged = [s for s in self.spares
                  if s.lease.index == lease.index and s.state == SpareState.STAGED]
        if not staged:
            return False
        return self._launch(min(staged, key=lambda s: s.job.index), Go())

    def assign(self, lease: Any, job: Any) -> bool:
        """Give ``job`` (its lease is free) to an unbound spare of ``lease``: at once when
        it is ready, on its Ready when it is still starting. False: none."""
        for want in (SpareState.READY, SpareState.STARTING):
            for s in self.spares:
                if s.lease.index == lease.index and s.state == want and s.job is None:
                    s.job = job
                    if want == SpareState.READY:
                        self._launch(s, self.hooks.order(job, lease, True))
                    return True
        return False

    def steal(self, free: int) -> None:
        """``free`` leases are free and no job waits: take back the most recently staged
        jobs, one per free lease not already getting one back. A job taken back waits
        again once its spare has exited (so two processes never share its job dir)."""
        coming = sum(1 for s in self.spares if s.state == SpareState.CANCELLED)
        staged = [s for s in self.spares if s.state == SpareState.STAGED]
        for spare in reversed(staged[len(staged) - max(0, free - coming):]):
            self._cancel(spare, "another device is free first")

    def _cancel(self, spare: Spare, why: str) -> None:
        spare.move(SpareState.CANCELLED)
        spare.cancelled_at = time.monotonic()
        if not spare.send(Cancel(why)):
            self._ended(spare)

    def recall(self, why: str) -> None:
        """The sweep stops: staged jobs are cancelled, unstaged spares leave, a job bound to a
        starting spare waits again (it will not start)."""
        for s in list(self.spares):
            if s.state == SpareState.STAGED:
                self._cancel(s, why)
            elif s.state in (SpareState.READY, SpareState.STARTING):
                self._ended_now(s)

    def holding(self) -> bool:
        """Some spare still holds a job that has not run (staged, bound, or cancelled and not
        yet exited)."""
        return any(s.job is not None for s in self.spares)

    def tick(self) -> None:
        """Kill cancelled spares that have not left in CANCEL_WAIT_S."""
        now = time.monotonic()
        for s in list(self.spares):
            if s.state == SpareState.CANCELLED and now - s.cancelled_at > CANCEL_WAIT_S:
                s.proc.kill()
                self._ended(s)

    def close(self) -> None:
        """End every spare (EOF on its inbox: it exits; a staged one leaves its job)."""
        for s in list(self.spares):
            self._ended_now(s)

    def _ended_now(self, spare: Spare) -> None:
        with contextlib.suppress(OSError):
            spare.inbox.close()
        self._ended(spare)
