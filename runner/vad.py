"""Where to cut a long recording: Silero VAD (the ONNX model inside faster-whisper) near each
target cut.

A long file is cut into ``n = round(duration / piece_s)`` pieces (at least 2), the targets
spread evenly (``duration * k / n``). Around each target only a window of ``window_s`` each
side is decoded (a seek, :func:`runner.media.decode_audio`) and scored by the VAD in 32-ms
frames, so planning a three-hour file reads n minutes of audio, never the whole file.

Inside a window the cut goes in the middle of a silence -- a run of frames whose speech
probability is below ``threshold`` lasting at least ``min_silence_s`` -- preferring one of at
least a second, then the one nearest the target. When a window holds no such silence (music,
crosstalk, a speaker who never pauses) the cut is *forced*: it goes at the frame the VAD
finds least speech-like (in speech usually the gap between two words) and the cut is marked
``forced`` in the plan and in the file's JSON; a word said across it may be lost or heard in
both pieces.

Nothing here imports torch: faster-whisper's VAD runs on onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

SR = 16000
FRAME = 512  # samples per VAD frame (32 ms at 16 kHz)
FRAME_S = FRAME / SR


@dataclass(frozen=True)
class Piece:
    """One piece of a file: [start, end) seconds; ``forced``: its end is a forced cut."""

    start: float
    end: float
    forced: bool = False


def speech_probs(audio: np.ndarray) -> np.ndarray:
    """Silero's speech probability for each 32-ms frame of 16-kHz ``audio``."""
    from faster_whisper.vad import get_vad_model  # onnxruntime, no torch

    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        return np.zeros(0, dtype=np.float32)
    padded = np.pad(audio, (0, (-audio.size) % FRAME))
    return np.asarray(get_vad_model()(padded), dtype=np.float32).reshape(-1)


def silences(probs: np.ndarray, threshold: float = 0.35,
             min_silence_s: float = 0.3) -> list[tuple[float, float]]:
    """(start, end) seconds, relative to the audio's start, of each silence run."""
    quiet = np.concatenate(([False], probs < threshold, [False]))
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    out = []
    for a, b in zip(edges[::2], edges[1::2]):
        if (b - a) * FRAME_S >= min_silence_s:
            out.append((a * FRAME_S, b * FRAME_S))
    return out


def find_cut(probs: np.ndarray, offset: float, target: float, threshold: float = 0.35,
             min_silence_s: float = 0.3) -> tuple[float, bool]:
    """(cut time, forced) in a window whose first frame is at ``offset`` seconds."""
    runs = silences(probs, threshold, min_silence_s)
    if runs:
        def score(run: tuple[float, float]) -> tuple[float, float]:
            mid = offset + (run[0] + run[1]) / 2
            return (-min(run[1] - run[0], 1.0), abs(mid - target))
        a, b = min(runs, key=score)
        return offset + (a + b) / 2, False
    if probs.size == 0:
        return target, True
    # no silence: the least speech-like frame, the nearest to the target among equals
    frames = offset + (np.arange(probs.size) + 0.5) * FRAME_S
    order = np.lexsort((np.abs(frames - target), np.round(probs, 3)))
    return float(frames[order[0]]), True


Decode = Callable[[float, float], np.ndarray]


def plan(path: str | Path, duration: float, piece_s: float, window_s: float,
         decode: Optional[Decode] = None) -> list[Piece]:
    """The pieces of a file ``duration`` seconds long, cut at silences near every
    ``duration * k / n``; ``decode(start, end)`` reads a range (default: the media file)."""
    if decode is None:
        from runner import media

        def decode(a: float, b: float) -> np.ndarray:
            return media.decode_audio(path, SR, start=a, end=b)

    n = max(2, int(round(duration / piece_s)))
    half = min(window_s, duration / (2 * n))
    pieces, start = [], 0.0
    for k in range(1, n):
        target = duration * k / n
        lo = max(start, target - half)
        audio = decode(lo, target + half)
        cut, forced_now = find_cut(speech_probs(audio), lo, target)
        if not start < cut < duration:
            cut, forced_now = target, True
        pieces.append(Piece(start, cut, forced_now))
        start = cut
    pieces.append(Piece(start, duration, False))
    return pieces


def first_speech(path: str | Path, duration: float, block_s: float = 30.0,
                 decode: Optional[Decode] = None) -> float:
    """Seconds to the first speech frame (read in blocks from the start); 0.0 if none."""
    if decode is None:
        from runner import media

        def decode(a: float, b: float) -> np.ndarray:
            return media.decode_audio(path, SR, start=a, end=b)

    t = 0.0
    while t < duration:
        probs = speech_probs(decode(t, min(duration, t + block_s)))
        hits = np.flatnonzero(probs >= 0.5)
        if hits.size:
            return t + float(hits[0]) * FRAME_S
        t += block_s
    return 0.0
