"""Layer: processes (spawned workers, real signals).

Resume (issue 4): a controller SIGKILLed mid-run, then ``resume=latest`` finishes the job
with nothing lost or duplicated; what a resume may and may not change; checkpoint=off.

Every run is a real ``python -m runner`` subprocess with tests.faulty_task.FaultyTask.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import (alive, check_consistent, cli_args, committed, done_mtimes,
                            identities, journal_rows, only_run_dir, output_files,
                            outputs_written, read_summary, run_cli, run_dirs, start_run,
                            stop_leftover, wait_until)
from tests.faulty_task import item_id


@pytest.mark.timeout(120)
def test_controller_sigkilled_then_resume_latest(tmp_path):
    count = 60
    args = cli_args(tmp_path, "batch_size=2", count=count, ms=40)
    proc = start_run(args, stdout=subprocess.DEVNULL)

    def some_done_committed():  # (the journal commits every 0.5 s)
        dirs = run_dirs(tmp_path)
        return bool(dirs) and outputs_written(tmp_path) >= 12 and committed(dirs[0], "done") > 0

    try:
        # kill once the journal has committed some done items, or the run has ended
        wait_until(lambda: proc.poll() is not None or some_done_committed(), 60)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the controller, and nothing else
        proc.wait(10)
    finally:
        stop_leftover(proc)
    assert proc.returncode == -signal.SIGKILL
    run_dir = only_run_dir(tmp_path)

    # the orphaned workers notice their controller is gone and leave by themselves
    pids = [int(x["PID"]) for x in identities(run_dir)]
    assert len(pids) == 2
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "workers outlived their SIGKILLed controller"

    # what the kill left: a consistent but unfinished journal
    rows = check_consistent_after_kill(run_dir, count)
    done_before = done_mtimes(run_dir, rows)
    running_before = sum(r["status"] == "running" for r in rows.values())
    assert 0 < len(done_before) < count

    res = run_cli(cli_args(tmp_path, "batch_size=2", "resume=latest", count=count, ms=40))
    assert res.returncode == 0, res.stderr[-3000:]
    assert only_run_dir(tmp_path) == run_dir, "resume=latest made a new run dir"
    rows = check_consistent(run_dir, count)
    assert all(r["status"] == "done" for r in rows.values())
    # done items were skipped without being touched; nothing was done twice
    assert done_mtimes(run_dir, {i: rows[i] for i in done_before}) == done_before
    plan_items = _plan(run_dir)["items"]
    assert plan_items["already_done"] == len(done_before)
    assert plan_items["running_to_pending"] == running_before
    assert plan_items["count"] == count - len(done_before)
    summary = read_summary(run_dir)
    assert summary["items_done"] == count - len(done_before)
    assert summary["counts"] == {"pending": 0, "running": 0, "done": count, "failed": 0}
    assert len(output_files(run_dir)) == count
    resumes = (run_dir / "resumes.jsonl").read_text().splitlines()
    assert len(resumes) == 1 and json.loads(resumes[0])["resumed"] == str(run_dir)


def check_consistent_after_kill(run_dir, count):
    """After a SIGKILL the journal may hold running items (not yet back in the queue) and
    files written but not yet journaled; but every done item has its whole output."""
    rows = journal_rows(run_dir)
    assert set(rows) == {item_id(i) for i in range(count)}
    files = output_files(run_dir)
    for i, r in rows.items():
        if r["status"] == "done":
            assert files[r["output"]]["id"] == i
    return rows


def _plan(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "plan.yaml").read_text())


@pytest.mark.timeout(120)
def test_failed_items_retried_only_with_retry_failed(tmp_path):
    count = 8
    faults = "3:badinput:process:once"  # BadInput now, fine on a later run
    res = run_cli(cli_args(tmp_path, count=count, faults=faults))
    assert res.returncode == 3, res.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    rows = check_consistent(run_dir, count)
    assert rows[item_id(3)]["status"] == "failed" and rows[item_id(3)]["attempts"] == 1
    done = done_mtimes(run_dir, rows)
    assert "retry them with: python -m runner" in res.stderr
    assert "resume.retry_failed=true" in res.stderr

    # a plain resume leaves the failed item failed and touches nothing
    res = run_cli(cli_args(tmp_path, "resume=latest", count=count, faults=faults))
    assert res.returncode == 3, res.stderr[-3000:]
    rows2 = check_consistent(run_dir, count)
    same = ("status", "attempts", "error", "output", "started", "finished")
    assert {k: rows2[item_id(3)][k] for k in same} == {k: rows[item_id(3)][k] for k in same}
    assert done_mtimes(run_dir, rows2) == done
    assert read_summary(run_dir)["items_done"] == 0
    assert len(identities(run_dir)) == 2, "workers were started with nothing to do"

    # resume.retry_failed=true runs it again (attempts start over); done items untouched
    res = run_cli(cli_args(tmp_path, "resume=latest", "resume.retry_failed=true", count=count,
                           faults=faults))
    assert res.returncode == 0, res.stderr[-3000:]
    rows3 = check_consistent(run_dir, count)
    assert rows3[item_id(3)]["status"] == "done" and rows3[item_id(3)]["attempts"] == 1
    assert {i: m for i, m in done_mtimes(run_dir, rows3).items() if i != item_id(3)} == done
    assert read_summary(run_dir)["items_done"] == 1
    assert _plan(run_dir)["items"]["failed_retried"] == 1
    lines = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert [x["retry_failed"] for x in lines] == [False, True]


@pytest.mark.timeout(90)
def test_resume_refuses_a_changed_task(tmp_path):
    count = 4
    res = run_cli(cli_args(tmp_path, "+task.models=[m1]", count=count, ms=5.0))
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    journal = (run_dir / "journal.sqlite").read_bytes()

    res = run_cli(cli_args(tmp_path, "resume=latest", "+task.models=[m2,m1]", count=count,
                           ms=7.5))
    assert res.returncode == 1
    errors = [x for x in res.stderr.splitlines() if x.startswith("runner: error:")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    line = errors[0]
    assert "resume refused" in line
    assert "task.ms: 5.0 -> 7.5" in line
    assert "task.models: ['m1'] -> ['m2', 'm1']" in line
    assert "task.count" not in line  # only what differs is listed
    assert (run_dir / "journal.sqlite").read_bytes() == journal, "a refused resume wrote"
    assert not (run_dir / "resumes.jsonl").exists()


@pytest.mark.timeout(120)
def test_resume_may_change_devices_batch_chunking_limit(tmp_path):
    res = run_cli(cli_args(tmp_path, "limit=6", count=12))
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    done = done_mtimes(run_dir, journal_rows(run_dir))
    assert len(done) == 6

    changes = ["devices=cpu", "batch_size=3", "chunking=round_robin", "limit=10"]
    res = run_cli(cli_args(tmp_path, "resume=latest", *changes[1:], devices="cpu", count=12))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = journal_rows(run_dir)
    assert sorted(i for i, r in rows.items() if r["status"] == "done") == \
        [item_id(i) for i in range(10)]
    assert {rows[item_id(i)]["batch_size"] for i in range(6, 10)} <= {1, 2, 3}
    assert {rows[item_id(i)]["device"] for i in range(6, 10)} == {"cpu:0"}
    assert {i: m for i, m in done_mtimes(run_dir, rows).items() if i in done} == done
    resume = json.loads((run_dir / "resumes.jsonl").read_text())
    for change in changes:
        assert change in resume["overrides"], resume
    plan = _plan(run_dir)
    assert plan["chunking"] == "round_robin" and plan["batch_size"] == 3
    assert plan["items"]["already_done"] == 6 and plan["items"]["count"] == 4


@pytest.mark.timeout(90)
def test_checkpoint_off_keeps_no_journal_and_resume_finds_nothing(tmp_path):
    count = 5
    res = run_cli(cli_args(tmp_path, "checkpoint=off", count=count))
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert not list(run_dir.glob("journal.sqlite*"))
    assert {f["id"] for f in output_files(run_dir).values()} == {item_id(i) for i in range(count)}
    assert read_summary(run_dir)["counts"]["done"] == count

    # resume=latest looks for a journal; an off run has none: one line, exit 1
    res = run_cli(cli_args(tmp_path, "resume=latest", count=count))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith("runner: error: resume=latest: no run of task=sleep")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["latest", "/nonexistent/run"])
def test_resume_without_an_earlier_run_is_one_line(tmp_path, value):
    res = run_cli(cli_args(tmp_path, f"resume={value}"))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"runner: error: resume={value}: ")
    assert "journal" in lines[0]
    assert not (tmp_path / "sleep").exists(), "a failed resume made a run dir"
