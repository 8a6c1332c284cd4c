"""Layer: unit + cli. Long recordings: VAD cuts, ranged decoding, pieces, stitching, resume.

Real audio throughout (espeak-ng voices with known silences, sox noise), the bundled tiny.en
for transcription; one real ``python -m runner`` run SIGKILLs a worker mid-piece and resumes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from runner import media, vad
from runner.tasks import pieces as pc
from runner.tasks.base import FinalizeContext, Item, WriteContext
from runner.tasks.subtitles import SubtitlesTask
from tests.conftest import only_run_dir, query_journal, run_cli, start_run, stop_leftover, wait_until
from tests.speech import recording, wer

SENTENCES = [
    "The children played football in the park until the sun went down.",
    "My brother bought a new bicycle and rides it to work every day.",
    "Please send the invoice before the end of the month.",
    "The train to the airport leaves every twenty minutes.",
    "We painted the kitchen yellow over the weekend.",
    "He forgot his umbrella at the bus station again.",
    "She reads the newspaper with a cup of coffee.",
    "The museum opens at ten and closes at six.",
]
GAPS = [0.4, 1.5, 0.7, 3.0, 0.5]


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    spans = recording(SENTENCES * 2, root / "meeting.wav", GAPS)
    return root / "meeting.wav", spans


@pytest.fixture(scope="module")
def tiny():
    task = SubtitlesTask()
    rung = task.model_chain("cpu")[0]
    assert rung.available, rung.reason
    return task.load_model(rung, "cpu")


def test_ranged_decode_is_the_same_samples_as_a_full_decode(long_wav, tmp_path):
    wav, _ = long_wav
    mp3 = tmp_path / "m.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(mp3)], check=True,
                   timeout=60)
    for path in (wav, mp3):
        full = media.decode_audio(path)
        part = media.decode_audio(path, start=10.0, end=12.5)
        assert len(part) == 40000
        ref = full[160000:200000]
        assert np.corrcoef(ref, part)[0, 1] > 0.99, path


def test_cuts_fall_inside_the_known_silences(long_wav):
    wav, spans = long_wav
    seconds = media.duration(wav)
    plan = vad.plan(wav, seconds, 12.0, 5.0)
    assert len(plan) == round(seconds / 12) and plan[0].start == 0 and plan[-1].end == seconds
    assert all(a.end == b.start for a, b in zip(plan, plan[1:]))
    gaps = [(a[1], b[0]) for a, b in zip(spans, spans[1:])]
    for p in plan[:-1]:
        assert not p.forced
        assert any(lo <= p.end <= hi for lo, hi in gaps), (p.end, gaps)


def test_no_silence_at_all_is_a_forced_cut_near_the_target(tmp_path):
    noise = tmp_path / "babble.wav"
    # speech over speech: two voices mixed, no pause anywhere
    a = tmp_path / "a.wav"
    recording([" ".join(SENTENCES)], a, [0.0], voices=("en-us",))
    b = tmp_path / "b.wav"
    recording([" ".join(reversed(SENTENCES))], b, [0.0], voices=("en-gb+f2",))
    subprocess.run(["sox", "-m", str(a), str(b), str(noise), "trim", "0", "20"], check=True,
                   timeout=60)
    plan = vad.plan(noise, media.duration(noise), 10.0, 1.0)
    assert len(plan) == 2 and plan[0].forced
    assert 9.0 <= plan[0].end <= 11.0


def test_short_file_is_one_item_unchanged(long_wav):
    wav, _ = long_wav
    items = list(SubtitlesTask(input=str(wav), split_over_s=600).discover())
    assert len(items) == 1 and items[0].id == "meeting.wav" and items[0].payload == str(wav.resolve())
    never = list(SubtitlesTask(input=str(wav), split_over_s=0).discover())
    assert [i.payload for i in never] == [str(wav.resolve())]


def _ctx(run: Path, slot: int) -> WriteContext:
    return WriteContext(run_dir=run, batch_no=slot, slot=slot, device=f"cpu:{slot}",
                        model="tiny.en", batch_size=1)


def test_pieces_out_of_order_on_two_slots_stitch_to_the_whole_file(long_wav, tiny, tmp_path):
    wav, spans = long_wav
    seconds = media.duration(wav)
    task = SubtitlesTask(input=str(wav), split_over_s=20, piece_s=12, split_window_s=5,
                         formats=["srt", "vtt", "json"])
    items = list(task.discover())
    assert len(items) >= 4 and all(pc.file_of(i.id)[0] == "meeting.wav" for i in items)
    assert abs(sum(i.cost for i in items) - seconds) < 1e-3
    run = tmp_path / "run"
    order = list(reversed(items))
    for n, item in enumerate(order):
        [result] = task.process(tiny, [item])
        [out] = task.write([item], [result], _ctx(run, n % 2))
        stitched = run / "subtitles" / "meeting.en.srt"
        assert stitched.exists() == (n == len(order) - 1), n  # only once all pieces are in
    doc = json.loads((run / "subtitles" / "meeting.en.json").read_text())
    assert [p["k"] for p in doc["pieces"]] == list(range(1, len(items) + 1))
    assert {p["slot"] for p in doc["pieces"]} == {0, 1}
    srt = (run / "subtitles" / "meeting.en.srt").read_text()
    numbers = [int(b.split("\n")[0]) for b in srt.strip().split("\n\n")]
    assert numbers == list(range(1, len(doc["cues"]) + 1))
    cues = doc["cues"]
    for a, b in zip(cues, cues[1:]):
        assert a["start"] < a["end"] <= b["start"]  # in order, no overlap
    assert cues[0]["start"] >= 0 and cues[-1]["end"] <= seconds + 1e-6
    for c in cues:
        assert len(c["lines"]) <= 2 and all(len(x) <= 42 for x in c["lines"])
        assert c["end"] - c["start"] <= 7.0 + 1e-6
    # quality: the stitched transcript against the same file whole
    whole_task = SubtitlesTask(input=str(wav), split_over_s=0)
    [whole] = whole_task.process(tiny, list(whole_task.discover()))
    ref = " ".join(SENTENCES * 2)
    whole_text = "".join(s.text for s in whole.transcript.segments)
    assert wer(ref, doc["text"]) <= wer(ref, whole_text) + 0.02, (doc["text"], whole_text)
    # each sentence is said once: no word lost or doubled at a cut
    words = doc["text"].lower().count("umbrella")
    assert words == 2
    # finalize finds everything done; with the outputs gone it stitches them again
    rows = [(i.id, pc.piece_rel("subtitles", pc.parse(i.payload)), "tiny.en") for i in items]
    (run / "subtitles" / "meeting.en.srt").unlink()
    figures = task.finalize(FinalizeContext(run, rows))
    assert figures["split_files"]["incomplete"] == {}
    assert (run / "subtitles" / "meeting.en.srt").read_text() == srt
    # a piece not done names itself
    figures = task.finalize(FinalizeContext(run, rows[1:]))
    assert "pieces 1 of" in figures["split_files"]["incomplete"]["meeting.wav"]


@pytest.mark.timeout(600)
def test_sigkilled_worker_mid_piece_then_resume_makes_the_file_once(long_wav, tmp_path):
    wav, _ = long_wav
    src = tmp_path / "in"
    src.mkdir()
    os.link(wav, src / "meeting.wav")
    out = tmp_path / "out"
    args = ["task=subtitles", f"task.input={src}", "devices=cpu", f"outputs={out}",
            "task.split_over_s=20", "task.piece_s=12", "task.split_window_s=5",
            "task.beam_size=5", "progress=plain"]
    proc = start_run(args)
    try:
        run = wait_until(lambda: next((out / "subtitles").glob("*/plan.yaml"), None),
                         timeout=120, proc=proc).parent
        pid = wait_until(lambda: _running_worker(run), timeout=120, proc=proc)
        os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        stop_leftover(proc)
    done_before = {i for i, s in query_journal(run, "SELECT id, status FROM items") if s == "done"}
    r = run_cli([*args, "resume=" + str(run)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = dict(query_journal(run, "SELECT id, status FROM items"))
    assert set(rows.values()) == {"done"} and len(rows) >= 4
    redone = {i for i, s in query_journal(run, "SELECT id, status FROM items WHERE attempts>1")}
    assert not redone & done_before
    files = sorted(p.name for p in (run / "subtitles").iterdir() if p.is_file())
    assert files == ["meeting.en.json", "meeting.en.srt"]
    doc = json.loads((run / "subtitles" / "meeting.en.json").read_text())
    assert doc["text"].lower().count("umbrella") == 2


def _running_worker(run: Path) -> int | None:
    """A worker's pid once some piece is running (the journal says so)."""
    from tests.conftest import worker_pids

    if not query_journal(run, "SELECT id FROM items WHERE status='running'"):
        return None
    pids = worker_pids(run)
    return pids[0] if pids else None


