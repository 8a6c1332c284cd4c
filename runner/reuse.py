"""Reusing an earlier run: ``reuse=latest|<run dir>`` -- a new run makes only what is new.

A nightly run over a growing archive should not recompute yesterday's items. With
``reuse=``, a *new* run dir is made as always; after discovery, every item that an earlier
run of the same task already did -- the same id, the same fingerprint (text hash; size +
mtime for files), the same name, and outputs made with the same output-affecting config
(the task group as ``resume`` compares it, and the model: an item made by a fallback model
is reused only with ``reuse.accept_fallback=true``) -- is journalled ``done`` with
``reused_from`` = the earlier run dir, and its output files are hard-linked (else copied;
never symlinked) into the new run dir. Everything else runs. The new run dir is complete
on its own: deleting the earlier one breaks nothing, and it can be reused tomorrow.

One SQL statement matches all items (the earlier journal is ATTACHed read-only in spirit:
nothing is written to it); memory does not grow with the number of items. A file that
cannot be linked (gone from the earlier run) puts its item back to pending. Tasks whose
items share output files (embed's shards) get the shards holding reused rows linked under
their own names, and the new run numbers its batches after the earlier run's, so a new
shard never takes a linked one's name; the task's finalize drops rows of items that were
not reused (changed or removed) from the linked shards, writing new files, never the
earlier run's.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import journal_schema
from runner.errors import ConfigError
from runner.journal import Journal
from runner.resume import diff, find_run
from runner.rundir import RunDir

log = logging.getLogger("runner")


@dataclass(frozen=True)
class ReuseReport:
    """What reuse= found: counts for the log, the dry run and summary.json."""

    source: str  # the earlier run dir ("" when none was usable)
    reused: int = 0
    changed: int = 0  # done there, but their input changed since: made again
    new: int = 0  # not in the earlier run
    removed: int = 0  # in the earlier run, gone from the input: not copied
    linked_files: int = 0
    why_none: str = ""  # why nothing could be reused (a config change), or ""

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.source, "reused": self.reused, "new": self.new,
                "changed": self.changed, "removed": self.removed,
                "linked_files": self.linked_files, "nothing_because": self.why_none or None}

    def line(self) -> str:
        if self.why_none:
            return f"reuse: nothing reused from {self.source}: {self.why_none}"
        return (f"reuse: {self.reused} item(s) reused from {self.source} ({self.linked_files} "
                f"file(s) linked); {self.new} new, {self.changed} changed, {self.removed} "
                f"removed from the input")


def find_source(outputs: str, task: str, value: str, current: Path) -> Path:
    """The run dir ``reuse=`` names: ``latest`` = the newest run of ``task`` under ``outputs``
    with a journal, other than ``current``; else the path given. One-line errors."""
    path = find_run(outputs, task, value, key="reuse", exclude=current)
    if path.resolve() == current.resolve():
        raise ConfigError(f"reuse={value} is this run's own dir; to finish a run use resume=")
    return path


def _config_change(source: Path, task_cfg: dict, safe_keys: tuple[str, ...]) -> str:
    """How the earlier run's output-affecting task config differs from this one ('' = not)."""
    try:
        old = json.loads(RunDir(source).task_config.read_text())
    except (OSError, ValueError):
        return f"its {RunDir(source).task_config.name} cannot be read"
    changes = [c for c in diff(old, task_cfg) if c[0] not in safe_keys and c[0] != "input"]
    return "; ".join(f"task.{k}: {a!r} -> {b!r}" for k, a, b in changes[:3])


def apply(journal: Journal, rundir: RunDir, source: Path, task: Any, task_cfg: dict,
          first_models: set[str], accept_fallback: bool, link: bool = True) -> ReuseReport:
    """Match this run's discovered (pending) items against ``source``'s done ones, mark the
    matches done and link their files (``link=False``: a dry run counts only)."""
    journal_schema.verify(RunDir(source).journal)
    change = _config_change(source, task_cfg, tuple(getattr(task, "resume_safe_keys", ())))
    db = journal.db
    db.execute("ATTACH DATABASE ? AS prev", (str(RunDir(source).journal),))
    try:
        gen = journal.gen
        prev_cols = {r[1] for r in db.execute("PRAGMA prev.table_info(items)")}
        fp = "p.fingerprint" if "fingerprint" in prev_cols else "NULL"
        counts = db.execute(
            f"SELECT SUM(p.id IS NULL), SUM(p.status='done' AND ({fp} IS NULL OR "
            f"{fp} != i.fingerprint)) FROM items i LEFT JOIN prev.items p ON p.id = i.id "
            f"WHERE i.gen=?", (gen,)).fetchone()
        removed = db.execute("SELECT COUNT(*) FROM prev.items p WHERE p.status='done' AND NOT "
                             "EXISTS (SELECT 1 FROM items i WHERE i.id=p.id AND i.gen=?)",
                             (gen,)).fetchone()[0]
        new, changed = int(counts[0] or 0), int(counts[1] or 0)
        if change:
            return ReuseReport(str(source), new=new, changed=changed, removed=removed,
                               why_none=f"the task config changed ({change})")
        models = "" if accept_fallback else (
            f"AND p.model IN ({','.join('?' * len(first_models))})" if first_models else "AND 0")
        reused = db.execute(
            "UPDATE items SET status='done', output=p.output, model=p.model, "
            "batch_size=p.batch_size, started=p.started, finished=p.finished, slot=p.slot, "
            "device=p.device, placed=p.placed, warning=p.warning, output_key=p.output_key, "
            "attempts=0, error=NULL, reused_from=? FROM prev.items AS p "
            "WHERE items.id = p.id AND items.gen = ? AND items.status = 'pending' "
            "AND p.status = 'done' AND p.fingerprint IS NOT NULL "
            f"AND items.fingerprint = p.fingerprint AND items.name = p.name {models}",
            (str(source), gen, *([] if accept_fallback else sorted(first_models)))).rowcount
        prev_batches = db.execute("SELECT value FROM prev.meta WHERE key='batch_no'").fetchone()
    finally:
        journal.commit()
        db.execute("DETACH DATABASE prev")
    if prev_batches:  # a new shard must never take a linked shard's name
        journal.raise_batch_no(int(json.loads(prev_batches[0])))
    linked = _link_outputs(journal, rundir, source, task, str(source)) if link and reused else 0
    return ReuseReport(str(source), reused=reused, changed=changed, new=new, removed=removed,
                       linked_files=linked)


def _link_outputs(journal: Journal, rundir: RunDir, source: Path, task: Any, src: str) -> int:
    """Hard-link (else copy) every output file of the reused items into the new run dir; an
    item whose file cannot be had goes back to pending. The number of files linked."""
    files_of = getattr(task, "output_files", None) or (lambda output: [output])
    linked, missing, made_dirs = 0, [], set()
    for output, ids in journal.reused_outputs(src):
        for rel in files_of(output):
            dst = rundir.root / rel
            if dst.parent not in made_dirs:
                dst.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(dst.parent)
            try:
                os.link(source / rel, dst)
            except FileExistsError:
                pass
            except OSError:
                try:
                    shutil.copy2(source / rel, dst)
                except OSError as exc:
                    log.warning("reuse: %s cannot be linked or copied (%s): made again", rel,
                                exc.strerror)
                    missing.extend(ids)
                    break
            linked += 1
    journal.unreuse(missing)
    return linked
