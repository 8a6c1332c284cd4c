"""Pieces of a long recording: their items, their intermediate results, and the stitch.

A file longer than ``task.split_over_s`` becomes one journal item per piece (see
:mod:`runner.vad` for the cuts). A piece's id is ``<file id>/piece-<k>`` (k from 001): the
file id is the path of a regular file, so no real input can have that id. Its payload is a
small JSON object (the media path, the range, the plan's tag; a whole file's payload stays
its bare path), its cost the piece's seconds.

A worker transcribes only the piece's range and writes the piece's words, in piece-local
time, to ``subtitles/.pieces/<file name>~<tag of the file id>/<k>.json`` (atomically; the
journal's output for the piece). Right after, it looks at the siblings: when all ``n`` exist
with this plan's tag, it stitches the file -- words shifted by their piece's start, clipped
to it, cues rebuilt over the whole file by :func:`runner.tasks.cues.build_cues` (so the cue
norms hold across cuts, cues are numbered from 1, a word is in exactly one piece) -- and
writes the file's SRT / VTT / JSON under the file's own name. Two workers finishing the last
two pieces at once may both stitch: same inputs, same bytes, atomic renames. ``finalize``
stitches any file whose pieces are all done but whose outputs are missing, and names the
pieces a file still lacks.

Language with ``task.language=auto``: the controller finds the file's first speech (VAD) and
puts its time in every piece's payload; a worker detects the language on the 30 s from there
-- the same audio for every piece, so every piece gets one answer from one model -- and keeps
it for the file's other pieces. Each piece records the language it used; the stitch takes
the one covering most of the file and the JSON lists any piece that disagreed (possible only
when pieces ran on different models of the fallback chain).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from runner import names
from runner.rundir import atomic_write_bytes
from runner.tasks import cues as cue_mod

MARK = "/piece-"
PIECES_DIR = ".pieces"
_ID = re.compile(r"^(?P<file>.+)/piece-(?P<k>\d{3,})$")


def piece_id(file_id: str, k: int) -> str:
    return f"{file_id}{MARK}{k:03d}"


def file_of(item_id: str) -> Optional[tuple[str, int]]:
    """(file id, k) of a piece id; None for any other id."""
    m = _ID.match(item_id)
    return (m.group("file"), int(m.group("k"))) if m else None


def plan_tag(pieces: Sequence[Any], fingerprint: str) -> str:
    """A hash of the cuts and the file's fingerprint: pieces of one plan stitch together."""
    text = json.dumps([[round(p.start, 3), round(p.end, 3)] for p in pieces]) + fingerprint
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def folder(file_id: str, name: str) -> str:
    """The piece folder, relative to the task's output dir."""
    return f"{PIECES_DIR}/{name}{names.tag(file_id, 8)}"


def payload(path: str, file_id: str, name: str, k: int, n: int, start: float, end: float,
            tag: str, forced: bool, speech: float) -> str:
    return json.dumps({"path": path, "file": file_id, "name": name, "k": k, "n": n,
                       "start": round(start, 3), "end": round(end, 3), "tag": tag,
                       "forced": forced, "speech": round(speech, 3)}, ensure_ascii=False)


def parse(text: str) -> Optional[dict]:
    """The piece a payload describes; None for a whole file (a bare path)."""
    if not text.startswith("{"):
        return None
    return json.loads(text)


def piece_rel(output_dir: str, info: dict) -> str:
    return f"{output_dir}/{folder(info['file'], info['name'])}/{info['k']:03d}.json"


def detect_language(handle: Any, audio) -> str:
    """The language Whisper hears in ``audio`` (16 kHz, up to 30 s) with a loaded backend
    (runner.tasks.whisper); "en" for an English-only model."""
    model = getattr(handle, "model", None)
    if model is None:
        return "en"
    if hasattr(model, "detect_language") and hasattr(model, "feature_extractor"):  # faster
        if not getattr(model.model, "is_multilingual", True):
            return "en"
        lang, _, _ = model.detect_language(audio=audio)
        return str(lang)
    import whisper  # openai-whisper

    if not getattr(model, "is_multilingual", True):
        return "en"
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), model.dims.n_mels)
    _, probs = model.detect_language(mel.to(model.device))
    return str(max(probs, key=probs.get))


