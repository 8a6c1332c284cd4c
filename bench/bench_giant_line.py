"""One giant line (issue 16): the controller's peak RSS and wall time, before and after.

The corpus: a few normal JSON lines and one line whose text is 52 MB (the issue's case),
``task=embed task.id_field=id devices=cpu progress=off``. Each side is the real CLI in a
fresh process, with the same ``.venv`` interpreter:

* before: the code before issue 16 (commit 86381f6), checked out with ``git worktree add``
  (``--before-dir``; made when missing) and run with that folder as cwd, so that
  ``python -m runner`` imports its own ``runner`` package (sys.path[0] is the cwd);
* after: this checkout;
* with ``--unbounded``, this checkout again with ``task.max_item_bytes=null``: no bound, so
  the controller reads the line whole, but counts its tokens on its first 64 KiB.

Measured: the controller's own peak RSS -- VmHWM from /proc/<pid>/status, polled every
0.1 s, for the process started here (its workers are other processes and do not count) --
and the wall time from launch to exit. A side still running after ``--timeout`` seconds is
killed with its whole session; its figure is the peak reached until then.

    .venv/bin/python bench/bench_giant_line.py                     # ~3 min
    .venv/bin/python bench/bench_giant_line.py --mb 52 --timeout 150 --unbounded --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `tests` importable

from tests.conftest import vm_hwm_kb  # noqa: E402
BEFORE_COMMIT = "86381f6"  # the commit before the issue 16 work


def make_corpus(path: Path, mb: float, normal: int = 8) -> int:
    """``normal`` short lines and one line of ``mb`` MB of text in the middle; returns the
    giant line's size in bytes."""
    words = "tide harbour lantern archive violin meadow circuit glacier orchard ledger "
    size = int(mb * 1_000_000)
    blob = (words * (size // len(words) + 1))[:size]
    with open(path, "w", encoding="utf-8") as fh:
        for k in range(normal):
            if k == normal // 2:
                line = json.dumps({"id": "giant", "text": blob})
                giant = len(line.encode())
                fh.write(line + "\n")
            fh.write(json.dumps({"id": f"n{k}", "text": f"A normal sentence number {k}."}) + "\n")
    return giant


def ensure_worktree(path: Path) -> None:
    if (path / "runner" / "__init__.py").is_file():
        return
    subprocess.run(["git", "worktree", "add", "--detach", str(path), BEFORE_COMMIT],
                   cwd=ROOT, check=True, capture_output=True)


def measure(cwd: Path, args: list[str], log: Path, timeout: float) -> dict:
    """Run ``python -m runner <args>`` in ``cwd``; the controller's peak RSS and wall."""
    argv = [sys.executable, "-m", "runner", *args]
    with open(log, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        peak_kb, finished = 0, True
        while proc.poll() is None:
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid))
            if time.monotonic() - t0 > timeout:
                finished = False
                os.killpg(proc.pid, signal.SIGKILL)  # the controller and its workers
                proc.wait()
                break
            time.sleep(0.1)
        wall = time.monotonic() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return {"cwd": str(cwd), "argv": argv, "finished": finished,
            "exit_code": proc.returncode if finished else None, "wall_s": round(wall, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1), "tail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=52.0, help="the giant line's text, MB")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per side")
    ap.add_argument("--before-dir", default="/tmp/runner-before", help="worktree of 86381f6")
    ap.add_argument("--unbounded", action="store_true",
                    help="also run this checkout with task.max_item_bytes=null: the line is "
                         "read whole and embedded, its tokens counted on its first 64 KiB")
    ap.add_argument("--json", help="also write the figures here")
    opts = ap.parse_args(argv)

    before_dir = Path(opts.before_dir)
    ensure_worktree(before_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-giant-"))
    try:
        corpus = work / "corpus.jsonl"
        giant = make_corpus(corpus, opts.mb)
        print(f"corpus: {corpus.stat().st_size:,} bytes, the giant line {giant:,} bytes")
        results = {}
        sides = [("before", before_dir, []), ("after", ROOT, [])]
        if opts.unbounded:
            sides.append(("after, task.max_item_bytes=null", ROOT, ["task.max_item_bytes=null"]))
        for i, (side, cwd, extra) in enumerate(sides):
            args = ["task=embed", f"task.input={corpus}", "task.id_field=id", "devices=cpu",
                    f"outputs={work / f'out{i}'}", "progress=off", *extra]
            r = measure(cwd, args, work / f"run{i}.log", opts.timeout)
            results[side] = r
            how = (f"exit {r['exit_code']} in {r['wall_s']} s" if r["finished"]
                   else f"did not finish in {opts.timeout:g} s")
            print(f"{side}: controller peak RSS {r['peak_rss_mb']:8.1f} MB   {how}")
            for line in r["tail"]:
                print(f"        | {line[:160]}")
        ratio = results["after"]["peak_rss_mb"] / max(results["before"]["peak_rss_mb"], 0.1)
        print(f"peak RSS after / before = {ratio:.3f}")
        if opts.json:
            Path(opts.json).write_text(json.dumps(
                {"when": datetime.now().isoformat(timespec="seconds"), "mb": opts.mb,
                 "giant_line_bytes": giant, "timeout_s": opts.timeout, "ratio": ratio,
                 **results}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
