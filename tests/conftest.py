"""Helpers the test files share (no tests here): ``python -m runner`` as a subprocess, waits on
what a run leaves behind, and readers of a run dir (journal, summary, worker logs).

Plain functions: ``from tests.conftest import run_cli, wait_until, ...`` (tests/ is a package).
Only the standard library is imported at module level; what needs ``runner`` or a test task
imports it when called.

Waiting: never a fixed sleep standing for "the run got somewhere". :func:`wait_until` polls
something a run makes observable -- a journal row (committed every 0.5 s), a marker file a test
task writes, a log line -- and fails, instead of hanging, on its deadline or when the watched
run ends first.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]  # the repository: cwd of every run


# ---- python -m runner as a subprocess ---------------------------------------------------------
def cli(args: Sequence[str]) -> list[str]:
    """The argv of ``python -m runner <args>`` with this interpreter."""
    return [sys.executable, "-m", "runner", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_cli(args: Sequence[str], timeout: float = 120,
            **kw: Any) -> "subprocess.CompletedProcess[str]":
    """``python -m runner <args>`` to the end, from the repository, output captured as text.
    ``kw`` goes to ``subprocess.run`` (``env=`` replaces the default environment)."""
    kw.setdefault("cwd", ROOT)
    kw.setdefault("env", _env())
    return subprocess.run(cli(args), capture_output=True, text=True, timeout=timeout, **kw)


def start_run(args: Sequence[str], **kw: Any) -> "subprocess.Popen[str]":
    """``python -m runner`` in the background, in a session of its own: killpg reaches the
    controller and its workers, like a TTY's ^C. ``kw`` goes to ``subprocess.Popen``."""
    kw.setdefault("cwd", ROOT)
    kw.setdefault("env", _env())
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    # Ctrl-C as a terminal delivers it: the suite may itself run with SIGINT ignored (a
    # shell's background job), which a child would inherit
    kw.setdefault("preexec_fn", _default_sigint)
    return subprocess.Popen(cli(args), text=True, start_new_session=True, **kw)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(cond: Callable[[], Any], timeout: float = 60.0, *, proc: Any = None,
               poll_s: float = 0.02) -> Any:
    """Poll ``cond()`` until it gives something truthy, and return that.

    The hang guard: an AssertionError after ``timeout`` seconds, or as soon as ``proc`` (the
    run being watched, if given) has ended, with the end of its stderr.
    """
    what = getattr(cond, "__name__", repr(cond))
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            err = proc.communicate()[1] or ""
            raise AssertionError(f"the run ended early (exit {proc.returncode}) while waiting "
                                 f"for {what}: {err[-2000:]}")
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll_s)


def stop_leftover(proc: Any) -> None:
    """SIGKILL what is left of a run started by :func:`start_run` (its whole session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def vm_hwm_kb(pid: int) -> int:
    """The peak resident memory (VmHWM, kB) of process ``pid`` so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, also between open and read
        return False


# ---- run dirs ---------------------------------------------------------------------------------
def run_dirs(outputs: Path, task: str = "sleep") -> list[Path]:
    """The run dirs of ``task`` under ``outputs`` that got as far as their plan."""
    return sorted(p.parent for p in (Path(outputs) / task).glob("*/plan.yaml"))


def only_run_dir(outputs: Path, task: str = "sleep") -> Path:
    dirs = run_dirs(outputs, task)
    if len(dirs) != 1:
        raise AssertionError(f"expected one run dir under {outputs}, found {dirs}")
    return dirs[0]


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def sweep_jobs(sweep_dir: Path) -> dict[int, dict]:
    """sweep.json's jobs by number."""
    return {j["num"]: j for j in json.loads((Path(sweep_dir) / "sweep.json").read_text())["jobs"]}


def done_mtimes(run_dir: Path, rows: dict[str, dict]) -> dict[str, int]:
    """The output mtime of every done row: what a resume must leave untouched."""
    return {i: os.stat(Path(run_dir) / r["output"]).st_mtime_ns for i, r in rows.items()
            if r["status"] == "done"}


def log_has(path: Path, text: str) -> bool:
    """``text`` is in the log at ``path`` (False while the log does not exist yet)."""
    try:
        return text in Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return False


# ---- the journal ------------------------------------------------------------------------------
def query_journal(run_dir: Path, sql: str, params: Sequence[Any] = (), *,
                  live: bool = False) -> list[tuple]:
    """Rows of ``sql`` over ``<run_dir>/journal.sqlite`` (which must exist: never created here).

    A finished run's journal is opened read-write, so that closing it removes the -wal and
    -shm files that opening a WAL database makes (a read-only connection leaves them in the
    run dir). ``live``: a running controller's journal, read-only, waiting at most 1 s for a
    lock; its -wal and -shm files are the controller's.
    """
    mode, timeout = ("ro", 1.0) if live else ("rw", 5.0)
    db = sqlite3.connect(f"file:{Path(run_dir) / 'journal.sqlite'}?mode={mode}", uri=True,
                         timeout=timeout)
    try:
        return db.execute(sql, tuple(params)).fetchall()
    finally:
        db.close()


