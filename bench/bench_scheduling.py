"""Scheduling benchmark: how close runner gets to a perfect schedule of sleeping items.

    .venv/bin/python bench/bench_scheduling.py              # full: ~2-3 minutes
    .venv/bin/python bench/bench_scheduling.py --quick      # small: does it work?
    .venv/bin/python bench/bench_scheduling.py --json bench/scheduling.json

Items come from runner/tasks/sleep.py (``task=sleep``, plugged in through ``_target_`` as a
user's task would be): each sleeps for its cost, so it is device time that needs no CPU,
and a perfect scheduler on 8 slots finishes in max(sum/8, longest). The runner runs
through the real CLI with ``devices=cpu devices.count=8 devices.threads_per_worker=1
batch_size=1 task.write_outputs=false`` -- no output files, so no fsyncs count as device
time (the journal, journal.sqlite, is kept as always: its commits are part of the run).

(i)  5,000 items x 10 ms, chunking=dynamic: makespan / (sum/8), target <= 1.03; once per
     --fixed-batch-sizes (default 1 and 8; the Pool beside it gets the same chunksize). A
     worker runs a batch's items back to back, so a batch pays one dispatch for all of them.
(ii) 2,000 lognormal items (sigma 1, median --median-ms, the same seed so every strategy
     gets identical costs) for dynamic, size_balanced, contiguous and round_robin:
     makespan / max(sum/8, longest), target <= 1.05 for dynamic and size_balanced.
(iii) the baseline beside each: ``multiprocessing.Pool(8).imap_unordered`` over the same
     costs (a module-level sleep function, chunksize=1), same makespan definition.

Makespan = first item start to last item finish (journal.sqlite ``items``: started,
finished; for the pool, the times each call records). The CLI's wall time, launch to exit
with start-up, is printed beside it. Where the makespan exceeds the ideal, the excess
slot-time is split exactly into: slots starting late (worker start-up spread), gaps between
chunks (dispatch latency not hidden by prefetch), overhead inside a chunk beyond its sleeps,
and the tail (slots idle at the end: imbalance). A chunk is what a worker ran at once: one
item at batch_size 1 (or Pool chunksize 1). The script reports and always exits 0.
"""
from __future__ import annotations

import argparse
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

SLOTS = 8
STRATEGIES = ("dynamic", "size_balanced", "contiguous", "round_robin")
TARGET_FIXED, TARGET_LOGNORMAL = 1.03, 1.05


def sleep_for(job: tuple[int, float]) -> tuple[int, float, float, int]:
    """The pool's work function: sleep for the cost, say when (module-level: it pickles)."""
    import os

    index, cost = job
    start = time.time()
    time.sleep(cost)
    return index, start, time.time(), os.getpid()


def costs(count: int, ms: float, dist: str, sigma: float, seed: int) -> list[float]:
    """The exact costs SleepTask discovers for these settings (seconds)."""
    from runner.tasks.sleep import SleepTask

    return [it.cost for it in SleepTask(count=count, ms=ms, dist=dist, sigma=sigma,
                                        seed=seed).discover()]


def analyse(records: list[tuple[Any, float, float, float]], n_slots: int,
            longest: float | None = None) -> dict[str, Any]:
    """Makespan and an exact split of its excess slot-time. records: (slot, start, end, cost);
    ``longest``: the longest single item, where records are chunks of several."""
    t0 = min(r[1] for r in records)
    t1 = max(r[2] for r in records)
    total = sum(r[3] for r in records)
    longest = max(r[3] for r in records) if longest is None else longest
    makespan = t1 - t0
    per: dict[Any, list] = {}
    for slot, s, e, c in records:
        per.setdefault(slot, []).append((s, e, c))
    late = gaps = overhead = tail = 0.0
    firsts = []
    for rows in per.values():
        rows.sort()
        firsts.append(rows[0][0])
        late += rows[0][0] - t0
        gaps += sum(max(0.0, b[0] - a[1]) for a, b in zip(rows, rows[1:]))
        overhead += sum((e - s) - c for s, e, c in rows)
        tail += t1 - max(e for _, e, _ in rows)
    idle_slots = n_slots - len(per)  # slots that never ran an item count as wholly idle
    ideal = max(total / n_slots, longest)
    ideal_fixed = total / n_slots
    # the ideal once each slot's first start is given (water-filling from the first starts)
    starts = sorted(firsts)
    lo, hi = t0, t0 + total + (max(firsts) - t0) + longest
    for _ in range(60):
        mid = (lo + hi) / 2
        cap = sum(max(0.0, mid - s) for s in starts)
        lo, hi = (mid, hi) if cap < total else (lo, mid)
    ideal_given_starts = max(hi - t0, longest)
    return {
        "items": len(records), "slots_used": len(per), "sum_cost_s": total, "longest_s": longest,
        "makespan_s": makespan, "ideal_s": ideal, "ratio": makespan / ideal,
        "ratio_vs_sum_over_slots": makespan / ideal_fixed,
        "ideal_given_starts_s": ideal_given_starts,
        "ratio_given_starts": makespan / ideal_given_starts,
        "first_start_spread_s": max(firsts) - min(firsts),
        # excess slot-time = n_slots * makespan - sum(cost) = the four parts below (+ unused slots)
        "excess_slot_s": n_slots * makespan - total,
        "excess_late_start_s": late, "excess_gaps_s": gaps, "excess_per_item_s": overhead,
        "excess_tail_s": tail, "excess_unused_slots_s": idle_slots * makespan,
        "per_item_overhead_ms": 1000 * overhead / len(records),
        "gap_per_item_ms": 1000 * gaps / max(1, len(records) - len(per)),
    }


