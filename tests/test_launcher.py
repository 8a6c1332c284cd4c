"""Layer: processes (spawned sweep jobs, real SIGKILL); Hydra's launcher suites are its
contract, the pool cases at the end are unit.

The process-per-device launcher (hydra_plugins/runner_launcher).

* Hydra's own launcher contract: LauncherTestSuite and IntegrationTestSuite from
  ``hydra.test_utils.launcher_common_tests``, run with ``hydra/launcher=runner`` on apps
  that have no ``devices`` group (the pool is then ``max_parallel`` plain slots).
* Real sweeps of the runner app (spawned job processes, real SIGKILL): 4 jobs on 2 CPU
  slots run 2 at a time, each seeing only its slot's environment; a job that raises and a
  job whose process is SIGKILLed leave the others finishing and show as failed in
  sweep.md; fail_fast stops handing out jobs.
* The device pool for GPUs (cuda/xpu) with a faked inventory: no GPU on this machine.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from omegaconf import OmegaConf

from hydra_plugins.runner_launcher import _pool
from hydra_plugins.runner_launcher.launcher import RunnerLauncher
from runner import devices as devices_mod
from tests.conftest import ROOT, identity_line, query_journal, run_cli, sweep_jobs

PROBE = ["task=sleep", "task._target_=tests.sweep_tasks.SweepProbeTask"]


def sweep(tmp_path: Path, *overrides: str, timeout: int = 150) -> tuple[subprocess.CompletedProcess, Path]:
    proc = run_cli(["-m", f"outputs={tmp_path}", "progress=off", "hydra.launcher.live=plain",
                    *overrides], timeout=timeout)
    found = sorted((tmp_path / "multirun").glob("*/*/sweep.json"))
    assert found, f"no sweep.json; rc={proc.returncode}\n{proc.stderr[-3000:]}"
    return proc, found[-1].parent


def item_window(job_dir: Path) -> tuple[float, float]:
    return query_journal(job_dir, "SELECT min(started), max(finished) FROM items "
                                  "WHERE status='done'")[0]


def max_overlap(windows: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in windows] + [(b, -1) for _, b in windows],
                    key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


# ---- Hydra's launcher contract ----------------------------------------------------------------
def test_discovery() -> None:
    assert RunnerLauncher.__name__ in [x.__name__ for x in Plugins.instance().discover(Launcher)]


@pytest.fixture(autouse=True)
def _unspecified_hydra_version_base():
    """Hydra's suites expect no version_base set; an earlier test's
    initialize(version_base="1.3") leaves it in a process-wide singleton."""
    from hydra import version

    vb = version.VersionBase.instance()
    old = vb.version_base
    vb.version_base = version._UNSPECIFIED_
    yield
    vb.version_base = old


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher_name, overrides", [("runner", ["hydra.launcher.live=off", "hydra.launcher.max_parallel=2"])])
class TestRunnerLauncher(LauncherTestSuite):
    """Hydra's LauncherTestSuite, every test of it (jobs in spawned processes)."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({"defaults": ["_self_", {"override hydra/launcher": "runner"},
                    {"override hydra/hydra_logging": "hydra_debug"},
                    {"override hydra/job_logging": "disabled"}]},
      ["-m", "hydra.launcher.live=off"])])
class TestRunnerLauncherIntegration(IntegrationTestSuite):
    """Hydra's IntegrationTestSuite: generated apps run as scripts with -m."""


@pytest.mark.timeout(60)
def test_cli_lists_the_plugin_and_its_fields() -> None:
    info = run_cli(["--info", "plugins"], timeout=50)
    assert "RunnerLauncher" in info.stdout, info.stdout[-2000:]
    cfg = run_cli(["--cfg", "hydra", "-p", "hydra.launcher"], timeout=50)
    fields = yaml.safe_load(cfg.stdout.split("\n", 1)[1])  # first line: "# @package ..."
    assert fields["_target_"] == "hydra_plugins.runner_launcher.launcher.RunnerLauncher"
    assert {"max_parallel", "stagger_s", "fail_fast", "poll_s", "live"} <= set(fields)


