"""Layer: cli (the README's commands as subprocesses).

The README's example as a test: the real CLI in a subprocess, its run dir checked.

1. ``python -m runner`` with only ``outputs=`` and ``progress=plain`` -- what ``make run``
   runs: task=subtitles devices=auto (one CPU worker here) over samples/audio with the
   bundled tiny.en. Subtitles must be valid SRT and say what the recordings say.
2. ``task=subtitles devices=cpu2 task.formats=[srt,vtt,json]`` over a folder made here:
   espeak-ng speech from known sentences (one file in a nested folder), a corrupt file
   (random bytes named .wav) and an empty one. The bad files fail alone (exit 3), with a
   one-line error naming them; the rest are transcribed by two distinct worker processes.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, journal_statuses, only_run_dir, run_cli, worker_pids
from tests.speech import synthesise, wer

SAMPLES = ROOT / "samples" / "audio"
SRT_TIME = re.compile(r"^(\d\d):([0-5]\d):([0-5]\d),(\d{3}) --> (\d\d):([0-5]\d):([0-5]\d),(\d{3})$")
VTT_TIME = re.compile(r"^(\d\d):([0-5]\d):([0-5]\d)\.(\d{3}) --> (\d\d):([0-5]\d):([0-5]\d)\.(\d{3})$")
# tiny.en gets these right (WER 0 at 1 thread, int8) in wav and, for the second, in mp3
SENTENCES = [
    "Please turn off the lights when you leave the room.",
    "They walked along the beach and collected shells.",
]


def _ms(g: tuple[str, ...]) -> int:
    h, m, s, ms = map(int, g)
    return ((h * 60 + m) * 60 + s) * 1000 + ms


def parse_cues(text: str, timing: re.Pattern, header: str | None = None) -> list[tuple[int, int, str]]:
    """(start ms, end ms, text) per cue; asserts numbering from 1 and the timing line format."""
    blocks = text.strip("\n").split("\n\n")
    if header is not None:
        assert blocks[0] == header, f"first block is {blocks[0]!r}, not {header!r}"
        blocks = blocks[1:]
    cues, last_end = [], -1
    for n, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(n), f"cue {n} is numbered {lines[0]!r}"
        m = timing.match(lines[1])
        assert m, f"cue {n}: bad timing line {lines[1]!r}"
        start, end = _ms(m.groups()[:4]), _ms(m.groups()[4:])
        assert start < end and start >= last_end, f"cue {n}: {lines[1]} (previous ended {last_end} ms)"
        assert len(lines) >= 3 and all(ln.strip() for ln in lines[2:]), f"cue {n} has no text"
        assert all("-->" not in ln for ln in lines[2:])
        cues.append((start, end, " ".join(lines[2:])))
        last_end = end
    return cues


def transcripts() -> dict[str, str]:
    out = {}
    for line in (SAMPLES / "TRANSCRIPTS.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, text = line.split("\t", 1)
            out[name] = text
    return out


def out_name(rel: str) -> str:
    """The README's naming rule: <folder>/<stem>.<lang>, here English."""
    return rel.rsplit(".", 1)[0] + ".en"


