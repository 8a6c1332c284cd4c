"""Intake: discovered items into the journal, each with its identity checked.

Discovery yields items in input order; :func:`take` records them in the journal in chunks
and decides, once per item:

* **Repeated ids** (``on_duplicate``): ``error`` refuses the run with one line naming the id
  and where both copies are (nothing is written); ``keep_first`` records the first copy and
  counts the rest; ``suffix`` gives the n-th copy the id ``<id>#<n>`` (the first free n >= 2).
* **Names**: an item's files are named from ``Item.name`` (default
  :func:`runner.names.component` of its id). The journal keeps the name an item got at its
  first discovery. Two names that would meet on a case-insensitive or normalising file
  system, or two shortened names with one hash, are refused by the journal's UNIQUE
  ``name_key``; the later item (input order) then gets ``<name>~<hash of its id>``.
* **Changed inputs** (``on_changed``, on a resume): an item whose fingerprint differs from
  the one it was done (or failed) with is not trusted: ``requeue`` makes it again (a bad
  one is failed with its new error), ``error`` refuses the resume with one line.

Memory stays flat in the number of items: one chunk and its journal rows at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable

from runner import names
from runner.journal import Journal
from runner.rundir import RunDir, atomic_write_json
from runner.tasks.base import ON_CHANGED, ON_DUPLICATE, BadItem, ConfigError, Item

CHUNK = 2000


class InputRefused(ConfigError):
    """The input cannot be taken as it is (repeated id, changed input with on_changed=error)."""


@dataclass
class Intake:
    """What intake found besides the items: plan.yaml and the log say it."""

    items: int = 0  # recorded (good and bad)
    repeated: int = 0  # copies of an id seen before (skipped or suffixed)
    first_repeated: str = ""  # one line naming the first of them
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (id, name): first 20
    renamed_count: int = 0
    changed: int = 0  # re-queued (or failed) because their input changed
    first_changed: list[str] = field(default_factory=list)  # their ids: first 5
    bad: list[BadItem] = field(default_factory=list)  # bad input, as recorded (its id)

    def as_dict(self) -> dict:
        return {"repeated_ids": self.repeated, "renamed": self.renamed_count,
                "changed_since_done": self.changed}


def _where(obj: Item | BadItem) -> str:
    return obj.where or "the input"


def _seen_where(row: tuple) -> str:
    return row[5] or "the input"


def take(journal: Journal, discovered: Iterable[Item | BadItem], on_duplicate: str = "error",
         on_changed: str = "requeue") -> Intake:
    """Record ``discovered``; raise :class:`InputRefused` (journal untouched) to refuse."""
    if on_duplicate not in ON_DUPLICATE:
        raise ConfigError(f"task.on_duplicate_id={on_duplicate!r} is not one of "
                          f"{', '.join(ON_DUPLICATE)}")
    if on_changed not in ON_CHANGED:
        raise ConfigError(f"resume.on_changed={on_changed!r} is not one of {', '.join(ON_CHANGED)}")
    found = Intake()
    seq = 0
    it = iter(discovered)
    try:
        while objs := list(islice(it, CHUNK)):
            seq = _chunk(journal, objs, seq, found, on_duplicate)
    except InputRefused:
        journal.discard()
        raise
    if found.changed and on_changed == "error":
        journal.discard()
        raise InputRefused(
            f"{found.changed} item(s) changed since this run made them (first: "
            f"{', '.join(found.first_changed)}); resume.on_changed=requeue makes them again, "
            f"or start a new run")
    return found


def _new_row(obj: Item | BadItem, seq: int, name: str, key: str) -> tuple:
    """The journal row of an item seen for the first time (Journal.insert's order)."""
    bad = isinstance(obj, BadItem)
    return (obj.id, "failed" if bad else "pending", obj.error if bad else None, seq,
            0.0 if bad else obj.cost, None if bad else obj.payload, name, key,
            obj.fingerprint or None, obj.where or None)


def _first_time(journal: Journal, objs: list, seq: int, found: Intake) -> bool:
    """The first invocation of a run (nothing in the journal from before): try the chunk in
    one INSERT. False, with nothing written, when an id repeats or a name is taken -- the
    item-by-item path then says which."""
    if journal.gen != 0 or len({o.id for o in objs}) != len(objs):
        return False
    rows = []
    for k, obj in enumerate(objs):
        name = obj.name or names.component(obj.id)
        rows.append(_new_row(obj, seq + k, name, names.fold(name)))
    if not journal.insert_all(rows):
        return False
    found.items += len(objs)
    found.bad.extend(o for o in objs if isinstance(o, BadItem))
    return True


def _seen_before(journal: Journal, objs: list, seq: int, found: Intake) -> bool:
    """A later invocation (a resume): when the journal finds nothing to decide in the chunk
    (every id known, named, unchanged; none repeated), take it in one statement."""
    if journal.gen == 0 or len({o.id for o in objs}) != len(objs):
        return False
    rows = []
    for k, obj in enumerate(objs):
        if isinstance(obj, BadItem):
            rows.append((seq + k, 0.0, None, obj.fingerprint or None, obj.where or None,
                         obj.error, obj.id))
        else:
            rows.append((seq + k, obj.cost, obj.payload, obj.fingerprint or None,
                         obj.where or None, None, obj.id))
    if not journal.refresh_plain(rows):
        return False
    found.items += len(objs)
    found.bad.extend(o for o in objs if isinstance(o, BadItem))
    return True


def _chunk(journal: Journal, objs: list, seq: int, found: Intake, on_duplicate: str) -> int:
    if _first_time(journal, objs, seq, found) or _seen_before(journal, objs, seq, found):
        return seq + len(objs)
    seen = journal.seen([o.id for o in objs])
    fresh, again, changed, became_bad = [], [], [], []
    for obj in objs:
        old = seen.get(obj.id)
        if old is not None and old[2] == journal.gen:  # a repeated id in this input
            obj = _repeated(journal, obj, old, seen, found, on_duplicate)
            if obj is None:
                continue
            old = seen.get(obj.id)
        kept = old[3] if old is not None else None  # the name it got when first seen
        name = kept or obj.name or names.component(obj.id)
        key = None if kept else names.fold(name)
        bad = isinstance(obj, BadItem)
        if old is None:
            fresh.append(_new_row(obj, seq, name, key))
        else:
            again.append((seq, 0.0 if bad else obj.cost, None if bad else obj.payload,
                          None if kept else name, key, obj.fingerprint or None,
                          obj.where or None, obj.id))
            if (old[4] and obj.fingerprint and old[4] != obj.fingerprint
                    and old[1] in ("done", "failed")):
                changed.append((obj.id, obj.error if bad else None))
            elif bad and old[1] in ("pending", "running"):  # bad now: never dispatched
                became_bad.append((obj.id, obj.error))
        # the row as the journal now has it: a repeat later in this chunk is seen
        seen[obj.id] = (obj.id, "new", journal.gen, name, obj.fingerprint, obj.where)
        if bad:
            found.bad.append(obj)
        seq += 1
        found.items += 1
    for row in journal.insert(fresh):
        _rename(journal, row, found, lambda r, n, k: journal.insert([r[:6] + (n, k) + r[8:]]),
                name_at=6)
    for row in journal.refresh(again):
        _rename(journal, row, found, lambda r, n, k: journal.refresh([r[:3] + (n, k) + r[5:]]),
                name_at=3)
    for item_id, error in became_bad:
        journal.requeue_changed(item_id, error)
    for item_id, error in changed:
        journal.requeue_changed(item_id, error)
        found.changed += 1
        if len(found.first_changed) < 5:
            found.first_changed.append(item_id)
    return seq


def _rename(journal: Journal, row: tuple, found: Intake, write, name_at: int) -> None:
    """``row``'s name is taken under folding: the first free of <name>~<hash>, longer hashes."""
    item_id = row[0] if name_at == 6 else row[-1]
    name = row[name_at]
    for candidate in [name + names.tag(item_id), name + names.tag(item_id, 32)] + [
            f"{name}~{k}" for k in range(2, 1000)]:
        key = names.fold(candidate)
        if not journal.name_taken(key) and not write(row, candidate, key):
            found.renamed_count += 1
            if len(found.renamed) < 20:
                found.renamed.append((item_id, candidate))
            return
    raise InputRefused(f"item {item_id!r}: no free output name near {name!r}; rename the input")


def _repeated(journal: Journal, obj, old: tuple, seen: dict, found: Intake, on_duplicate: str):
    """A copy of an id already recorded in this input: refuse, skip, or give it a new id."""
    line = (f"id {obj.id!r} appears more than once: {_seen_where(old)} and {_where(obj)}")
    if on_duplicate == "error":
        raise InputRefused(f"{line}; make the ids unique, or set task.on_duplicate_id="
                           f"keep_first (ignore later copies) or suffix (rename them <id>#2, ...)")
    found.repeated += 1
    if not found.first_repeated:
        found.first_repeated = line
    if on_duplicate == "keep_first":
        return None
    n = 2
    while True:
        new_id = f"{obj.id}#{n}"
        if new_id not in seen:
            seen.update(journal.seen([new_id]))
        row = seen.get(new_id)
        if row is None or row[2] != journal.gen:
            break
        n += 1
    kind = type(obj)
    fields = {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    fields["id"] = new_id
    fields["name"] = ""  # named from its new id
    return kind(**fields)


def record_bad(rundir: RunDir, journal: Journal, bad: Iterable[BadItem],
               stage: str = "discovery") -> None:
    """``logs/errors/<name>.json`` for each item found bad at discovery (or at a watch look)."""
    for b in bad:
        atomic_write_json(rundir.error_file(journal.name_of(b.id)), {
            "item": b.id, "where": b.where or None, "stage": stage, "error": b.error,
            "time": time.time()})
