"""A skewed archive: one long recording holding half of the audio, plus short clips.

    .venv/bin/python bench/bench_split.py                  # ~3-4 minutes on 2 cores
    .venv/bin/python bench/bench_split.py --json bench/split.json

The archive (espeak-ng speech, made once into a temp dir): one recording of ``--long-s``
seconds (sentences in several voices with silences of 0.4-3 s between them) and short clips
of ~10 s adding up to the same length. ``task=subtitles devices=cpu2`` (tiny.en, int8, one
thread per slot) runs it:

* split: ``task.split_over_s=<long / 3> task.piece_s=<long / 6>`` -- the long file in pieces
  cut at silences, spread over both slots, stitched into one subtitle file;
* whole: ``task.split_over_s=0`` -- a file-level scheduler: one slot spends the run on it.

Makespan = first item start to last item finish (journal.sqlite). The ideal is
sum(media seconds) / sum over slots of each slot's measured speed (media seconds per busy
second, from the same run), so each run is judged against its own slots: target <= 1.10
split; the whole run is expected near 2 (one file holds half the audio). Then the long file
alone on cpu2: wall-clock split vs whole. Reports and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clirun import machine, run_cli, table, write_json  # noqa: E402

SENTENCES = [
    "the committee met on tuesday to discuss the annual budget",
    "several members raised questions about the cost of repairs",
    "the chair asked for a vote on the new proposal",
    "everyone agreed that the park should stay open in winter",
    "a report on the library was presented by the treasurer",
    "the meeting was adjourned shortly after nine in the evening",
    "public comments focused on traffic near the school",
    "a new schedule for waste collection will start next month",
]
GAPS = [0.4, 1.2, 3.0, 0.8, 2.0, 0.6]


def make_archive(root: Path, long_s: float) -> tuple[Path, float]:
    """The folder; returns it and the long recording's length."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.speech import recording

    media = root / "archive"
    media.mkdir()
    sentences, spans = [], []
    while not spans or spans[-1][1] < long_s:
        sentences = SENTENCES * (len(sentences) // len(SENTENCES) + 2)
        spans = recording(sentences, media / "meeting.wav", GAPS)
    length = spans[-1][1]
    total, k = 0.0, 0
    while total < length:  # ~10 s clips, as much audio again
        s = recording(SENTENCES[k % len(SENTENCES):k % len(SENTENCES) + 2] or SENTENCES[:2],
                      media / f"clip{k:03d}.wav", [1.0])
        total += s[-1][1] + 1.0
        k += 1
    return media, length


def measure(run_dir: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT slot, started, finished, cost FROM items "
                          "WHERE status='done'").fetchall()
    finally:
        db.close()
    makespan = max(r[2] for r in rows) - min(r[1] for r in rows)
    speeds = {}
    for slot in {r[0] for r in rows}:
        mine = [r for r in rows if r[0] == slot]
        speeds[slot] = sum(r[3] for r in mine) / max(1e-9, sum(r[2] - r[1] for r in mine))
    media_s = sum(r[3] for r in rows)
    ideal = media_s / sum(speeds.values())
    return {"items": len(rows), "media_s": media_s, "makespan_s": makespan, "ideal_s": ideal,
            "ratio": makespan / ideal, "slot_speed": speeds}


def run(media: Path, tmp: Path, name: str, split_over: float, piece: float) -> dict[str, Any]:
    overrides = ["task=subtitles", f"task.input={media}", "devices=cpu2", "progress=off",
                 f"task.split_over_s={split_over:g}", f"task.piece_s={piece:g}"]
    r = run_cli(overrides, tmp / f"out-{name}", tmp / f"{name}.log")
    if r.returncode != 0 or r.run_dir is None:
        raise RuntimeError(f"{name} failed (exit {r.returncode}):\n{r.output_tail}")
    out = measure(r.run_dir)
    out["wall_s"] = r.wall_s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--long-s", type=float, default=150.0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    res: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        media, length = make_archive(tmp, a.long_s)
        split_over, piece = length / 3, length / 6
        print(f"archive: meeting.wav {length:.0f} s + {len(list(media.glob('clip*')))} clips")
        res["split"] = run(media, tmp, "split", split_over, piece)
        res["whole"] = run(media, tmp, "whole", 0, piece)
        alone = tmp / "alone"
        alone.mkdir()
        os.link(media / "meeting.wav", alone / "meeting.wav")
        res["alone_split"] = run(alone, tmp, "alone-split", split_over, piece)
        res["alone_whole"] = run(alone, tmp, "alone-whole", 0, piece)
    rows = [[k, f"{r['media_s']:.0f}", f"{r['makespan_s']:.1f}", f"{r['ideal_s']:.1f}",
             f"{r['ratio']:.3f}", f"{r['wall_s']:.1f}"] for k, r in res.items() if k != "machine"]
    print(table(["run", "media s", "makespan s", "ideal s", "makespan / ideal", "wall s"], rows))
    print(f"long file alone, wall: split {res['alone_split']['wall_s']:.1f} s vs whole "
          f"{res['alone_whole']['wall_s']:.1f} s (x{res['alone_whole']['wall_s'] / res['alone_split']['wall_s']:.2f})")
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
