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
      .runner.lock                 RunDir.lock: held by the run's controller (runner.runlock)
      .claims/<race>               RunDir.claim(race): which copy of a speculated batch wrote
      versions.json                RunDir.versions
      logs/worker-<slot>.log       RunDir.worker_log(slot)
      logs/errors/<name>.json      RunDir.error_file(name): the item's journal name
      task.json, resumes.jsonl     RunDir.task_config, RunDir.resumes
      config.resolved.yaml, rerun.sh   RunDir.resolved_config(), RunDir.rerun
      .hydra/, .hydra/resume-<time>/   RunDir.hydra_dir, RunDir.resume_hydra_dirs()
      runner.log                   RunDir.runner_log (written by Hydra's job logging)
      <task output dir>/...        RunDir.output(task.output_dir)

A sweep directory's names: :class:`SweepDir` (sweep.json, sweep.md, console.log per job).
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
    def lock(self) -> Path:
        """Locked by the run's one controller for its life (runner.runlock)."""
        return self.root / ".runner.lock"

    @property
    def hydra_dir(self) -> Path:
        """Hydra's own files of the first run (config.yaml, hydra.yaml, overrides.yaml)."""
        return self.root / ".hydra"

    @property
    def hydra_config(self) -> Path:
        return self.hydra_dir / "config.yaml"

    @staticmethod
    def resume_hydra_subdir(stamp: str) -> str:
        """Where Hydra writes its files for one resume, relative to the run dir."""
        return f".hydra/resume-{stamp}"

    def resume_hydra_dirs(self) -> list[Path]:
        """Hydra's files of each resume, oldest first."""
        return sorted(self.hydra_dir.glob("resume-*"))

    def resolved_config(self, latest_resume: bool = False) -> Path:
        """config.resolved.yaml: every interpolation resolved, hydra section included; a
        resume's own goes into its .hydra/resume-<time>/."""
        if latest_resume:
            return (self.resume_hydra_dirs() or [self.hydra_dir])[-1] / "config.resolved.yaml"
        return self.root / "config.resolved.yaml"

    @property
    def rerun(self) -> Path:
        """rerun.sh: re-runs exactly this job as a new run."""
        return self.root / "rerun.sh"

    @property
    def runner_log(self) -> Path:
        """The controller's log (Hydra's job logging writes it)."""
        return self.root / "runner.log"

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

    @property
    def errors(self) -> Path:
        """logs/errors/: one <name>.json per failed item."""
        return self.logs / "errors"

    def worker_log(self, slot: int) -> Path:
        return self.logs / f"worker-{slot}.log"

    @property
    def claims(self) -> Path:
        """``.claims/<race>``: made (O_EXCL) by the first call of a race to write its outputs
        (speculation: a copy and its original); cleared by the controller before its
        workers start and after they stop."""
        return self.root / ".claims"

    def claim(self, race: int) -> bool:
        """Claim race ``race`` for this process: True for the first caller only (one mkdir:
        atomic, and cheap enough for every call)."""
        path = f"{self.root}/.claims/{race}"
        try:
            os.mkdir(path)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:  # the first claim of the run makes .claims/
            self.claims.mkdir(exist_ok=True)
            return self.claim(race)

    def claimed(self, race: int) -> bool:
        return os.path.exists(f"{self.root}/.claims/{race}")

    def running_marker(self, slot: int) -> Path:
        """Ray actors only: ``<incarnation> <batch_no>`` of the call the slot's actor is running
        (a dead actor's last replies can be lost; this says which call it died in)."""
        return self.logs / f".running-{slot}"

    def error_file(self, name: str) -> Path:
        """``name``: the item's journal name (unique, safe; see runner.names)."""
        return self.errors / f"{names.flat(name)}.json"

    def output(self, output_dir: str) -> Path:
        return self.root / output_dir

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def make(self) -> "RunDir":
        self.errors.mkdir(parents=True, exist_ok=True)
        return self


@dataclass(frozen=True)
class SweepDir:
    """Every path of one sweep directory (``-m``): one sub-directory per job (a run dir)."""

    root: Path

    @property
    def json(self) -> Path:
        """sweep.json: one record per job; what a resume of the sweep reads."""
        return self.root / "sweep.json"

    @property
    def lock(self) -> Path:
        """Locked by the sweep's launcher for its life (runner.runlock)."""
        return self.root / ".runner.lock"

    @property
    def md(self) -> Path:
        """sweep.md: the same as a table."""
        return self.root / "sweep.md"

    @property
    def multirun(self) -> Path:
        """Hydra's own multirun.yaml."""
        return self.root / "multirun.yaml"

    def multirun_of_resume(self, stamp: str) -> Path:
        """A resume's multirun.yaml, moved here from the fresh dir Hydra made for it."""
        return self.root / f"multirun.resume-{stamp}.yaml"

    @staticmethod
    def console_log(job_dir: str | Path) -> Path:
        """A job's stdout and stderr (the launcher sends them there)."""
        return Path(job_dir) / "console.log"
