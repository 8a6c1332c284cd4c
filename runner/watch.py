"""``watch=true``: a run that keeps looking at its input and processes what arrives.

"Monitor a folder and transcribe what arrives": when the queue drains, the run does not
end. Every ``watch.every_s`` seconds (polling) the :class:`Watcher` runs the task's discovery
again, with the workers and their models still loaded, and journals what is new or changed
-- but only what is *stable*: an item whose fingerprint (size + mtime for files, the text's
hash for lines) is the same as at the previous look. A file still being written changes
between two looks and waits; a line half-written at the end of a .jsonl does too. Items the
journal already has unchanged are taken as they are (a look never drops them). Each look
that finds work is a new invocation of the journal (``Journal.next_gen``): the scheduler is
built again over it and the executor goes on. Ctrl-C or SIGTERM end the run as a stop
request (exit 130 / 143, resumable); the task's finalize runs once, at the end.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from runner import intake
from runner.journal import Journal

if TYPE_CHECKING:
    from runner.context import RunContext
    from runner.ledger import Ledger

log = logging.getLogger("runner")


class Watcher:
    """The executor's ``refill``: called when the run is idle; True when it found work."""

    def __init__(self, ctx: "RunContext", journal: Journal, ledger: "Ledger",
                 replan: Callable[[], Any]):
        self.ctx, self.journal, self.ledger, self.replan = ctx, journal, ledger, replan
        self.every_s = float(ctx.cfg.watch.every_s)
        self.last_look = time.monotonic()
        self.previous: dict[str, str] = {}  # id -> fingerprint at the previous look
        self.looks = 0

    def __call__(self) -> bool:
        if time.monotonic() - self.last_look < self.every_s:
            return False
        self.last_look = time.monotonic()
        self.looks += 1
        found = list(self.ctx.task.discover())
        known = self.journal.seen([o.id for o in found])
        fingerprints = {o.id: o.fingerprint for o in found}
        stable, waiting = [], 0
        for o in found:
            row = known.get(o.id)
            if row is not None and row[4] == o.fingerprint and row[1] in ("done", "failed"):
                stable.append(o)  # known and unchanged
            elif self.previous.get(o.id) == o.fingerprint:
                stable.append(o)  # new or changed, and the same as at the last look
            else:
                waiting += 1
        self.previous = fingerprints
        fresh = [o for o in stable if known.get(o.id) is None or known[o.id][4] != o.fingerprint
                 or known[o.id][1] not in ("done", "failed")]
        if not fresh:
            return False
        self.journal.next_gen()
        taken = intake.take(self.journal, stable,
                            on_duplicate=getattr(self.ctx.task, "on_duplicate_id", "error"),
                            on_changed="requeue")
        intake.record_bad(self.ctx.rundir, self.journal, taken.bad, "discovery (watch)")
        scheduler = self.replan()
        self.ledger.scheduler = scheduler
        count = self.journal.todo_stats()[0]
        self.ledger.note(f"watch: look {self.looks}: {len(fresh)} new or changed item(s), "
                         f"{count} to do" + (f"; {waiting} still changing, left for the next "
                                             f"look" if waiting else ""))
        return count > 0