# ---- real sweeps of the runner app ------------------------------------------------------------
@pytest.mark.timeout(200)
def test_four_jobs_on_two_cpu_slots_run_two_at_a_time(tmp_path: Path) -> None:
    proc, sdir = sweep(tmp_path, *PROBE, "devices=cpu2", "task.count=20",
                       "task.ms=150,20,100,100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sweep_jobs(sdir)
    assert sorted(rows) == [0, 1, 2, 3] and all(r["state"] == "ok" for r in rows.values())
    assert {r["device"] for r in rows.values()} == {"cpu:0", "cpu:1"}

    # concurrency, from the jobs' own journals: two at a time, never more
    windows = [item_window(Path(r["dir"])) for r in rows.values()]
    assert max_overlap(windows) == 2, windows

    # a job starts as soon as a device frees up: a waiting job (2 or 3: a job staged on the
    # busy device's spare may be overtaken) took job 1's device while the long job 0 was
    # still running (no waiting for a whole batch of jobs)
    took = [k for k in (2, 3) if rows[k]["device"] == rows[1]["device"] != rows[0]["device"]
            and rows[1]["finished"] <= rows[k]["started"] < rows[0]["finished"]]
    assert took, rows

    # each job process saw its own lease's environment, and its `devices` is one CPU worker
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for num, r in rows.items():
        job = Path(r["dir"])
        assert job == sdir / str(num)  # Hydra's numbering
        env = json.loads((job / "job_env.json").read_text())
        assert env["env"]["RUNNER_SWEEP_DEVICE"] == r["device"]
        assert env["env"]["CUDA_VISIBLE_DEVICES"] == ""
        assert env["env"]["OMP_NUM_THREADS"] == str(threads)
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert (cfg.devices.count, cfg.devices.threads_per_worker, cfg.devices.workers_per_device) \
            == (1, threads, 1)
        assert len(yaml.safe_load((job / "plan.yaml").read_text())["slots"]) == 1
        identity = identity_line(job, 0)
        assert f"CUDA_VISIBLE_DEVICES= threads={threads} OMP_NUM_THREADS={threads}" in identity
        assert f"devices.count=1" in (job / "rerun.sh").read_text()
    pids = {json.loads((Path(r["dir"]) / "job_env.json").read_text())["pid"] for r in rows.values()}
    assert len(pids) == 4

    # jobs that ran at the same time held different leases
    for a in rows.values():
        for b in rows.values():
            if a["num"] < b["num"] and a["started"] < b["finished"] and b["started"] < a["finished"]:
                assert a["device"] != b["device"], (a, b)

    md = (sdir / "sweep.md").read_text()
    assert "| job | task.ms | device | status |" in md and md.count("**best**") == 1
    assert "task.count" not in md.split("\n\n")[2]  # only what varies is a column
    assert "20/20" in proc.stderr  # the live view counted items


@pytest.mark.timeout(200)
def test_a_raising_and_a_killed_job_leave_the_others_finishing(tmp_path: Path) -> None:
    proc, sdir = sweep(tmp_path, *PROBE, "devices=cpu2", "task.count=10", "task.ms=20",
                       "+task.fail=none,raise", "+task.kill_after=-1,3")
    assert proc.returncode == 1  # Hydra's sweeper reports the first failed job
    assert "killed by SIGKILL" in proc.stderr and "Traceback" not in proc.stderr
    rows = sweep_jobs(sdir)
    ok, killed, raised, raised_too = rows[0], rows[1], rows[2], rows[3]
    assert ok["state"] == "ok" and ok["items_done"] == 10
    assert killed["state"] == "failed" and "SIGKILL" in killed["reason"]
    assert raised["state"] == "failed" and "RuntimeError: boom from job" in raised["reason"]
    assert raised_too["state"] == "failed"

    md = (sdir / "sweep.md").read_text()
    for num, what in ((1, "killed by SIGKILL"), (2, "RuntimeError: boom from job")):
        line = next(x for x in md.splitlines() if x.startswith(f"| {num} |"))
        assert f"failed: {what}" in line, line
    assert next(x for x in md.splitlines() if x.startswith("| 0 |")).count("**best**") == 1

    # the traceback is in the failed job's own logs, written when it failed
    job2 = Path(raised["dir"])
    for log in ("console.log", "runner.log"):
        text = (job2 / log).read_text()
        assert "Traceback" in text and "RuntimeError: boom from job" in text, log
    assert (job2 / "console.log").stat().st_mtime < max(r["finished"] for r in rows.values())
    killed_journal = Path(killed["dir"]) / "journal.sqlite"
    assert killed_journal.is_file() and not (Path(killed["dir"]) / "summary.json").exists()


@pytest.mark.timeout(150)
def test_fail_fast_stops_handing_out_jobs(tmp_path: Path) -> None:
    proc, sdir = sweep(tmp_path, *PROBE, "devices=cpu", "task.count=3", "task.ms=10",
                       "+task.fail=raise,none,none", "hydra.launcher.fail_fast=true")
    assert proc.returncode == 1
    rows = sweep_jobs(sdir)
    assert rows[0]["state"] == "failed"
    assert [rows[i]["state"] for i in (1, 2)] == ["not started", "not started"]
    assert not (sdir / "1").exists() and not (sdir / "2").exists()
    assert "not started: fail_fast: job 0 failed" in (sdir / "sweep.md").read_text()


@pytest.mark.timeout(150)
def test_a_job_with_failed_items_makes_the_sweep_exit_3_and_stagger(tmp_path: Path) -> None:
    proc, sdir = sweep(tmp_path, *PROBE, "devices=cpu2", "task.count=4", "task.ms=10",
                       "+task.fail=none,items", "hydra.launcher.stagger_s=1.5")
    assert proc.returncode == 3, proc.stderr[-2000:]  # runner's code: finished, items failed
    rows = sweep_jobs(sdir)
    assert rows[1]["started"] - rows[0]["started"] >= 1.5  # the stagger, with a device free
    assert rows[0]["state"] == "ok" and rows[1]["exit_code"] == 3
    line = next(x for x in (sdir / "sweep.md").read_text().splitlines() if x.startswith("| 1 |"))
    assert "failed: exit 3 (items failed)" in line


# ---- the pool ---------------------------------------------------------------------------------
def _cfg(group: str, **extra) -> OmegaConf:
    raw = yaml.safe_load((ROOT / "conf" / "devices" / f"{group}.yaml").read_text())
    raw.pop("defaults")
    base = {"ids": None, "workers_per_device": 1, "threads_per_worker": None}
    return OmegaConf.create({"devices": {**base, **raw, **extra}})


def test_pool_for_cuda_and_xpu_cards_with_a_faked_inventory(monkeypatch) -> None:
    fake = devices_mod.Inventory(cpu_cores=16, cuda=("A100",) * 4, xpu=())
    monkeypatch.setattr(devices_mod, "discover", lambda backends=(): fake)
    leases = _pool.make_pool(_cfg("cuda4"), None)
    assert [lease.label for lease in leases] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    for i, lease in enumerate(leases):
        assert lease.env["CUDA_VISIBLE_DEVICES"] == str(i)
        assert lease.env[_pool.LEASE_VARIABLE] == f"cuda:{i}"
        assert lease.pins["devices.ids"] == [i] and lease.pins["devices.count"] == 1
    # two workers per card are still one lease per card; max_parallel caps the pool
    assert len(_pool.make_pool(_cfg("cuda2", workers_per_device=2), None)) == 2
    assert [x.label for x in _pool.make_pool(_cfg("cuda4"), 3)] == ["cuda:0", "cuda:1", "cuda:2"]
    # devices.ids picks the cards
    assert [x.device_id for x in _pool.make_pool(_cfg("cuda2", ids=[1, 3]), None)] == [1, 3]

    fake = devices_mod.Inventory(cpu_cores=8, xpu=("Arc A770", "Arc A770"))
    monkeypatch.setattr(devices_mod, "discover", lambda backends=(): fake)
    leases = _pool.make_pool(_cfg("arc2"), None)
    assert [x.env["ZE_AFFINITY_MASK"] for x in leases] == ["0", "1"]
    assert all(x.pins["devices.backend"] == "xpu" for x in leases)


def test_pool_for_cpu_and_for_apps_without_devices() -> None:
    leases = _pool.make_pool(_cfg("cpu4"), None)
    assert [x.label for x in leases] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert all(x.pins["devices.count"] == 1 and x.env["CUDA_VISIBLE_DEVICES"] == "" for x in leases)
    plain = _pool.make_pool(OmegaConf.create({"foo": 1}), 3)
    assert [x.label for x in plain] == ["slot:0", "slot:1", "slot:2"] and not plain[0].env


def test_xpu_probe_ignores_a_sweep_jobs_own_mask(monkeypatch) -> None:
    """A job on xpu:1 runs with ZE_AFFINITY_MASK=1; its discovery must still see every card
    (ids are machine ids, as nvidia-smi gives for CUDA), or devices.ids=[1] would not exist."""
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(kw.get("env") or os.environ)
        return subprocess.CompletedProcess(cmd, 0, "Arc A770\nArc A770\n", "")

    monkeypatch.setenv("ZE_AFFINITY_MASK", "1")
    monkeypatch.setattr(devices_mod, "_intel_gpu_in_sysfs", lambda: True)
    monkeypatch.setattr(devices_mod.subprocess, "run", fake_run)
    assert len(devices_mod.discover(("xpu",)).xpu) == 2
    assert "ZE_AFFINITY_MASK" not in seen
