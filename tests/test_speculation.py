"""Layer: unit (the Speculator with scripted numbers) and processes (real uneven runs).

Tail speculation (issue 17, point 4): once the queue is empty, an idle slot runs a copy of
the in-flight batch expected to finish last when it would finish it sooner; the first copy
to write claims the race, the other writes nothing. Exactly once must hold in the journal
and in the outputs, also when either copy's worker is SIGKILLed mid-race.

The uneven machine: tests.faulty_task.FaultyTask with ``slow_slots='1:4'`` -- slot 1's
worker sleeps 4x each item's cost (devices=cpu2), items of 1 s: slot 0 finishes its two
items at 1 s and 2 s while slot 1 is still on its first, so slot 0 copies slot 1's queued
item (expected at 8 s, the copy done at 3 s).
"""
from __future__ import annotations

import json
import os
import signal

import pytest

from runner.speculation import CallInFlight, Speculator
from tests.conftest import (check_consistent, cli_args, journal_rows, log_has, only_run_dir,
                            read_summary, run_cli, start_run, stop_leftover, wait_until,
                            worker_pids)


# ---- unit: which call an idle slot copies -------------------------------------------------
def _spec(measured: dict[int, tuple[float, float]], declared: dict[int, float] | None = None):
    sp = Speculator(declared or {s: 1.0 for s in measured})
    for slot, (cost, secs) in measured.items():
        sp.record(slot, cost, secs)
    return sp


def test_idle_fast_slot_copies_the_call_that_would_end_last():
    sp = _spec({0: (10.0, 10.0), 1: (10.0, 40.0)})  # slot 1: 4x slower
    running = CallInFlight(1, 1, 1, 1.0)
    queued = CallInFlight(2, 1, 2, 1.0)
    got = sp.pick(0, {0: [], 1: [running, queued]}, {1: 100.0}, now=101.0)
    assert got is queued  # running ends at 104, queued at 108; a copy on slot 0 ends at 102


def test_no_copy_when_it_would_not_end_sooner_or_is_a_copy_already():
    sp = _spec({0: (10.0, 40.0), 1: (10.0, 10.0)})  # the idle slot is the slow one
    call = CallInFlight(1, 1, 1, 1.0)
    assert sp.pick(0, {1: [call]}, {1: 100.0}, now=100.1) is None
    fast = _spec({0: (10.0, 10.0), 1: (10.0, 40.0)})
    for flags in ({"copy": True}, {"copied": True}):
        assert fast.pick(0, {1: [CallInFlight(1, 1, 1, 1.0, **flags)]}, {1: 100.0}, 100.1) is None


def test_nothing_measured_means_no_copy_and_an_overdue_call_reveals_a_slow_slot():
    assert _spec({0: (0.0, 0.0), 1: (0.0, 0.0)}).pick(
        0, {1: [CallInFlight(1, 1, 1, 1.0)]}, {1: 0.0}, now=0.5) is None
    sp = _spec({0: (2.0, 2.0), 1: (0.0, 0.0)})  # slot 1 unmeasured: declared as fast
    running, queued = CallInFlight(1, 1, 1, 1.0), CallInFlight(2, 1, 2, 1.0)
    assert sp.pick(0, {1: [running, queued]}, {1: 0.0}, now=0.9) is None  # on time so far
    assert sp.pick(0, {1: [running, queued]}, {1: 0.0}, now=2.0) is queued  # 2 s for 1 s


def test_declared_speed_scales_an_unmeasured_slot():
    sp = _spec({0: (4.0, 2.0), 1: (0.0, 0.0)}, declared={0: 1.0, 1: 0.25})
    assert sp.speed(0) == pytest.approx(2.0) and sp.speed(1) == pytest.approx(0.5)


# ---- processes: real uneven runs ------------------------------------------------------------
def _args(out, *extra):
    return cli_args(out, "task.slow_slots='1:4'", "executor.stop_timeout_s=3",
                    "chunking.speculate=true", *extra, count=4, ms=1000)


def _outputs(run_dir):
    return {p.name: json.loads(p.read_text()) for p in (run_dir / "faulty").glob("*.json")}


def test_a_copy_wins_and_every_item_is_done_exactly_once(tmp_path):
    got = run_cli(_args(tmp_path), timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    rows = check_consistent(run_dir, 4)
    spec = read_summary(run_dir)["speculation"]
    assert spec["made"] >= 1 and spec["won"] >= 1, spec
    outputs = _outputs(run_dir)
    # the winner's slot is in the journal and in the one output file of each item
    for item, row in rows.items():
        assert outputs[f"{item}.json"]["slot"] == row["slot"], (item, row["slot"])
    assert sum(r["slot"] == 0 for r in rows.values()) >= 3  # slot 0 did its own and the copy
    assert not (run_dir / ".claims").exists()


def test_speculation_off_leaves_the_tail_to_the_slow_slot(tmp_path):
    got = run_cli(_args(tmp_path, "chunking.speculate=false"), timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    check_consistent(run_dir, 4)
    assert read_summary(run_dir)["speculation"] == {"made": 0, "won": 0}


@pytest.mark.parametrize("victim", ["original", "copy"])
def test_sigkill_of_either_copy_keeps_exactly_once(tmp_path, victim):
    proc = start_run(_args(tmp_path))
    try:
        run_dir = wait_until(lambda: next(iter(p.parent for p in tmp_path.glob(
            "sleep/*/plan.yaml")), None), 60, proc=proc)
        wait_until(lambda: log_has(run_dir / "runner.log", "runs a copy of batch"), 60, proc=proc)
        slot = 1 if victim == "original" else 0
        os.kill(worker_pids(run_dir)[slot], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_leftover(proc)
    assert proc.returncode == 0, err[-3000:]
    rows = check_consistent(run_dir, 4)
    assert all(r["status"] == "done" for r in rows.values())
    assert set(_outputs(run_dir)) == {f"{i}.json" for i in rows}
    summary = read_summary(run_dir)
    assert summary["speculation"]["made"] >= 1, summary["speculation"]
    assert any("died" in n for n in summary["notes"]), summary["notes"]
    journal = journal_rows(run_dir)
    assert all(r["attempts"] <= 2 for r in journal.values()), journal


def test_size_balanced_weighs_slots_by_declared_speed():
    from runner.scheduler import assign

    items = [(f"i{k}", 1.0) for k in range(40)]
    even = assign("size_balanced", 2, items)
    uneven = assign("size_balanced", 2, items, speeds=[1.0, 0.25])
    assert sum(s == 1 for s, _ in even) == 20
    assert sum(s == 1 for s, _ in uneven) == 8  # a quarter as fast: a fifth of the work
