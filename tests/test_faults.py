"""Layer: processes (spawned workers, real signals).

The fault table of issue 4, against real spawned workers and the real task code path.

Each case runs ``python -m runner`` with :class:`tests.faulty_task.FaultyTask`, whose items
raise, ``sys.exit``, SIGKILL or segfault themselves — in ``process`` (mid-batch), in
``write`` (after earlier items of the batch are on disk) or at model load — on the first
attempt only or every time. After the run, every case asserts:

* every item is done exactly once or failed with its error (journal, summary, error file);
* every output file is whole (parsed) and names its item, no item has two outputs;
* the journal agrees with the disk (done <=> output exists, nothing left running);
* the run went on past the fault and exited 0 or 3 as the outcome says;
* a worker that died was restarted (second identity line, ``incarnation=1``), and a slot
  that used up ``executor.max_restarts`` is lost for good — the run says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from tests.conftest import (check_consistent, cli_args, committed, identities, log_has,
                            only_run_dir, read_summary, run_cli, run_dirs, start_run,
                            stop_leftover, wait_until)
from tests.faulty_task import item_id

COUNT = 12


@dataclass(frozen=True)
class Case:
    faults: str = ""  # FaultyTask.faults
    load_fault: str = ""  # FaultyTask.load_fault
    batch: int = 1
    exit: int = 0
    failed: dict = field(default_factory=dict)  # index -> text the error must contain
    exit_name: dict = field(default_factory=dict)  # index -> SIGKILL / SIGSEGV / "exit 3"
    deaths: int = 0  # worker deaths the summary must count (at least)
    retried: tuple = ()  # indexes done on a later attempt
    lost: int = 0  # slots lost for good
    extra: tuple = ()  # more overrides
    ms: float = 5.0  # per item; longer where the healthy slot must not finish everything first


# loky-style: fault x where x when, with what must come out of it.
CRASH_CASES = {
    # exceptions in the task: no death, retried by the worker's own report
    "raise-process-once": Case("3:raise:process:once", retried=(3,)),
    "raise-process-always": Case("3:raise", exit=3, failed={3: "RuntimeError: injected fault"}),
    "badinput-process": Case("3:badinput", exit=3, failed={3: "BadInput"}),
    "raise-write-always-batch": Case("5:raise:write", batch=4, exit=3,
                                     failed={5: "RuntimeError: injected fault"}),
    # sys.exit inside a batch
    "exit-process-once": Case("3:exit:process:once", deaths=1, retried=(3,)),
    "exit-process-always": Case("3:exit", exit=3, failed={3: "quarantined"},
                                exit_name={3: "exit 3"}, deaths=3),
    # SIGKILL mid-batch (item 5 is second in the batch 4..7)
    "sigkill-process-once-batch": Case("5:sigkill:process:once", batch=4, deaths=1, retried=(5,)),
    "sigkill-process-always-batch": Case("5:sigkill", batch=4, exit=3, failed={5: "quarantined"},
                                         exit_name={5: "SIGKILL"}, deaths=3),
    "sigkill-write-once-batch": Case("6:sigkill:write:once", batch=4, deaths=1, retried=(6,)),
    # SIGKILL half-way through an atomic write: the temp file is left, then removed at the end
    "sigkill-inwrite-once-batch": Case("6:sigkill:inwrite:once", batch=4, deaths=1, retried=(6,)),
    # segfaults: ctypes.string_at(0) and faulthandler._sigsegv()
    "segv-process-once": Case("3:segv:process:once", deaths=1, retried=(3,)),
    "segv_fh-process-always": Case("3:segv_fh", exit=3, failed={3: "SIGSEGV"},
                                   exit_name={3: "SIGSEGV"}, deaths=3),
    "segv-write-always-batch": Case("6:segv:write", batch=4, exit=3, failed={6: "SIGSEGV"},
                                    exit_name={6: "SIGSEGV"}, deaths=3),
    # two poison items at once, and a one-off fault beside them
    "two-poisons-and-a-flake": Case("2:sigkill;7:segv;4:raise:process:once", exit=3,
                                    failed={2: "SIGKILL", 7: "SIGSEGV"},
                                    exit_name={2: "SIGKILL", 7: "SIGSEGV"}, deaths=6,
                                    retried=(4,), extra=("executor.max_restarts=6",)),
    # faults at model load: no item is charged
    "sigkill-load-once": Case(load_fault="sigkill:1", deaths=1, ms=150),
    "exit-load-3-times-one-slot-lost": Case(load_fault="exit:3", deaths=3, lost=1, ms=50,
                                            extra=("executor.max_restarts=1",)),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", list(CRASH_CASES))
def test_crash_case(tmp_path, name):
    case = CRASH_CASES[name]
    args = cli_args(tmp_path, f"batch_size={case.batch}", *case.extra, count=COUNT, ms=case.ms,
                    faults=case.faults, load_fault=case.load_fault)
    res = run_cli(args, timeout=80)
    assert res.returncode == case.exit, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    rows = check_consistent(run_dir, COUNT)

    # every item done exactly once, or failed with its error
    failed = {i for i, r in rows.items() if r["status"] == "failed"}
    assert failed == {item_id(i) for i in case.failed}, res.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["counts"]["done"] == COUNT - len(case.failed)
    assert summary["items_done"] == COUNT - len(case.failed), "an item was counted done twice"
    assert summary["exit_code"] == case.exit
    assert {f["id"] for f in summary["failures"]} == failed
    pids = {int(ident["PID"]) for ident in identities(run_dir)}
    for index, text in case.failed.items():
        row = rows[item_id(index)]
        assert text in row["error"], row
        err = json.loads((run_dir / "logs" / "errors" / f"{item_id(index)}.json").read_text())
        assert err["item"] == item_id(index)
        assert err["device"] in ("cpu:0", "cpu:1") and err["pid"] in pids
        assert err["attempt"] == row["attempts"]
        assert text in err["error"]
        if index in case.exit_name:  # it killed its worker: the exit code, as a name
            assert err["exit"] == case.exit_name[index], err
            assert err["attempt"] == 3 and "quarantined" in err["error"]
            # pinned down alone: its last attempts ran in a batch of its own
            assert "while processing a batch of 1 with" in err["error"], err
            assert err["traceback"] is None
        else:  # an exception: the worker's traceback, and no exit code
            assert err["exit_code"] is None and "Traceback" in err["traceback"]
            assert err["attempt"] == (1 if "BadInput" in text else 3)
    for index in case.retried:
        assert rows[item_id(index)]["status"] == "done"
        assert rows[item_id(index)]["attempts"] == 2, rows[item_id(index)]

    # no bystander was charged for a batch that never ran, nor quarantined with a poison item
    for i, r in rows.items():
        if i in failed or int(i.split("-")[1]) in case.retried:
            continue
        assert r["attempts"] <= 2, f"bystander {i} charged {r['attempts']} attempts"

    # nothing half-written is left: a write cut short leaves no temp file behind
    assert not list((run_dir / "faulty").rglob(".*.tmp"))

    # the run went on past the fault: items after it were done
    assert rows[item_id(COUNT - 1)]["status"] == "done"

    # deaths, restarts, lost slots
    deaths = sum(s["deaths"] for s in summary["slots"])
    assert deaths >= case.deaths
    if not case.deaths:
        assert deaths == 0
    incarnations = [int(ident["incarnation"]) for ident in identities(run_dir)]
    if case.deaths:
        assert 1 in incarnations, "a dead slot was not restarted"
        # one process per slot, plus a restart per death — except for a slot lost for good,
        # and a death at the very end when the slot has nothing left to do
        assert 2 + case.deaths - case.lost - 1 <= len(incarnations) <= 2 + deaths - case.lost
    else:
        assert incarnations == [0, 0]
    lost_notes = [n for n in summary["notes"] if n.endswith("slot lost")]
    assert len(lost_notes) == case.lost, summary["notes"]


@pytest.mark.timeout(90)
def test_every_slot_lost_stops_cleanly(tmp_path):
    """One slot, one restart, a poison item that outlives both: the run stops, says so,
    exits 3, leaves the journal intact (nothing running, the rest pending, the poison
    item charged), and ``resume`` with more restarts finishes the job."""
    count = 10
    args = cli_args(tmp_path, "executor.max_restarts=1", "checkpoint.max_attempts=3",
                    devices="cpu", count=count, faults="4:sigkill")
    res = run_cli(args, timeout=80)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "every worker slot was lost" in res.stderr
    assert "resume with: python -m runner" in res.stderr
    run_dir = only_run_dir(tmp_path)
    rows = check_consistent(run_dir, count, finished=False)
    states = {i: r["status"] for i, r in rows.items()}
    assert all(states[item_id(i)] == "done" for i in range(4))
    assert states[item_id(4)] == "pending" and rows[item_id(4)]["attempts"] == 2
    assert "SIGKILL" in rows[item_id(4)]["error"]
    assert all(states[item_id(i)] == "pending" for i in range(5, count))
    summary = read_summary(run_dir)
    assert summary["status"] == "slots lost" and summary["exit_code"] == 3
    assert [int(x["incarnation"]) for x in identities(run_dir)] == [0, 1]

    # resume with one more restart: the poison item uses its last attempt and is
    # quarantined, everything else is done
    res = run_cli(cli_args(tmp_path, "executor.max_restarts=2", "resume=latest",
                           devices="cpu", count=count, faults="4:sigkill"), timeout=80)
    assert res.returncode == 3, res.stderr[-3000:]
    rows = check_consistent(run_dir, count)
    assert {i for i, r in rows.items() if r["status"] == "failed"} == {item_id(4)}
    err = json.loads((run_dir / "logs" / "errors" / f"{item_id(4)}.json").read_text())
    assert err["exit"] == "SIGKILL" and err["attempt"] == 3


@pytest.mark.timeout(120)
def test_a_slot_whose_worker_died_idle_comes_back_when_work_does(tmp_path):
    """Two slots, one batch each at a time, item 0 slow (5 s), item 1 quick. Slot B finishes
    item 1 and waits idle:
    SIGKILL it there (nothing of it in flight, nothing queued for it). Then slot A, running
    item 0, is SIGKILLed twice, and with executor.max_restarts=1 it is lost. Item 0 is back
    in the queue: slot B must come back for it (its own restart), and the run finishes, where
    before it stopped with 'every worker slot was lost' and item 0 pending."""
    import os
    import signal

    args = cli_args(tmp_path, "executor.max_restarts=1", "checkpoint.max_attempts=5",
                    "chunking.prefetch=1", "+task.slow='0:5000'", devices="cpu2", count=2)
    proc = start_run(args)

    def run_dir():
        return (run_dirs(tmp_path) or [None])[0]

    def quick_done():  # item 1's output
        out = run_dir() / "faulty" / f"{item_id(1)}.json"
        return json.loads(out.read_text()) if out.exists() else None

    def pids_of(slot):
        return [int(x["PID"]) for x in identities(run_dir()) if x["slot"] == str(slot)]

    def quick_reported():  # the controller has item 1 done (the journal commits every 0.5 s)
        return committed(run_dir(), "done", item_id(1)) == 1

    try:
        wait_until(run_dir, 30, proc=proc)
        quick = wait_until(quick_done, 30, proc=proc)
        b, a = quick["slot"], 1 - quick["slot"]
        # B has reported item 1 and has nothing left: idle
        wait_until(quick_reported, 30, proc=proc)
        os.kill(quick["pid"], signal.SIGKILL)
        b_died = f"worker cpu:{b} (pid {quick['pid']}) died: SIGKILL; 0 item(s) in flight"
        wait_until(lambda: log_has(run_dir() / "runner.log", b_died), 30, proc=proc)  # alone
        os.kill(wait_until(lambda: pids_of(a), 30, proc=proc)[0], signal.SIGKILL)  # running item 0
        second = wait_until(lambda: pids_of(a)[1:], 30, proc=proc)[0]  # A's restart (1 of 1)
        os.kill(second, signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        stop_leftover(proc)
    assert proc.returncode == 0, err[-3000:]
    rows = check_consistent(only_run_dir(tmp_path), 2)
    assert all(r["status"] == "done" for r in rows.values())
    assert rows[item_id(1)]["slot"] == b
    run = only_run_dir(tmp_path)
    assert len(pids_of(b)) == 2, "slot B was not restarted"  # incarnation 0, then 1
    assert f"restarting cpu:{b} (restart 1/1)" in (run / "runner.log").read_text()


@pytest.mark.timeout(60)
def test_model_that_never_loads_loses_every_slot(tmp_path):
    """load_model raises on every slot: each worker reports StartFailed, no restart loop,
    no item charged, exit 3 with the reason on stderr."""
    count = 6
    res = run_cli(cli_args(tmp_path, count=count, load_fault="raise:always"), timeout=50)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "every worker slot was lost" in res.stderr
    assert "injected fault in load_model" in res.stderr
    run_dir = only_run_dir(tmp_path)
    rows = check_consistent(run_dir, count, finished=False)
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows.values())
    assert [int(x["incarnation"]) for x in identities(run_dir)] == [0, 0]
    assert not list((run_dir / "logs" / "errors").iterdir())
