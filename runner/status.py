"""``python -m runner.status [RUN|latest] [--once] [--json]``: how far a run is, from another
terminal, without attaching to it.

It reads only the run dir -- ``journal.sqlite`` opened read-only (a WAL reader never blocks
the controller's writes, nor they it), ``summary.json``, ``plan.yaml``, the lock file --
and shows per slot the items done, items/s, the item it runs now and for how long, its last
error; the totals with an ETA; whether the controller is alive (its PID, and whether it
holds the run dir's lock). It works on a running, finished, interrupted or crashed run.

``RUN`` is a run dir, or ``latest`` (default): the newest run dir of any task under
``--outputs`` (default ``./outputs``, the config's ``outputs``), sweep jobs included. On a
TTY it refreshes (rich) until the run ends or ``q`` is pressed; ``--once`` (or output that
is not a terminal) prints one snapshot; ``--json`` prints :func:`snapshot` as JSON.

Run states (:func:`run_state`): ``running`` (a controller holds the lock), ``done``,
``failed items``, ``interrupted`` / ``terminated`` / ``hung up`` (the summary's exit code
130 / 143 / 129), ``stopped (write refused)`` (4), ``slots lost``, ``crashed`` (no
controller and items left ``running``, or no summary at all), ``not started`` (no journal).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.rundir import RunDir, SweepDir

STAMP = "%Y-%m-%d_%H-%M-%S.%f"
EXIT_STATES = {0: "done", 3: "failed items", 4: "stopped (write refused)",
               129: "hung up", 130: "interrupted", 143: "terminated"}


# ---- finding run dirs ------------------------------------------------------------------------
def stamp_time(name: str) -> float | None:
    """Epoch seconds of a run dir's name (``2026-12-02_01-20-09.739212``), or None."""
    with contextlib.suppress(ValueError):
        return datetime.strptime(name, STAMP).timestamp()
    return None


def is_run_dir(path: Path) -> bool:
    rd = RunDir(path)
    return path.is_dir() and any(p.exists() for p in (rd.plan, rd.journal, rd.summary,
                                                      rd.hydra_dir))


def run_dirs(outputs: Path) -> list[Path]:
    """Every run dir under ``outputs`` (``<task>/<stamp>`` and the jobs of
    ``multirun/<task>/<stamp>/<n>``), newest first (by the name's time, else mtime)."""
    outputs = Path(outputs)
    found = [p for p in outputs.glob("*/*") if p.parent.name != "multirun" and is_run_dir(p)]
    found += [p for p in outputs.glob("multirun/*/*/*") if is_run_dir(p)]
    return sorted(found, key=started_at, reverse=True)


def started_at(run: Path) -> float:
    """When the run (or, for a sweep job, its sweep) started: its dir's name, else mtime."""
    for name in (run.name, run.parent.name):
        t = stamp_time(name)
        if t is not None:
            return t
    with contextlib.suppress(OSError):
        return run.stat().st_mtime
    return 0.0


def resolve(run: str | None, outputs: Path) -> Path:
    """A run dir from the command line's ``RUN`` (a path, or ``latest``/None)."""
    if run and run != "latest":
        path = Path(run)
        if not path.is_dir():
            raise SystemExit(f"runner.status: error: {run} is not a folder")
        if SweepDir(path).json.is_file() and not is_run_dir(path):  # a sweep: its newest job
            jobs = sorted((p for p in path.iterdir() if is_run_dir(p)),
                          key=lambda p: p.stat().st_mtime, reverse=True)
            if jobs:
                return jobs[0]
        return path
    runs = run_dirs(outputs)
    if not runs:
        raise SystemExit(f"runner.status: error: no run dir under {outputs}/ (give one, or "
                         f"--outputs DIR)")
    return runs[0]


# ---- reading one run dir ---------------------------------------------------------------------
def controller(lock: Path) -> dict[str, Any]:
    """Whether a controller holds ``lock`` (never taken here: a shared, non-blocking try on a
    read-only descriptor, released at once) and what the holder wrote in it."""
    info: dict[str, Any] = {"alive": False, "lock_held": False, "pid": None, "host": None,
                            "since": None}
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return info
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace")
        words = dict(w.split("=", 1) for w in text.split() if "=" in w)
        info.update(pid=int(words["pid"]) if words.get("pid", "").isdigit() else None,
                    host=words.get("host"), since=words.get("since"))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                info["lock_held"] = True
    finally:
        os.close(fd)
    info["alive"] = info["lock_held"]
    return info


def open_journal(path: Path, live: bool) -> sqlite3.Connection:
    """The journal, read-only. A journal with no ``-wal`` beside it and no controller has all
    it holds in the main file: opened ``immutable`` so that reading leaves no -wal/-shm
    behind; else a plain WAL reader (never blocks the writer)."""
    wal = Path(f"{path}-wal").exists()
    flags = "mode=ro" if live or wal else "immutable=1"
    return sqlite3.connect(f"file:{path}?{flags}", uri=True, timeout=1.0)


def _read_json(path: Path) -> Any:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return None