@pytest.mark.timeout(150)
def test_readme_default_run_makes_subtitles_for_the_samples(tmp_path):
    proc = run_cli([f"outputs={tmp_path}", "progress=plain"], timeout=140)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = only_run_dir(tmp_path, "subtitles")
    refs = transcripts()
    assert len(refs) == 3 and all((SAMPLES / n).is_file() for n in refs)

    subs = run / "subtitles"
    made = sorted(p.relative_to(subs).as_posix() for p in subs.rglob("*") if p.is_file())
    assert made == sorted([f"{out_name(n)}.srt" for n in refs] +
                          [f"{out_name(n)}.json" for n in refs])

    errors = words = 0.0
    for name, ref in refs.items():
        cues = parse_cues((subs / f"{out_name(name)}.srt").read_text(encoding="utf-8"), SRT_TIME)
        assert cues, f"{name}.srt has no cues"
        hyp = " ".join(text for _, _, text in cues)
        n = len(ref.split())
        errors += wer(ref, hyp) * n
        words += n
        doc = json.loads((subs / f"{out_name(name)}.json").read_text())
        assert doc["id"] == name and doc["model"] == "tiny.en" and doc["segments"]
    assert errors / words <= 0.2, f"pooled WER {errors / words:.3f} over the samples"

    summary = json.loads((run / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["items_done"] == 3
    assert summary["devices"] and all(d["rtf"] > 0 for d in summary["devices"].values())
    assert summary["rtf"] > 0
    assert set(journal_statuses(run).values()) == {"done"} and len(journal_statuses(run)) == 3
    assert (run / "plan.yaml").is_file()
    assert (run / "logs" / "worker-0.log").read_text().startswith("PID=")


@pytest.fixture
def speech_folder(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "in"
    (root / "nested" / "sub").mkdir(parents=True)
    refs = {"a.wav": SENTENCES[0], "b.mp3": SENTENCES[1],
            "nested/sub/c.wav": f"{SENTENCES[1]} {SENTENCES[0]}"}
    for rel, text in refs.items():
        synthesise(text, root / rel)
    (root / "corrupt.wav").write_bytes(random.Random(1234).randbytes(8192))
    (root / "empty.wav").write_bytes(b"")
    return root, refs


@pytest.mark.timeout(150)
def test_two_workers_bad_files_fail_alone_outputs_mirror_input(tmp_path, speech_folder):
    root, refs = speech_folder
    out = tmp_path / "out"
    proc = run_cli(["task=subtitles", "devices=cpu2", "task.formats=[srt,vtt,json]",
                    f"task.input={root}", f"outputs={out}", "progress=plain"], timeout=140)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = only_run_dir(out, "subtitles")

    # the bad files: failed, each with one line naming the file
    summary = json.loads((run / "summary.json").read_text())
    failures = {f["id"]: f["error"] for f in summary["failures"]}
    assert set(failures) == {"corrupt.wav", "empty.wav"}
    error_files = {json.loads(p.read_text())["item"]: json.loads(p.read_text())["error"]
                   for p in (run / "logs" / "errors").glob("*.json")}
    assert set(error_files) == set(failures)
    for name, msg in [*failures.items(), *error_files.items()]:
        assert "\n" not in msg and name in msg, msg
    assert "empty" in failures["empty.wav"]
    statuses = journal_statuses(run)
    assert statuses == {**{r: "done" for r in refs}, "corrupt.wav": "failed", "empty.wav": "failed"}

    # the good ones: outputs mirror the input's relative paths, and say what was spoken
    subs = run / "subtitles"
    made = sorted(p.relative_to(subs).as_posix() for p in subs.rglob("*") if p.is_file())
    assert made == sorted(f"{out_name(r)}.{fmt}" for r in refs for fmt in ("srt", "vtt", "json"))
    for rel, ref in refs.items():
        srt = parse_cues((subs / f"{out_name(rel)}.srt").read_text(encoding="utf-8"), SRT_TIME)
        vtt_text = (subs / f"{out_name(rel)}.vtt").read_text(encoding="utf-8")
        assert vtt_text.startswith("WEBVTT")
        vtt = parse_cues(vtt_text, VTT_TIME, header="WEBVTT")
        assert [(s, e) for s, e, _ in vtt] == [(s, e) for s, e, _ in srt]
        hyp = " ".join(text for _, _, text in srt)
        assert wer(ref, hyp) <= 0.2, f"{rel}: WER {wer(ref, hyp):.3f}: {hyp!r}"
        doc = json.loads((subs / f"{out_name(rel)}.json").read_text())
        assert doc["id"] == rel and wer(ref, doc["text"]) <= 0.2

    # two workers, two processes
    pids = worker_pids(run)
    assert len(pids) == 2 and len(set(pids)) == 2, pids
    assert sorted(p for s in summary["slots"] for p in s["pids"]) == sorted(pids)
