"""Layer: cli (real runs of the real models) -- a growing archive, ``reuse=`` (issue 19).

A new run over an input that changed since an earlier run makes only what is new or
changed; the rest is journalled done with ``reused_from`` and its files are linked into the
new run dir, which is complete on its own. Embed: lines appended, edited and deleted in a
.jsonl; a config change reuses nothing. Subtitles: a folder with a file added, one whose
audio is replaced by other speech under the same name, and one deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import read_summary, run_cli
from tests.speech import normalise, synthesise


def _rows(run_dir: Path) -> dict[str, dict]:
    db = sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM items")}
    finally:
        db.close()


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file() and "-wal" not in p.name
            and "-shm" not in p.name}


def _vectors(run_dir: Path) -> dict[str, list[float]]:
    import pyarrow.parquet as pq

    manifest = json.loads((run_dir / "embeddings" / "manifest.json").read_text())
    out: dict[str, list[float]] = {}
    for shard in manifest["shards"]:
        table = pq.read_table(run_dir / shard["path"]).to_pydict()
        for i, v in zip(table["id"], table["vector"]):
            assert i not in out, f"{i} is in two shards"
            out[i] = v
    return out


def _embed(corpus: Path, out: Path, *extra: str):
    return run_cli(["task=embed", f"task.input={corpus}", "task.id_field=id", "devices=cpu",
                    f"outputs={out}", "progress=off", "batch_size=8", *extra], timeout=300)


def _write(corpus: Path, texts: dict[str, str]) -> None:
    corpus.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))


def _newest(out: Path, task: str) -> Path:
    return sorted(p.parent for p in (out / task).glob("*/journal.sqlite"))[-1]


def test_embed_reuses_unchanged_rows_and_makes_the_rest(tmp_path):
    out, corpus = tmp_path / "o", tmp_path / "corpus.jsonl"
    texts = {f"t{k:02d}": f"Sentence number {k} talks about topic {k % 7}." for k in range(30)}
    _write(corpus, texts)
    first = _embed(corpus, out)
    assert first.returncode == 0, first.stderr[-3000:]
    run1 = _newest(out, "embed")
    before, vec1 = _tree(run1), _vectors(run1)
    for k in ("t03", "t04"):  # edited
        texts[k] = texts[k] + " Edited since."
    for k in ("t10", "t11", "t12"):  # deleted
        del texts[k]
    texts.update({f"n{k}": f"A new line {k} about something else." for k in range(5)})
    _write(corpus, texts)

    dry = _embed(corpus, out, "reuse=latest", "dry_run=true")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "25 item(s) would be reused" in dry.stdout + dry.stderr, dry.stdout[-2000:]

    second = _embed(corpus, out, "reuse=latest")
    assert second.returncode == 0, second.stderr[-3000:]
    run2 = _newest(out, "embed")
    assert run2 != run1 and _tree(run1) == before, "the earlier run dir was touched"
    rows = _rows(run2)
    reused = {i for i, r in rows.items() if r["reused_from"]}
    assert reused == set(texts) - {"t03", "t04"} - {f"n{k}" for k in range(5)}
    assert all(rows[i]["status"] == "done" for i in rows)
    rep = read_summary(run2)["reuse"]
    assert (rep["reused"], rep["new"], rep["changed"], rep["removed"]) == (25, 5, 2, 3), rep
    vec2 = _vectors(run2)
    assert set(vec2) == set(texts), "the new run's shards hold exactly the input's ids"
    assert all(vec2[i] == vec1[i] for i in reused)
    assert vec2["t03"] != vec1["t03"]

    shutil.rmtree(run1)  # the new run dir stands alone, and can itself be reused
    third = _embed(corpus, out, "reuse=latest")
    assert third.returncode == 0, third.stderr[-3000:]
    run3 = _newest(out, "embed")
    assert read_summary(run3)["reuse"]["reused"] == len(texts)
    assert _vectors(run3) == vec2


def test_embed_config_change_reuses_nothing(tmp_path):
    out, corpus = tmp_path / "o", tmp_path / "corpus.jsonl"
    _write(corpus, {f"t{k}": f"Line {k} of a small corpus." for k in range(6)})
    assert _embed(corpus, out).returncode == 0
    got = _embed(corpus, out, "reuse=latest", "task.normalize=true")
    assert got.returncode == 0, got.stderr[-3000:]
    run2 = _newest(out, "embed")
    assert not any(r["reused_from"] for r in _rows(run2).values())
    assert "task.normalize" in read_summary(run2)["reuse"]["nothing_because"]


def test_reuse_errors_are_one_line(tmp_path):
    got = _embed(tmp_path / "none.jsonl", tmp_path / "o", "reuse=latest")
    assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr[-2000:]
    both = _embed(tmp_path / "none.jsonl", tmp_path / "o", "reuse=latest", "resume=latest")
    assert both.returncode == 1 and "give only one of them" in both.stderr, both.stderr[-2000:]


@pytest.mark.timeout(600)
def test_subtitles_reuse_runs_exactly_the_added_and_replaced_files(tmp_path):
    media, out = tmp_path / "archive", tmp_path / "o"
    media.mkdir()
    said = {"alpha": "the quick brown fox jumps over the lazy dog",
            "bravo": "a stitch in time saves nine",
            "charlie": "all that glitters is not gold"}
    for stem, text in said.items():
        synthesise(text, media / f"{stem}.wav")
    args = ["task=subtitles", f"task.input={media}", "devices=cpu", f"outputs={out}",
            "progress=off", "task.formats=[srt,json]"]
    first = run_cli(args, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    run1 = _newest(out, "subtitles")
    before = _tree(run1)

    synthesise("every cloud has a silver lining", media / "delta.wav")  # added
    (media / "bravo.wav").unlink()  # replaced: other speech, same name
    synthesise("good morning everyone and welcome to the meeting", media / "bravo.wav")
    os.utime(media / "bravo.wav", ns=(1, 1_000_000_000))  # whatever its mtime, the size differs
    (media / "charlie.wav").unlink()  # deleted
    second = run_cli([*args, "reuse=latest"], timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    run2 = _newest(out, "subtitles")
    assert _tree(run1) == before
    rows = _rows(run2)
    assert {i: bool(r["reused_from"]) for i, r in rows.items()} == {
        "alpha.wav": True, "bravo.wav": False, "delta.wav": False}
    srt = {p.name: p.read_text() for p in (run2 / "subtitles").glob("*.srt")}
    assert set(srt) == {"alpha.en.srt", "bravo.en.srt", "delta.en.srt"}
    assert {"morning", "meeting"} <= set(normalise(srt["bravo.en.srt"])), srt["bravo.en.srt"]
    assert (run2 / "subtitles" / "alpha.en.json").is_file()
    assert os.stat(run2 / "subtitles" / "alpha.en.srt").st_ino == \
        os.stat(run1 / "subtitles" / "alpha.en.srt").st_ino  # a hard link, not a copy
    rep = read_summary(run2)["reuse"]
    assert (rep["reused"], rep["new"], rep["changed"], rep["removed"]) == (1, 1, 1, 1), rep


def test_a_folder_walk_stats_each_file_once(tmp_path, monkeypatch):
    """Discovery of a folder (what every reuse= or watch look starts with) stats each file
    once: its fingerprint, size bound and duration all come from that one stat."""
    from runner.tasks.subtitles import SubtitlesTask

    for stem in ("one", "two", "three"):
        synthesise(f"number {stem}", tmp_path / f"{stem}.wav")
    seen: dict[str, int] = {}
    real_stat, real_lstat = os.stat, os.lstat

    def counted(real):
        def call(path, *a, **k):
            if str(path).startswith(str(tmp_path) + "/") and str(path).endswith(".wav"):
                seen[str(path)] = seen.get(str(path), 0) + 1
            return real(path, *a, **k)
        return call

    monkeypatch.setattr(os, "stat", counted(real_stat))
    monkeypatch.setattr(os, "lstat", counted(real_lstat))
    items = list(SubtitlesTask(input=str(tmp_path)).discover())
    assert len(items) == 3 and all(i.fingerprint for i in items)
    assert seen and set(seen.values()) == {1}, seen
