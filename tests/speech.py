"""Test helpers for speech: synthesise English with espeak-ng, score transcripts by WER."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path


def synthesise(text: str, path: Path, rate: int = 150, voice: str = "en-us") -> Path:
    """Speak ``text`` with espeak-ng into ``path``; the extension picks the format (ffmpeg)."""
    path = Path(path)
    raw = path.with_name(path.stem + ".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(raw), text],
                   check=True, capture_output=True, timeout=60)
    if path.suffix.lower() == ".wav":
        args = ["-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le"]
    else:
        args = ["-ar", "16000", "-ac", "1"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(raw), *args, str(path)],
                   check=True, capture_output=True, timeout=60)
    raw.unlink()
    return path


def normalise(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes inside words kept)."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level Levenshtein distance / reference length."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return float(bool(hyp))
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


VOICES = ("en-us", "en-gb", "en-us+m3", "en-gb+f2", "en-us+f4")


def recording(sentences: list[str], path: Path, gaps: list[float],
              voices: tuple[str, ...] = VOICES) -> list[tuple[float, float]]:
    """One 16-kHz mono WAV of ``sentences`` (espeak-ng voices in turn) with ``gaps[i % len]``
    seconds of digital silence after sentence i; returns each sentence's (start, end) s."""
    import wave

    import numpy as np

    path = Path(path)
    parts, spans, t = [], [], 0.0
    for i, text in enumerate(sentences):
        one = synthesise(text, path.with_name(f".{path.stem}.{i}.wav"), voice=voices[i % len(voices)])
        with wave.open(str(one)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        one.unlink()
        spans.append((t, t + len(pcm) / 16000))
        gap = np.zeros(int(gaps[i % len(gaps)] * 16000), dtype=np.int16)
        parts += [pcm, gap]
        t += (len(pcm) + len(gap)) / 16000
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.concatenate(parts).tobytes())
    return spans