def chunks(rows: list[tuple[Any, float, float, float]]) -> list[tuple[Any, float, float, float]]:
    """Journal rows (slot, started, finished, cost) -> one record per chunk the worker ran.

    A worker stamps every item of a chunk with the chunk's start and finish, so items with
    the same (slot, started, finished) were one sleep of their summed cost (batch_size 1:
    one item each)."""
    merged: dict[tuple[Any, float, float], float] = {}
    for slot, s, e, c in rows:
        merged[(slot, s, e)] = merged.get((slot, s, e), 0.0) + c
    return [(slot, s, e, c) for (slot, s, e), c in merged.items()]


def run_runner(name: str, count: int, ms: float, dist: str, strategy: str, tmp: Path,
               seed: int, prefetch: int | None = None, batch_size: int = 1) -> dict[str, Any]:
    overrides = ["task=sleep", f"task.count={count}", f"task.ms={ms}", f"task.dist={dist}",
                 "task.sigma=1.0", f"task.seed={seed}", "task.write_outputs=false",
                 "devices=cpu", f"devices.count={SLOTS}", "devices.threads_per_worker=1",
                 f"batch_size={batch_size}", f"chunking={strategy}"]
    if prefetch is not None:
        overrides.append(f"chunking.prefetch={prefetch}")
    run = run_cli(overrides, tmp / f"out-{name}", tmp / f"{name}.log")
    if run.returncode != 0 or run.run_dir is None:
        raise RuntimeError(f"runner {name} failed (exit {run.returncode}):\n{run.output_tail}")
    db = sqlite3.connect(f"file:{run.run_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT slot, started, finished, cost FROM items WHERE status='done'").fetchall()
    finally:
        db.close()
    if len(rows) != count:
        raise RuntimeError(f"runner {name}: {len(rows)} of {count} items done")
    out = analyse(chunks(rows), SLOTS, longest=max(r[3] for r in rows))
    out.update({"items": len(rows), "chunks": out["items"], "batch_size": batch_size,
                "wall_s": run.wall_s, "first_start_after_launch_s": min(r[1] for r in rows) - run.launch,
                "after_last_finish_s": run.exit - max(r[2] for r in rows),
                "run_dir": str(run.run_dir), "argv": run.argv[2:]})
    return out


def run_pool(item_costs: list[float], chunksize: int = 1) -> dict[str, Any]:
    t0 = time.time()
    pool = mp.Pool(SLOTS)
    t1 = time.time()
    try:
        results = list(pool.imap_unordered(sleep_for, enumerate(item_costs), chunksize=chunksize))
        t2 = time.time()
    finally:
        pool.close()
        pool.join()
    records = [(pid, s, e, item_costs[i]) for i, s, e, pid in results]
    out = analyse(records, SLOTS)
    out.update({"wall_s": time.time() - t0, "pool_create_s": t1 - t0, "results_s": t2 - t1,
                "first_start_after_launch_s": min(r[1] for r in records) - t0,
                "start_method": mp.get_start_method(), "chunksize": chunksize})
    return out


def _row(label: str, r: dict[str, Any], target: float | None) -> list[Any]:
    verdict = "" if target is None else ("ok" if r["ratio"] <= target else "MISSED")
    return [label, r["items"], r["sum_cost_s"] / SLOTS, r["longest_s"], r["makespan_s"],
            r["ratio"], r["ratio_given_starts"], r["wall_s"],
            f"<= {target} {verdict}" if target else "baseline"]