def write_piece(run_dir: Path, output_dir: str, info: dict, record: dict) -> str:
    rel = piece_rel(output_dir, info)
    data = json.dumps(record, indent=1, default=str, ensure_ascii=False) + "\n"
    atomic_write_bytes(Path(run_dir) / rel, data.encode("utf-8"))
    return rel


def siblings(run_dir: Path, output_dir: str, info: dict) -> Optional[list[dict]]:
    """All ``n`` piece records of this plan, in order; None while one is missing."""
    base = Path(run_dir) / output_dir / folder(info["file"], info["name"])
    out = []
    for k in range(1, info["n"] + 1):
        try:
            rec = json.loads((base / f"{k:03d}.json").read_text("utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        if rec.get("tag") != info["tag"]:
            return None  # left by an older plan (the file changed): redone by its item
        out.append(rec)
    return out


def missing(run_dir: Path, output_dir: str, info: dict) -> list[int]:
    base = Path(run_dir) / output_dir / folder(info["file"], info["name"])
    gone = []
    for k in range(1, info["n"] + 1):
        try:
            ok = json.loads((base / f"{k:03d}.json").read_text("utf-8")).get("tag") == info["tag"]
        except (FileNotFoundError, ValueError):
            ok = False
        if not ok:
            gone.append(k)
    return gone


def stitch_words(records: Iterable[dict]) -> tuple[list[tuple[float, float, str]], list[int],
                                                    list[dict]]:
    """(words, segment ends, segments) in file time: each piece's times shifted by its start
    and clipped to its range, pieces in time order."""
    words: list[tuple[float, float, str]] = []
    ends: list[int] = []
    segments: list[dict] = []
    for rec in sorted(records, key=lambda r: r["start"]):
        lo, hi = float(rec["start"]), float(rec["end"])

        def at(t: float) -> float:
            return round(min(max(lo + float(t), lo), hi), 3)

        for seg in rec["segments"]:
            shifted = dict(seg, start=at(seg["start"]), end=at(seg["end"]), piece=rec["k"],
                           words=[dict(w, start=at(w["start"]), end=at(w["end"]))
                                  for w in seg.get("words", [])])
            segments.append(shifted)
            words.extend((w["start"], w["end"], w["text"]) for w in shifted["words"])
            if words:
                ends.append(len(words) - 1)
    return words, ends, segments


def stitched(records: Sequence[dict], rules: cue_mod.CueRules) -> dict[str, Any]:
    """The file's transcript from its piece records: cues, text, provenance."""
    words, ends, segments = stitch_words(records)
    duration = max(float(r["end"]) for r in records)
    cues = cue_mod.build_cues(words, rules, ends, until=duration)
    first = records[0]
    seconds: dict[str, float] = {}
    for r in records:
        seconds[r["language"]] = seconds.get(r["language"], 0.0) + r["end"] - r["start"]
    lang = max(seconds, key=seconds.get)
    return {
        "id": first["file"],
        "language": lang,
        "language_disagrees": [r["k"] for r in records if r["language"] != lang],
        "models": sorted({r["model"] for r in records}),
        "backend": first.get("backend", ""),
        "duration": duration,
        "dropped_segments": sum(int(r.get("dropped", 0)) for r in records),
        "proc_s": round(sum(float(r.get("proc_s", 0.0)) for r in records), 3),
        "pieces": [{k: r.get(k) for k in ("k", "start", "end", "forced", "slot", "device",
                                          "model", "batch_size", "proc_s", "language")}
                   for r in sorted(records, key=lambda r: r["start"])],
        "text": "".join(s["text"] for s in segments).strip(),
        "segments": segments,
        "cues": cues,
    }


def render(doc: dict[str, Any], formats: Sequence[str]) -> dict[str, bytes]:
    """The file's bytes per format (the JSON with cues as plain lists)."""
    cues = doc["cues"]
    out = {}
    for fmt in formats:
        if fmt == "srt":
            text = cue_mod.to_srt(cues)
        elif fmt == "vtt":
            text = cue_mod.to_vtt(cues)
        else:
            body = dict(doc, cues=[{"start": c.start, "end": c.end, "lines": list(c.lines)}
                                   for c in cues])
            text = json.dumps(body, indent=2, default=str, ensure_ascii=False) + "\n"
        out[fmt] = text.encode("utf-8")
    return out
