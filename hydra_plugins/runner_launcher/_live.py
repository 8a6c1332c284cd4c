"""The live view of a sweep: one line per job — device, status, elapsed, items done.

Items done come from the job's own journal (``journal.sqlite``, opened read-only, so the
job's controller stays its only writer) while it runs, and from its ``summary.json`` once
it has ended. On a terminal the block is redrawn in place; otherwise (logs, CI) it is
printed whenever a job changes state and at least every ``every_s`` seconds.
"""
from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO

from runner.rundir import RunDir
from runner.sweep import JobRecord, JobState, split_override


def items_done(job_dir: str) -> Optional[tuple[int, int]]:
    """(done, total) for a runner job dir, or None when it has no journal (yet)."""
    summary = RunDir(Path(job_dir)).summary
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            counts = s.get("counts") or {}
            return int(s.get("items_done", 0)), int(sum(counts.values()) or 0)
        except (OSError, ValueError, TypeError):
            pass
    path = RunDir(Path(job_dir)).journal
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
        try:
            rows = dict(db.execute("SELECT status, count(*) FROM items GROUP BY status").fetchall())
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return int(rows.get("done", 0)), int(sum(rows.values()))


def line(r: JobRecord, label_keys: Sequence[str]) -> str:
    mine = dict(split_override(o) for o in r.overrides)
    what = " ".join(f"{k}={mine[k]}" for k in label_keys if k in mine) or " ".join(r.overrides)
    wall = r.wall_s
    elapsed = f"{wall:7.1f}s" if wall is not None else " " * 8
    counts = items_done(r.dir) if r.started is not None else None
    done = f"{counts[0]:>6}/{counts[1]:<6}" if counts else " " * 13
    why = f"  [{r.reason}]" if r.reason and r.state != JobState.OK else ""
    return f"  #{r.num:<3} {r.device or '-':<8} {r.state.value:<12} {elapsed} {done} {what}{why}"


class LiveView:
    """Prints the block; ``mode`` is auto | plain | off."""

    def __init__(self, mode: str, every_s: float, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.mode = "off" if mode == "off" else ("tty" if mode == "auto" and tty else "plain")
        self.every_s = every_s
        self._drawn = 0
        self._last = 0.0
        self._last_states: tuple = ()

    def message(self, text: str) -> None:
        """A line above the block (a job failed, the sweep stops handing out jobs)."""
        if self.mode == "off":
            return
        self._erase()
        print(text, file=self.stream, flush=True)

    def update(self, records: Sequence[JobRecord], keys: Sequence[str],
               force: bool = False) -> None:
        if self.mode == "off":
            return
        now = time.monotonic()
        states = tuple((r.num, r.state) for r in records)
        changed = states != self._last_states
        if self.mode == "plain" and not (force or changed or now - self._last >= self.every_s):
            return
        if self.mode == "tty" and not (force or changed or now - self._last >= 0.5):
            return
        self._last, self._last_states = now, states
        block = ["sweep: " + ", ".join(f"{sum(r.state == s for r in records)} {s.value}"
                                       for s in JobState if any(r.state == s for r in records))]
        block += [line(r, keys) for r in records]
        self._erase()
        print("\n".join(block), file=self.stream, flush=True)
        self._drawn = len(block) if self.mode == "tty" else 0

    def _erase(self) -> None:
        if self.mode == "tty" and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
