"""The run directory: the one owner of every path in it, and atomic file writes.

The run directory is a public contract (see DESIGN.md); its names are defined here and
nowhere else. Every file appears whole or not at all: written to a temp file in the same
directory, fsynced, then renamed over the final name -- and with the mode any file the
user's programs make would have (0666 & ~umask; folders 0777 & ~umask), not mkstemp's 0600.

    <run dir>/
      .hydra/                      Hydra's own
      plan.yaml                    RunDir.plan
      summary.json                 RunDir.summary
      timeline.png                 RunDir.timeline
      journal.sqlite               RunDir.journal
      versions.json                RunDir.versions
      logs/worker-<slot>.log       RunDir.worker_log(slot)
      logs/errors/<name>.json      RunDir.error_file(name): the item's journal name
      <task output dir>/...        RunDir.output(task.output_dir, relative)
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from runner import names


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it (/proc; else set and restore)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file under the user's umask: 0666 & ~umask."""
    return 0o666 & ~current_umask()


def apply_umask(path: Path) -> None:
    """Give a file made by something that ignores the umask's intent (mkstemp: 0600,
    SQLite: 0644) the mode the user's umask asks for."""
    with contextlib.suppress(OSError):
        os.chmod(path, file_mode())


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success fsync it and rename it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove what :func:`atomic_path` leaves when its writer is killed half-way
    (``.<name>.<random>.tmp``) anywhere under ``folder``. Only safe when no writer is alive:
    the controller calls it once every worker of the run has stopped."""
    removed = []
    for p in sorted(Path(folder).rglob(".*.tmp")) if Path(folder).is_dir() else []:
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: Path, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")




@dataclass(frozen=True)
class RunDir:
    """Every path of one run directory."""

    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def timeline(self) -> Path:
        return self.root / "timeline.png"

    @property
    def journal(self) -> Path:
        return self.root / "journal.sqlite"

    @property
    def versions(self) -> Path:
        return self.root / "versions.json"

    @property
    def hydra_config(self) -> Path:
        return self.root / ".hydra" / "config.yaml"

    @property
    def task_config(self) -> Path:
        """The task group as first resolved; resume compares against it."""
        return self.root / "task.json"

    @property
    def resumes(self) -> Path:
        """One line per resume: when, overrides, what changed."""
        return self.root / "resumes.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def worker_log(self, slot: int) -> Path:
        return self.logs / f"worker-{slot}.log"

    def running_marker(self, slot: int) -> Path:
        """Ray actors only: ``<incarnation> <batch_no>`` of the call the slot's actor is running
        (a dead actor's last replies can be lost; this says which call it died in)."""
        return self.logs / f".running-{slot}"

    def error_file(self, name: str) -> Path:
        """``name``: the item's journal name (unique, safe; see runner.names)."""
        return self.logs / "errors" / f"{names.flat(name)}.json"

    def output(self, output_dir: str) -> Path:
        return self.root / output_dir

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def make(self) -> "RunDir":
        (self.logs / "errors").mkdir(parents=True, exist_ok=True)
        return self
