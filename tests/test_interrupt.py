"""Layer: processes (spawned workers, real signals).

Ctrl-C and termination (issue 4), with real signals to a real ``python -m runner``.

* Ctrl-C once (SIGINT to the whole process group, as a terminal sends it; the workers
  ignore it) or SIGINT to the controller alone: no new work, in-flight batches
  finish, everything is recorded, exit 130, and stderr names the exact command that
  resumes the run; running that command finishes it with every item done exactly once.
  (SIGTERM and SIGHUP stop at once, exit 143/129: tests/test_hostile.py.)
* Ctrl-C twice: the workers are terminated now (their items go back to pending with the
  attempt refunded), exit 130, and the printed command again finishes the run.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (ROOT, alive, check_consistent, cli_args, committed, done_mtimes,
                            identities, journal_rows, log_has, only_run_dir, outputs_written,
                            run_dirs, start_run, started_items, stop_leftover, wait_until)
from tests.env_probe_task import FINALIZING


def _resume_command(stderr: str) -> list[str]:
    lines = [x for x in stderr.splitlines() if "Resume with: " in x]
    assert len(lines) == 1, stderr[-3000:]
    cmd = shlex.split(lines[0].split("Resume with: ", 1)[1])
    assert cmd[:3] == ["python", "-m", "runner"], cmd
    return [sys.executable, *cmd[1:]]


def _finish_with(stderr, run_dir, count, done_before):
    cmd = _resume_command(stderr)
    assert f"resume={run_dir}" in cmd
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = check_consistent(run_dir, count)
    assert all(r["status"] == "done" for r in rows.values())
    for i, mtime in done_before.items():  # done before the interruption: not touched
        assert os.stat(run_dir / rows[i]["output"]).st_mtime_ns == mtime, i
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["items_done"] == count - len(done_before), "an item was done twice"
    return rows


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", ["SIGINT-group", "SIGINT-controller"])
def test_first_signal_drains_in_flight_then_resume(tmp_path, sig):
    count = 16
    proc = start_run(cli_args(tmp_path, "batch_size=2", "executor.grace_s=30", count=count,
                           ms=250))
    try:
        wait_until(lambda: outputs_written(tmp_path) >= 2, proc=proc)
        sent_at = time.time()
        if sig == "SIGINT-group":
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        else:
            os.kill(proc.pid, signal.SIGINT)  # kill -INT <controller pid>
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop_leftover(proc)
    assert proc.returncode == 130, stderr[-3000:]
    assert "SIGINT: no new work" in stderr
    run_dir = only_run_dir(tmp_path)
    rows = check_consistent(run_dir, count, finished=False)
    done = [r for r in rows.values() if r["status"] == "done"]
    assert len(done) < count, "nothing was left to resume"
    # the batches in flight when the signal came were finished, not dropped: every item
    # that was ever handed to a worker is done, and some finished after the signal
    assert all(r["status"] == "done" for r in rows.values() if r["attempts"] > 0)
    assert any(r["finished"] > sent_at for r in done)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 130
    _finish_with(stderr, run_dir, count, done_mtimes(run_dir, rows))


@pytest.mark.timeout(120)
def test_second_sigint_stops_workers_now_then_resume(tmp_path):
    count = 4  # with prefetch 2, all four are handed out at once: two running, two queued
    proc = start_run(cli_args(tmp_path, "executor.grace_s=60", "chunking.prefetch=2",
                           count=count, ms=2000))
    try:
        def both_busy():
            dirs = run_dirs(tmp_path)
            logs = list((dirs[0] / "logs").glob("worker-*.log")) if dirs else []
            return len(logs) == 2 and all("loaded m1" in p.read_text() for p in logs)

        wait_until(both_busy, proc=proc)
        run_dir = only_run_dir(tmp_path)

        def both_inside_an_item():  # each worker has begun a 2 s item (started/ markers)
            return len(started_items(run_dir)) == 2

        wait_until(both_inside_an_item, proc=proc)
        os.killpg(proc.pid, signal.SIGINT)
        wait_until(lambda: log_has(run_dir / "runner.log", "SIGINT: no new work"), proc=proc)
        second_at = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        pids = [int(x["PID"]) for x in identities(run_dir)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.02)
        workers_gone_s = time.time() - second_at
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop_leftover(proc)
    assert proc.returncode == 130, stderr[-3000:]
    assert "second SIGINT: stopping workers now" in stderr
    # terminated now, not after the grace period (60 s); that the items in flight did not
    # finish (below) shows they were not waited for either
    assert workers_gone_s < 4.0, workers_gone_s
    rows = check_consistent(run_dir, count, finished=False)
    abandoned = [i for i, r in rows.items() if r["status"] == "pending" and r["started"]]
    assert len(abandoned) == count, rows
    assert all(rows[i]["attempts"] == 0 for i in abandoned), "a stop was charged as an attempt"
    assert not any(r["status"] == "done" for r in rows.values())
    _finish_with(stderr, run_dir, count, {})
    rows = journal_rows(run_dir)
    assert all(r["attempts"] == 1 for r in rows.values())


def _probe_args(tmp_path, *extra):
    """The probe task (tests/env_probe_task.py) on two CPU slots, with ``extra`` overrides."""
    return ["task=sleep", "task._target_=tests.env_probe_task.EnvProbeTask", "task.count=4",
            "+task.use_torch=false", "devices=cpu2", f"outputs={tmp_path}", "progress=off", *extra]


@pytest.mark.timeout(60)
def test_ctrl_c_during_discovery_is_one_line_and_stops_the_early_workers(tmp_path):
    """A new run's workers are spawned before discovery; Ctrl-C while it runs ends the run
    with one line and exit 130, and takes those workers down with it."""
    proc = start_run(_probe_args(tmp_path, "+task.discover_s=30"))

    def logs():  # the worker logs that have their identity line (no plan.yaml yet)
        return [p for p in (tmp_path / "sleep").glob("*/logs/worker-*.log")
                if p.read_text().startswith("PID=")]

    wait_until(lambda: len(logs()) == 2, timeout=40, proc=proc)  # both workers are up
    pids = [int(p.read_text().split()[0].split("=")[1]) for p in logs()]
    os.killpg(proc.pid, signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "runner: interrupted while discovering items" in err
    assert len([line for line in err.splitlines() if line.startswith("runner:")]) == 1, err
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone (reaped by the controller, which waited for it)


@pytest.mark.timeout(90)
def test_ctrl_c_while_finishing_is_one_line_and_the_resume_finishes(tmp_path):
    """Ctrl-C after the last item, while the controller finalizes (SIGINT is the default
    handler again): one line naming the command that finishes the run, exit 130; that
    command writes the summary without running any item again."""
    proc = start_run(_probe_args(tmp_path, "+task.finalize_s=30"))

    def all_done():
        dirs = run_dirs(tmp_path)
        return bool(dirs) and committed(dirs[0], "done") == 4

    def finalizing():  # past the journal's last commit: inside finalize's 30 s
        return (run_dirs(tmp_path)[0] / FINALIZING).exists()

    wait_until(all_done, timeout=60, proc=proc)
    wait_until(finalizing, timeout=30, proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("runner:")]
    assert "interrupted while finishing the run" in line
    run_dir = only_run_dir(tmp_path)
    assert not (run_dir / "summary.json").exists()
    cmd = shlex.split(line.split("finish it with: ", 1)[1])
    assert cmd[:3] == ["python", "-m", "runner"] and f"resume={run_dir}" in cmd
    res = subprocess.run([sys.executable, *cmd[1:], "task.finalize_s=0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"]["done"] == 4 and summary["items_done"] == 0  # nothing ran again
