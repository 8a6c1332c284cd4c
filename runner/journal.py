"""The journal: every item's state in SQLite, written by the controller alone.

Table ``items`` (a public contract, see DESIGN.md): id, status, attempts, slot, device,
model, batch_size, started, finished, output, error — plus the controller's own columns
seq (discovery order), cost, payload, planned_slot and gen (the invocation that last saw
the item). ``checkpoint=off`` keeps the same journal in memory. The schema, its version
and the check a journal file passes before it is opened: :mod:`runner.journal_schema`.

Item states and their legal moves: :mod:`runner.item_states` (:func:`check_transition`
refuses the rest; the UPDATEs here move an item only from a state it may leave).

Identity columns: ``name`` is what the item's files are named from (set once, at its first
discovery, never changed); ``name_key`` is its case- and normalisation-folded form, UNIQUE,
so the journal itself refuses one name (one output path) for two items; ``fingerprint``
says what the item was made from; ``src`` where it is in the input; ``placed`` the copies
written outside the run dir (JSON list) and ``warning`` a one-line note from the writer.

Memory does not grow with the number of items: discovery streams in chunks, pending work
is read back in pages ordered by seq, counts come from SQL.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import time
from itertools import islice
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Iterable, Iterator

from runner import journal_schema, names
from runner.item_states import IllegalTransition, ItemStatus, check_transition, sources
from runner.rundir import apply_umask
from runner.tasks.base import Item


@functools.cache
def _update_sql(new: ItemStatus, sets: str) -> str:
    """The UPDATE that moves one item to ``new`` only from a state it may leave for it."""
    return (f"UPDATE items SET status=?, {sets} WHERE id=? "
            f"AND status IN ({','.join('?' * len(sources(new)))})")


SEEN_COLUMNS = "id, status, gen, name, fingerprint, src"


class Journal:
    """The controller's record of every item. Not thread-safe; one owner."""

    def __init__(self, path: Path | None, commit_every_s: float = 0.5,
                 shared_outputs: bool = False):
        self.path = path
        # False: each item has output files of its own, and the journal refuses to record
        # one output path for two items (UNIQUE output_key); True: items share outputs
        # (embed's shards), each found by its id inside
        self.shared_outputs = shared_outputs
        if path:
            journal_schema.verify(path)  # never trust a cut-short, damaged or foreign file
        self._db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        journal_schema.create(self._db)  # tables, indexes; an older journal's upgrade
        if path:
            apply_umask(Path(path))
        self._db.execute("BEGIN")
        self._batch_no: int | None = None  # next_batch_no's counter, once read
        self._commit_every = commit_every_s
        self._last_commit = time.monotonic()
        self.gen = int(self.get_meta("gen", -1)) + 1
        self.set_meta("gen", self.gen)
        self.set_meta("schema_version", journal_schema.SCHEMA_VERSION)

    # ---- meta and housekeeping ----------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def commit(self) -> None:
        self._flush_batch_no()
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        self._last_commit = time.monotonic()

    def maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self._commit_every:
            self.commit()

    def close(self) -> None:
        """Commit and close; after a failed write (disk full) roll back what is not on disk."""
        try:
            self._flush_batch_no()
            self._db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        finally:
            self._db.close()

    def next_batch_no(self) -> int:
        """Batch numbers never repeat in a run dir (they name output shards). Counted in
        memory and written with each commit, in the same transaction as the items they
        carried: a crash loses both together."""
        if self._batch_no is None:
            self._batch_no = int(self.get_meta("batch_no", 0))
        n, self._batch_no = self._batch_no, self._batch_no + 1
        return n

    def _flush_batch_no(self) -> None:
        if self._batch_no is not None:
            self.set_meta("batch_no", self._batch_no)

    # ---- discovery (runner.intake decides; these are its primitives) ------------------------
    def add(self, discovered: Iterable, **policy: Any) -> Any:
        """Record discovered items (:func:`runner.intake.take`); returns its Intake."""
        from runner.intake import take  # intake builds on this module

        return take(self, discovered, **policy)

    def seen(self, ids: Sequence[str]) -> dict[str, tuple]:
        """The journal's rows for ``ids``: id -> (id, status, gen, name, fingerprint, src)."""
        out: dict[str, tuple] = {}
        for k in range(0, len(ids), 900):
            part = list(ids[k:k + 900])
            out.update((r[0], r) for r in self._db.execute(
                f"SELECT {SEEN_COLUMNS} FROM items WHERE id IN ({','.join('?' * len(part))})",
                part))
        return out

    def insert(self, rows: list[tuple]) -> list[tuple]:
        """New items: (id, status, error, seq, cost, payload, name, name_key, fingerprint, src).
        Returns the rows refused because their name_key is taken (the caller renames them);
        the others are in."""
        return self._write_named(self._INSERT % self.gen, rows)

    _INSERT = ("INSERT INTO items (id, status, error, seq, cost, payload, gen, name, name_key, "
               "fingerprint, src) VALUES (?,?,?,?,?,?,%d,?,?,?,?)")

    def insert_all(self, rows: list[tuple]) -> bool:
        """:meth:`insert` all or nothing: False (nothing written) if any id or name is taken."""
        self._db.execute("SAVEPOINT all_new")
        try:
            self._db.executemany(self._INSERT % self.gen, rows)
        except sqlite3.IntegrityError:
            self._db.execute("ROLLBACK TO all_new")
            return False
        finally:
            self._db.execute("RELEASE all_new")
        return True

    def refresh_plain(self, rows: list[tuple]) -> bool:
        """A later invocation's chunk, (seq, cost, payload, fingerprint, src, error, id) per
        item, in one pass -- if every row is plainly an item seen before with nothing to
        decide: known, named, not yet seen in this invocation (no repeat), fingerprint
        unchanged, not a pending item gone bad. Else False and nothing written."""
        self._db.execute("SAVEPOINT plain")
        moved = self._db.executemany(
            "UPDATE items SET gen=?1, seq=?2, cost=?3, payload=?4, fingerprint=?5, src=?6 "
            "WHERE id=?8 AND gen != ?1 AND name IS NOT NULL "
            "AND (fingerprint IS NULL OR ?5 IS NULL OR fingerprint = ?5 "
            "     OR status NOT IN ('done','failed')) "
            "AND (?7 IS NULL OR status NOT IN ('pending','running'))",
            [(self.gen, *r) for r in rows]).rowcount
        if moved != len(rows):
            self._db.execute("ROLLBACK TO plain")
        self._db.execute("RELEASE plain")
        return moved == len(rows)

    def refresh(self, rows: list[tuple]) -> list[tuple]:
        """Items seen again: (seq, cost, payload, name, name_key, fingerprint, src, id); their
        state is kept. A row whose name is None keeps the name it has (the common case: no
        index to touch). Returns the rows refused for a taken name_key, like :meth:`insert`."""
        named = [r for r in rows if r[3] is not None]
        self._db.executemany(
            "UPDATE items SET gen=%d, seq=?, cost=?, payload=?, fingerprint=?, src=? "
            "WHERE id=?" % self.gen, [r[:3] + r[5:] for r in rows if r[3] is None])
        return self._write_named(
            "UPDATE items SET gen=%d, seq=?, cost=?, payload=?, name=?, name_key=?, "
            "fingerprint=?, src=? WHERE id=?" % self.gen, named)

    def _write_named(self, sql: str, rows: list[tuple]) -> list[tuple]:
        if not rows:
            return []
        self._db.execute("SAVEPOINT named")
        try:
            self._db.executemany(sql, rows)
            self._db.execute("RELEASE named")
            return []
        except sqlite3.IntegrityError:
            self._db.execute("ROLLBACK TO named")
            self._db.execute("RELEASE named")
        refused = []
        for row in rows:  # one by one: which names are taken
            try:
                self._db.execute(sql, row)
            except sqlite3.IntegrityError as exc:
                if "name_key" not in str(exc):
                    raise
                refused.append(row)
        return refused

    def name_taken(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM items WHERE name_key=?", (key,)).fetchone() is not None

    def requeue_changed(self, item_id: str, error: str | None) -> None:
        """Its input changed since the item was done or failed: back to pending with its
        attempts and outputs cleared (``error`` None); or, ``error`` given, failed as the bad
        input it now is (from any state: discovery runs before any dispatch)."""
        if error is None:
            sql = ("UPDATE items SET status='pending', attempts=0, output=NULL, error=NULL, "
                   "finished=NULL, placed=NULL, warning=NULL WHERE id=? "
                   "AND status IN ('done','failed')")
            args: tuple = (item_id,)
        else:
            sql = ("UPDATE items SET status='failed', output=NULL, output_key=NULL, error=?, "
                   "placed=NULL, warning=NULL WHERE id=?")
            args = (error, item_id)
        if self._db.execute(sql, args).rowcount != 1:
            raise IllegalTransition(f"item {item_id!r}: only a done or failed item is re-queued "
                                    f"when its input changed")

    def discard(self) -> None:
        """Undo everything since the last commit (a refused discovery writes nothing)."""
        self._db.execute("ROLLBACK")
        self._db.execute("BEGIN")
        self._batch_no = None

    def name_of(self, item_id: str) -> str:
        row = self._db.execute("SELECT name FROM items WHERE id=?", (item_id,)).fetchone()
        return row[0] if row and row[0] else ""

    def next_gen(self) -> None:
        """A new invocation within this process (watch=true: another look at the input)."""
        self.commit()
        self.gen += 1
        self.set_meta("gen", self.gen)

    # ---- reuse= (runner.reuse matches with one statement over the connection) -------------
    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for runner.reuse's bulk SQL at discovery (before any dispatch)."""
        return self._db

    def raise_batch_no(self, at_least: int) -> None:
        """Number this run's batches from ``at_least`` on (after a reused run's shards)."""
        self._batch_no = max(int(self.get_meta("batch_no", 0)), at_least)

    def reused_outputs(self, source: str) -> Iterator[tuple[str, list[str]]]:
        """(output, ids) of the items reused from ``source``, one output at a time."""
        cur = self._db.execute("SELECT output, group_concat(id, char(0)) FROM items WHERE "
                               "reused_from=? GROUP BY output ORDER BY output", (source,))
        while rows := cur.fetchmany(2000):
            yield from ((out, ids.split("\0")) for out, ids in rows)

    def unreuse(self, item_ids: Sequence[str]) -> None:
        """Reused items whose files could not be linked: back to pending, made again."""
        self._db.executemany("UPDATE items SET status='pending', output=NULL, output_key=NULL, "
                             "reused_from=NULL WHERE id=? AND reused_from IS NOT NULL",
                             [(i,) for i in item_ids])

    def recover(self, retry_failed: bool) -> dict[str, int]:
        """Start of a run: running -> pending (their worker is gone); optionally failed -> pending."""
        moved = self._db.execute(
            "UPDATE items SET status='pending' WHERE status='running'").rowcount
        retried = 0
        if retry_failed:
            retried = self._db.execute(
                "UPDATE items SET status='pending', attempts=0, error=NULL "
                "WHERE status='failed' AND gen=?", (self.gen,)).rowcount
        return {"running_to_pending": moved, "failed_retried": retried}

    # ---- planning -------------------------------------------------------------------------
    def todo_stats(self) -> tuple[int, float, float]:
        """(count, total cost, largest cost) of this invocation's pending items."""
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(cost),0), COALESCE(MAX(cost),0) FROM items "
            "WHERE gen=? AND status='pending'", (self.gen,)).fetchone()
        return int(row[0]), float(row[1]), float(row[2])

    def todo_costs(self, longest_first: bool) -> Iterator[tuple[str, float]]:
        order = "cost DESC, seq" if longest_first else "seq"
        cur = self._db.execute(
            f"SELECT id, cost FROM items WHERE gen=? AND status='pending' ORDER BY {order}",
            (self.gen,))
        while rows := cur.fetchmany(5000):
            yield from rows

    def set_planned_slots(self, pairs: Iterable[tuple[int | None, str]]) -> None:
        it = iter(pairs)
        while rows := list(islice(it, 5000)):
            self._db.executemany("UPDATE items SET planned_slot=? WHERE id=?", rows)

    def page(self, planned_slot: int | None, after_seq: int, limit: int) -> list[tuple[Item, int]]:
        """Pending items of one planned slot (None: the shared queue), in seq order."""
        where = "planned_slot IS NULL" if planned_slot is None else "planned_slot=?"
        args: tuple = (self.gen, after_seq) + (() if planned_slot is None else (planned_slot,))
        rows = self._db.execute(
            f"SELECT id, cost, payload, seq, name, fingerprint, src FROM items WHERE gen=? "
            f"AND status='pending' AND seq>? AND {where} ORDER BY seq LIMIT ?",
            args + (limit,)).fetchall()
        return [(Item(r[0], r[1], r[2], r[4] or "", r[5] or "", r[6] or ""), r[3]) for r in rows]

    # ---- state changes (controller only) --------------------------------------------------
    def _move(self, item_id: str, new: ItemStatus, sets: str, args: tuple) -> None:
        if self._db.execute(_update_sql(new, sets), (new.value, *args, item_id, *sources(new))
                            ).rowcount != 1:
            row = self._db.execute("SELECT status FROM items WHERE id=?", (item_id,)).fetchone()
            check_transition(ItemStatus(row[0]) if row else ItemStatus.NEW, new)
            raise IllegalTransition(f"item {item_id!r}: no row moved to {new.value}")

    def _move_many(self, new: ItemStatus, sets: str, rows: list[tuple[str, tuple]]) -> None:
        """``_move`` for a batch in one executemany. If any row is refused, the batch is
        undone and replayed one by one, so it ends exactly as ``_move`` per item would: the
        items before the offender moved, the offender raises IllegalTransition."""
        if len(rows) <= 1:  # one row: a plain execute is cheaper than a savepoint
            for item_id, args in rows:
                self._move(item_id, new, sets, args)
            return
        allowed = sources(new)
        self._db.execute("SAVEPOINT move_many")
        try:
            moved = self._db.executemany(_update_sql(new, sets), [
                (new.value, *args, item_id, *allowed) for item_id, args in rows]).rowcount
        except sqlite3.IntegrityError:  # a UNIQUE refused a row: nothing of the batch moved
            self._db.execute("ROLLBACK TO move_many")
            self._db.execute("RELEASE move_many")
            raise
        if moved == len(rows):
            self._db.execute("RELEASE move_many")
            return
        self._db.execute("ROLLBACK TO move_many")
        self._db.execute("RELEASE move_many")
        for item_id, args in rows:  # find it (and leave the journal as one-by-one would)
            self._move(item_id, new, sets, args)

    def mark_running(self, item_id: str, slot: int, device: str, now: float) -> int:
        self.mark_running_many([item_id], slot, device, now)
        return self.attempts(item_id)

    def mark_done(self, item_id: str, output: str, model: str, batch_size: int,
                  started: float, finished: float, placed: str | None = None,
                  warning: str | None = None) -> None:
        self.mark_done_many([(item_id, output, model, batch_size, started, finished, placed,
                              warning)])

    def mark_running_many(self, item_ids: list[str], slot: int, device: str, now: float) -> None:
        self._move_many(ItemStatus.RUNNING,
                        "attempts=attempts+1, slot=?, device=?, started=?, finished=NULL",
                        [(i, (slot, device, now)) for i in item_ids])

    def mark_done_many(self, rows: list[tuple]) -> None:
        """(id, output, model, batch_size, started, finished[, placed, warning]) per item;
        placed: a JSON list of copies written outside the run dir, or None."""
        self._move_many(ItemStatus.DONE,
                        "output=?, model=?, batch_size=?, started=?, finished=?, placed=?, "
                        "warning=?, output_key=?, error=NULL",
                        [(r[0], (*r[1:], *(None,) * (8 - len(r)),
                                 None if self.shared_outputs else names.fold(r[1])))
                         for r in rows])

    def moved(self, item_ids: Sequence[str], slot: int, device: str) -> None:
        """Running items whose result came from another slot (a speculative copy won)."""
        self._db.executemany("UPDATE items SET slot=?, device=? WHERE id=? AND status='running'",
                             [(slot, device, i) for i in item_ids])

    def mark_failed(self, item_id: str, error: str, finished: float,
                    model: str | None = None) -> None:
        self._move(item_id, ItemStatus.FAILED, "error=?, finished=?, model=COALESCE(?, model)",
                   (error, finished, model))

    def mark_pending(self, item_id: str, error: str | None = None, refund: bool = False) -> None:
        """Back to the queue; ``refund``: an orderly stop, the attempt does not count."""
        self._move(item_id, ItemStatus.PENDING,
                   "error=COALESCE(?, error), attempts=MAX(attempts-?, 0)", (error, int(refund)))

    def attempts(self, item_id: str) -> int:
        return int(self._db.execute("SELECT attempts FROM items WHERE id=?", (item_id,)).fetchone()[0])

    # ---- reading back ---------------------------------------------------------------------
    def counts(self, this_gen_only: bool = True) -> dict[str, int]:
        q = "SELECT status, COUNT(*) FROM items" + (" WHERE gen=?" if this_gen_only else "")
        rows = self._db.execute(q + " GROUP BY status", (self.gen,) if this_gen_only else ())
        out = {s.value: 0 for s in ItemStatus if s != ItemStatus.NEW}
        out.update(dict(rows.fetchall()))
        return out

    def failures(self, limit: int = 50) -> list[tuple[str, str]]:
        return self._db.execute(
            "SELECT id, error FROM items WHERE gen=? AND status='failed' ORDER BY seq LIMIT ?",
            (self.gen, limit)).fetchall()

    def done_rows(self) -> Iterator[tuple[str, str, str]]:
        cur = self._db.execute(
            "SELECT id, output, model FROM items WHERE status='done' AND gen=? ORDER BY seq",
            (self.gen,))
        while rows := cur.fetchmany(5000):
            yield from rows

    def done_view(self) -> "DoneRows":
        """Every done item's (id, output, model), read again at each iteration, never held.
        Only items of this invocation's input: one that left the input (a line deleted, a
        smaller limit) is not in the run's outputs any more."""
        return DoneRows(self)

    def timeline_rows(self, since: float) -> Iterator[tuple[int, float, float, str]]:
        cur = self._db.execute(
            "SELECT slot, started, finished, status FROM items WHERE finished IS NOT NULL "
            "AND started IS NOT NULL AND started>=? ORDER BY started", (since,))
        while rows := cur.fetchmany(5000):
            yield from rows



class DoneRows(Sequence):
    """A lazy, re-iterable view of the done items for ``Task.finalize``: memory does not
    grow with the number of items (a tuple of 100,000 rows is ~25 MB)."""

    def __init__(self, journal: Journal):
        self._journal = journal

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        return self._journal.done_rows()

    def __len__(self) -> int:
        return int(self._journal._db.execute(
            "SELECT COUNT(*) FROM items WHERE status='done' AND gen=?",
            (self._journal.gen,)).fetchone()[0])

    def __getitem__(self, index):  # rarely used: a query per access
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(index)
        return self._journal._db.execute(
            "SELECT id, output, model FROM items WHERE status='done' AND gen=? ORDER BY seq "
            "LIMIT 1 OFFSET ?", (self._journal.gen, index)).fetchone()
