"""OOM-ladder benchmark: after a step-down, restart from the configured batch size (issue 17).

    .venv/bin/python bench/bench_ladder.py                 # 400 items, 3 repeats, ~1 minute
    .venv/bin/python bench/bench_ladder.py --quick         # 80 items, 1 repeat
    .venv/bin/python bench/bench_ladder.py --json bench/ladder.json

A fake model family (``LadderTask`` below, plugged in through ``_target_`` as a user's task
would be): the largest member, ``big``, runs out of memory at any batch size; the next one,
``small``, fits batches up to ``--fits`` (8) and runs out of memory above. A call of the
model costs a fixed ``--call-ms`` (a kernel launch, a host-device round trip: what makes
batching matter) plus ``--item-ms`` per item; an out-of-memory call costs the fixed part.
Both sides run the real CLI with ``devices=cpu batch_size=8`` and the same items:

* **restart** (the rule now): after ``big`` ran out of memory at batch 1, ``small`` starts
  again from the configured 8 and keeps it.
* **stay at 1** (the old rule): ``small`` kept the batch size ``big`` had shrunk to, 1. The
  task sets the worker's private switch ``runner.worker._Ladder._restart_from_top = False``
  in the worker process (before the ladder exists); nothing else differs.

Items/s = items / (first item start -> last item finish, journal.sqlite), i.e. the steady
state the ladder decides; launch-to-exit items/s is printed beside it. The sides alternate,
``--repeats`` times each; the best of each is compared (ratio = restart / stay at 1). The
script reports and always exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Iterator, Sequence

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clirun import journal_rows, machine, run_cli, span, table, write_json  # noqa: E402
from runner.tasks.base import Item, ModelRung, Task, WriteContext  # noqa: E402

TARGET = "bench.bench_ladder.LadderTask"


class LadderTask(Task):
    """``big`` runs out of memory at any batch; ``small`` above ``fits`` items."""

    name = "sleep"
    output_dir = "ladder"

    def __init__(self, count: int = 400, call_ms: float = 20.0, item_ms: float = 1.0,
                 fits: int = 8, old_rule: bool = False, **_: Any):
        self.count, self.fits, self.old_rule = count, fits, old_rule
        self.call_s, self.item_s = call_ms / 1000.0, item_ms / 1000.0
        self.default_batch_size = 8
        if old_rule and "RUNNER_SLOT" in os.environ:  # a worker: the old rule, for comparison
            from runner.worker import _Ladder

            _Ladder._restart_from_top = False

    def discover(self) -> Iterator[Item]:
        for i in range(self.count):
            yield Item(f"item-{i:05d}", 1.0, str(i))

    def model_chain(self, backend: str) -> list[ModelRung]:
        return [ModelRung(m, m, True, "fake") for m in ("big", "small")]

    def load_model(self, rung: ModelRung, device: str) -> Any:
        return rung.name

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        time.sleep(self.call_s)
        if model == "big" or len(items) > self.fits:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({model}, "
                               f"batch of {len(items)})")
        time.sleep(self.item_s * len(items))
        return [int(it.payload) for it in items]

    def write(self, items: Sequence[Item], results: Sequence[Any], ctx: WriteContext) -> list[str]:
        return [f"{self.output_dir}/{it.id}.json" for it in items]  # nothing written: no fsyncs


def one_run(old_rule: bool, args: argparse.Namespace, work: Path, n: int) -> dict[str, Any]:
    side = "stay1" if old_rule else "restart"
    run = run_cli(["task=sleep", f"task._target_={TARGET}", f"task.count={args.count}",
                   f"+task.call_ms={args.call_ms}", f"+task.item_ms={args.item_ms}",
                   f"+task.fits={args.fits}", f"+task.old_rule={str(old_rule).lower()}",
                   "devices=cpu", "batch_size=8"],
                  work / f"{side}-{n}", work / f"{side}-{n}.log", timeout_s=600)
    if run.returncode != 0 or run.run_dir is None:
        raise SystemExit(f"{side}: exit {run.returncode}\n{run.output_tail}")
    rows = journal_rows(run.run_dir)
    first, last = span(rows)
    ladder = run.summary["slots"][0]["ladder"]
    return {"side": side, "items": len(rows), "span_s": last - first, "wall_s": run.wall_s,
            "items_per_s": len(rows) / (last - first), "wall_items_per_s": len(rows) / run.wall_s,
            "small_batch": ladder[-1][1] if ladder else None, "ladder": ladder}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--call-ms", type=float, default=20.0)
    ap.add_argument("--item-ms", type=float, default=1.0)
    ap.add_argument("--fits", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.count, args.repeats = 80, 1
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ladder-") as tmp:
        for n in range(args.repeats):
            for old in (True, False):  # alternate, so load on the box hits both sides
                runs.append(one_run(old, args, Path(tmp), n))
                r = runs[-1]
                print(f"  {r['side']:8s} #{n}: {r['items_per_s']:.1f} items/s over "
                      f"{r['span_s']:.2f}s, small at batch {r['small_batch']}", flush=True)
    best = {s: max((r for r in runs if r["side"] == s), key=lambda r: r["items_per_s"])
            for s in ("stay1", "restart")}
    med = {s: median(r["items_per_s"] for r in runs if r["side"] == s) for s in best}
    print()
    print(table(["side", "small's batch", "items/s (best)", "items/s (median)",
                 "items/s launch-to-exit", "span s"],
                [[s, best[s]["small_batch"], best[s]["items_per_s"], med[s],
                  best[s]["wall_items_per_s"], best[s]["span_s"]] for s in ("stay1", "restart")]))
    ratio = best["restart"]["items_per_s"] / best["stay1"]["items_per_s"]
    wall_ratio = best["restart"]["wall_items_per_s"] / best["stay1"]["wall_items_per_s"]
    print(f"\nrestart / stay at 1: x{ratio:.2f} items/s (median x{med['restart'] / med['stay1']:.2f}),"
          f" launch to exit x{wall_ratio:.2f}; {args.count} items, call {args.call_ms:g} ms + "
          f"{args.item_ms:g} ms/item, small fits {args.fits}")
    write_json(args.json, {"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                           "runs": runs, "ratio_best": ratio, "ratio_wall": wall_ratio})


if __name__ == "__main__":
    main()
