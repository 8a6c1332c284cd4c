"""Resume over a run whose items are all done: how long the skip takes, and whether the
controller's memory grows with the number of items (issue 4: <= 2 s for 100,000 items,
memory flat).

For each size N it builds a real run dir of ``task=sleep`` through the real APIs — the
task config composed by Hydra from conf/, the journal written by :class:`runner.journal.Journal`
(N items discovered by SleepTask, each marked running then done) — and then measures:

* skip phase: the controller's own start-of-run work over the journal, timed in a fresh
  process: ``Journal.add(discover)`` + ``recover`` + ``counts`` + ``Scheduler.plan`` +
  ``todo_stats`` + commit — what runner/app.py does before it hands work to executors;
  with the process's peak RSS (ru_maxrss) above its RSS after imports;
* the whole CLI: ``python -m runner task=sleep ... resume=latest`` from launch to exit
  (Python and Hydra start-up included), with the controller's peak RSS (VmHWM from
  /proc, polled) and RUSAGE_CHILDREN's max RSS (any process in its tree).

    .venv/bin/python bench/bench_resume.py                 # 10,000 and 100,000
    .venv/bin/python bench/bench_resume.py --sizes 1000 20000 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def overrides(n: int, outputs: Path) -> list[str]:
    return ["task=sleep", f"task.count={n}", "task.ms=1", "task.write_outputs=false",
            "devices=cpu2", f"outputs={outputs}", "progress=off"]


def build_run(n: int, outputs: Path) -> Path:
    """A run dir of task=sleep with N done items, written through the real APIs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from runner.tasks.sleep import SleepTask
    from runner import app
    from runner.journal import Journal
    from runner.rundir import RunDir, atomic_write_json

    app.setup()
    with initialize_config_dir(config_dir=app.CONF, version_base="1.3"):
        cfg = compose("config", overrides=[o for o in overrides(n, outputs)])
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    root = outputs / "sleep" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
    rundir = RunDir(root).make()
    atomic_write_json(rundir.task_config, task_cfg)
    task = SleepTask(**{k: v for k, v in task_cfg.items() if k != "_target_"})
    journal = Journal(rundir.journal)
    journal.add(task.discover())
    now = time.time()
    for k in range(n):
        item = f"item-{k:06d}"
        journal.mark_running(item, k % 2, f"cpu:{k % 2}", now)
        journal.mark_done(item, f"sleeps/{item}.json", "sleep", 1, now, now + 0.001)
    journal.commit()
    journal.close()
    return root


SKIP_PHASE = r"""
import json, resource, sys, time
from itertools import islice
from runner.journal import Journal
from runner.scheduler import Scheduler
from runner.tasks.sleep import SleepTask
def rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = rss_kib()
path, n = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
journal = Journal(path)
journal.add(islice(SleepTask(count=n, ms=1, write_outputs=False).discover(), None))
recovered = journal.recover(False)
counts = journal.counts()
scheduler = Scheduler(journal, "dynamic", 2, 1)
load = scheduler.plan()
todo = journal.todo_stats()
has_work = scheduler.has_work()
journal.commit()
seconds = time.perf_counter() - t0
journal.close()
print(json.dumps({"skip_s": seconds, "counts": counts, "todo": todo[0], "has_work": has_work,
                  "recovered": recovered, "rss_base_kib": base, "rss_peak_kib": rss_kib()}))
"""


def skip_phase(run: Path, n: int) -> dict:
    p = subprocess.run([sys.executable, "-c", SKIP_PHASE, str(run / "journal.sqlite"), str(n)],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def _vmhwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cli_resume(n: int, outputs: Path) -> dict:
    """The whole CLI in a child that reports its own RUSAGE_CHILDREN."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "runner", *overrides(n, outputs),
                             "resume=latest"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    hwm = 0
    while proc.poll() is None:
        v = _vmhwm_kib(proc.pid)
        hwm = max(hwm, v or 0)
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"resume of {n} items failed ({proc.returncode}):\n{err[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run = sorted((outputs / "sleep").iterdir())[-1]
    summary = json.loads((run / "summary.json").read_text())
    plan_text = (run / "plan.yaml").read_text()
    return {"wall_s": wall, "controller_peak_kib": hwm,
            "tree_max_rss_kib": after if after > before else None,
            "counts": summary["counts"], "items_done_now": summary["items_done"],
            "already_done_in_plan": "already_done: %d" % n in plan_text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
        for n in args.sizes:
            outputs = Path(tmp) / f"n{n}"
            t0 = time.perf_counter()
            run = build_run(n, outputs)
            build_s = time.perf_counter() - t0
            skip = skip_phase(run, n)
            cli = cli_resume(n, outputs)
            ok = (skip["counts"]["done"] == n and skip["todo"] == 0 and not skip["has_work"]
                  and cli["counts"]["done"] == n and cli["items_done_now"] == 0)
            results[n] = {"build_s": round(build_s, 2), "skip_s": round(skip["skip_s"], 3),
                          "skip_rss_growth_kib": skip["rss_peak_kib"] - skip["rss_base_kib"],
                          "skip_rss_peak_kib": skip["rss_peak_kib"],
                          "cli_wall_s": round(cli["wall_s"], 3),
                          "cli_controller_peak_kib": cli["controller_peak_kib"],
                          "cli_tree_max_rss_kib": cli["tree_max_rss_kib"],
                          "all_skipped": ok}
            r = results[n]
            print(f"{n:>7} done items: skip phase {r['skip_s']:.3f} s "
                  f"(RSS +{r['skip_rss_growth_kib'] / 1024:.1f} MiB over imports, peak "
                  f"{r['skip_rss_peak_kib'] / 1024:.1f} MiB); whole CLI resume "
                  f"{r['cli_wall_s']:.2f} s, controller peak RSS "
                  f"{r['cli_controller_peak_kib'] / 1024:.1f} MiB; nothing redone: {ok}",
                  flush=True)
    sizes = sorted(results)
    if len(sizes) >= 2:
        lo, hi = results[sizes[0]], results[sizes[-1]]
        print(f"ratio {sizes[-1]:,} / {sizes[0]:,} items: skip time x"
              f"{hi['skip_s'] / lo['skip_s']:.2f}, skip-phase peak RSS x"
              f"{hi['skip_rss_peak_kib'] / lo['skip_rss_peak_kib']:.2f}, CLI controller peak "
              f"RSS x{hi['cli_controller_peak_kib'] / lo['cli_controller_peak_kib']:.2f}")
    biggest = results[sizes[-1]]
    print(f"target: skip phase <= 2 s for {sizes[-1]:,} items: "
          f"{'met' if biggest['skip_s'] <= 2.0 else 'NOT met'} ({biggest['skip_s']:.3f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
