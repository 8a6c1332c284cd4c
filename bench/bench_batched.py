"""Batched decode and half precision (issue 18, point 5), on CPU, ratios from one run.

    .venv/bin/python bench/bench_batched.py                    # threads = all cores
    .venv/bin/python bench/bench_batched.py --threads 1 --repeats 3 --json out.json

Subtitles (the bundled tiny.en, int8): the task's own ``process()`` in this process -- the
worker's code path -- with ``task.chunk_batch`` 1 (sequential decode), 2, 4 and 8, on

* a long espeak-ng recording (~210 s, 8 VAD chunks), one item per call;
* 20 short clips (~10-25 s each, one or two VAD chunks) in one call (batch_size=20), so the
  chunks of several clips share a batch.

Figures: seconds (median of ``--repeats``, contenders alternated), RTF (seconds / media
seconds), speed-up over chunk_batch=1, and WER against the known text.

Embed (the bundled all-MiniLM-L6-v2): ``EmbedTask.process`` at batch 64 over 2,048 texts with
``task.precision`` fp32, bf16 and fp16: texts/s, and each vector's cosine similarity to the
fp32 vector of the same text (min and mean). No GPU here: the accelerator figures (RTF of
large-v3 batched vs sequential, fp16 on CUDA/XPU) are not measured by this script's run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

if __package__ in (None, ""):  # run as a script: make `bench`, `runner` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SENTENCES = [
    "The train leaves the station at noon.",
    "She opened the window to let in some fresh air.",
    "We planted tomatoes and beans in the garden this spring.",
    "The library closes early on Sunday afternoons.",
    "He forgot his keys on the kitchen table again.",
    "A small boat drifted slowly across the quiet lake.",
    "Please turn off the lights when you leave the room.",
    "The children laughed at the funny little dog.",
    "The coffee in this cafe is strong and very hot.",
    "My sister is learning to play the piano.",
    "The old bridge was closed for repairs last winter.",
    "They walked along the beach and collected shells.",
]
CHUNK_BATCHES = (1, 2, 4, 8)


def recordings(folder: Path) -> tuple[list[tuple[Path, str]], tuple[Path, str]]:
    from tests.speech import synthesise

    clips = []
    for k in range(20):
        n = 3 + k % 5  # 3..7 sentences: ~10-25 s
        text = " ".join(SENTENCES[(k + j) % len(SENTENCES)] for j in range(n))
        clips.append((synthesise(text, folder / f"clip{k:02d}.wav"), text))
    text = " ".join(SENTENCES * 6)
    return clips, (synthesise(text, folder / "long.wav"), text)


def bench_subtitles(folder: Path, repeats: int) -> dict:
    from runner.tasks import whisper as wh
    from runner.tasks.base import Item
    from runner.tasks.subtitles import SubtitlesTask
    from tests.speech import wer

    clips, (long_path, long_text) = recordings(folder)
    task = SubtitlesTask()
    rung = task.model_chain("cpu")[0]
    model = task.load_model(rung, "cpu")
    cases = {"long": ([Item("long", 0, str(long_path))], [long_text]),
             "20 clips": ([Item(p.name, 0, str(p)) for p, _ in clips], [t for _, t in clips])}
    task.process(model, cases["20 clips"][0][:2])  # warm up (VAD model, first allocations)
    out: dict = {}
    for case, (items, refs) in cases.items():
        times: dict[int, list[float]] = {n: [] for n in CHUNK_BATCHES}
        wers: dict[int, float] = {}
        media_s = 0.0
        for r in range(repeats):
            order = CHUNK_BATCHES if r % 2 == 0 else tuple(reversed(CHUNK_BATCHES))
            for n in order:
                t = SubtitlesTask(chunk_batch=n)
                model.chunk_batch = None  # as loaded: the task settles it
                t0 = time.perf_counter()
                results = t.process(model, items)
                times[n].append(time.perf_counter() - t0)
                media_s = sum(res.duration for res in results)
                hyp = " ".join(w.text for res in results for s in res.transcript.segments
                               for w in s.words)
                wers[n] = round(wer(" ".join(refs), hyp), 4)
        base = median(times[1])
        out[case] = {"media_s": round(media_s, 1), "files": len(items), "rows": [
            {"chunk_batch": n, "s": round(median(times[n]), 2),
             "runs": [round(x, 2) for x in times[n]],
             "rtf": round(median(times[n]) / media_s, 4),
             "speedup": round(base / median(times[n]), 2), "wer": wers[n]}
            for n in CHUNK_BATCHES]}
    out["default_cpu"] = wh.CHUNK_BATCH["cpu"]
    return out


def bench_embed(repeats: int) -> dict:
    import numpy as np

    from runner.tasks.base import Item
    from runner.tasks.embed import EmbedTask

    words = ("tide harbour lantern archive violin meadow circuit glacier orchard ledger comet "
             "quarry sonnet bakery canal falcon theorem pottery monsoon atlas").split()
    texts = [" ".join(words[(k * p) % 20] for p in (1, 3, 7, 11, 13, 17, 19)[: 3 + k % 5])
             + f" number {k}." for k in range(2048)]
    items = [Item(str(k), 0, t) for k, t in enumerate(texts)]
    rows, vecs = [], {}
    for precision in ("fp32", "bf16", "fp16"):
        task = EmbedTask(precision=precision)
        model = task.load_model(task.model_chain("cpu")[0], "cpu")
        task.process(model, items[:64])  # warm up
        spent = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            got = [v for i in range(0, len(items), 64) for v in task.process(model, items[i:i + 64])]
            spent.append(time.perf_counter() - t0)
        vecs[precision] = np.asarray(got, dtype=np.float32)
        rows.append({"precision": precision, "s": round(median(spent), 2),
                     "texts_per_s": round(len(items) / median(spent), 1)})
    ref = vecs["fp32"] / np.linalg.norm(vecs["fp32"], axis=1, keepdims=True)
    for row in rows:
        v = vecs[row["precision"]]
        cos = ((v / np.linalg.norm(v, axis=1, keepdims=True)) * ref).sum(axis=1)
        row.update(cos_min=round(float(cos.min()), 6), cos_mean=round(float(cos.mean()), 6),
                   speed_vs_fp32=round(rows[0]["s"] / row["s"], 2))
    return {"texts": len(items), "batch": 64, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "repeats": args.repeats, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-batched-") as tmp:
        report["subtitles"] = bench_subtitles(Path(tmp), args.repeats)
    for case in ("long", "20 clips"):
        c = report["subtitles"][case]
        print(f"\nsubtitles tiny.en int8, {case}: {c['files']} file(s), {c['media_s']} s of media, "
              f"{args.threads} thread(s)")
        print("chunk_batch  seconds  RTF     speed-up  WER    runs")
        for r in c["rows"]:
            print(f"{r['chunk_batch']:>11}  {r['s']:>7}  {r['rtf']:<6}  {r['speedup']:>8}  "
                  f"{r['wer']:<5}  {r['runs']}")
    if not args.skip_embed:
        report["embed"] = bench_embed(args.repeats)
        e = report["embed"]
        print(f"\nembed all-MiniLM-L6-v2 on CPU, {e['texts']} texts, batch {e['batch']}")
        print("precision  seconds  texts/s  vs fp32  cos min   cos mean")
        for r in e["rows"]:
            print(f"{r['precision']:<9}  {r['s']:>7}  {r['texts_per_s']:>7}  {r['speed_vs_fp32']:>7}  "
                  f"{r['cos_min']:<8}  {r['cos_mean']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
