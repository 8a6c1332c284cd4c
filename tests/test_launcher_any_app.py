"""Layer: processes (spawned sweep jobs of an app outside the package).

The launcher as a product: ``hydra/launcher=runner`` in a Hydra app that has never heard of
runner (tests/fixtures/any_app/train.py, copied to a folder outside the repository and run
from there as a script).

* The launcher's own pool (``hydra.launcher.devices/ids/jobs_per_device``): CPU slots run
  ``jobs_per_device`` jobs at a time; a fake ``nvidia-smi`` on PATH listing four cards
  makes ``auto`` a 4-card pool, one job per card, each job seeing only its card's
  ``CUDA_VISIBLE_DEVICES``; the job's config is never rewritten.
* One-line errors before any job: no GPU for ``devices=cuda``, ids the machine lacks, a
  bad setting.
* Return values are the app's: floats, flat dicts and ints are recorded in sweep.json /
  sweep.md with ``best=max|min``; a raising job makes the sweep exit 1 and its traceback
  names train.py and its line; a script without a ``__main__`` guard runs.
* ``hydra/sweeper=optuna`` (optional extra) drives it, n_jobs trials at a time on CPU slots.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "any_app"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """The example app, copied outside the repository."""
    dest = tmp_path / "app"
    shutil.copytree(FIXTURE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def run_app(app: Path, *args: str, script: str = "train.py", env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    sweep_dir = app / "sweep"
    return subprocess.run([sys.executable, script, "-m", f"hydra.sweep.dir={sweep_dir}",
                           "hydra.launcher.live=off", *args],
                          cwd=app, capture_output=True, text=True, timeout=timeout,
                          env=env or {**os.environ, "PYTHONUNBUFFERED": "1"})


def jobs(app: Path) -> dict[int, dict]:
    doc = json.loads((app / "sweep" / "sweep.json").read_text())
    return {j["num"]: j for j in doc["jobs"]}


def seen(row: dict) -> dict:
    return json.loads((Path(row["dir"]) / "seen.json").read_text())


def max_overlap(windows: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in windows] + [(b, -1) for _, b in windows])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def fake_gpus(tmp_path: Path, cards: int) -> dict[str, str]:
    """An environment whose PATH has an ``nvidia-smi`` that lists ``cards`` cards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    lines = "".join(f"{i}, Fake Card {i}, 16384 MiB\\n" for i in range(cards))
    smi.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


# ---- the pool ---------------------------------------------------------------------------------
@pytest.mark.timeout(150)
def test_cpu_slots_values_and_best(app: Path) -> None:
    proc = run_app(app, "lr=0.1,0.2,0.3,0.5", "sleep_s=0.6", "hydra.launcher.devices=cpu",
                   "hydra.launcher.jobs_per_device=2", "hydra.launcher.best=min")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = jobs(app)
    assert [rows[i]["state"] for i in range(4)] == ["ok"] * 4
    assert [round(rows[i]["value"], 6) for i in range(4)] == [0.04, 0.01, 0.0, 0.04]
    assert rows[2]["best"] and sum(r["best"] for r in rows.values()) == 1
    views = [seen(rows[i]) for i in range(4)]
    assert all(v["env"]["CUDA_VISIBLE_DEVICES"] == "" for v in views)
    assert {v["env"]["RUNNER_SWEEP_DEVICE"] for v in views} == {"cpu:0", "cpu:1"}
    assert all(v["env"]["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS") for v in views)
    assert max_overlap([(v["start"], v["end"]) for v in views]) == 2
    # the job's config is the app's own, nothing added; its log says which device it held
    cfg = OmegaConf.load(Path(rows[0]["dir"]) / ".hydra" / "config.yaml")
    assert set(cfg) == {"lr", "sleep_s", "returns", "hold", "linger"}
    assert "this job holds cpu:" in (Path(rows[0]["dir"]) / "train.log").read_text()
    md = (app / "sweep" / "sweep.md").read_text()
    assert "| job | lr | device | status | wall s | value | best |" in md, md
    assert "items/s" not in md and "best = lowest value" in md
    assert "Best: job 2 (lr=0.3), value 0." in md