def test_auto_language_is_one_per_file_and_names_it(tmp_path):
    """task.language=auto with the multilingual base model: a German recording in pieces is
    detected once per file (on its first speech) -- every piece says de -- and named .de."""
    from tests.speech import recording

    media = tmp_path / "media"
    media.mkdir()
    sentences = ["Guten Morgen, heute sprechen wir über das Wetter in Berlin.",
                 "Der Zug nach München fährt um acht Uhr ab.",
                 "Wir treffen uns morgen im Rathaus zur Sitzung.",
                 "Die Kinder spielen im Garten hinter dem Haus."] * 2
    recording(sentences, media / "sitzung.wav", [1.5, 2.0], voices=("de", "de+m3"))
    out = tmp_path / "o"
    r = run_cli(["task=subtitles", f"task.input={media}", "devices=cpu2", f"outputs={out}",
                 "progress=off", "task.language=auto", "task.models=[base]",
                 "task.split_over_s=15", "task.piece_s=10", "task.split_window_s=4"],
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run_dir(out, "subtitles")
    pieces = query_journal(run, "SELECT COUNT(*) FROM items")[0][0]
    assert pieces >= 2, "the recording was not split"
    assert sorted(p.name for p in (run / "subtitles").glob("*.srt")) == ["sitzung.de.srt"]
    doc = json.loads((run / "subtitles" / "sitzung.de.json").read_text())
    langs = {str(p.get("language")) for p in doc["pieces"]}
    assert langs == {"de"}, doc["pieces"]
