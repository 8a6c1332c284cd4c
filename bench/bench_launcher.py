"""Per-job overhead of ``hydra/launcher=runner`` against Hydra's basic launcher and
hydra-joblib-launcher, on the example app (tests/fixtures/any_app/train.py) with jobs that
sleep 0.1 s and 1 s.

Each launcher runs the same N jobs one at a time (runner: max_parallel=1 on CPU; joblib:
n_jobs=1), so ``(sweep wall - N x job sleep) / N`` is what the launcher adds per job:
process start, imports, config, logging, the result back. The sweep's fixed start-up
(Hydra composing the sweep, the app's own imports) is measured with a 1-job sweep and
taken off. Each launcher's overhead is also printed as a ratio to joblib's (the target:
<= 1).

    .venv/bin/python bench/bench_launcher.py [--jobs 6] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "any_app"
LAUNCHERS = {  # joblib first: the others' ratios are to its overhead
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],
    "basic": ["hydra/launcher=basic"],
    "runner": ["hydra/launcher=runner", "hydra.launcher.devices=cpu",
               "hydra.launcher.max_parallel=1", "hydra.launcher.live=off"],
    # the same without its fork server (a new interpreter per job process), and without
    # spares (each job's process started when the device frees, nothing staged)
    "runner start_method=spawn": ["hydra/launcher=runner", "hydra.launcher.devices=cpu",
                                  "hydra.launcher.max_parallel=1", "hydra.launcher.live=off",
                                  "hydra.launcher.start_method=spawn"],
    "runner spares=0": ["hydra/launcher=runner", "hydra.launcher.devices=cpu",
                        "hydra.launcher.max_parallel=1", "hydra.launcher.live=off",
                        "hydra.launcher.spares=0"],
}


def sweep_wall(app: Path, launcher: list[str], jobs: int, sleep_s: float) -> float:
    out = app / "out"
    shutil.rmtree(out, ignore_errors=True)
    lrs = ",".join(str(0.1 * (i + 1)) for i in range(jobs))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "-m", f"lr={lrs}", f"sleep_s={sleep_s}",
                           f"hydra.sweep.dir={out}", *launcher], cwd=app,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{launcher[0]} failed: {proc.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "app"
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
        print("| launcher | job sleep s | jobs | sweep wall s | per-job overhead s | vs joblib |")
        print("|---|---|---|---|---|---|")
        for sleep_s in (0.1, 1.0):
            per_job: dict[str, float] = {}
            for name, launcher in LAUNCHERS.items():
                base = min(sweep_wall(app, launcher, 1, sleep_s) for _ in range(args.repeat))
                wall = min(sweep_wall(app, launcher, args.jobs, sleep_s)
                           for _ in range(args.repeat))
                per_job[name] = (wall - base - (args.jobs - 1) * sleep_s) / (args.jobs - 1)
                ratio = (f"{per_job[name] / per_job['joblib']:.2f}"
                         if per_job.get("joblib", 0) > 0 else "-")
                print(f"| {name} | {sleep_s} | {args.jobs} | {wall:.2f} | {per_job[name]:.3f} "
                      f"| {ratio} |", flush=True)


if __name__ == "__main__":
    main()
