"""Shared by the bench scripts: run the real CLI in a subprocess and read its run dir.

Nothing here imports torch. A run is timed from ``Popen`` to exit on the parent's clock
(``time.time()``, the same clock the journal's ``started``/``finished`` use), so start-up,
model loading, finalize, summary and timeline.png all count in ``wall_s``; the journal then
says where inside that wall the items actually ran.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CliRun:
    """One ``python -m runner ...`` invocation, timed from launch to exit."""

    argv: list[str]
    returncode: int
    launch: float  # time.time() just before Popen
    exit: float  # time.time() just after the process ended
    run_dir: Path | None
    output_tail: str
    summary: dict = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.exit - self.launch


def run_cli(overrides: list[str], outputs: Path, log_path: Path, timeout_s: float = 3600) -> CliRun:
    """Run the CLI with ``overrides`` (plus outputs= and progress=off) in a fresh process."""
    outputs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "runner", *overrides, f"outputs={outputs}", "progress=off"]
    with open(log_path, "wb") as out:
        launch = time.time()
        proc = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s, check=False)
        end = time.time()
    tail = log_path.read_text(errors="replace")[-3000:]
    dirs = sorted(p.parent for p in outputs.glob("*/*/summary.json"))
    run_dir = dirs[-1] if dirs else None
    summary = json.loads((run_dir / "summary.json").read_text()) if run_dir else {}
    return CliRun(argv, proc.returncode, launch, end, run_dir, tail, summary)


def journal_rows(run_dir: Path) -> list[tuple[int, float, float, str]]:
    """(slot, started, finished, status) of every item that ran (journal.sqlite ``items``)."""
    db = sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT slot, started, finished, status FROM items "
                          "WHERE started IS NOT NULL AND finished IS NOT NULL").fetchall()
    finally:
        db.close()


def span(rows: list[tuple[int, float, float, str]]) -> tuple[float, float]:
    """(first item start, last item finish): the makespan's ends."""
    return min(r[1] for r in rows), max(r[2] for r in rows)


def slot_gaps(rows: list[tuple[int, float, float, str]]) -> dict[str, Any]:
    """Idle time between consecutive batches of the same slot (dispatch + result overhead).

    Items processed together share (started, finished), so distinct pairs are batches.
    """
    per: dict[int, set] = {}
    for slot, s, f, _ in rows:
        per.setdefault(slot, set()).add((s, f))
    gaps, busy, batches = [], 0.0, 0
    first_last = {}
    for slot, pairs in per.items():
        pairs = sorted(pairs)
        batches += len(pairs)
        busy += sum(f - s for s, f in pairs)
        gaps += [max(0.0, b[0] - a[1]) for a, b in zip(pairs, pairs[1:])]
        first_last[slot] = (pairs[0][0], pairs[-1][1])
    return {"batches": batches, "busy_s": busy, "gap_total_s": sum(gaps),
            "gap_median_ms": 1000 * median(gaps) if gaps else 0.0,
            "gap_mean_ms": 1000 * sum(gaps) / len(gaps) if gaps else 0.0,
            "gap_max_ms": 1000 * max(gaps) if gaps else 0.0, "slots": len(per),
            "first_last": first_last}


def _log_time(line: str) -> float | None:
    # [2026-11-23 09:33:10,123][INFO] ...  (hydra job_logging, local time)
    try:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def log_events(run_dir: Path) -> dict[str, Any]:
    """Times from runner.log: when the controller started the workers, when each was ready."""
    out: dict[str, Any] = {"spawn": None, "ready": {}, "load_s": {}}
    log = run_dir / "runner.log"
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            t = _log_time(line)
            if t is None:
                continue
            if "item(s) to do on" in line and out["spawn"] is None:
                out["spawn"] = t
            elif "] worker " in line and " ready: " in line:
                label = line.split("] worker ", 1)[1].split(" ready", 1)[0]
                out["ready"][label] = t
    for wlog in sorted((run_dir / "logs").glob("worker-*.log")):
        for line in wlog.read_text(errors="replace").splitlines():
            if line.startswith("loaded ") and " in " in line and line.endswith("s"):
                with_slot = line.split(" on ", 1)[1]
                label, secs = with_slot.rsplit(" in ", 1)
                out["load_s"][label] = float(secs[:-1])
    return out


def breakdown(run: CliRun) -> dict[str, Any]:
    """Where a CLI run's wall time went, from runner.log, worker logs and the journal."""
    rows = journal_rows(run.run_dir)
    first, last = span(rows)
    ev = log_events(run.run_dir)
    gaps = slot_gaps(rows)
    spawn = ev["spawn"]
    ready = ev["ready"]
    out = {
        "wall_s": run.wall_s,
        "controller_start_s": (spawn - run.launch) if spawn else None,
        "worker_ready_s": {k: v - spawn for k, v in ready.items()} if spawn else {},
        "model_load_s": ev["load_s"],
        "first_item_after_launch_s": first - run.launch,
        "items_span_s": last - first,
        "after_last_item_s": run.exit - last,
        "batches": gaps["batches"],
        "batch_busy_s": gaps["busy_s"],
        "gap_total_s": gaps["gap_total_s"],
        "gap_median_ms": gaps["gap_median_ms"],
        "gap_max_ms": gaps["gap_max_ms"],
        "slot_span_s": {str(k): v[1] - v[0] for k, v in gaps["first_last"].items()},
        "slot_first_start_after_launch_s": {str(k): v[0] - run.launch
                                            for k, v in gaps["first_last"].items()},
        "slot_last_finish_before_exit_s": {str(k): run.exit - v[1]
                                           for k, v in gaps["first_last"].items()},
        "items": len(rows),
    }
    return out


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain text table (floats: 3 decimals below 10, else 1)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in cells]
    return "\n".join(out)


def write_json(path: Path | None, obj: Any) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def machine() -> dict[str, Any]:
    import os
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "loadavg_at_start": load,
            "time": datetime.now().isoformat(timespec="seconds")}