def _excess(label: str, r: dict[str, Any]) -> list[Any]:
    return [label, r["excess_slot_s"], r["excess_late_start_s"], r["excess_gaps_s"],
            r["excess_per_item_s"], r["excess_tail_s"], r["gap_per_item_ms"],
            r["per_item_overhead_ms"], r["first_start_spread_s"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="runner scheduling benchmark with sleeping items")
    ap.add_argument("--quick", action="store_true", help="small counts: check that it works")
    ap.add_argument("--median-ms", type=float, default=30.0,
                    help="lognormal median (ms); 30 gives ~12 s of ideal makespan for 2,000 items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="i,ii", help="i, ii or i,ii")
    ap.add_argument("--fixed-batch-sizes", type=lambda v: [int(x) for x in v.split(",")],
                    default=[1, 8], help="(i) runs once per batch size (Pool: chunksize)")
    ap.add_argument("--prefetch", type=int, default=None, help="chunking.prefetch for the runner")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--keep", type=Path, default=None, help="keep run dirs here")
    a = ap.parse_args(argv)

    n_fixed, n_logn = (400, 300) if a.quick else (5000, 2000)
    tmp = a.keep or Path(tempfile.mkdtemp(prefix="bench-sched-"))
    tmp.mkdir(parents=True, exist_ok=True)
    parts = {p.strip() for p in a.parts.split(",")}
    res: dict[str, Any] = {"bench": "scheduling", "machine": machine(), "slots": SLOTS,
                           "quick": a.quick, "tmp": str(tmp), "prefetch": a.prefetch,
                           "targets": {"fixed": TARGET_FIXED, "lognormal": TARGET_LOGNORMAL}}
    rows: list[list[Any]] = []
    excess: list[list[Any]] = []
    print(f"work dir {tmp}", flush=True)
    try:
        if "i" in parts:
            res["fixed"] = {}
            for bs in a.fixed_batch_sizes:
                print(f"(i) {n_fixed} x 10 ms, dynamic, batch_size={bs} ...", flush=True)
                fixed = run_runner(f"fixed-b{bs}", n_fixed, 10.0, "fixed", "dynamic", tmp, a.seed,
                                   a.prefetch, bs)
                pool = run_pool(costs(n_fixed, 10.0, "fixed", 1.0, a.seed), bs)
                res["fixed"][f"batch_size={bs}"] = {"runner": fixed, "pool": pool}
                if bs == a.fixed_batch_sizes[0]:  # the first: where earlier results were kept
                    res["fixed"].update({"runner": fixed, "pool": pool})
                rows += [_row(f"(i) runner dynamic {n_fixed}x10ms, batch {bs}", fixed, TARGET_FIXED),
                         _row(f"(i) Pool(8).imap_unordered, chunksize {bs}", pool, None)]
                excess += [_excess(f"(i) runner dynamic, batch {bs}", fixed),
                           _excess(f"(i) Pool, chunksize {bs}", pool)]
        if "ii" in parts:
            res["lognormal"] = {"count": n_logn, "median_ms": a.median_ms, "sigma": 1.0}
            for strategy in STRATEGIES:
                print(f"(ii) {n_logn} lognormal, {strategy} ...", flush=True)
                r = run_runner(f"logn-{strategy}", n_logn, a.median_ms, "lognormal", strategy,
                               tmp, a.seed, a.prefetch)
                res["lognormal"][strategy] = r
                target = TARGET_LOGNORMAL if strategy in ("dynamic", "size_balanced") else None
                rows.append(_row(f"(ii) runner {strategy}", r, target) if target else
                            _row(f"(ii) runner {strategy}", r, None)[:-1] + ["(no target)"])
                excess.append(_excess(f"(ii) runner {strategy}", r))
            pool = run_pool(costs(n_logn, a.median_ms, "lognormal", 1.0, a.seed))
            res["lognormal"]["pool"] = pool
            rows.append(_row("(ii) Pool(8).imap_unordered", pool, None))
            excess.append(_excess("(ii) Pool", pool))
    except Exception as exc:  # a benchmark reports; it does not fail CI
        res["error"] = str(exc)
        print(f"bench_scheduling: {exc}", file=sys.stderr)

    print()
    print(table(["run", "items", "sum/8 s", "longest s", "makespan s", "ratio", "ratio|starts",
                 "CLI wall s", "target"], rows))
    print()
    print("excess slot-seconds (8 x makespan - sum) split into its parts:")
    print(table(["run", "excess", "late start", "gaps", "in chunks", "tail", "gap ms/chunk",
                 "ovh ms/chunk", "start spread s"], excess))
    print("ratio = makespan / max(sum/8, longest); ratio|starts = makespan / the ideal given "
          "each slot's first start (worker start-up spread taken out)")
    write_json(a.json, res)
    if a.json:
        print(f"figures written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
