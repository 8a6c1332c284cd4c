"""Chunking strategies and the ledger's bookkeeping, with no processes in sight.

The executor asks ``next_batch(slot)`` whenever a worker has room, and tells the scheduler
what came back. Everything here is plain data over the journal, so it is tested with
scripted fakes (tests/test_scheduler.py) and shared by every executor.

Strategies (``chunking.strategy``):

* ``dynamic``       one shared queue in discovery order; an idle worker takes the next batch.
* ``size_balanced`` longest first onto the slot that would finish it first by the task's
                    cost estimate over the slot's declared speed (LPT on uniform
                    machines; ``devices.slots[].speed``); each slot then works through
                    its own list.
* ``contiguous``    ceil-div slices of the list, one per slot, in order.
* ``round_robin``   item i goes to slot i mod n.

Static lists are not stolen from: that is the point of choosing them. Items come back to
the shared *retry* queue — which every slot serves first — when a worker dies (then as
suspects, one per batch, so a poison item is pinned down alone) or when an item failed in a
way worth retrying. A slot lost for good hands its remaining list to the shared queue.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from runner.journal import Journal
from runner.tasks.base import Item

SHARED = None  # planned_slot of items in the shared queue
SORTED_PAGE_BATCHES = 128  # a page that is sorted by cost holds this many batches


def page_size(batch_size: int, sort_pages: bool) -> int:
    """Items the scheduler reads from the journal at once.

    A page sorted by cost is cut into batches of similar cost, so the larger the page, the
    closer its padding gets to one global sort: all-MiniLM-L6-v2, 20,000 sentences, batch
    64 -> pages of 4,096 pad to 1.173 x the real tokens, 8,192 to 1.163, one sort of all
    to 1.159. The price is the page's payloads in memory (8,192 texts: a few MB).
    """
    return max(1000, SORTED_PAGE_BATCHES * batch_size) if sort_pages else 1000


@dataclass
class _Cursor:
    """Pages through one queue of pending items in seq order."""

    planned_slot: int | None
    after_seq: int = -1
    buffer: deque = field(default_factory=deque)
    exhausted: bool = False


def assign(strategy: str, n_slots: int, items: list[tuple[str, float]],
           speeds: list[float] | None = None) -> list[tuple[int | None, str]]:
    """(planned slot, id) per item. ``items`` is (id, cost), longest first for size_balanced;
    ``speeds``: each slot's relative speed (size_balanced; None = all equal)."""
    if strategy == "dynamic":
        return [(SHARED, item_id) for item_id, _ in items]
    if strategy == "round_robin":
        return [(i % n_slots, item_id) for i, (item_id, _) in enumerate(items)]
    if strategy == "contiguous":
        per = math.ceil(len(items) / n_slots) if items else 1
        return [(i // per, item_id) for i, (item_id, _) in enumerate(items)]
    if strategy == "size_balanced":
        speed = speeds or [1.0] * n_slots
        if len(set(speed)) == 1:  # equal slots: the least-loaded one, in a heap
            heap = [(0.0, s) for s in range(n_slots)]
            out = []
            for item_id, cost in items:
                load, slot = heapq.heappop(heap)
                out.append((slot, item_id))
                heapq.heappush(heap, (load + max(cost, 0.0), slot))
            return out
        busy = [0.0] * n_slots  # seconds of work planned per slot
        out = []
        for item_id, cost in items:
            slot = min(range(n_slots), key=lambda s: (busy[s] + max(cost, 0.0) / speed[s], s))
            busy[slot] += max(cost, 0.0) / speed[slot]
            out.append((slot, item_id))
        return out
    raise ValueError(f"unknown chunking strategy {strategy!r}")


class Scheduler:
    """What each slot gets next."""

    def __init__(self, journal: Journal, strategy: str, n_slots: int, batch_size: int,
                 page: int = 1000, sort_pages: bool = False, guided_tail: bool = False,
                 speeds: list[float] | None = None):
        self.journal = journal
        self.speeds = speeds  # each slot's declared relative speed (size_balanced)
        self.strategy = strategy
        self.n_slots = n_slots
        self.batch_size = batch_size
        self.page = max(page, batch_size)
        # Tasks whose batch cost grows with its longest item (padded text) ask for each page
        # to be cut into batches of similar cost: longest first within the page.
        self.sort_pages = sort_pages
        self.retry: deque[tuple[Item, bool]] = deque()  # (item, suspect)
        self.shared = _Cursor(SHARED)
        self.own = {s: _Cursor(s) for s in range(n_slots)} if strategy != "dynamic" else {}
        self.lost: set[int] = set()
        # Guided tail (OpenMP's "guided" schedule, for the shared queue only): once fewer
        # than 2 x live slots x batch_size items are left, a batch is ceil(left / (2 x live
        # slots)), so the last batches shrink towards one item and the slots finish
        # together instead of up to a whole batch apart. One live slot has no one to wait
        # for: its batches stay whole.
        self.guided_tail = guided_tail
        self.shared_left = 0  # items the shared cursor has not handed out yet

    def plan(self) -> dict[int, tuple[int, float]]:
        """Write the static assignment into the journal; return (count, cost) per slot."""
        if self.strategy == "dynamic":
            self.shared_left = 0

            def counted():  # streamed: the controller never holds every id
                for item_id, _ in self.journal.todo_costs(False):
                    self.shared_left += 1
                    yield SHARED, item_id
            self.journal.set_planned_slots(counted())
            return {}
        longest = self.strategy == "size_balanced"
        rows = list(self.journal.todo_costs(longest_first=longest))
        pairs = assign(self.strategy, self.n_slots, rows, self.speeds)
        self.journal.set_planned_slots(pairs)
        load: dict[int, tuple[int, float]] = {s: (0, 0.0) for s in range(self.n_slots)}
        cost = dict(rows)
        for slot, item_id in pairs:
            n, c = load[slot]
            load[slot] = (n + 1, c + cost[item_id])
        return load

    def _take(self, cur: _Cursor, n: int) -> list[Item]:
        out: list[Item] = []
        while len(out) < n:
            if not cur.buffer:
                if cur.exhausted:
                    break
                rows = self.journal.page(cur.planned_slot, cur.after_seq, self.page)
                if not rows:
                    cur.exhausted = True
                    break
                cur.after_seq = rows[-1][1]
                items = [item for item, _ in rows]
                if self.sort_pages:
                    items.sort(key=lambda it: -it.cost)
                cur.buffer.extend(items)
            out.append(cur.buffer.popleft())
        return out

    def next_batch(self, slot: int) -> list[Item]:
        """Up to batch_size items for ``slot``; empty when there is nothing for it now."""
        if self.retry:
            item, suspect = self.retry.popleft()
            batch = [item]
            while not suspect and self.retry and len(batch) < self.batch_size and not self.retry[0][1]:
                batch.append(self.retry.popleft()[0])
            return batch
        if slot in self.own:
            batch = self._take(self.own[slot], self.batch_size)
            if batch:
                return batch
        n = self.batch_size
        live = max(1, self.n_slots - len(self.lost))
        if self.guided_tail and live > 1 and self.shared_left < 2 * live * n:
            n = max(1, math.ceil(self.shared_left / (2 * live)))
        batch = self._take(self.shared, n)
        self.shared_left = max(0, self.shared_left - len(batch))
        return batch

    def requeue(self, items: list[Item], suspect: bool) -> None:
        """Items back to the shared retry queue (a worker died, or a retryable failure)."""
        self.retry.extend((item, suspect) for item in items)

    def slot_lost(self, slot: int) -> None:
        """A slot gone for good: its own list becomes everyone's."""
        self.lost.add(slot)
        cur = self.own.pop(slot, None)
        if cur is not None:  # _take drains the cursor's buffer first, then pages the rest
            while batch := self._take(cur, self.page):
                self.retry.extend((item, False) for item in batch)

    def has_work(self) -> bool:
        """Is anything left that some live slot could be given?"""
        if self.retry:
            return True
        for cur in [self.shared, *self.own.values()]:
            if cur.buffer:
                return True
            if not cur.exhausted:
                rows = self.journal.page(cur.planned_slot, cur.after_seq, 1)
                if rows:
                    return True
                cur.exhausted = True
        return False

    def has_work_for(self, slot: int) -> bool:
        if self.retry or self.shared.buffer or not self.shared.exhausted:
            return True
        cur = self.own.get(slot)
        return cur is not None and (bool(cur.buffer) or not cur.exhausted)
