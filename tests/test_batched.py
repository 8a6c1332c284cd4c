"""Layer: unit (the whisper backend and the subtitles task called in-process; espeak-ng and
ffmpeg make the inputs, the bundled tiny.en decodes them).

Batched decode (issue 18, point 5): ``task.chunk_batch`` runs VAD chunks through
faster-whisper's batched recipe, chunks of several short files in one batch; an out of memory
in a batched decode halves the chunk batch before the worker's ladder sees it.

* one file decoded by the backend equals faster-whisper's own ``BatchedInferencePipeline``
  (segments, words, timestamps): the recipe is the library's, not a look-alike;
* files decoded together equal each file decoded alone, and the task pools short items:
  20 clips at chunk_batch=8 take 3 batched calls, not 20, each transcript on its own timeline;
* chunk_batch=1 is the sequential decode (no VAD), null is the device's default;
* an injected out of memory (torch.OutOfMemoryError, CTranslate2's "CUDA failed with error
  out of memory") halves chunk_batch and retries the same chunks, down to 1; at 1 it goes up
  to the worker (is_oom true); any other error is not retried.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runner import media
from runner.errors import ConfigError
from runner.oom import is_oom
from runner.tasks import whisper as wh
from runner.tasks.base import Item
from runner.tasks.subtitles import SubtitlesTask
from tests.speech import synthesise, wer

CLIPS = [
    "Please turn off the lights when you leave the room.",
    "They walked along the beach and collected shells.",
    "The children played football in the park until the sun went down.",
    "My brother bought a new bicycle and rides it to work every day.",
    "She opened the window and looked out at the garden.",
]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("clips")
    return [synthesise(text, root / f"clip{k}.wav") for k, text in enumerate(CLIPS)]


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory) -> np.ndarray:
    """~75 s of speech with pauses: three VAD chunks."""
    path = synthesise(" ".join(CLIPS * 3), tmp_path_factory.mktemp("long") / "long.wav")
    return media.decode_audio(path)


@pytest.fixture(scope="module")
def backend() -> wh.FasterWhisperBackend:
    rung = wh.resolve("tiny.en", wh.FASTER, "en")
    assert rung.available, rung.reason
    return wh.FasterWhisperBackend(rung.source, "cpu")


def timeline(t: wh.Transcript) -> list:
    return [(s.start, s.end, s.text, [(w.start, w.end, w.text) for w in s.words])
            for s in t.segments]


class FlakyPipe:
    """The batched pipeline, running out of memory on batches of more than ``fits`` chunks."""

    def __init__(self, real, fits: int, error):
        self.real, self.fits, self.error, self.sizes = real, fits, error, []

    def generate_segment_batched(self, features, tokenizer, options):
        self.sizes.append(int(features.shape[0]))
        if features.shape[0] > self.fits:
            raise self.error()
        return self.real.generate_segment_batched(features, tokenizer, options)


# ---- settings -------------------------------------------------------------------------------

def test_chunk_batch_setting_and_defaults():
    assert SubtitlesTask().config.chunk_batch is None
    assert SubtitlesTask(chunk_batch=4).config.chunk_batch == 4
    for bad in (0, 257):
        with pytest.raises(ConfigError, match="task.chunk_batch"):
            SubtitlesTask(chunk_batch=bad)
    assert wh.default_chunk_batch("cuda:1") == 8 and wh.default_chunk_batch("xpu") == 4
    assert wh.default_chunk_batch("cpu") == wh.CHUNK_BATCH["cpu"] >= 1

    class Fake:
        device = "cuda"
        chunk_batch = None

    fake = Fake()
    assert wh.settle_chunk_batch(fake, None) == 8  # the device's default, once
    fake.chunk_batch = 2  # e.g. halved by an out of memory: kept
    assert wh.settle_chunk_batch(fake, 16) == 2
    assert wh.settle_chunk_batch(Fake(), 16) == 16
    assert wh.OpenAIWhisperBackend.chunk_batch == 1  # no batched pipeline: sequential


# ---- the recipe is faster-whisper's -----------------------------------------------------------

@pytest.mark.timeout(180)
def test_one_file_equals_batched_inference_pipeline(backend, long_audio):
    from faster_whisper import BatchedInferencePipeline

    backend.chunk_batch = 2
    mine = backend.transcribe("", long_audio, wh.Options())
    segs, info = BatchedInferencePipeline(backend.model).transcribe(
        long_audio, language="en", beam_size=5, word_timestamps=True, batch_size=2)
    theirs = [(s.start, s.end, s.text, [(w.start, w.end, w.word) for w in s.words])
              for s in segs]
    assert len(theirs) >= 2 and timeline(mine) == theirs
    assert mine.chunk_batch == 2 and mine.backend == wh.FASTER and mine.language == "en"
    assert wer(" ".join(CLIPS * 3), " ".join(w.text for s in mine.segments for w in s.words)) <= 0.2


@pytest.mark.timeout(180)
def test_files_decoded_together_equal_each_alone(backend, clips, long_audio):
    opts = wh.Options()
    audios = [media.decode_audio(clips[0]), long_audio, media.decode_audio(clips[1])]
    backend.chunk_batch = 4
    together = backend.decode([backend.prepare(a, opts) for a in audios], opts)
    alone = [backend.decode([backend.prepare(a, opts)], opts)[0] for a in audios]
    assert [timeline(t) for t in together] == [timeline(t) for t in alone]
    for audio, t in zip(audios, together):  # each on its own timeline
        assert t.segments and t.segments[-1].end <= len(audio) / 16000 + 0.05


@pytest.mark.timeout(240)
def test_short_clips_share_batches_across_files(backend, clips, monkeypatch):
    """20 clips (each one VAD chunk) in one call at chunk_batch=8: 3 batched decodes of 8, 8
    and 4 chunks; every transcript right, every word within its own clip."""
    task = SubtitlesTask(chunk_batch=8)
    backend.chunk_batch = None  # as loaded: the task settles it
    items = [Item(f"c{k}", 0, str(clips[k % len(clips)])) for k in range(20)]
    calls, sizes = [], []
    real_decode, real_forward = backend.decode, backend._forward

    def decode(prepared, opts):
        calls.append(len(prepared))
        return real_decode(prepared, opts)

    def forward(pipe, part, *args):
        sizes.append(len(part))
        return real_forward(pipe, part, *args)

    monkeypatch.setattr(backend, "decode", decode)
    monkeypatch.setattr(backend, "_forward", forward)
    results = task.process(backend, items)
    assert backend.chunk_batch == 8 and calls == [8, 8, 4] and sizes == [8, 8, 4]
    for k, res in enumerate(results):
        words = [w for s in res.transcript.segments for w in s.words]
        assert wer(CLIPS[k % len(CLIPS)], " ".join(w.text for w in words)) <= 0.2
        assert words[0].start >= 0 and words[-1].end <= res.duration + 0.05
        assert res.proc_s > 0 and res.transcript.chunk_batch == 8
    # the same clip gives the same words wherever it sat in a batch
    assert timeline(results[0].transcript) == timeline(results[5].transcript)


@pytest.mark.timeout(120)
def test_chunk_batch_one_is_the_sequential_decode(backend, clips, monkeypatch):
    task = SubtitlesTask(chunk_batch=1)
    backend.chunk_batch = None
    monkeypatch.setattr(backend, "prepare", lambda *a: pytest.fail("batched path used"))
    [res] = task.process(backend, [Item("c0", 0, str(clips[0]))])
    assert backend.chunk_batch == 1 and res.transcript.chunk_batch == 1
    assert wer(CLIPS[0], " ".join(w.text for s in res.transcript.segments for w in s.words)) <= 0.2


# ---- out of memory: the chunk batch is halved first ----------------------------------------------

def _torch_oom():
    torch = pytest.importorskip("torch")
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _ct2_oom():
    return RuntimeError("CUDA failed with error out of memory")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("error", [_torch_oom, _ct2_oom], ids=["torch", "ctranslate2"])
def test_oom_halves_chunk_batch_and_retries(backend, clips, error, caplog):
    task = SubtitlesTask(chunk_batch=8)
    items = [Item(f"c{k}", 0, str(clips[k])) for k in range(5)]
    backend.chunk_batch = 1
    want = [timeline(r.transcript) for r in
            SubtitlesTask(chunk_batch=2).process(_fresh(backend, 2), items)]
    backend._pipe = None
    backend.chunk_batch, halvings = None, backend.oom_halvings
    backend._batched("en", wh.Options())  # makes the real pipeline
    flaky = FlakyPipe(backend._pipe, fits=2, error=error)
    backend._pipe = flaky
    try:
        results = task.process(backend, items)
    finally:
        backend._pipe = None
    # 5 chunks: 5 (OOM) -> 4 (OOM) -> 2, 2, 1 -- halved twice, then kept at 2
    assert flaky.sizes == [5, 4, 2, 2, 1]
    assert backend.chunk_batch == 2 and backend.oom_halvings == halvings + 2
    assert [timeline(r.transcript) for r in results] == want
    assert all(r.transcript.chunk_batch == 2 for r in results)
    assert "task.chunk_batch halved to 4" in caplog.text and "halved to 2" in caplog.text


def _fresh(backend, n):
    backend._pipe, backend.chunk_batch = None, n
    return backend


@pytest.mark.timeout(120)
def test_oom_at_one_chunk_goes_to_the_worker_and_other_errors_are_not_retried(backend, clips):
    items = [Item(f"c{k}", 0, str(clips[k])) for k in range(2)]
    for error, oom in ((_ct2_oom, True), (lambda: ValueError("bad input"), False)):
        backend._pipe = None
        backend.chunk_batch = 2
        backend._batched("en", wh.Options())
        flaky = FlakyPipe(backend._pipe, fits=0, error=error)
        backend._pipe = flaky
        try:
            with pytest.raises(Exception) as err:
                SubtitlesTask(chunk_batch=2).process(backend, items)
        finally:
            backend._pipe = None
        assert is_oom(err.value) is oom
        # OOM: 2 -> 1 -> re-raised at 1; another error: not retried, the batch unchanged
        assert flaky.sizes == ([2, 1] if oom else [2])
        assert backend.chunk_batch == (1 if oom else 2)
