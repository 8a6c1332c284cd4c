"""The subtitles task: audio/video files in, SRT / WebVTT / JSON transcripts out.

Controller side (no torch): ``check`` validates input and tools, ``discover`` walks the
input and reads each file's duration from its header (the item's cost), ``model_chain``
resolves ``task.models`` through :mod:`runner.tasks.whisper`. Worker side: ``load_model``
loads faster-whisper or openai-whisper on the slot's device, ``process`` transcribes with
word timestamps, ``write`` builds cues with :mod:`runner.tasks.cues` and writes
``<run dir>/subtitles/<folder>/<stem>.<lang>.<fmt>`` atomically -- the input's own folders
and stem, kept as written (see ``_names`` for two inputs with one stem) -- and, with
``task.place=beside_input``, a copy beside the media file, where players look for it.

Silence: a file that decodes but contains no speech is *not* an error; it gets valid empty
subtitle files (an SRT with no cues, a VTT with only its header) and a JSON with no
segments, so a silent video still has a (blank) track and a resume does not retry it.
Unreadable, empty (0 bytes) or audio-less files raise :class:`BadInput` naming the file.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from runner import names
from runner.rundir import atomic_write_bytes
from runner.tasks import cues as cue_mod
from runner.tasks import whisper as wh
from runner.tasks.base import (
    BadInput, BadItem, ConfigError, Item, ModelRung, Task, TaskConfig, WriteContext, Written,
    check_input_path, file_kind, ranged, too_big,
)

log = logging.getLogger(__name__)

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


@dataclass
class Result:
    """What ``process`` hands to ``write`` for one file (stays in the worker)."""

    transcript: wh.Transcript
    duration: float  # seconds of media
    proc_s: float  # seconds spent transcribing it


VIDEO = frozenset("mp4 m4v mkv mov webm avi mpg mpeg ts wmv flv 3gp".split())


def _names(rels: Iterator[str]) -> dict[str, str]:
    """Each input's output name: its folders and stem, as written (runner.names makes each
    part safe). Inputs of one folder whose stems are equal (case-folded) -- talk.mp4,
    talk.wav -- share a stem: the first by (video before audio, extension, name) keeps it, so
    the video's player pairs talk.en.srt with it; the others keep their extension in the
    name (talk.wav.en.srt). The journal settles any clash that is left."""
    groups: dict[tuple[str, str], list[str]] = {}
    for rel in rels:
        folder, _, base = rel.rpartition("/")
        stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
        groups.setdefault((folder, names.fold(stem)), []).append(rel)
    out = {}
    for (folder, _), members in groups.items():
        def rank(rel: str) -> tuple:
            ext = rel.rsplit(".", 1)[-1].lower() if "." in rel.rpartition("/")[2] else ""
            return (ext not in VIDEO, ext, rel)
        for k, rel in enumerate(sorted(members, key=rank)):
            base = rel.rpartition("/")[2]
            stem = base if k else (base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base)
            parts = ([p for p in folder.split("/") if p] if folder else []) + [stem]
            out[rel] = names.relative(parts)
    return out


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [p for alt in m.group(1).split(",") for p in _expand_braces(head + alt + tail)]


class SubtitlesTask(Task):
    """Speech to subtitles with Whisper (faster-whisper or openai-whisper)."""

    name = "subtitles"
    output_dir = "subtitles"
    #: where copies go does not change what an output means: a resume may change them;
    #: the size bound only decides which files are refused at discovery
    resume_safe_keys = ("place", "overwrite", "max_item_bytes")

    def __init__(self, **fields_: Any):
        known = {f.name for f in fields(SubtitlesConfig)}
        unknown = sorted(set(fields_) - known)
        if unknown:
            raise ConfigError(f"task.{unknown[0]}: unknown subtitles setting; allowed "
                              f"{', '.join(sorted(known - {'_target_'}))}")
        values = {k: (list(v) if k in ("models", "formats", "temperature") else v) for k, v in fields_.items()}
        self.config = SubtitlesConfig(**values)
        self.rules = self.config.rules()
        self.options = wh.Options(self.config.language, self.config.beam_size,
                                  tuple(self.config.temperature), self.config.max_new_tokens)
        self._globs = [g.lower() for g in _expand_braces(self.config.pattern)]

    # ---- controller side ---------------------------------------------------------------
    def _backends_used(self, backends: frozenset[str]) -> set[str]:
        return {wh.choose_backend(self.config.backend, b) for b in backends}

    def check(self, backends: frozenset[str]) -> None:
        cfg = self.config
        check_input_path("task.input", Path(cfg.input).expanduser(),
                         "point task.input at an audio/video file or folder")
        if cfg.backend == wh.FASTER and "xpu" in backends:
            raise ConfigError("task.backend=faster-whisper cannot run on xpu devices; "
                              "use task.backend=auto or openai-whisper")
        used = self._backends_used(backends)
        modules = {wh.FASTER: "faster_whisper", wh.OPENAI: "whisper"}
        import importlib.util

        for be in sorted(used):
            if importlib.util.find_spec(modules[be]) is None:
                raise ConfigError(f"task.backend={cfg.backend}: the {be} package is not "
                                  f"installed; pip install it or pick another backend")
        if wh.OPENAI in used and shutil.which("ffmpeg") is None:
            raise ConfigError(f"task.backend={cfg.backend}: openai-whisper needs the ffmpeg "
                              "CLI on PATH to decode files; install ffmpeg (apt-get install ffmpeg)")

    def _matches(self, rel: str) -> bool:
        target = rel.lower()
        name = target.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(target if "/" in g else name, g) for g in self._globs)

    def discover(self) -> Iterator[Item | BadItem]:
        from runner import media

        root = Path(self.config.input).expanduser()
        check_input_path("task.input", root, "point task.input at an audio/video file or folder")
        if root.is_file():
            files = [(root.name, root)]
        else:
            files = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fn in filenames:
                    path = Path(dirpath) / fn
                    rel = path.relative_to(root).as_posix()
                    if not fn.startswith(".") and self._matches(rel):
                        files.append((rel, path))
            files.sort(key=lambda f: f[0])
        named = _names(rel for rel, _ in files)
        for rel, path in files:
            if not names.is_unicode(rel):  # os.walk's stand-ins for bytes that are not UTF-8
                shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                yield BadItem(shown, f"{shown}: the file name is not UTF-8; rename it (e.g. "
                                     f"convmv -f latin1 -t utf-8)", where=shown)
                continue
            try:
                st = path.stat()
                kind = file_kind(st.st_mode)  # a FIFO is never opened: it would block
                fingerprint = "" if kind else names.file_fingerprint(path, st)
            except OSError as exc:
                yield BadItem(rel, f"{rel}: unreadable ({exc.strerror}); check its permissions",
                              name=named[rel], where=str(path))
                continue
            if kind:
                yield BadItem(rel, f"{rel}: not a regular file ({kind}); remove it or replace "
                                   f"it with a file", name=named[rel], where=str(path))
                continue
            bound = self.config.max_item_bytes
            if bound is not None and st.st_size > bound:
                yield BadItem(rel, f"{rel}: {too_big('the file', st.st_size, bound)}",
                              name=named[rel], fingerprint=fingerprint, where=str(path))
                continue
            try:
                seconds = media.duration(path)
            except BadInput as exc:
                yield BadItem(rel, str(exc), name=named[rel], fingerprint=fingerprint,
                              where=str(path))
                continue
            yield Item(id=rel, cost=seconds, payload=str(path.resolve()), name=named[rel],
                       fingerprint=fingerprint, where=str(path))

    def model_chain(self, backend: str) -> list[ModelRung]:
        be = wh.choose_backend(self.config.backend, backend)
        if be == wh.FASTER and backend == "xpu":
            return [ModelRung(n, n, False, "faster-whisper cannot run on xpu")
                    for n in self.config.models]
        return [wh.resolve(n, be, self.config.language) for n in self.config.models]

    def model_problem(self, name: str, backend: str) -> str:
        be = wh.choose_backend(self.config.backend, backend)
        if Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~")) \
                or name.endswith(".pt"):
            return ""  # a local path: model_chain says whether it is a model
        if be == wh.FASTER and (name in wh._FW_REPOS or "/" in name):
            return ""
        if be == wh.OPENAI and name in OPENAI_NAMES:
            return ""
        known = ("tiny, base, small, medium (each also .en), large-v1..v3, turbo, distil-*, a "
                 "Hugging Face repo id" if be == wh.FASTER else ", ".join(OPENAI_NAMES))
        return f"{be} (used on {backend}) has no model of that name ({known}, or a local path)"

    def worker_env(self) -> dict[str, str]:
        # every rung resolves to local files: keep the HF hub from ever reaching out
        return {"HF_HUB_OFFLINE": "1"}

    # ---- worker side -------------------------------------------------------------------
    def load_model(self, rung: ModelRung, device: str) -> Any:
        device = device.split(":", 1)[0]
        be = wh.choose_backend(self.config.backend, device)
        log.info("loading %s (%s) with %s on %s", rung.name, rung.source, be, device)
        return wh.load(be, rung.source, device, self.config.compute_type)

    def process(self, model: Any, items: Sequence[Item]) -> list[Result]:
        from runner import media

        results = []
        cfg = self.config
        floor = 10 ** (cfg.silence_dbfs / 20)
        for item in items:
            seconds = media.duration(item.payload)  # BadInput for corrupt/empty files
            t0 = time.perf_counter()
            audio = media.decode_audio(item.payload)
            if audio.size == 0:
                raise BadInput(f"{item.payload}: no audio samples decoded; replace or remove it")
            if float(np.abs(audio).max()) < floor:
                transcript = wh.Transcript(cfg.language, [], getattr(model, "name", ""))
            else:
                transcript = model.transcribe(item.payload, audio, self.options)
                transcript.drop_non_speech(cfg.no_speech_drop)
            proc = time.perf_counter() - t0
            results.append(Result(transcript, seconds, proc))
            log.info("%s: %.1f s of media in %.1f s (RTF %.3f)", item.id, seconds, proc,
                     proc / seconds if seconds else 0.0)
        return results

    def cues(self, result: Result) -> list[cue_mod.Cue]:
        words, ends = [], []
        for seg in result.transcript.segments:
            words.extend((w.start, w.end, w.text) for w in seg.words)
            if words:
                ends.append(len(words) - 1)
        return cue_mod.build_cues(words, self.rules, ends)

    def write(self, items: Sequence[Item], results: Sequence[Result],
              ctx: WriteContext) -> list[str | Written]:
        """``subtitles/<folder>/<stem>.<lang>.<fmt>`` per item (its journal name), and with
        task.place=beside_input a copy beside the media file too."""
        out_root = Path(ctx.run_dir) / self.output_dir
        outputs: list[str | Written] = []
        for item, result in zip(items, results):
            cues = self.cues(result)
            lang = result.transcript.language or self.config.language
            lang = lang if _LANGUAGE.match(str(lang)) and lang != "auto" else "und"
            name = item.name or names.component(item.id)
            rendered = {}
            for fmt in self.config.formats:
                if fmt == "srt":
                    text = cue_mod.to_srt(cues)
                elif fmt == "vtt":
                    text = cue_mod.to_vtt(cues)
                else:
                    text = json.dumps(self._json(item, result, cues, ctx, lang), indent=2,
                                      default=str) + "\n"
                rendered[fmt] = text.encode("utf-8")
                atomic_write_bytes(out_root / f"{name}.{lang}.{fmt}", rendered[fmt])
            first = "srt" if "srt" in rendered else self.config.formats[0]
            rel = f"{self.output_dir}/{name}.{lang}.{first}"
            if self.config.place == "beside_input":
                placed, warning = self._place(item, name.rpartition("/")[2], lang, rendered)
                outputs.append(Written(rel, placed, warning))
            else:
                outputs.append(rel)
        return outputs

    def _place(self, item: Item, stem: str, lang: str,
               rendered: dict[str, bytes]) -> tuple[tuple[str, ...], str]:
        """Copies beside the media file; an existing different file is kept unless
        task.overwrite; a folder we cannot write to is a warning, never a failure."""
        placed, notes = [], []
        for fmt, data in rendered.items():
            target = Path(item.payload).parent / f"{stem}.{lang}.{fmt}"
            try:
                if target.is_file() and target.read_bytes() == data:
                    placed.append(str(target))
                    continue
                if target.exists() and not self.config.overwrite:
                    notes.append(f"{target} exists with other content; kept it "
                                 f"(task.overwrite=true replaces it)")
                    continue
                existed = target.exists()
                atomic_write_bytes(target, data)
                placed.append(str(target))
                if existed:
                    notes.append(f"{target} replaced (task.overwrite=true)")
            except OSError as exc:
                notes.append(f"cannot write {target} ({exc.strerror or exc}); "
                             f"the run dir's copy is kept")
        return tuple(placed), "; ".join(notes)

    def _json(self, item: Item, result: Result, cues, ctx: WriteContext,
              lang: str) -> dict[str, Any]:
        t = result.transcript
        return {
            "id": item.id,
            "language": lang,
            "model": ctx.model,
            "backend": t.backend,
            "device": ctx.device,
            "batch_size": ctx.batch_size,
            "duration": result.duration,
            "dropped_segments": t.dropped,
            "proc_s": round(result.proc_s, 3),
            "text": "".join(s.text for s in t.segments).strip(),
            "segments": t.to_dict()["segments"],
            "cues": [{"start": c.start, "end": c.end, "lines": list(c.lines)} for c in cues],
        }

    def item_metrics(self, item: Item, result: Result) -> dict[str, float]:
        return {"media_s": float(result.duration), "proc_s": float(result.proc_s)}
