"""reuse=: matching 100,000 unchanged items against an earlier run and linking their files.

    .venv/bin/python bench/bench_reuse.py                 # 100,000 items (~1 minute to set up)
    .venv/bin/python bench/bench_reuse.py --count 20000

The earlier run is made here without running a model: the sleep task's items
(runner/tasks/sleep.py, with fingerprints) are journalled by the real intake, marked done
with one output file each (written plainly, no fsync: this is set-up), and its task.json is
the task group a CLI run writes. Then a new run's journal takes the same items (the real
intake: "discovery" below) and :func:`runner.reuse.apply` matches them and hard-links their
files into the new run dir ("reuse" below: the figure the issue bounds, target <= 5 s).
The controller's peak RSS before and after the match says whether memory grows with the
item count. Reports and exits 0.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner import intake, reuse  # noqa: E402
from runner.journal import Journal  # noqa: E402
from runner.rundir import RunDir  # noqa: E402
from runner.tasks.sleep import SleepTask  # noqa: E402

TARGET_S = 5.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def earlier_run(root: Path, task: SleepTask, cfg: dict) -> RunDir:
    rd = RunDir(root / "sleep" / "2026-01-01_00-00-00.000000").make()
    j = Journal(rd.journal)
    intake.take(j, task.discover())
    ids = [i for i, _ in j.todo_costs(False)]
    (rd.root / task.output_dir).mkdir()
    for k in range(0, len(ids), 5000):
        part = ids[k:k + 5000]
        j.mark_running_many(part, 0, "cpu:0", time.time())
        rows = []
        for i in part:
            rel = f"{task.output_dir}/{i}.json"
            (rd.root / rel).write_text(json.dumps({"id": i}))
            rows.append((i, rel, "sleep", 1, time.time(), time.time()))
        j.mark_done_many(rows)
    j.set_meta("batch_no", len(ids))
    j.close()
    rd.task_config.write_text(json.dumps(cfg))
    return rd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    a = ap.parse_args(argv)
    cfg = {"_target_": "runner.tasks.sleep.SleepTask", "name": "sleep", "count": a.count,
           "ms": 1.0, "dist": "fixed", "sigma": 1.0, "seed": 0, "write_outputs": True,
           "slow_slots": ""}
    task = SleepTask(**{k: v for k, v in cfg.items() if k not in ("_target_", "name")})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        old = earlier_run(Path(tmp), task, cfg)
        setup_s = time.perf_counter() - t0
        new = RunDir(Path(tmp) / "sleep" / "2026-01-02_00-00-00.000000").make()
        j = Journal(new.journal)
        t1 = time.perf_counter()
        intake.take(j, task.discover())
        j.commit()
        t2 = time.perf_counter()
        rss_before = _rss_mb()
        report = reuse.apply(j, new, old.root, task, cfg, {"sleep"}, False)
        j.commit()
        t3 = time.perf_counter()
        rss_after = _rss_mb()
        files = sum(1 for _ in (new.root / task.output_dir).iterdir())
        j.close()
    print(f"{a.count} items; earlier run made in {setup_s:.1f} s (set-up)")
    print(f"discovery (intake of {a.count} items into the new journal): {t2 - t1:.2f} s")
    print(f"reuse (match + link {report.linked_files} files): {t3 - t2:.2f} s "
          f"(target <= {TARGET_S} s: {'ok' if t3 - t2 <= TARGET_S else 'MISSED'}); "
          f"{report.reused} reused, {files} files in the new run's folder")
    print(f"peak RSS before the match {rss_before:.0f} MB, after {rss_after:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
