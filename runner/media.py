"""Media files: duration from the container header, and decoding to 16 kHz mono float32.

Both use PyAV (FFmpeg's libraries in-process), so neither needs the ``ffmpeg`` CLI.
``duration`` is cheap enough for discovery: it reads the header and only falls back to
walking packet timestamps (demuxing, never decoding) when the header has no duration.
Unreadable or audio-less files raise :class:`runner.tasks.base.BadInput` with one line; a
FIFO, device or socket is refused without being opened.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np

from runner.errors import BadInput, one_line
from runner.tasks.base import file_kind

log = logging.getLogger(__name__)

_AV_TIME_BASE = 1_000_000  # container.duration is in microseconds (FFmpeg's AV_TIME_BASE)


def _open(path: Path):
    import av  # local: keeps `import runner.media` cheap for the controller

    try:
        st = path.stat()
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror or 'no such file'}; check task.input") from None
    kind = file_kind(st.st_mode)
    if kind:  # never opened: a FIFO blocks until a writer comes, a device never ends
        raise BadInput(f"{path}: not a regular file ({kind}); remove it or replace it with a file")
    if st.st_size == 0:
        raise BadInput(f"{path}: empty file (0 bytes); replace or remove it")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise BadInput(f"{path}: unreadable media ({one_line(exc)}); replace or remove it") from exc


def duration(path: str | Path) -> float:
    """Seconds of audio in ``path``, from the header (or packet timestamps if it has none)."""
    import av

    path = Path(path)
    container = _open(path)
    try:
        if not container.streams.audio:
            raise BadInput(f"{path}: no audio stream; give a file with sound")
        stream = container.streams.audio[0]
        seconds = 0.0
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / _AV_TIME_BASE
        if seconds <= 0:
            seconds = _duration_from_packets(container, stream)
    except av.FFmpegError as exc:
        raise BadInput(f"{path}: unreadable media ({one_line(exc)}); replace or remove it") from exc
    finally:
        container.close()
    if not seconds > 0:
        raise BadInput(f"{path}: no audio samples (duration 0); replace or remove it")
    return seconds


def _duration_from_packets(container, stream) -> float:
    """Walk the audio packets' timestamps (demux only) for containers without a duration."""
    end = None
    first = None
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        tb = packet.time_base or stream.time_base or Fraction(1, _AV_TIME_BASE)
        start = packet.pts * tb
        first = start if first is None else min(first, start)
        stop = start + (packet.duration or 0) * tb
        end = stop if end is None else max(end, stop)
    if end is None or first is None:
        return 0.0
    return float(end - min(first, 0))


def decode_audio(path: str | Path, sr: int = 16000) -> np.ndarray:
    """Decode the first audio stream to mono float32 at ``sr`` Hz (values in [-1, 1])."""
    import av

    path = Path(path)
    container = _open(path)
    chunks: list[np.ndarray] = []
    try:
        if not container.streams.audio:
            raise BadInput(f"{path}: no audio stream; give a file with sound")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):  # flush
            chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise BadInput(f"{path}: cannot decode audio ({one_line(exc)}); replace or remove it") from exc
    finally:
        container.close()
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)
