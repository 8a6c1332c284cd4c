"""Layer: cli (runner.status and runner.ls as subprocesses, on real runs).

Issue 22: ``python -m runner.status`` reads a run dir from another terminal -- a running
run (the controller alive, holding the lock; a current item per slot; an ETA), a finished
one, one whose controller was SIGKILLed (crashed: items left running, no controller) --
without blocking the controller; ``python -m runner.ls`` lists the runs under outputs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from tests.conftest import (ROOT, cli_args, committed, run_cli, run_dirs,
                            start_run, stop_leftover, wait_until)


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.status", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def status_json(*args: str) -> dict:
    r = status(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def ls_json(outputs: Path, *args: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "runner.ls", "--outputs", str(outputs), "--json",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _live_status(*args: str):
    return pexpect.spawn(sys.executable, ["-m", "runner.status", *args], cwd=str(ROOT),
                         env={**os.environ, "TERM": "xterm"}, dimensions=(30, 80), timeout=30)


def _no_leftover_files(run: Path) -> None:
    """Reading a run that nobody writes leaves nothing behind (no -wal/-shm of ours)."""
    assert not list(run.glob("journal.sqlite-*")), list(run.glob("journal.sqlite-*"))


@pytest.mark.timeout(180)
def test_status_of_a_running_then_finished_run(tmp_path):
    count = 24
    proc = start_run(cli_args(tmp_path, "batch_size=1", count=count, ms=300,
                              faults="2:raise"))
    try:
        run = wait_until(lambda: run_dirs(tmp_path) and run_dirs(tmp_path)[0], proc=proc)
        wait_until(lambda: committed(run, "done") >= 3, proc=proc)
        wait_until(lambda: committed(run, "running") >= 1, proc=proc)
        snap = status_json(str(run))
        assert snap["state"] == "running"
        ctl = snap["controller"]
        assert ctl["alive"] and ctl["lock_held"] and ctl["pid"] == proc.pid, ctl
        assert snap["counts"]["total"] == count and snap["counts"]["done"] >= 3
        assert snap["rate"] > 0 and snap["eta_s"] is not None
        assert [s["device"] for s in snap["slots"]] == ["cpu:0", "cpu:1"]
        assert any(s["current"] and s["current_for_s"] is not None for s in snap["slots"])
        assert sum(s["done"] for s in snap["slots"]) == snap["counts"]["done"]
        # 'latest' under --outputs finds the same run; the text form fits 80 columns
        once = status("--outputs", str(tmp_path), "--once")
        assert once.returncode == 0, once.stderr
        assert f"running: controller pid {proc.pid}" in once.stdout
        assert all(len(line) <= 80 for line in once.stdout.splitlines()
                   if not line.startswith(("run ", "outputs ", "errors "))), once.stdout
        rows = ls_json(tmp_path)
        assert [r["status"] for r in rows] == ["running"] and rows[0]["pid"] == proc.pid
        # on a terminal: refreshed live until q
        live = _live_status(str(run))
        live.expect("q to leave")
        assert f"controller pid {proc.pid}" in live.before.decode(errors="replace")
        live.send("q")
        live.expect(pexpect.EOF, timeout=20)
        live.close()
        assert live.exitstatus == 0 and proc.poll() is None
        # reading never blocked the controller: it goes on and ends normally
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err[-2000:]
    finally:
        stop_leftover(proc)
    snap = status_json(str(run))
    assert snap["state"] == "failed items", snap
    assert not snap["controller"]["alive"] and snap["controller"]["pid"] == proc.pid
    assert snap["counts"] == {"pending": 0, "running": 0, "done": count - 1, "failed": 1,
                              "total": count}
    assert snap["errors"][0]["id"] == "item-000002"
    assert any(s["last_error"] and s["last_error"]["id"] == "item-000002"
               for s in snap["slots"])
    assert snap["wall_s"] > 0 and snap["eta_s"] is None
    live = _live_status(str(run))  # a finished run: shown once, and it leaves by itself
    live.expect(pexpect.EOF, timeout=30)
    live.close()
    assert live.exitstatus == 0 and b"failed items: no controller" in live.before
    text = status(str(run), "--once").stdout
    assert "failed items: no controller" in text and "last error [cpu:" in text
    assert f"errors  {run / 'logs' / 'errors'}" in text
    _no_leftover_files(run)


@pytest.mark.timeout(180)
def test_status_of_a_sigkilled_run_says_crashed_and_ls_lists_runs(tmp_path):
    proc = start_run(cli_args(tmp_path, "batch_size=1", count=40, ms=400))
    try:
        run = wait_until(lambda: run_dirs(tmp_path) and run_dirs(tmp_path)[0], proc=proc)
        wait_until(lambda: committed(run, "done") >= 2 and committed(run, "running") >= 1,
                   proc=proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the controller and its workers, no clean-up
        proc.wait(timeout=30)
    finally:
        stop_leftover(proc)
    snap = status_json(str(run))
    assert snap["state"] == "crashed", snap
    assert not snap["controller"]["alive"] and snap["controller"]["pid"] == proc.pid
    assert snap["counts"]["running"] >= 1 and snap["summary"] is None
    assert snap["eta_s"] is None
    text = status(str(run), "--once").stdout
    assert "crashed: no controller" in text
    # a second, finished run of the same outputs: ls lists both, newest first
    time.sleep(0.01)
    r = run_cli(cli_args(tmp_path, count=4))
    assert r.returncode == 0, r.stderr[-2000:]
    done = [p for p in run_dirs(tmp_path) if p != run][0]
    rows = ls_json(tmp_path)
    assert [(x["dir"], x["status"]) for x in rows] == [(str(done), "done"), (str(run),
                                                                          "crashed")]
    assert rows[0]["done"] == 4 and rows[0]["failed"] == 0 and rows[0]["pending"] == 0
    assert rows[0]["devices"] == "cpu x2"
    assert "task.count=4" in rows[0]["overrides"]
    assert not any(o.startswith("outputs=") for o in rows[0]["overrides"])
    assert rows[1]["pending"] == 40 - rows[1]["done"]
    assert ls_json(tmp_path, "--task", "embed") == []
    assert len(ls_json(tmp_path, "--since", "1d")) == 2
    assert ls_json(tmp_path, "--since", "2999-01-01") == []
    table = subprocess.run([sys.executable, "-m", "runner.ls", "--outputs", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["task", "start", "status"]
    assert "done" in lines[1] and "crashed" in lines[2], table
    # status with no RUN: the latest run (the finished one)
    assert status_json("--outputs", str(tmp_path))["run_dir"] == str(done)
    _no_leftover_files(done)


def test_status_of_an_interrupted_run_and_of_a_sweep(tmp_path):
    """States from summary.json's exit code, and a sweep as one ls row (no subprocess run:
    the files a run leaves, written here)."""
    from runner.status import run_state

    assert run_state(False, {"exit_code": 130}, {"running": 0}) == "interrupted"
    assert run_state(False, {"exit_code": 143}, {"running": 0}) == "terminated"
    assert run_state(False, {"exit_code": 0}, {"running": 0}) == "done"
    assert run_state(False, None, {"running": 0}) == "crashed"
    assert run_state(False, {"exit_code": 0}, {"running": 2}) == "crashed"
    assert run_state(True, None, {"running": 2}) == "running"
    sweep = tmp_path / "multirun" / "sleep" / "2026-12-01_10-00-00.000001"
    for n, code in ((0, 0), (1, 130)):
        job = sweep / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / "summary.json").write_text(json.dumps({"exit_code": code, "wall_s": 2.0 + n}))
        (job / ".hydra" / "overrides.yaml").write_text(f"- batch_size={n + 1}\n")
    (sweep / "sweep.json").write_text(json.dumps({"task": "sleep", "varying": ["batch_size"],
                                                  "jobs": []}))
    rows = ls_json(tmp_path)
    assert len(rows) == 1 and rows[0]["kind"] == "sweep" and rows[0]["jobs"] == 2
    assert rows[0]["status"] == "interrupted" and rows[0]["wall_s"] == 3.0
    assert rows[0]["overrides"] == ["batch_size: 2 values"]
