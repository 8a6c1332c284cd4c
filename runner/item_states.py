"""Item states: what an item of a run can be, and the one function that refuses illegal moves.

The journal (runner/journal.py) stores them; every UPDATE it makes moves an item only from a
state :func:`sources` allows, and :func:`check_transition` says why a refused move is illegal.

Item states and their legal moves (:func:`check_transition` refuses the rest)::

    (new) --> pending --> running --> done
       |         ^  |        |  \\
       |         |  +--------|---> failed   (bad input found at discovery)
       |         +-----------+       ^      (worker died, interrupted, retryable error)
       +--> failed <-----------------+      (bad input, or attempts exhausted)
    failed --> pending                      (resume.retry_failed=true only)

A resume that finds an item's input changed since it was done or failed moves it back
(:meth:`Journal.requeue_changed`, the one exception to the table above, called only by
:mod:`runner.intake` before any work is dispatched)::

    done | failed --> pending               (its fingerprint changed: make it again)
    done | pending | running --> failed     (it changed into bad input)

and ``reuse=`` (:mod:`runner.reuse`, at discovery of a new run, before any dispatch) takes
over what an earlier run made, and undoes that for a file it cannot link::

    pending --> done                        (the same item, unchanged, was done earlier)
    done (reused) --> pending               (its file is gone from the earlier run)
"""
from __future__ import annotations

import functools
from enum import Enum


class ItemStatus(str, Enum):
    NEW = "new"  # not yet in the journal
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


_LEGAL: dict[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.NEW: frozenset({ItemStatus.PENDING, ItemStatus.FAILED}),
    ItemStatus.PENDING: frozenset({ItemStatus.RUNNING, ItemStatus.FAILED}),
    ItemStatus.RUNNING: frozenset({ItemStatus.DONE, ItemStatus.FAILED, ItemStatus.PENDING}),
    ItemStatus.FAILED: frozenset({ItemStatus.PENDING}),
    ItemStatus.DONE: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: ItemStatus, new: ItemStatus) -> None:
    """The one place that says which moves are legal."""
    if new not in _LEGAL[old]:
        raise IllegalTransition(f"item state {old.value} -> {new.value} is not allowed")


@functools.cache
def sources(new: ItemStatus) -> tuple[str, ...]:
    """The states an item may be in to move to ``new`` (for SQL WHERE clauses)."""
    return tuple(s.value for s, targets in _LEGAL.items() if new in targets and s != ItemStatus.NEW)