def journal_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every item row, as a dict, by id (in discovery order)."""
    db = sqlite3.connect(f"file:{Path(run_dir) / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM items ORDER BY seq")}
    finally:
        db.close()


def journal_statuses(run_dir: Path) -> dict[str, str]:
    return dict(query_journal(run_dir, "SELECT id, status FROM items"))


def committed(run_dir: Path | None, status: str, item: str | None = None) -> int:
    """How many items the journal has committed in ``status`` (only ``item``, if given);
    0 while there is no run dir or journal yet, or the journal cannot be read right now.
    For waits on a live run: the controller commits every 0.5 s."""
    if run_dir is None:
        return 0
    sql, params = "SELECT COUNT(*) FROM items WHERE status=?", [status]
    if item is not None:
        sql, params = sql + " AND id=?", params + [item]
    try:
        return query_journal(run_dir, sql, params, live=True)[0][0]
    except sqlite3.Error:
        return 0


# ---- worker logs ------------------------------------------------------------------------------
def identity_line(run_dir: Path, slot: int) -> str:
    """The first line of a worker's log: its identity (PID=... slot=... ...)."""
    return (Path(run_dir) / "logs" / f"worker-{slot}.log").read_text().splitlines()[0]


def identities(run_dir: Path) -> list[dict[str, str]]:
    """Every identity line of every worker log: PID=, slot=, incarnation= ..."""
    out = []
    for log in sorted((Path(run_dir) / "logs").glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("PID="):
                out.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return out


def worker_pids(run_dir: Path) -> list[int]:
    """The PID of each worker log's first process (its first line)."""
    pids = []
    for log in sorted((Path(run_dir) / "logs").glob("worker-*.log")):
        first = log.read_text().splitlines()[0]
        assert first.startswith("PID="), f"{log.name} starts with {first!r}"
        pids.append(int(first.split()[0][4:]))
    return pids


# ---- runs of tests.faulty_task.FaultyTask (fault, resume and interrupt tests) ------------------
FAULTY = "tests.faulty_task.FaultyTask"
ITEM_STATES = ("pending", "running", "done", "failed")


def cli_args(outputs: Path, *extra: str, count: int = 12, ms: float = 5.0,
             faults: str = "", load_fault: str = "", devices: str = "cpu2") -> list[str]:
    """``python -m runner`` overrides for a FaultyTask run under ``outputs``."""
    args = ["task=sleep", f"task._target_={FAULTY}", f"devices={devices}", f"outputs={outputs}",
            "progress=off", f"task.count={count}", f"task.ms={ms}",
            "executor.start_timeout_s=60", "executor.stop_timeout_s=3"]
    if faults:
        args.append(f"+task.faults='{faults}'")
    if load_fault:
        args.append(f"+task.load_fault='{load_fault}'")
    return args + list(extra)


def outputs_written(outputs: Path) -> int:
    """How many output files FaultyTask's run under ``outputs`` has on disk so far."""
    dirs = run_dirs(outputs)
    return len(list((dirs[0] / "faulty").glob("*.json"))) if dirs else 0


def started_items(run_dir: Path | None) -> set[str]:
    """The items whose ``process`` has begun (FaultyTask's ``started/`` markers)."""
    from tests.faulty_task import STARTED

    if run_dir is None or not (Path(run_dir) / STARTED).is_dir():
        return set()
    return {p.name for p in (Path(run_dir) / STARTED).iterdir()}


def output_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every visible output file, parsed (a torn file fails here): relative path -> content."""
    from tests.faulty_task import FaultyTask

    out = {}
    for p in sorted((Path(run_dir) / FaultyTask.output_dir).glob("*")):
        if p.name.startswith("."):
            continue  # a temp file of a write killed half-way is not an output
        out[str(p.relative_to(run_dir))] = json.loads(p.read_text())
    return out


def check_consistent(run_dir: Path, count: int, finished: bool = True) -> dict[str, dict]:
    """The invariants of issue 4 on a run dir; returns the journal rows.

    Every discovered item has one row; nothing is left ``running``; done <=> its output is
    on disk, whole, and names that item; failed items have no output and an error file;
    ``finished``: nothing is left pending either.
    """
    from runner import names
    from tests.faulty_task import item_id

    rows = journal_rows(run_dir)
    want = {item_id(i) for i in range(count)}
    assert set(rows) == want, f"journal ids differ: {sorted(set(rows) ^ want)[:5]}"
    states = {r["status"] for r in rows.values()}
    assert states <= set(ITEM_STATES), states
    running = [i for i, r in rows.items() if r["status"] == "running"]
    assert not running, f"items left running after the run ended: {running}"
    if finished:
        pending = [i for i, r in rows.items() if r["status"] == "pending"]
        assert not pending, f"items left pending: {pending}"
    files = output_files(run_dir)
    done = {i: r for i, r in rows.items() if r["status"] == "done"}
    for i, r in done.items():
        assert r["output"] in files, f"{i} is done but {r['output']} is not on disk"
        assert files[r["output"]]["id"] == i, f"{r['output']} holds {files[r['output']]['id']}"
        assert r["attempts"] >= 1 and r["finished"] is not None and r["model"], r
    owners = {f["id"] for f in files.values()}
    assert len(owners) == len(files), "two output files hold the same item"
    if finished:
        assert owners == set(done), f"outputs without a done item: {sorted(owners - set(done))}"
    for i, r in rows.items():
        if r["status"] == "failed":
            assert i not in owners, f"{i} failed but has an output"
            assert r["error"], f"{i} failed without an error"
            assert (Path(run_dir) / "logs" / "errors" / f"{names.component(i)}.json").is_file(), i
    return rows

