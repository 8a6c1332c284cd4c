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
from glob import escape as glob_escape
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, fields, replace as dc_replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from runner import names
from runner.rundir import atomic_write_bytes
from runner.tasks import cues as cue_mod
from runner.tasks import pieces as pc
from runner.tasks import whisper as wh
from runner.tasks.base import (
    BadInput, BadItem, ConfigError, FinalizeContext, Item, ModelRung, Task, WriteContext, Written,
    check_input_path, file_kind, too_big,
)

log = logging.getLogger(__name__)

from runner.tasks.subtitles_config import (  # noqa: F401 (SAMPLES, SubtitlesConfig: re-exported)
    _LANGUAGE, OPENAI_NAMES, SAMPLES, SubtitlesConfig)


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
        root = root.resolve()  # once: each file's path below is then absolute as it is
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
                seconds = media.duration(path, st)
            except BadInput as exc:
                yield BadItem(rel, str(exc), name=named[rel], fingerprint=fingerprint,
                              where=str(path))
                continue
            split = self.config.split_over_s
            if split and seconds > split:
                yield from self._pieces(rel, path, seconds, named[rel], fingerprint)
                continue
            yield Item(id=rel, cost=seconds, payload=str(path), name=named[rel],
                       fingerprint=fingerprint, where=str(path))

    def _pieces(self, rel: str, path: Path, seconds: float, name: str,
                fingerprint: str) -> Iterator[Item | BadItem]:
        """One item per piece of a long file (cuts: :mod:`runner.vad`)."""
        from runner import vad

        cfg = self.config
        t0 = time.perf_counter()
        try:
            plan = vad.plan(path, seconds, cfg.piece_s, cfg.split_window_s)
            speech = vad.first_speech(path, seconds) if cfg.language == "auto" else 0.0
        except BadInput as exc:
            yield BadItem(rel, str(exc), name=name, fingerprint=fingerprint, where=str(path))
            return
        forced = sum(p.forced for p in plan)
        log.info("%s: %.0f s cut into %d pieces in %.1f s%s", rel, seconds, len(plan),
                 time.perf_counter() - t0,
                 f" ({forced} forced cuts: no silence within {cfg.split_window_s:g} s)"
                 if forced else "")
        tag = pc.plan_tag(plan, fingerprint)
        for k, p in enumerate(plan, 1):
            yield Item(id=pc.piece_id(rel, k), cost=p.end - p.start,
                       payload=pc.payload(str(path), rel, name, k, len(plan), p.start,
                                          p.end, tag, p.forced, speech),
                       name=f"{name}.piece-{k:03d}", fingerprint=fingerprint,
                       where=f"{path} {p.start:.1f}-{p.end:.1f} s")

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
        self._handle = wh.load(be, rung.source, device, self.config.compute_type)
        return self._handle

    def _audio(self, item: Item) -> tuple[np.ndarray, float]:
        """(16 kHz mono float32 audio, media seconds) of an item: the whole file, or only a
        piece's range (a seek; the file is never decoded whole for a piece)."""
        from runner import media

        info = pc.parse(item.payload)
        if info is None:
            seconds = media.duration(item.payload)  # BadInput for corrupt/empty files
            return media.decode_audio(item.payload), seconds
        audio = media.decode_audio(info["path"], start=info["start"], end=info["end"])
        return audio, float(info["end"]) - float(info["start"])

    def _language(self, item: Item) -> str:
        """The language to transcribe an item in: task.language; for a piece with auto, its
        file's, detected on the 30 s from the file's first speech (the same audio for every
        piece, so every piece gets the same answer from the same model; kept per worker)."""
        info = pc.parse(item.payload)
        if self.config.language != "auto" or info is None:
            return self.config.language
        handle = getattr(self, "_handle", None)
        key = (info["file"], info["tag"], id(handle))
        memo = self.__dict__.setdefault("_languages", {})
        if key not in memo:
            from runner import media

            start = float(info["speech"])
            audio = media.decode_audio(info["path"], start=start, end=start + 30.0)
            memo[key] = pc.detect_language(handle, audio)
        return memo[key]

    def process(self, model: Any, items: Sequence[Item]) -> list[Result]:
        """Transcribe the items. faster-whisper with a chunk batch above 1 (task.chunk_batch)
        decodes VAD chunks in batches, and short items are pooled: the chunks of several items
        fill one batch (an item joins the pool until it holds ``chunk_batch`` chunks). A
        pooled item's proc_s is its own decode/VAD time plus its share of the batched decode
        by chunk count."""
        cfg = self.config
        floor = 10 ** (cfg.silence_dbfs / 20)
        batched = wh.settle_chunk_batch(model, cfg.chunk_batch) > 1 and hasattr(model, "decode")
        results: list[Optional[Result]] = [None] * len(items)
        pool: list[tuple[int, Any, wh.Options, float, float]] = []  # (k, prepared, opts, s, t)

        def flush() -> None:
            if not pool:
                return
            t0 = time.perf_counter()
            transcripts = model.decode([p for _, p, _, _, _ in pool], pool[0][2])
            spent = time.perf_counter() - t0
            chunks = sum(len(p.features) for _, p, _, _, _ in pool) or 1
            for (k, p, _, seconds, own), transcript in zip(pool, transcripts):
                transcript.drop_non_speech(cfg.no_speech_drop)
                done(k, transcript, seconds, own + spent * len(p.features) / chunks)
            pool.clear()

        def done(k: int, transcript: wh.Transcript, seconds: float, proc: float) -> None:
            results[k] = Result(transcript, seconds, proc)
            log.info("%s: %.1f s of media in %.1f s (RTF %.3f)", items[k].id, seconds, proc,
                     proc / seconds if seconds else 0.0)

        for k, item in enumerate(items):
            t0 = time.perf_counter()
            audio, seconds = self._audio(item)
            if audio.size == 0:
                raise BadInput(f"{item.payload}: no audio samples decoded; replace or remove it")
            if float(np.abs(audio).max()) < floor:
                transcript = wh.Transcript(cfg.language, [], getattr(model, "name", ""))
                done(k, transcript, seconds, time.perf_counter() - t0)
                continue
            opts = dc_replace(self.options, language=self._language(item))
            if not batched:
                transcript = model.transcribe(item.payload, audio, opts)
                transcript.drop_non_speech(cfg.no_speech_drop)
                done(k, transcript, seconds, time.perf_counter() - t0)
                continue
            if pool and dc_replace(pool[0][2], language="") != dc_replace(opts, language=""):
                flush()  # one decode's settings (each item's language is its own)
            pool.append((k, model.prepare(audio, opts), opts, seconds, time.perf_counter() - t0))
            del audio  # the pool holds the chunks' log-mel windows, not the audio
            if sum(len(p.features) for _, p, _, _, _ in pool) >= model.chunk_batch:
                flush()
        flush()
        return [r for r in results if r is not None]

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
            if pc.parse(item.payload) is not None:
                outputs.append(self._write_piece(item, result, ctx))
                continue
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

    def _write_piece(self, item: Item, result: Result, ctx: WriteContext) -> str | Written:
        """A piece's record (piece-local times); the file's subtitles once all are there."""
        info = pc.parse(item.payload)
        t = result.transcript
        record = {k: info[k] for k in ("file", "name", "path", "k", "n", "tag", "start", "end",
                                       "forced")}
        record.update(language=self._language(item), model=ctx.model, backend=t.backend,
                      slot=ctx.slot, device=ctx.device, batch_size=ctx.batch_size,
                      dropped=t.dropped, proc_s=round(result.proc_s, 3),
                      segments=t.to_dict()["segments"])
        rel = pc.write_piece(ctx.run_dir, self.output_dir, info, record)
        records = pc.siblings(ctx.run_dir, self.output_dir, info)
        if records is None:
            return rel
        placed, warning = self._stitch(ctx.run_dir, records)
        return Written(rel, placed, warning) if self.config.place == "beside_input" else rel

    def _stitch(self, run_dir: Path, records: list[dict]) -> tuple[tuple[str, ...], str]:
        """Write a split file's SRT / VTT / JSON from its piece records (runner.tasks.pieces)."""
        doc = pc.stitched(records, self.rules)
        lang = doc["language"] if _LANGUAGE.match(str(doc["language"])) \
            and doc["language"] != "auto" else "und"
        name = records[0]["name"]
        rendered = pc.render(doc, self.config.formats)
        for fmt, data in rendered.items():
            atomic_write_bytes(Path(run_dir) / self.output_dir / f"{name}.{lang}.{fmt}", data)
        log.info("%s: stitched from %d pieces (%d cues)", doc["id"], len(records), len(doc["cues"]))
        if self.config.place != "beside_input":
            return (), ""
        whole = Item(id=doc["id"], cost=doc["duration"], payload=records[0]["path"], name=name)
        return self._place(whole, name.rpartition("/")[2], lang, rendered)

    def finalize(self, ctx: FinalizeContext) -> dict[str, Any]:
        """Stitch any split file whose pieces are all done but whose subtitles are missing
        (a worker stopped between its piece and the stitch); name the pieces a file lacks."""
        files: dict[str, tuple[set[int], str]] = {}
        for item_id, output, _ in ctx.done:
            hit = pc.file_of(item_id)
            if hit and output:
                files.setdefault(hit[0], (set(), output))[0].add(hit[1])
        incomplete, stitched = {}, 0
        for file_id, (done, output) in files.items():
            try:
                info = json.loads((Path(ctx.run_dir) / output).read_text("utf-8"))
            except (OSError, ValueError):
                incomplete[file_id] = f"piece record {output} unreadable; resume redoes it"
                continue
            lacking = sorted(set(range(1, info["n"] + 1)) - done)
            lacking += [k for k in pc.missing(ctx.run_dir, self.output_dir, info)
                        if k not in lacking]
            if lacking:
                incomplete[file_id] = (f"pieces {', '.join(map(str, sorted(lacking)))} of "
                                       f"{info['n']} not done; a resume redoes only those")
                log.warning("%s: no subtitles: %s", file_id, incomplete[file_id])
                continue
            records = pc.siblings(ctx.run_dir, self.output_dir, info)
            first = self.config.formats[0]
            made = list((Path(ctx.run_dir) / self.output_dir).glob(
                f"{glob_escape(info['name'])}.*.{first}"))
            if records and not made:
                self._stitch(ctx.run_dir, records)
                stitched += 1
        if not files:
            return {}
        return {"split_files": {"files": len(files), "complete": len(files) - len(incomplete),
                                "stitched_at_finalize": stitched, "incomplete": incomplete}}

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

    def output_files(self, output: str) -> list[str]:
        """An item's files: ``<name>.<lang>.<fmt>`` for every format (the journal holds the
        first: srt when asked for)."""
        if f"/{pc.PIECES_DIR}/" in output:
            return [output]  # a piece's own record; its file's subtitles are stitched
        stem = output.rsplit(".", 1)[0]
        return [f"{stem}.{fmt}" for fmt in self.config.formats]

    def item_metrics(self, item: Item, result: Result) -> dict[str, float]:
        return {"media_s": float(result.duration), "proc_s": float(result.proc_s)}
