"""Uneven devices: tail speculation against the same run without it, and Pool beside them.

    .venv/bin/python bench/bench_speculation.py               # ~1-2 minutes
    .venv/bin/python bench/bench_speculation.py --json bench/speculation.json

4 slots, one of them 4x slower (``task=sleep task.slow_slots='3:4'``: slot 3's worker sleeps
4x each item's cost), 2,000 lognormal items (sigma 1, median --median-ms, one seed, so every
run gets identical costs). The ideal makespan on slots of speeds 1, 1, 1, 1/4 is

    max(sum(cost) / sum(speed), longest / fastest) = max(sum / 3.25, longest)

and each run prints makespan / ideal (target <= 1.05 with speculation). Makespan = first item
start to last item finish (journal.sqlite for the runner; the times each call records for
the pool). The runs:

* runner, ``chunking.speculate=true`` (dynamic's default) and ``=false``;
* ``multiprocessing.Pool(4).imap_unordered`` over the same costs, chunksize 1, one of its
  workers sleeping 4x as well (the slowdown follows the worker, as it follows the slot).

No output files (``task.write_outputs=false``, as in bench_scheduling.py: an fsync per item
would count as device time the pool does not spend); every item must be done in the
journal. Exactly once of outputs under speculation and deaths: tests/test_speculation.py.
The script reports and exits 0.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clirun import machine, run_cli, table, write_json  # noqa: E402

SLOTS, SLOW_SLOT, SLOWDOWN, TARGET = 4, 3, 4.0, 1.05
SPEEDS = [1.0 / SLOWDOWN if s == SLOW_SLOT else 1.0 for s in range(SLOTS)]


def costs(count: int, ms: float, seed: int) -> list[float]:
    """The exact costs SleepTask discovers for these settings (seconds)."""
    from runner.tasks.sleep import SleepTask

    return [it.cost for it in SleepTask(count=count, ms=ms, dist="lognormal", sigma=1.0,
                                        seed=seed).discover()]


def ideal(item_costs: list[float]) -> float:
    return max(sum(item_costs) / sum(SPEEDS), max(item_costs) / max(SPEEDS))


_FACTOR = 1.0


def _init(started: Any) -> None:
    """Pool initializer: the first worker to start is the slow one."""
    global _FACTOR
    with started.get_lock():
        first = started.value == 0
        started.value += 1
    _FACTOR = SLOWDOWN if first else 1.0


def _sleep(cost: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(cost * _FACTOR)
    return start, time.time()


def run_pool(item_costs: list[float]) -> dict[str, Any]:
    started = mp.Value("i", 0)
    t0 = time.time()
    with mp.Pool(SLOTS, initializer=_init, initargs=(started,)) as pool:
        spans = list(pool.imap_unordered(_sleep, item_costs, chunksize=1))
    makespan = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"makespan_s": makespan, "ratio": makespan / ideal(item_costs),
            "wall_s": time.time() - t0}


def run_runner(speculate: bool, count: int, ms: float, seed: int, tmp: Path) -> dict[str, Any]:
    name = "speculate" if speculate else "no-speculate"
    overrides = ["task=sleep", f"task.count={count}", f"task.ms={ms}", "task.dist=lognormal",
                 "task.sigma=1.0", f"task.seed={seed}", f"task.slow_slots='{SLOW_SLOT}:{SLOWDOWN:g}'",
                 "task.write_outputs=false",
                 "devices=cpu", f"devices.count={SLOTS}", "devices.threads_per_worker=1",
                 "batch_size=1", "chunking=dynamic", f"chunking.speculate={str(speculate).lower()}"]
    run = run_cli(overrides, tmp / f"out-{name}", tmp / f"{name}.log")
    if run.returncode != 0 or run.run_dir is None:
        raise RuntimeError(f"runner {name} failed (exit {run.returncode}):\n{run.output_tail}")
    db = sqlite3.connect(f"file:{run.run_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, started, finished, cost, output, slot FROM items "
                          "WHERE status='done'").fetchall()
    finally:
        db.close()
    once = len(rows) == count  # (one row per id: the journal's primary key)
    makespan = max(r[2] for r in rows) - min(r[1] for r in rows)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    notes = " ".join(summary.get("notes", []))
    return {"makespan_s": makespan, "ratio": makespan / ideal([r[3] for r in rows]),
            "wall_s": run.wall_s, "exactly_once": once,
            "slow_slot_items": sum(1 for r in rows if r[5] == SLOW_SLOT),
            "copies": summary.get("speculation", {}), "notes": notes[:300]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tail speculation on an uneven machine")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--median-ms", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    item_costs = costs(a.count, a.median_ms, a.seed)
    print(f"{a.count} lognormal items (median {a.median_ms} ms, sigma 1): sum {sum(item_costs):.2f} s, "
          f"longest {max(item_costs):.3f} s; {SLOTS} slots, slot {SLOW_SLOT} {SLOWDOWN:g}x slower; "
          f"ideal makespan {ideal(item_costs):.2f} s")
    results: dict[str, Any] = {"machine": machine(), "count": a.count, "median_ms": a.median_ms,
                               "ideal_s": ideal(item_costs)}
    with tempfile.TemporaryDirectory() as tmp:
        results["runner_speculate"] = run_runner(True, a.count, a.median_ms, a.seed, Path(tmp))
        results["runner_no_speculate"] = run_runner(False, a.count, a.median_ms, a.seed, Path(tmp))
    results["pool_imap_unordered"] = run_pool(item_costs)
    rows = []
    for key, label in (("runner_speculate", "runner, speculate=true"),
                       ("runner_no_speculate", "runner, speculate=false"),
                       ("pool_imap_unordered", "Pool(4).imap_unordered")):
        r = results[key]
        verdict = (f"<= {TARGET} {'ok' if r['ratio'] <= TARGET else 'MISSED'}"
                   if key == "runner_speculate" else "")
        rows.append([label, f"{r['makespan_s']:.2f}", f"{r['ratio']:.3f}", verdict,
                     r.get("exactly_once", ""), r.get("copies", "")])
    print(table(["run", "makespan s", "makespan / ideal", "target", "exactly once", "copies"], rows))
    write_json(a.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
