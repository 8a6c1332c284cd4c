"""Layer: processes (real controllers, workers, signals, mounts) -- the fault table of issue 16.

A hostile environment, row by row. Every row runs the real ``python -m runner`` and asserts
the exit code, the one line it says (no traceback), the journal's counts, and -- where the
run can go on -- that a resume ends with every item done exactly once:

| row | environment | must hold |
|---|---|---|
| lock | a second ``resume=`` of a live run | exit 1, names the holder's pid, writes nothing; a SIGKILLed holder leaves no stale lock |
| sweep lock | a second ``-m ... resume=`` of a live sweep | one line, exit 1 |
| SIGTERM / SIGHUP | to the process group, or to the controller alone | exit 143 / 129, in-flight items pending and uncharged; resume exact |
| worker SIGTERM | to one worker alone | a death as any other: charged |
| broken journal | 0 bytes, cut in half, random bytes, a foreign database, a newer schema | exit 1, one line naming the file, the run dir untouched |
| disk full | the run dir on a small tmpfs; only the output folder full or read-only | exit 4, one line, nothing charged, journal intact; resume after freeing space is exact |
| unwritable outputs= | a read-only mount, /proc, /sys/kernel | exit 1, one line, before Hydra |
| item timeout | one item far slower than executor.item_timeout_s | that item fails alone, the rest done |

The settings and input rows (bad numbers, FIFOs, giant lines) are in tests/test_config.py
and tests/test_bounds.py; Ray's sockets in tests/test_ray_network.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import (check_consistent, cli_args, committed, journal_rows, only_run_dir,
                            query_journal, run_cli, start_run, started_items, stop_leftover,
                            wait_until, worker_pids)

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def one_line_error(stderr: str, *words: str) -> str:
    """The run's last stderr line, checked: no traceback anywhere, and it names ``words``."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("runner:")]
    assert lines, stderr[-2000:]
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path``: (size, mtime_ns) -- to show that nothing was written."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def _planned(outputs: Path) -> Path | None:
    """The run dir under ``outputs`` once its plan is written (None before)."""
    found = sorted(p.parent for p in Path(outputs).glob("sleep/*/plan.yaml"))
    return found[0] if found else None


def counts(run_dir: Path) -> dict[str, int]:
    return dict(query_journal(run_dir, "SELECT status, COUNT(*) FROM items GROUP BY status"))


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems under tmp_path (root only); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(where: Path, size: str = "2m", ro: bool = False) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the file system of ``folder`` up to ``leave_bytes`` free; the filler's path."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler.bin"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


