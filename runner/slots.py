"""A slot's life as the executor sees it: :class:`SlotState` with its legal moves
(:func:`check_slot_move` refuses the rest), the :class:`Worker` record of one incarnation
of a slot's worker, and the :class:`Death` a mechanics reports. The executor's loop
(runner/executor.py) moves slots; the mechanics (executor_local.py, executor_ray.py) fill
in their own handles.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from runner.devices import Slot


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
    # the items of each call sent and not yet done, oldest first, and when the oldest began
    # (a worker runs its calls in order): what executor.item_timeout_s measures
    call_sizes: list = field(default_factory=list)
    running_since: float = 0.0
    killed_for: str = ""  # why the loop killed it (a timeout), for the death's reason

    def call_sent(self, size: int, now: float) -> None:
        if not self.call_sizes:
            self.running_since = now
        self.call_sizes.append(size)
        self.outstanding += 1

    def call_over(self, now: float) -> None:
        """The oldest call is done (or refused): the next one begins now."""
        self.outstanding -= 1
        if self.call_sizes:
            self.call_sizes.pop(0)
        self.running_since = now

    def move(self, new: SlotState) -> None:
        check_slot_move(self.state, new)
        self.state = new


@dataclass(frozen=True)
class Death:
    """What a mechanics' wait says of a worker that ended."""

    reason: str = ""  # "" = its exit code says it (exit_name)
    running_batch: int | None = None  # the call it died in, when the mechanics knows (Ray)
