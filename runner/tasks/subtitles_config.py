"""The subtitles task's settings: :class:`SubtitlesConfig` (the ``task`` group, registered
as ``subtitles_schema``), its checks, the cue rules it makes, and the names it allows
(formats, places, compute types, openai-whisper's model names). The task itself:
runner/tasks/subtitles.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from runner.tasks import cues as cue_mod
from runner.tasks import whisper as wh
from runner.tasks.base import ConfigError, TaskConfig, ranged

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "audio"
FORMATS = ("srt", "vtt", "json")
PLACES = ("run_dir", "beside_input")
COMPUTE_TYPES = ("auto", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "int16",
                 "float16", "bfloat16", "float32", "default")
_AUDIO_VIDEO = "wav,mp3,m4a,aac,flac,ogg,oga,opus,wma,aiff,aif,mp4,m4v,mkv,mov,webm,avi,mpg,mpeg,ts"
_LANGUAGE = re.compile(r"^(auto|[a-z]{2,3}|haw|yue)$")
#: the names openai-whisper's load_model knows (whisper.available_models())
OPENAI_NAMES = ("tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
                "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo")


@dataclass
class SubtitlesConfig(TaskConfig):
    """The ``task`` group for subtitles (registered as ``subtitles_schema``)."""

    _target_: str = "runner.tasks.subtitles.SubtitlesTask"  # the Task class
    name: str = "subtitles"  # run dirs are grouped by it
    input: str = str(SAMPLES)  # an audio/video file or a folder (searched recursively)
    # file-name glob, case-insensitive; "{a,b}" alternatives allowed
    pattern: str = "*.{" + _AUDIO_VIDEO + "}"
    models: list[str] = field(default_factory=lambda: ["tiny.en"])  # fallback chain
    backend: str = "auto"  # auto | faster-whisper | openai-whisper (auto: openai on xpu)
    language: str = "en"  # language code, or auto to detect; en prefers .en models
    formats: list[str] = field(default_factory=lambda: ["srt", "json"])  # srt, vtt, json
    beam_size: int = ranged(5, ge=1, le=100)  # beam search width (1 = greedy)
    # decoding temperatures: retried hotter when output looks wrong; [0.0] = no fallback
    temperature: list[float] = ranged(ge=0, le=1,
                                      default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # cap on tokens per 30-s window (null: the model's limit)
    max_new_tokens: Optional[int] = ranged(None, ge=1, le=440, none="the model's limit")
    compute_type: str = "auto"  # faster-whisper: auto = int8 on CPU, float16 on CUDA
    # a file whose peak is below this level (dBFS) is silent: no model run
    silence_dbfs: float = ranged(-60.0, le=0)
    # drop segments whose no_speech_prob exceeds this (1 = keep all)
    no_speech_drop: float = ranged(0.8, ge=0, le=1)
    max_line_chars: int = ranged(42, ge=1)  # cue rules: characters per line
    max_lines: int = ranged(2, ge=1)  # cue rules: lines per cue
    min_duration: float = ranged(0.833, ge=0)  # cue rules: shortest cue (s), if the silence allows
    max_duration: float = ranged(7.0, gt=0)  # cue rules: longest cue (s)
    max_cps: float = ranged(20.0, gt=0)  # cue rules: reading speed limit (characters per second)
    # cue rules: gap kept before the next cue when extending (s)
    min_gap: float = ranged(0.083, ge=0, lt=1)
    # cue rules: a cue never spans a silence longer than this (s)
    max_pause: float = ranged(1.5, ge=0)
    # where subtitle files go besides the run dir: run_dir (only there) | beside_input (also
    # <media folder>/<stem>.<lang>.<fmt>, where players look for them)
    place: str = "run_dir"
    overwrite: bool = False  # beside_input: replace an existing file there with other content
    # a media file over this many bytes fails at discovery; null (default) = no limit: a long
    # recording is normal here, and the worker decodes it, never the controller
    max_item_bytes: Optional[int] = ranged(None, ge=1, none="no limit")
    # faster-whisper: VAD speech chunks decoded in one batch (BatchedInferencePipeline),
    # several short files' chunks together; 1 = the sequential decode; null = per device
    # (runner.tasks.whisper.CHUNK_BATCH: cuda 8, xpu 4, cpu 4); out of memory halves it first
    chunk_batch: Optional[int] = ranged(None, ge=1, le=256, none="per device: cuda 8, xpu 4, cpu 4")
    # long recordings: a file longer than this (s) is cut at silences into pieces, each its
    # own item, stitched back into one file's subtitles (0 = never split)
    split_over_s: float = ranged(600.0, ge=0)
    piece_s: float = ranged(300.0, ge=5)  # the length pieces aim at (s)
    # how far from a target cut (s, each side) a silence is looked for; none: a forced cut
    split_window_s: float = ranged(30.0, gt=0)

    def __post_init__(self) -> None:
        self.models = [str(m) for m in self.models]
        self.formats = [str(f) for f in self.formats]
        super().__post_init__()  # every numeric field within its declared range
        self.temperature = [float(t) for t in self.temperature]
        bad = []
        if not self.models:
            bad.append("task.models=[]: give at least one model (e.g. [tiny.en])")
        if self.backend not in wh.BACKENDS:
            bad.append(f"task.backend={self.backend}: allowed {', '.join(wh.BACKENDS)}")
        if not _LANGUAGE.match(str(self.language)):
            bad.append(f"task.language={self.language}: use a Whisper language code (en, de...) or auto")
        wrong = [f for f in self.formats if f not in FORMATS]
        if wrong or not self.formats or len(set(self.formats)) != len(self.formats):
            bad.append(f"task.formats={self.formats}: allowed a non-empty, duplicate-free list of "
                       f"{', '.join(FORMATS)}")
        if not self.temperature:
            bad.append(f"task.temperature={self.temperature}: allowed a non-empty list of 0..1")
        if self.compute_type not in COMPUTE_TYPES:
            bad.append(f"task.compute_type={self.compute_type}: allowed {', '.join(COMPUTE_TYPES)}")
        if self.place not in PLACES:
            bad.append(f"task.place={self.place}: allowed {', '.join(PLACES)}")
        if not str(self.pattern).strip():
            bad.append("task.pattern is empty: give a file-name glob such as *.wav")
        try:
            rules = self.rules()
        except (TypeError, ValueError) as exc:
            bad.append(f"task cue rules: {exc}")
        else:
            bad.extend(f"task.{p}" for p in rules.problems())
        if bad:
            raise ConfigError("; ".join(bad))

    def rules(self) -> cue_mod.CueRules:
        return cue_mod.CueRules(
            max_line_chars=int(self.max_line_chars), max_lines=int(self.max_lines),
            min_duration=float(self.min_duration), max_duration=float(self.max_duration),
            max_cps=float(self.max_cps), min_gap=float(self.min_gap),
            max_pause=float(self.max_pause))
