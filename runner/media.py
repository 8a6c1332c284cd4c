"""Media files: duration from the container header, and decoding to 16 kHz mono float32.

Both use PyAV (FFmpeg's libraries in-process), so neither needs the ``ffmpeg`` CLI.
``duration`` is cheap enough for discovery: it reads the header and only falls back to
walking packet timestamps (demuxing, never decoding) when the header has no duration.
Unreadable or audio-less files raise :class:`runner.tasks.base.BadInput` with one line; a
FIFO, device or socket is refused without being opened.
"""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from runner.errors import BadInput, one_line
from runner.tasks.base import file_kind

log = logging.getLogger(__name__)

_AV_TIME_BASE = 1_000_000  # container.duration is in microseconds (FFmpeg's AV_TIME_BASE)


def _open(path: Path, st: os.stat_result | None = None):
    """``path`` opened by PyAV; ``st``: its stat when the caller has it (discovery stats
    each file once)."""
    import av  # local: keeps `import runner.media` cheap for the controller

    try:
        st = st or path.stat()
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


def duration(path: str | Path, st: os.stat_result | None = None) -> float:
    """Seconds of audio in ``path``, from the header (or packet timestamps if it has none)."""
    import av

    path = Path(path)
    container = _open(path, st)
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


def decode_audio(path: str | Path, sr: int = 16000, start: float | None = None,
                 end: float | None = None) -> np.ndarray:
    """Decode the first audio stream to mono float32 at ``sr`` Hz (values in [-1, 1]).

    With ``start`` / ``end`` (seconds) only that range is returned, and only about that range
    is read: the container seeks to the packet before ``start`` (exact for PCM, the nearest
    frame for compressed audio), decoding stops once ``end`` is passed, and the samples are
    trimmed by each decoded frame's own timestamp -- a piece of a long recording never
    costs a decode of the whole file."""
    import av

    path = Path(path)
    container = _open(path)
    chunks: list[np.ndarray] = []
    first: float | None = None  # media time of chunks[0][0]
    got = 0
    try:
        if not container.streams.audio:
            raise BadInput(f"{path}: no audio stream; give a file with sound")
        stream = container.streams.audio[0]
        # frame times count from the stream's start (an MP3's encoder delay): a full decode's
        # sample 0 is that start, so ranges are measured from it too
        zero = (float(stream.start_time * stream.time_base)
                if stream.start_time is not None and stream.time_base is not None else 0.0)
        if start and start > 0 and stream.time_base is not None:
            container.seek(int((start + zero) / stream.time_base), stream=stream,
                           backward=True, any_frame=False)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        for frame in container.decode(stream):
            if first is None:
                first = float(frame.time) - zero if frame.time is not None else 0.0
            for out in resampler.resample(frame):
                data = out.to_ndarray().reshape(-1)
                chunks.append(data)
                got += data.size
            if end is not None and first + got / sr >= end:
                break
        else:
            for out in resampler.resample(None):  # flush
                chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise BadInput(f"{path}: cannot decode audio ({one_line(exc)}); replace or remove it") from exc
    finally:
        container.close()
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if start is None and end is None:
        return audio
    t0 = first or 0.0
    a = max(0, int(round(((start or 0.0) - t0) * sr)))
    b = len(audio) if end is None else max(a, int(round((end - t0) * sr)))
    return audio[a:b]
