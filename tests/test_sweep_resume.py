"""Layer: processes (spawned sweep jobs, a real SIGKILL), through the CLI's sweep commands.

Resuming a half-finished sweep (``-m ... resume=latest``, see _resume.py).

First run, one CPU slot, fail_fast: job 0 finishes, job 1's process is SIGKILLed mid-run
(its journal holds some done items), jobs 2 and 3 are never started. The resume (on two
CPU slots: ``devices`` only picks the pool) reruns jobs 1-3 only, in their old numbers and
directories; job 1 resumes its own journal; job 0 is not touched.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import query_journal, run_cli, sweep_jobs

SWEEP = ["task=sleep", "task._target_=tests.sweep_tasks.SweepProbeTask", "task.count=20",
         "task.ms=50", "+task.kill_after=-1,15,-1,-1", "progress=off", "hydra.launcher.live=off"]


def runner(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(["-m", f"outputs={tmp_path}", *args], timeout=150)


@pytest.mark.timeout(280)
def test_resume_reruns_only_unfinished_jobs_in_place(tmp_path: Path) -> None:
    first = runner(tmp_path, *SWEEP, "devices=cpu", "hydra.launcher.fail_fast=true")
    assert first.returncode == 1, first.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multirun" / "sleep").iterdir()
    before = sweep_jobs(sweep_dir)
    assert [before[i]["state"] for i in range(4)] == ["ok", "failed", "not started", "not started"]
    assert "SIGKILL" in before[1]["reason"]
    job0, job1 = sweep_dir / "0", sweep_dir / "1"
    done_before = query_journal(job1, "SELECT count(*) FROM items WHERE status='done'")[0][0]
    assert 0 < done_before < 20, done_before  # half-finished, and its journal kept that
    stamp0 = (job0 / "summary.json").stat().st_mtime_ns

    second = runner(tmp_path, *SWEEP, "devices=cpu2", "resume=latest")
    assert second.returncode == 0, second.stderr[-3000:]
    # the same sweep dir, no new one; the numbers and directories kept
    assert [p.name for p in (tmp_path / "multirun" / "sleep").iterdir()] == [sweep_dir.name]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    after = sweep_jobs(sweep_dir)
    assert all(after[i]["state"] == "ok" for i in range(4)), after
    assert [after[i]["runs"] for i in range(4)] == [1, 2, 1, 1]
    assert [after[i]["dir"] for i in range(4)] == [str(sweep_dir / str(i)) for i in range(4)]
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert doc["resumes"][-1]["rerun"] == [1, 2, 3] and doc["resumes"][-1]["kept"] == [0]
    assert "| 1 | 15 |" in (sweep_dir / "sweep.md").read_text()

    # job 0 was not run again
    assert (job0 / "summary.json").stat().st_mtime_ns == stamp0
    assert not list((job0 / ".hydra").glob("resume-*"))

    # job 1 resumed its own journal: what was done before the kill was not redone
    (resume_dir,) = (job1 / ".hydra").glob("resume-*")
    hydra_cfg = OmegaConf.load(resume_dir / "hydra.yaml")
    assert hydra_cfg.hydra.job.num == 1
    assert f"resume.run='{job1}'" in list(hydra_cfg.hydra.overrides.task)
    resumed_at = json.loads((job1 / "resumes.jsonl").read_text().splitlines()[-1])["time"]
    kept = query_journal(job1, "SELECT count(*) FROM items WHERE status='done' AND finished < ?",
                         [resumed_at])
    assert kept[0][0] == done_before
    assert query_journal(job1, "SELECT count(*) FROM items WHERE status='done'")[0][0] == 20
    assert json.loads((job1 / "summary.json").read_text())["items_done"] == 20 - done_before

    # jobs 2 and 3 ran fresh where the first run would have put them
    for n in (2, 3):
        assert OmegaConf.load(sweep_dir / str(n) / ".hydra" / "hydra.yaml").hydra.job.num == n
        assert json.loads((sweep_dir / str(n) / "summary.json").read_text())["items_done"] == 20


@pytest.mark.timeout(120)
def test_resume_with_other_overrides_is_refused_before_anything_runs(tmp_path: Path) -> None:
    first = runner(tmp_path, "task=sleep", "task.count=2", "task.ms=1", "seed=1,2",
                   "progress=off", "hydra.launcher.live=off")
    assert first.returncode == 0, first.stderr[-2000:]
    (sweep_dir,) = (tmp_path / "multirun" / "sleep").iterdir()
    again = runner(tmp_path, "task=sleep", "task.count=2", "task.ms=1", "seed=1,3",
                   "progress=off", "resume=latest")
    assert again.returncode == 1
    err = again.stderr.strip().splitlines()
    assert any("are not a job of the sweep" in line and "seed=3" in line for line in err), err
    assert [r["runs"] for r in sweep_jobs(sweep_dir).values()] == [1, 1]
    assert list((tmp_path / "multirun" / "sleep").iterdir()) == [sweep_dir]  # no stray dir
    nothing = runner(tmp_path / "empty", "task=sleep", "seed=1,2", "resume=latest")
    assert nothing.returncode == 1 and "no sweep with a sweep.json" in nothing.stderr