def _read_plan(path: Path) -> dict[str, Any]:
    with contextlib.suppress(Exception):
        import yaml

        return yaml.safe_load(path.read_text()) or {}
    return {}


def run_state(alive: bool, summary: dict | None, counts: dict[str, int] | None) -> str:
    """One word or two for the run (see the module's docstring)."""
    if alive:
        return "running"
    if counts is None:
        return "not started" if summary is None else EXIT_STATES.get(summary.get("exit_code"),
                                                                      "ended")
    if counts.get("running"):
        return "crashed"  # items in flight and no controller: it died without cleaning up
    if summary is None:
        return "crashed"
    code = summary.get("exit_code")
    if code == 3 and summary.get("status") == "slots lost":
        return "slots lost"
    return EXIT_STATES.get(code, f"exit {code}")


def snapshot(run: Path, now: float | None = None) -> dict[str, Any]:
    """Everything ``runner.status`` shows about ``run``, as plain data (``--json``)."""
    run = Path(run)
    rd = RunDir(run)
    now = time.time() if now is None else now
    ctl = controller(rd.lock)
    summary = _read_json(rd.summary)
    plan = _read_plan(rd.plan)
    labels = {int(s["index"]): s.get("device", "?") for s in plan.get("slots") or []
              if isinstance(s, dict) and "index" in s}
    planned = {int(s["index"]): s.get("planned_items") for s in plan.get("slots") or []
               if isinstance(s, dict) and "index" in s}
    snap: dict[str, Any] = {
        "run_dir": str(run), "task": plan.get("task") or run.parent.name,
        "started": started_at(run), "controller": ctl, "counts": None, "slots": [],
        "rate": None, "eta_s": None, "errors": [], "summary": None,
        "outputs": plan.get("outputs"), "errors_dir": str(rd.errors),
    }
    if summary:
        snap["summary"] = {k: summary.get(k) for k in ("status", "exit_code", "wall_s",
                                                        "items_done", "items_per_s")}
    if rd.journal.is_file():
        try:
            db = open_journal(rd.journal, ctl["alive"])
            try:
                _from_journal(db, snap, labels, planned, now)
            finally:
                db.close()
        except sqlite3.Error as exc:
            snap["journal_error"] = str(exc)
    snap["state"] = run_state(ctl["alive"], summary, snap["counts"])
    snap["wall_s"] = _wall(snap, summary, now)
    return snap


def _from_journal(db: sqlite3.Connection, snap: dict, labels: dict[int, str],
                  planned: dict[int, Any], now: float) -> None:
    row = db.execute("SELECT value FROM meta WHERE key='gen'").fetchone()
    gen = int(json.loads(row[0])) if row else 0
    counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    counts.update(dict(db.execute("SELECT status, COUNT(*) FROM items WHERE gen=? "
                                  "GROUP BY status", (gen,)).fetchall()))
    counts["total"] = sum(counts[k] for k in ("pending", "running", "done", "failed"))
    snap["counts"] = counts
    # this invocation's window: what was started since its first item (a resume's own rate)
    per = {s: (d, f, t0, t1) for s, d, f, t0, t1 in db.execute(
        "SELECT slot, SUM(status='done'), SUM(status='failed'), MIN(started), MAX(finished) "
        "FROM items WHERE gen=? AND slot IS NOT NULL AND status IN ('done','failed') "
        "GROUP BY slot", (gen,))}
    for s, dev in db.execute("SELECT DISTINCT slot, device FROM items WHERE slot IS NOT NULL"):
        labels.setdefault(int(s), dev or "?")
    slots = []
    for s in sorted(labels):
        done, failed, t0, t1 = per.get(s, (0, 0, None, None))
        cur = db.execute("SELECT id, started, COUNT(*) OVER () FROM items WHERE slot=? AND "
                         "status='running' ORDER BY started LIMIT 1", (s,)).fetchone()
        err = db.execute("SELECT id, error FROM items WHERE slot=? AND error IS NOT NULL AND "
                         "gen=? ORDER BY COALESCE(finished, started) DESC LIMIT 1",
                         (s, gen)).fetchone()
        end = now if cur else (t1 or now)
        span = (end - t0) if t0 else 0.0
        slots.append({
            "slot": s, "device": labels[s], "done": int(done or 0), "failed": int(failed or 0),
            "planned": planned.get(s),
            "items_per_s": round(done / span, 3) if done and span > 0 else 0.0,
            "current": cur[0] if cur else None, "running": int(cur[2]) if cur else 0,
            "current_for_s": round(max(now - cur[1], 0.0), 1) if cur and cur[1] else None,
            "last_error": {"id": err[0], "error": err[1]} if err else None})
    snap["slots"] = slots
    t0, t1 = db.execute("SELECT MIN(started), MAX(finished) FROM items WHERE gen=? AND "
                        "status='done'", (gen,)).fetchone()
    if t0 and counts["done"]:
        span = (now if snap["controller"]["alive"] else (t1 or now)) - t0
        rate = counts["done"] / span if span > 0 else 0.0
        snap["rate"] = round(rate, 3)
        left = counts["pending"] + counts["running"]
        if snap["controller"]["alive"] and rate > 0:
            snap["eta_s"] = round(left / rate, 1)
    snap["errors"] = [{"id": i, "device": d, "error": e} for i, d, e in db.execute(
        "SELECT id, device, error FROM items WHERE gen=? AND status='failed' "
        "ORDER BY finished DESC LIMIT 3", (gen,))]
    snap["first_started"], snap["last_finished"] = db.execute(
        "SELECT MIN(started), MAX(finished) FROM items").fetchone()


