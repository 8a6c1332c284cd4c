"""Tail speculation: an idle slot copies the in-flight batch expected to finish last.

When a slot has nothing left to take (the queue is empty) it would wait for the slowest
device to finish the last long items. :class:`Speculator` picks, among the calls in flight
on other slots, the one expected to finish last, and proposes running a copy of it on the
idle slot if the copy is expected to finish sooner. Both copies run; the first to write
claims the race (``RunDir.claim``, in the worker) and the other writes nothing and reports
``RaceLost`` -- so exactly one copy's outputs exist and the journal records one result.

Speeds are measured, in the task's cost units per second (seconds of media, tokens; an item
without a cost counts 1), from what each slot has finished; a slot not measured yet is
estimated from its declared speed (``devices.slots[].speed``) scaled by the measured slots.
Expected finish of a slot's calls: the running one from when it began, the ones queued
behind it one after another; a running call already past its estimate makes its slot's
speed at most its cost / its time so far (a slow device is caught before its first result). Plain data: unit-tested with scripted numbers.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

# a copy is made only when it is expected to finish this much sooner (a share of the time
# the original still needs): a near tie is not worth the device time
MARGIN = 0.15


@dataclass
class CallInFlight:
    """A call the ledger sent and has not seen end, as speculation sees it."""

    batch_no: int
    slot: int
    race: int  # the race it runs in (the original's batch_no)
    cost: float  # summed cost of its items
    copy: bool = False  # it is a speculative copy
    copied: bool = False  # a copy of it was made


class Speculator:
    """Speeds per slot, and which call an idle slot should copy."""

    def __init__(self, declared: dict[int, float]):
        self.declared = declared  # slot -> declared relative speed (1 = as fast as any)
        self.cost_done: dict[int, float] = {s: 0.0 for s in declared}
        self.busy_s: dict[int, float] = {s: 0.0 for s in declared}

    def record(self, slot: int, cost: float, seconds: float) -> None:
        """``slot`` finished items of ``cost`` in ``seconds`` of its time."""
        self.cost_done[slot] += cost
        self.busy_s[slot] += max(seconds, 0.0)

    def speed(self, slot: int) -> float | None:
        """Cost per second: measured, or declared x the measured slots' scale; None when
        no slot is measured yet."""
        if self.busy_s[slot] > 0.05 and self.cost_done[slot] > 0:
            return self.cost_done[slot] / self.busy_s[slot]
        scale = [self.cost_done[s] / self.busy_s[s] / self.declared[s]
                 for s in self.declared if self.busy_s[s] > 0.05 and self.cost_done[s] > 0]
        return self.declared[slot] * statistics.median(scale) if scale else None

    def pick(self, idle: int, calls: dict[int, list[CallInFlight]], running_since: dict[int, float],
             now: float) -> CallInFlight | None:
        """The call ``idle`` should copy, or None. ``calls``: per slot, in the order its
        worker runs them; ``running_since``: when each slot's first call began."""
        mine = self.speed(idle)
        if not mine:
            return None
        best, best_finish = None, now
        for slot, queue in calls.items():
            v = self.speed(slot)
            if slot == idle or not queue or not v:
                continue
            started = running_since.get(slot, now)
            if now - started > queue[0].cost / v:  # overdue: it is at most this fast
                v = queue[0].cost / (now - started)
            finish = started
            for call in queue:
                finish = max(finish, now) if call is not queue[0] else finish
                finish += call.cost / v
                if call.copy or call.copied:
                    continue
                if finish > best_finish:
                    best, best_finish = call, finish
        if best is None:
            return None
        copy_finish = now + best.cost / mine
        return best if copy_finish < best_finish - MARGIN * (best_finish - now) else None
