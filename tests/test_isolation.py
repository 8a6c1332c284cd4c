"""Layer: processes (spawned workers: the CLI's, and the real executor's from here).

Each worker is its own spawned process that sees its own environment before torch (issue 2).

The probe task (tests/env_probe_task.py) records from inside every worker: its PID, the
device masks, OMP_NUM_THREADS, RUNNER_SLOT, whether torch was already imported when the task
module was imported and when ``load_model`` began (both must be False: the mask has to be in
place before torch exists in the process), and torch's thread count.

* CPU: the real CLI, ``devices=cpu2`` with 1 thread per worker (torch alone would take
  every core: seeing 1 proves OMP_NUM_THREADS was in place before torch was imported).
* CUDA and Arc: no such card here, so only the *inventory* is faked; the slots come from the
  real ``make_slots`` for the cuda4 / arc2 groups and run on the real ``LocalExecutor`` with
  real spawned workers (the probe never touches the device).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.config import DevicesConfig
from runner.devices import Inventory, make_slots
from runner.executor import LocalExecutor
from runner.journal import Journal
from runner.messages import WorkerSpec
from runner.progress import Progress
from runner.rundir import RunDir
from runner.scheduler import Scheduler
from runner.ledger import Ledger
from tests.conftest import ROOT, identity_line, run_cli
from tests.env_probe_task import EnvProbeTask

TARGET = "tests.env_probe_task.EnvProbeTask"


def probes(run: Path) -> dict[int, list[dict]]:
    """Probe records by slot."""
    out: dict[int, list[dict]] = {}
    for p in sorted((run / "probe").glob("*.json")):
        rec = json.loads(p.read_text())
        out.setdefault(rec["slot"], []).append(rec)
    return out


def check_workers(run: Path, slots, mask_var: str | None) -> None:
    """Every slot's worker saw exactly its own slot's environment; PIDs distinct."""
    by_slot = probes(run)
    assert sorted(by_slot) == [s.index for s in slots], "every slot ran items"
    pids = {}
    for s in slots:
        recs = by_slot[s.index]
        assert len({r["pid"] for r in recs}) == 1, "one process per slot serves all its items"
        r = recs[0]
        pids[s.index] = r["pid"]
        assert r["torch_at_import"] is False, "torch was imported before the task module"
        assert r["torch_at_load"] is False, "torch was imported before load_model"
        # the environment at task import time, before torch: already the slot's own
        for var in ("OMP_NUM_THREADS", "RUNNER_SLOT") + ((mask_var,) if mask_var else ()):
            assert r["env_at_import"][var] == s.env[var], (s.index, var, r["env_at_import"])
            assert r[var] == s.env[var]
        assert r["RUNNER_SLOT"] == str(s.index)
        assert r["threads_at_import"] == s.threads  # OMP_NUM_THREADS reached torch
        assert r["threads"] == s.threads
        assert r["device"] == s.backend  # addressed as index 0 of what it can see
        line = identity_line(run, s.index)
        assert line.startswith(f"PID={r['pid']} slot={s.index} backend={s.backend} ")
        if mask_var:
            assert f" {mask_var}={s.env[mask_var]} " in line
        assert f"threads={s.threads}" in line
    assert len(set(pids.values())) == len(slots), f"PIDs not distinct: {pids}"
    assert os.getpid() not in pids.values()


# ---- CPU, through the real CLI -------------------------------------------------------------
@pytest.mark.timeout(120)
def test_cpu2_workers_through_the_cli(tmp_path):
    r = run_cli(["task=sleep", f"task._target_={TARGET}", "task.count=6", "devices=cpu2",
                 "devices.threads_per_worker=1", "chunking=round_robin", "batch_size=1",
                 f"outputs={tmp_path}", "progress=off"], timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (tmp_path / "sleep").iterdir()
    cfg = DevicesConfig(name="cpu2", backend="cpu", count=2, threads_per_worker=1)
    slots = make_slots(cfg, Inventory(cpu_cores=2))
    check_workers(run, slots, "CUDA_VISIBLE_DEVICES")
    for recs in probes(run).values():
        assert recs[0]["CUDA_VISIBLE_DEVICES"] == ""  # a CPU worker sees no accelerator
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(p for s in summary["slots"] for p in s["pids"]) == sorted(
        recs[0]["pid"] for recs in probes(run).values())


@pytest.mark.timeout(120)
def test_a_new_runs_workers_boot_while_discovery_runs(tmp_path):
    """Discovery takes 3 s here: the workers, spawned before it, have loaded their model
    long before their first item (spawned after it, they would load it just before)."""
    r = run_cli(["task=sleep", f"task._target_={TARGET}", "task.count=4",
                 "+task.use_torch=false", "+task.discover_s=3.0", "devices=cpu2",
                 "devices.threads_per_worker=1", "batch_size=1", f"outputs={tmp_path}",
                 "progress=off"], timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (tmp_path / "sleep").iterdir()
    by_slot = probes(run)
    assert sorted(by_slot) == [0, 1]
    for recs in by_slot.values():
        waited = min(rec["processed_at"] for rec in recs) - recs[0]["loaded_at"]
        assert waited > 1.5, f"the worker loaded its model only {waited:.2f}s before its first item"


@pytest.mark.timeout(120)
def test_the_console_script_is_the_same_app_and_workers_stay_light(tmp_path):
    """``runner`` (the console script) runs the same app; its workers, which re-run the
    script under spawn, do not import the Hydra app."""
    script = Path(sys.executable).parent / "runner"
    if not script.exists():
        pytest.skip(f"no console script at {script} (not installed with pip install -e .)")
    r = subprocess.run(
        [str(script), "task=sleep", f"task._target_={TARGET}", "task.count=4",
         "+task.use_torch=false", "devices=cpu2", "devices.threads_per_worker=1",
         "batch_size=1", f"outputs={tmp_path}", "progress=off"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
        env={**os.environ, "PYTHONPATH": str(ROOT)})  # a script's sys.path[0] is its own dir
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (tmp_path / "sleep").iterdir()
    recs = [rec for slot in probes(run).values() for rec in slot]
    assert len(recs) == 4
    assert not any(rec["app_at_load"] for rec in recs), "a worker imported runner.app"


# ---- CUDA / Arc slots on the real executor, with a fake inventory --------------------------------
def run_executor(root: Path, slots, count: int) -> Path:
    task_cfg = {"_target_": TARGET, "count": count, "use_torch": True}
    task = EnvProbeTask(**task_cfg)
    journal = Journal(None)
    journal.add(task.discover())
    sched = Scheduler(journal, "round_robin", len(slots), batch_size=1)
    sched.plan()
    rundir = RunDir(root).make()
    progress = Progress()
    progress.start({s.index: s.label for s in slots}, count, {})
    sup = Ledger(journal, sched, rundir, slots, 2, progress)
    rungs = tuple(task.model_chain(slots[0].backend))

    def make_spec(slot, incarnation):
        return WorkerSpec(slot, incarnation, task_cfg, rungs, 1, str(rundir.root),
                          str(rundir.worker_log(slot.index)), 0)

    ex = LocalExecutor(make_spec, max_restarts=0, grace_s=5.0, stop_timeout_s=5.0,
                       start_timeout_s=120.0, prefetch=1)
    before = dict(os.environ)
    ex.run(slots, sup)
    assert dict(os.environ) == before, "the slot env must not leak into the controller"
    assert journal.counts() == {"pending": 0, "running": 0, "done": count, "failed": 0}
    journal.close()
    return rundir.root


@pytest.mark.timeout(180)
def test_cuda4_slots_each_see_their_own_card(tmp_path):
    cfg = DevicesConfig(name="cuda4", backend="cuda", count=4)
    fake = Inventory(cpu_cores=2, cuda=("Fake GPU",) * 4, notes=("cuda: faked by the test",))
    slots = make_slots(cfg, fake)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2", "3"]
    run = run_executor(tmp_path, slots, count=8)
    check_workers(run, slots, "CUDA_VISIBLE_DEVICES")
    seen = [probes(run)[s.index][0]["CUDA_VISIBLE_DEVICES"] for s in slots]
    assert seen == ["0", "1", "2", "3"]


@pytest.mark.timeout(120)
def test_arc2_slots_each_see_their_own_card(tmp_path):
    cfg = DevicesConfig(name="arc2", backend="xpu", count=2)
    fake = Inventory(cpu_cores=2, xpu=("Fake Arc A770",) * 2, notes=("xpu: faked by the test",))
    slots = make_slots(cfg, fake)
    run = run_executor(tmp_path, slots, count=4)
    check_workers(run, slots, "ZE_AFFINITY_MASK")
    seen = [probes(run)[s.index][0]["ZE_AFFINITY_MASK"] for s in slots]
    assert seen == ["0", "1"]  # plain ordinals: "0.0" is invalid under FLAT
    for s in slots:
        assert "ZE_AFFINITY_MASK=0.0" not in identity_line(run, s.index)
