"""``python -m runner.ls [--outputs DIR] [--task T] [--since DATE] [--json]``: the runs under
``outputs`` (default ``./outputs``, the config's ``outputs``), one row each, newest first.

A row: task, start, status (as ``runner.status`` says it: running, done, failed items,
interrupted, crashed ...), items done/failed/pending, wall time, devices and the key
overrides (``.hydra/overrides.yaml`` less ``outputs=`` and ``task=``). A sweep
(``<outputs>/multirun/<task>/<stamp>``) is one row whose status and counts are its jobs'
together, with ``jobs`` = how many. Like ``runner.status`` it reads only the run dirs
(journals read-only, no lock taken), so it is safe beside running controllers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.rundir import SweepDir
from runner.status import controller, duration, is_run_dir, snapshot, stamp_time, started_at

#: overrides every run of a listing shares, or that only say where it lives: not shown
HIDDEN = ("outputs", "task")
#: when several jobs of a sweep disagree, the row says the worst (first here)
WORST = ("crashed", "running", "slots lost", "stopped (write refused)", "terminated",
         "interrupted", "hung up", "failed items", "not started", "done")


def overrides(run: Path) -> list[str]:
    """The run's own overrides (the first invocation's), less the hidden keys."""
    with contextlib.suppress(Exception):
        import yaml

        items = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
        keys = [o.lstrip("+~").split("=", 1)[0] for o in items]
        return [o for o, k in zip(items, keys) if k not in HIDDEN and not k.startswith("hydra.")]
    return []


def devices_of(snap: dict[str, Any]) -> str:
    """``cpu:0 cpu:1`` -> ``cpu x2``; ``cuda:0 cuda:1 cpu:2`` -> ``cuda x2, cpu``."""
    kinds: dict[str, int] = {}
    for s in snap["slots"]:
        k = str(s["device"]).split(":")[0]
        kinds[k] = kinds.get(k, 0) + 1
    return ", ".join(k + (f" x{n}" if n > 1 else "") for k, n in kinds.items()) or "-"


def run_row(run: Path) -> dict[str, Any]:
    snap = snapshot(run)
    c = snap["counts"] or {}
    return {"kind": "run", "dir": str(run), "task": snap["task"], "start": snap["started"],
            "status": snap["state"], "done": c.get("done", 0), "failed": c.get("failed", 0),
            "pending": c.get("pending", 0) + c.get("running", 0), "wall_s": snap["wall_s"],
            "devices": devices_of(snap), "overrides": overrides(run),
            "pid": snap["controller"]["pid"] if snap["controller"]["alive"] else None}


def sweep_row(sweep: Path) -> dict[str, Any]:
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and is_run_dir(p)),
                  key=lambda p: (len(p.name), p.name))
    rows = [run_row(j) for j in jobs]
    doc: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(SweepDir(sweep).json.read_text())
    states = {r["status"] for r in rows}
    if controller(SweepDir(sweep).lock)["alive"]:
        states.add("running")
    status = next((s for s in WORST if s in states), "not started" if not rows else
                  sorted(states)[0])
    walls = [r["wall_s"] for r in rows if isinstance(r["wall_s"], (int, float))]
    devs = sorted({r["devices"] for r in rows if r["devices"] != "-"})
    varying = doc.get("varying") or []
    return {"kind": "sweep", "dir": str(sweep), "task": doc.get("task") or sweep.parent.name,
            "start": started_at(sweep), "status": status, "jobs": len(rows),
            "done": sum(r["done"] for r in rows), "failed": sum(r["failed"] for r in rows),
            "pending": sum(r["pending"] for r in rows),
            "wall_s": round(max(walls), 1) if walls else None, "devices": ", ".join(devs) or "-",
            "overrides": [f"{k}: {len(rows)} values" for k in varying] or
            (rows[0]["overrides"] if rows else []),
            "job_rows": rows}


def listing(outputs: Path, task: str | None = None, since: float | None = None
            ) -> list[dict[str, Any]]:
    """Every run and sweep under ``outputs``, newest first."""
    outputs = Path(outputs)
    rows = [run_row(p) for p in outputs.glob("*/*")
            if p.parent.name != "multirun" and is_run_dir(p)]
    rows += [sweep_row(p) for p in outputs.glob("multirun/*/*") if p.is_dir()
             and (SweepDir(p).json.is_file() or any(is_run_dir(j) for j in p.iterdir()))]
    if task:
        rows = [r for r in rows if r["task"] == task]
    if since is not None:
        rows = [r for r in rows if r["start"] >= since]
    return sorted(rows, key=lambda r: r["start"], reverse=True)


def parse_since(text: str) -> float:
    """``2026-12-02``, ``2026-12-02 14:00``, ISO ``2026-12-02T14:00:05``, a run dir's name,
    or ``3d`` / ``12h`` / ``30m`` ago."""
    text = text.strip()
    if text[:-1].isdigit() and text[-1:] in "dhm" and text[:-1]:
        return time.time() - int(text[:-1]) * {"d": 86400, "h": 3600, "m": 60}[text[-1]]
    t = stamp_time(text)
    if t is not None:
        return t
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text).timestamp()
    raise SystemExit(f"runner.ls: error: --since {text!r}: give a date (2026-12-02), a time "
                     f"(2026-12-02 14:00) or an age (3d, 12h, 30m)")


def render(rows: list[dict[str, Any]], width: int = 100) -> str:
    head = (f"{'task':<10} {'start':<16} {'status':<13} {'done':>6} {'fail':>5} {'left':>5} "
            f"{'wall':>7}  {'devices':<10} overrides")
    lines = [head]
    for r in rows:
        start = datetime.fromtimestamp(r["start"]).strftime("%Y-%m-%d %H:%M")
        ov = " ".join(r["overrides"])
        if r["kind"] == "sweep":
            ov = f"sweep of {r['jobs']} jobs: " + ov
        line = (f"{r['task'][:10]:<10} {start:<16} {r['status'][:13]:<13} {r['done']:>6} "
                f"{r['failed']:>5} {r['pending']:>5} {duration(r['wall_s']):>7}  "
                f"{r['devices'][:10]:<10} {ov}")
        lines.append(line if len(line) <= width else line[:width - 1] + "…")
    if not rows:
        lines.append("(no runs)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.ls", description=__doc__.split("\n\n")[0])
    p.add_argument("--outputs", default="outputs", help="where runs are (default ./outputs)")
    p.add_argument("--task", help="only this task's runs")
    p.add_argument("--since", help="only runs started since (2026-12-02, '2026-12-02 14:00', 3d)")
    p.add_argument("--json", action="store_true", help="one JSON list, a dict per row")
    p.add_argument("--dirs", action="store_true", help="add each run's dir below its row")
    a = p.parse_args(argv)
    if not Path(a.outputs).is_dir():
        print(f"runner.ls: error: {a.outputs} is not a folder (--outputs DIR)", file=sys.stderr)
        return 1
    rows = listing(Path(a.outputs), a.task, parse_since(a.since) if a.since else None)
    if a.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    import shutil

    width = max(shutil.get_terminal_size((100, 24)).columns, 80)
    text = render(rows, width)
    if a.dirs:
        out = text.splitlines()[:1]
        for line, r in zip(text.splitlines()[1:], rows):
            out += [line, f"  {r['dir']}"]
        text = "\n".join(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