@pytest.mark.timeout(150)
def test_four_fake_cards_one_job_per_card(app: Path, tmp_path: Path) -> None:
    proc = run_app(app, "lr=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", "sleep_s=0.8",
                   "returns=dict", "hydra.launcher.best=max", "hydra.launcher.best_key=acc",
                   env=fake_gpus(tmp_path, 4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = jobs(app)
    assert len(rows) == 8 and all(r["state"] == "ok" for r in rows.values())
    for r in rows.values():
        v = seen(r)
        assert r["device"] == v["env"]["RUNNER_SWEEP_DEVICE"]
        assert v["env"]["CUDA_VISIBLE_DEVICES"] == r["device"].split(":")[1]
        assert set(r["value"]) == {"loss", "acc"}
    assert {r["device"] for r in rows.values()} == {f"cuda:{i}" for i in range(4)}
    assert max_overlap([(seen(r)["start"], seen(r)["end"]) for r in rows.values()]) == 4
    assert rows[2]["best"]  # lr=0.3: loss 0, acc 1
    md = (app / "sweep" / "sweep.md").read_text()
    assert "| loss | acc | best |" in md and "best = highest value[acc]" in md

    # ids picks cards; jobs_per_device shares them
    shutil.rmtree(app / "sweep")
    proc = run_app(app, "lr=0.1,0.2,0.3,0.4", "sleep_s=0.8", "hydra.launcher.ids=[1,3]",
                   "hydra.launcher.jobs_per_device=2", env=fake_gpus(tmp_path, 4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = jobs(app)
    assert {r["device"] for r in rows.values()} == {"cuda:1", "cuda:3"}
    assert max_overlap([(seen(r)["start"], seen(r)["end"]) for r in rows.values()]) == 4


@pytest.mark.timeout(150)
def test_an_app_devices_dict_is_not_rewritten(app: Path, tmp_path: Path) -> None:
    """The issue's case: the app has its own `devices: {backend, count}`; the launcher
    neither crashes on it nor pins it."""
    proc = run_app(app, "lr=0.1,0.2", "+devices.backend=cuda", "+devices.count=2",
                   env=fake_gpus(tmp_path, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = jobs(app)
    for r in rows.values():
        cfg = OmegaConf.load(Path(r["dir"]) / ".hydra" / "config.yaml")
        assert OmegaConf.to_container(cfg.devices) == {"backend": "cuda", "count": 2}
    assert {r["device"] for r in rows.values()} == {"cuda:0", "cuda:1"}


# ---- one-line errors, before any job ------------------------------------------------------------
@pytest.mark.timeout(150)
@pytest.mark.parametrize("args, cards, says", [
    (["hydra.launcher.devices=cuda"], 0, "hydra.launcher.devices=cuda: this machine has no cuda"),
    (["hydra.launcher.ids=[5]"], 4, "hydra.launcher.ids=[5] names cuda device(s) [5] but this "
                                    "machine has 4"),
    (["hydra.launcher.devices=gpu"], 0, "hydra.launcher.devices='gpu' is not one of"),
    (["hydra.launcher.jobs_per_device=0"], 0, "hydra.launcher.jobs_per_device=0 must be"),
    (["hydra.launcher.best=highest"], 0, "hydra.launcher.best='highest' is not one of"),
    (["hydra.launcher.start_method=fork"], 0,
     "hydra.launcher.start_method='fork' is not one of forkserver, spawn"),
    (["hydra.launcher.spares=-1"], 0, "hydra.launcher.spares=-1 must be an integer from 0 to 8"),
])
def test_a_bad_pool_is_one_line(app: Path, tmp_path: Path, args, cards, says) -> None:
    env = fake_gpus(tmp_path, cards) if cards else None
    proc = run_app(app, "lr=0.1,0.2", *args, env=env)
    assert proc.returncode == 1
    assert says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3
    assert not (app / "sweep" / "0").exists()


# ---- return values, failures, tracebacks --------------------------------------------------------
@pytest.mark.timeout(150)
def test_an_int_is_the_apps_value_and_a_raise_fails_the_sweep(app: Path) -> None:
    proc = run_app(app, "lr=0.1,0.2", "returns=int", "hydra.launcher.max_parallel=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = jobs(app)
    assert all(r["state"] == "ok" and r["value"] == 1 and r["exit_code"] is None
               for r in rows.values())
    assert "failed" not in (app / "sweep" / "sweep.md").read_text()

    shutil.rmtree(app / "sweep")
    proc = run_app(app, "lr=0.2", "returns=float,raise", "hydra.launcher.max_parallel=2")
    assert proc.returncode == 1
    assert "raised ValueError: diverged at lr=0.2" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = jobs(app)
    assert rows[0]["state"] == "ok" and rows[1]["state"] == "failed"
    console = (Path(rows[1]["dir"]) / "console.log").read_text()
    assert 'train.py", line' in console and "<dynamic-code>" not in console, console


@pytest.mark.timeout(150)
def test_a_script_without_main_guard_runs(app: Path) -> None:
    proc = run_app(app, "lr=0.1,0.2", "returns=float,raise", script="train_noguard.py")
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = jobs(app)
    assert rows[0]["state"] == "ok" and rows[0]["value"] == pytest.approx(0.04)
    console = (Path(rows[1]["dir"]) / "console.log").read_text()
    assert 'train_noguard.py", line' in console and "Primary config module" not in console


# ---- Hydra's sweepers -----------------------------------------------------------------------
@pytest.mark.timeout(200)
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="hydra-optuna-sweeper (extra `optuna`) not installed")
def test_optuna_sweeper_runs_n_jobs_trials_at_a_time(app: Path) -> None:
    proc = run_app(app, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6",
                   "hydra.sweeper.n_jobs=2", "hydra.sweeper.direction=minimize",
                   "hydra.sweeper.sampler.seed=1", "lr=interval(0,1)",
                   "sleep_s=0.6", "hydra.launcher.devices=cpu",
                   "hydra.launcher.jobs_per_device=2", "hydra.launcher.best=min", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = OmegaConf.load(app / "sweep" / "optimization_results.yaml")
    rows = jobs(app)  # every batch's trials in one sweep.json, the best one marked
    assert sorted(rows) == list(range(6)) and all(r["state"] == "ok" for r in rows.values())
    best = min(r["value"] for r in rows.values())
    assert results.best_value == pytest.approx(best)
    assert [r["value"] for r in rows.values() if r["best"]] == [best]
    views = [json.loads(p.read_text()) for p in (app / "sweep").glob("*/seen.json")]
    assert len(views) == 6
    assert {v["env"]["RUNNER_SWEEP_DEVICE"] for v in views} == {"cpu:0", "cpu:1"}
    assert max_overlap([(v["start"], v["end"]) for v in views]) == 2