# ---- one controller per run dir -----------------------------------------------------------
def test_second_resume_of_a_live_run_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "o"
    first = start_run(cli_args(out, count=16, ms=400))
    try:
        run_dir = wait_until(lambda: _planned(out), 60, proc=first)
        wait_until(lambda: committed(run_dir, "done"), 60, proc=first)
        before = {k: v for k, v in tree(run_dir).items()
                  if not k.startswith(("journal.sqlite", "logs/", "sleeps/", "faulty/", "started/"))}
        second = run_cli(cli_args(out, f"resume={run_dir}", count=16, ms=400), timeout=60)
        assert second.returncode == 1, second.stderr[-2000:]
        line = one_line_error(second.stderr, "in use by another runner", f"pid {first.pid}",
                              str(run_dir))
        assert len([ln for ln in second.stderr.splitlines() if ln.strip()]) == 1, second.stderr
        after = {k: v for k, v in tree(run_dir).items() if k in before or k.startswith(".hydra")}
        assert after == before, f"the refused resume wrote into the run dir ({line})"
        assert not (run_dir / "resumes.jsonl").exists()
        os.killpg(first.pid, signal.SIGKILL)  # the holder dies without any clean-up
        first.wait(30)
    finally:
        stop_leftover(first)
    again = run_cli(cli_args(out, f"resume={run_dir}", count=16, ms=400), timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    check_consistent(run_dir, 16)


def test_a_sweep_being_resumed_is_locked(tmp_path):
    out = tmp_path / "o"
    args = ["-m", *cli_args(out, count=6, ms=300, devices="cpu"), "task.seed=1,2"]
    first = start_run(args)
    try:
        sweep_dir = wait_until(lambda: next((p.parent for p in out.glob(
            "multirun/sleep/*/sweep.json")), None), 60, proc=first)
        wait_until(lambda: list(sweep_dir.glob("*/journal.sqlite")), 60, proc=first)
        second = run_cli([*args, f"resume={sweep_dir}"], timeout=60)
        assert second.returncode == 1, second.stderr[-2000:]
        assert "in use by another runner" in second.stderr and str(first.pid) in second.stderr
        assert "Traceback" not in second.stderr, second.stderr[-2000:]
        assert first.wait(120) == 0
    finally:
        stop_leftover(first)


# ---- SIGTERM and SIGHUP: a stop request, not a crash --------------------------------------------
@pytest.mark.parametrize("signame,whom,code,executor", [
    ("SIGTERM", "group", 143, "local"), ("SIGTERM", "controller", 143, "local"),
    ("SIGHUP", "group", 129, "local"), ("SIGTERM", "group", 143, "ray")])
def test_stop_signal_charges_nothing_and_a_resume_is_exact(tmp_path, signame, whom, code,
                                                           executor):
    if executor == "ray":
        pytest.importorskip("ray", reason="executor=ray needs Ray (pip install 'runner[ray]')")
    out, count = tmp_path / "o", 24
    args = cli_args(out, "checkpoint.max_attempts=1", "batch_size=2", f"executor={executor}",
                    count=count, ms=300)
    proc = start_run(args)
    try:
        run_dir = wait_until(lambda: _planned(out), 60, proc=proc)
        wait_until(lambda: committed(run_dir, "done") >= 2 and len(started_items(run_dir)) >= 4,
                   60, proc=proc)
        sig = getattr(signal, signame)
        if whom == "group":
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_leftover(proc)
    assert proc.returncode == code, err[-2000:]
    one_line_error(err, f"stopped by {signame}", "none charged", "Resume with:")
    rows = journal_rows(run_dir)
    states = {r["status"] for r in rows.values()}
    assert "failed" not in states and "running" not in states, states
    assert all(r["attempts"] == 0 for r in rows.values() if r["status"] == "pending"), \
        [(i, r["attempts"]) for i, r in rows.items() if r["status"] == "pending"][:5]
    assert any(r["status"] == "pending" for r in rows.values())
    again = run_cli(cli_args(out, f"resume={run_dir}", count=count, ms=300), timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    check_consistent(run_dir, count)


def test_sigterm_to_one_worker_alone_is_a_death(tmp_path):
    out = tmp_path / "o"
    args = cli_args(out, "checkpoint.max_attempts=1", count=6, ms=3000, devices="cpu")
    proc = start_run(args)
    try:
        run_dir = wait_until(lambda: _planned(out), 60, proc=proc)
        wait_until(lambda: started_items(run_dir), 60, proc=proc)
        os.kill(worker_pids(run_dir)[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_leftover(proc)
    assert proc.returncode == 3, err[-2000:]
    failed = {i: r for i, r in journal_rows(run_dir).items() if r["status"] == "failed"}
    assert len(failed) == 1 and "SIGTERM" in next(iter(failed.values()))["error"], failed


# ---- the journal is checked before it is trusted ------------------------------------------------
def _cut_half(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _foreign(p: Path) -> None:
    p.unlink()
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE notes (x TEXT)")
    db.commit()
    db.close()


def _newer(p: Path) -> None:
    db = sqlite3.connect(p)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', '99')")
    db.commit()
    db.close()


BROKEN = {
    "zero-bytes": (lambda p: p.write_bytes(b""), "is empty"),
    "cut-in-half": (_cut_half, "journal"),
    "random-bytes": (lambda p: p.write_bytes(os.urandom(40_000)), "not an SQLite database"),
    "damaged-pages": (lambda p: p.write_bytes(p.read_bytes()[:100] + os.urandom(
        p.stat().st_size - 100)), "journal"),
    "foreign-database": (_foreign, "not a runner journal"),
    "newer-schema": (_newer, "newer runner"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small finished run whose journal each case below copies and breaks."""
    out = tmp_path_factory.mktemp("journal") / "o"
    done = run_cli(cli_args(out, count=40, ms=1), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, only_run_dir(out)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_journal_is_refused_in_one_line(tmp_path, finished_run, case):
    src_out, src = finished_run
    out = tmp_path / "o"
    run_dir = out / "sleep" / src.name
    shutil.copytree(src, run_dir)
    journal = run_dir / "journal.sqlite"
    for side in ("-wal", "-shm"):
        Path(f"{journal}{side}").unlink(missing_ok=True)
    breaks, words = BROKEN[case]
    breaks(journal)
    before = tree(run_dir)
    got = run_cli(cli_args(out, f"resume={run_dir}", count=40, ms=1), timeout=60)
    assert got.returncode == 1, (got.returncode, got.stderr[-2000:])
    one_line_error(got.stderr, str(journal), words)
    assert tree(run_dir) == before, "a refused journal's run dir was written"


def test_journal_records_its_schema_version(finished_run):
    from runner.journal_schema import SCHEMA_VERSION

    _, run_dir = finished_run
    (value,), = query_journal(run_dir, "SELECT value FROM meta WHERE key='schema_version'")
    assert int(value) == SCHEMA_VERSION


# ---- full disks and unwritable places -----------------------------------------------------------
@ROOT_ONLY
def test_run_dir_on_a_full_disk_stops_in_one_line_and_resumes_exactly(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", size="2m")
    filler = fill(disk, 400_000)
    count = 400
    args = cli_args(disk, count=count, ms=1)
    got = run_cli(args, timeout=180)
    assert got.returncode == 4, (got.returncode, got.stderr[-3000:])
    one_line_error(got.stderr, "could not write", "resume")
    run_dir = next(p.parent for p in (disk / "sleep").glob("*/journal.sqlite"))
    assert query_journal(run_dir, "PRAGMA quick_check") == [("ok",)]
    assert counts(run_dir).get("failed", 0) == 0, counts(run_dir)
    assert counts(run_dir).get("done", 0) < count
    filler.unlink()
    again = run_cli(cli_args(disk, f"resume={run_dir}", count=count, ms=1), timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    check_consistent(run_dir, count)


@ROOT_ONLY
def test_journal_on_a_full_disk_stops_in_one_line_and_resumes_exactly(tmp_path, tmpfs):
    """Outputs have room (a file system of their own); the journal's does not."""
    disk = tmpfs(tmp_path / "disk", size="4m")
    run_dir, count = disk / "run", 3000
    tmpfs(run_dir / "faulty", size="24m")
    filler = fill(disk, 1_500_000)  # room for discovery and some of the run, not all of it
    got = run_cli(cli_args(tmp_path / "o", f"hydra.run.dir={run_dir}", count=count, ms=1),
                  timeout=180)
    assert got.returncode == 4, (got.returncode, got.stderr[-3000:])
    line = one_line_error(got.stderr, "could not write", f"resume={run_dir}")
    assert "full" in line, line
    assert query_journal(run_dir, "PRAGMA quick_check") == [("ok",)]
    assert counts(run_dir).get("failed", 0) == 0 and 0 < counts(run_dir).get("done", 0) < count
    filler.unlink()
    again = run_cli(cli_args(tmp_path / "o", f"resume={run_dir}", count=count, ms=1),
                    timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    check_consistent(run_dir, count)


@ROOT_ONLY
@pytest.mark.parametrize("how", ["full", "read-only"])
def test_output_folder_refusing_writes_puts_items_back_uncharged(tmp_path, tmpfs, how):
    out, count = tmp_path / "o", 30
    run_dir = out / "sleep" / "fixed-run"
    outputs = run_dir / "faulty"  # FaultyTask's output folder, its own file system here
    if how == "full":
        fill(tmpfs(outputs, size="64k"), 0)
    else:
        tmpfs(outputs, size="64k", ro=True)
    got = run_cli(cli_args(out, f"hydra.run.dir={run_dir}", count=count, ms=1), timeout=120)
    assert got.returncode == 4, (got.returncode, got.stderr[-3000:])
    one_line_error(got.stderr, "could not write", "none charged", "resume with")
    rows = journal_rows(run_dir)
    assert {r["status"] for r in rows.values()} == {"pending"}, counts(run_dir)
    assert all(r["attempts"] == 0 for r in rows.values())
    subprocess.run(["umount", "-l", str(outputs)], check=True)
    again = run_cli(cli_args(out, f"resume={run_dir}", count=count, ms=1), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    check_consistent(run_dir, count)


@pytest.mark.parametrize("where", ["read-only", "/proc/runner-out", "/sys/kernel/runner-out"])
def test_unwritable_outputs_is_one_line_before_hydra(tmp_path, tmpfs, where):
    if where == "read-only":
        if os.geteuid() != 0:
            pytest.skip("mounting a read-only tmpfs needs root")
        where = str(tmpfs(tmp_path / "ro", size="1m", ro=True))
    for sweep in ([], ["-m"]):
        got = run_cli([*sweep, *cli_args(Path(where), count=2), *(["task.seed=1,2"] if sweep
                                                                   else [])], timeout=60)
        assert got.returncode == 1, (sweep, got.stderr[-2000:])
        one_line_error(got.stderr, f"outputs={where}", "writable")
        assert len([ln for ln in got.stderr.splitlines() if ln.strip()]) == 1, got.stderr


# ---- per-item bounds: a batch's wall time ----------------------------------------------------
def test_item_over_the_timeout_fails_alone(tmp_path):
    out, count = tmp_path / "o", 8
    args = cli_args(out, "executor.item_timeout_s=2", "batch_size=2", count=count, ms=20,
                    devices="cpu")
    args.append("+task.slow='5:60000'")
    got = run_cli(args, timeout=120)
    assert got.returncode == 3, got.stderr[-2000:]
    rows = journal_rows(Path(only_run_dir(out)))
    failed = {i: r for i, r in rows.items() if r["status"] == "failed"}
    assert list(failed) == ["item-000005"], failed
    assert "executor.item_timeout_s" in failed["item-000005"]["error"]
    assert sum(r["status"] == "done" for r in rows.values()) == count - 1