def _wall(snap: dict, summary: dict | None, now: float) -> float | None:
    if snap["controller"]["alive"]:
        return round(now - snap["started"], 1)
    if summary and isinstance(summary.get("wall_s"), (int, float)):
        return summary["wall_s"]
    last = snap.get("last_finished")
    return round(last - snap["started"], 1) if last else None


# ---- showing it ------------------------------------------------------------------------------
def duration(s: float | None) -> str:
    """``3.2s``, ``4m05s``, ``2h03m``; ``-`` for None."""
    if s is None:
        return "-"
    s = max(float(s), 0.0)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _cut(text: str, width: int) -> str:
    text = str(text).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def render(snap: dict[str, Any], width: int = 80) -> str:
    """The snapshot as lines no wider than ``width``."""
    ctl, c = snap["controller"], snap["counts"]
    when = datetime.fromtimestamp(snap["started"]).strftime("%Y-%m-%d %H:%M:%S")
    lines = [f"run     {snap['run_dir']}", f"task    {snap['task']}, started {when}, "
             f"wall {duration(snap['wall_s'])}"]
    who = (f"controller pid {ctl['pid']}" + (f" on {ctl['host']}" if ctl["host"] else "")
           + (f" since {ctl['since']}" if ctl["since"] else ""))
    if ctl["alive"]:
        lines.append(f"state   running: {who}, holds the run dir's lock")
    elif ctl["pid"]:
        lines.append(f"state   {snap['state']}: no controller (last: pid {ctl['pid']}, "
                     f"lock free)")
    else:
        lines.append(f"state   {snap['state']}: no controller")
    if c is None:
        lines.append("items   no journal (" + snap.get("journal_error", "none yet") + ")")
    else:
        lines.append(f"items   {c['done']}/{c['total']} done, {c['failed']} failed, "
                     f"{c['running']} running, {c['pending']} pending"
                     + (f"; {snap['rate']:.2f} items/s" if snap["rate"] else "")
                     + (f"; ETA {duration(snap['eta_s'])}" if snap["eta_s"] is not None else ""))
    if snap["slots"]:
        lines.append(f"{'slot':<5}{'device':<9}{'done':>6}{'fail':>5}{'items/s':>9}  "
                     f"current item (for)")
        for s in snap["slots"]:
            cur = "-"
            if s["current"]:
                more = f" +{s['running'] - 1}" if s["running"] > 1 else ""
                cur = f"{s['current']}{more} ({duration(s['current_for_s'])})"
            done = f"{s['done']}" + (f"/{s['planned']}" if s.get("planned") else "")
            lines.append(_cut(f"{s['slot']:<5}{s['device']:<9}{done:>6}{s['failed']:>5}"
                              f"{s['items_per_s']:>9.2f}  {cur}", width))
        for s in snap["slots"]:
            if s["last_error"]:
                e = s["last_error"]
                lines.append(_cut(f"last error [{s['device']}] {e['id']}: {e['error']}", width))
    paths = ([f"outputs {snap['outputs']}"] if snap.get("outputs") else []) + (
        [f"errors  {snap['errors_dir']}"] if c and c["failed"] else [])
    # paths are never cut: they are what a user copies
    return "\n".join([lines[0]] + [_cut(line, width) for line in lines[1:]] + paths)


def _live(run: Path, every_s: float) -> None:
    """Refresh on a TTY until the run is no longer running, or q / Ctrl-C."""
    import select
    import termios
    import tty

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    old = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                snap = snapshot(run)
                footer = "\n(q to leave)" if snap["state"] == "running" else ""
                live.update(Text(render(snap, console.width) + footer), refresh=True)
                if snap["state"] != "running":
                    return
                if fd is None:
                    time.sleep(every_s)
                    continue
                ready, _, _ = select.select([fd], [], [], every_s)
                if ready and os.read(fd, 1) in (b"q", b"Q"):
                    return
    except KeyboardInterrupt:
        pass
    finally:
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.status", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="latest", help="a run dir, or latest (default)")
    p.add_argument("--once", action="store_true", help="print one snapshot and leave")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    p.add_argument("--outputs", default="outputs", help="where runs are (default ./outputs)")
    p.add_argument("--every", type=float, default=1.0, help="refresh period, s (default 1)")
    a = p.parse_args(argv)
    run = resolve(a.run, Path(a.outputs))
    if a.json:
        print(json.dumps(snapshot(run), indent=2, default=str))
    elif a.once or not sys.stdout.isatty():
        print(render(snapshot(run), 80 if not sys.stdout.isatty() else
                     os.get_terminal_size().columns))
    else:
        _live(run, a.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
