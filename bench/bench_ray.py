"""executor=ray against executor=local on the embed bench, start-up included.

Both run the real CLI (`python -m runner task=embed ...`) over the same deterministic corpus
(bench/corpus.py) on the same devices group; the figure is wall time from launch to exit,
so Ray's own start-up (a local instance inside the run dir) and its actor start-up count.

    .venv/bin/python bench/bench_ray.py                # 2,000 sentences, devices=cpu2
    .venv/bin/python bench/bench_ray.py --quick        # 200 sentences
    .venv/bin/python bench/bench_ray.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.corpus import write_corpus  # noqa: E402


def run_cli(executor: str, corpus: Path, outputs: Path, devices: str, batch: int) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "runner", "task=embed", f"task.input={corpus}",
                        f"devices={devices}", f"executor={executor}", f"batch_size={batch}",
                        f"outputs={outputs}", "progress=off"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{executor} run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    run = sorted((outputs / "embed").iterdir())[-1]
    summary = json.loads((run / "summary.json").read_text())
    return {"wall_s": round(wall, 2), "items": summary["items_done"],
            "items_per_s_incl_startup": round(summary["items_done"] / wall, 1),
            "busy_items_per_s": {d: v["items_per_s"] for d, v in summary["devices"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--devices", default="cpu2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    count = 200 if a.quick else a.count
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_corpus(corpus, count)
        res = {ex: run_cli(ex, corpus, Path(tmp) / ex, a.devices, a.batch_size)
               for ex in ("local", "ray")}
    ratio = res["ray"]["wall_s"] / res["local"]["wall_s"]
    print(f"embed {count} sentences, devices={a.devices}, batch_size={a.batch_size}")
    print(f"{'executor':<8}{'wall s':>9}{'items/s (with start-up)':>26}")
    for ex, r in res.items():
        print(f"{ex:<8}{r['wall_s']:>9.1f}{r['items_per_s_incl_startup']:>26.1f}")
    print(f"ray overhead: wall(ray)/wall(local) = {ratio:.2f}x, "
          f"+{res['ray']['wall_s'] - res['local']['wall_s']:.1f} s")
    if a.json:
        a.json.write_text(json.dumps({"count": count, "devices": a.devices, "results": res,
                                      "ray_over_local_wall": round(ratio, 3)}, indent=2))


if __name__ == "__main__":
    main()
