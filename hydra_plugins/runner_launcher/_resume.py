"""Resuming a sweep: ``python -m runner -m <the sweep's overrides> resume=latest``.

A sweep that was interrupted, lost jobs to a crash, or stopped early (``fail_fast``) is
finished by running the same command line again with ``resume=latest`` (or
``resume=<sweep dir>``). ``runner.config.rewrite_argv`` turns that into ``resume.run=...``,
which every job of the new invocation carries; the launcher sees it and does this:

1. Which sweep. ``resume.run=<dir>``: that sweep dir (it must hold ``sweep.json``).
   ``resume.run=latest``: the sweep dir this invocation would use if it already holds a
   ``sweep.json`` (``hydra.sweep.dir`` pinned by hand), else the newest sibling of it that
   does: by default the newest ``<outputs>/multirun/<task>/<time>/``, so "latest" is per
   task, as it is for single runs. Hydra's sweeper has already made a fresh timestamped dir
   for this invocation holding only ``multirun.yaml``; that file moves into the old sweep
   dir as ``multirun.resume-<time>.yaml`` and the empty fresh dir is removed.
2. Which jobs. Each job of this invocation is matched to a job of the old sweep by its
   override list (sweep.json stores each job's list without ``resume.*``; the launcher's
   device pins were never in it), compared as a sorted list and without ``devices``
   overrides: those only choose the pool, so a sweep may be resumed on other devices
   (``devices=cpu`` first, ``devices=cuda4`` for the rest). A job with no match stops the
   resume before anything runs: a resume must repeat the sweep's overrides (the error
   shows the old ones).
3. What runs. A job whose row in the old sweep.json is ``ok`` does not run again; its
   JobReturn is rebuilt from its run dir (``.hydra/``, its exit code). Every other job
   (failed, killed, interrupted, never started) runs again with its old ``hydra.job.num``
   in its old directory: the launcher sets ``hydra.sweep.dir`` and ``hydra.sweep.subdir``
   of that job to the old ones, so numbers and directories are kept whatever the subdir
   pattern is.
4. Its journal. A rerun job whose dir holds ``journal.sqlite`` and ``task.json`` gets
   ``resume.run=<its own dir>`` in place of ``resume.run=latest``: runner resumes that
   journal (finished items are not redone, Hydra's files for the resume go to
   ``.hydra/resume-<time>/``, ``resumes.jsonl`` gets a line). A job that never got that far
   gets no ``resume.run`` and starts fresh in its directory. ``resume.retry_failed=true``
   passes through to every rerun job.
5. The record. ``sweep.json`` / ``sweep.md`` of the old sweep are rewritten with every job
   (kept rows and rerun rows); ``sweep.json``'s ``resumes`` lists each resume with its time
   and the jobs it reran.
"""
from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from runner import sweep as sweep_mod
from runner.rundir import RunDir, SweepDir
from runner.sweep import JobRecord, JobState



class SweepError(CompactHydraException):
    """A sweep that cannot start; Hydra prints the message as one line."""


def own_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides without ``resume.*`` (what sweep.json stores and matching uses)."""
    out = []
    for o in overrides:
        key = sweep_mod.split_override(o)[0]
        if key != "resume" and not key.startswith("resume."):
            out.append(o)
    return out


def match_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """What identifies a job across a resume: its overrides minus resume.* and devices."""
    keep = []
    for o in own_overrides(overrides):
        key = sweep_mod.split_override(o)[0]
        if key != "devices" and not key.startswith("devices."):
            keep.append(o)
    return tuple(sorted(keep))


def requested(config: DictConfig) -> Optional[str]:
    value = OmegaConf.select(config, "resume.run", default=None)
    return None if value in (None, "", "None", "null") else str(value)


def find_sweep(config: DictConfig, value: str) -> Path:
    here = Path(str(config.hydra.sweep.dir)).absolute()
    if value != "latest":
        path = Path(value).expanduser().absolute()
        if not SweepDir(path).json.is_file():
            raise SweepError(f"resume={value} with -m: no {SweepDir(path).json.name} there; pass a "
                             f"sweep dir made by hydra/launcher=runner, or resume=latest")
        return path
    if SweepDir(here).json.is_file():
        return here
    root = here.parent
    found = sorted(p.parent for p in root.glob(f"*/{SweepDir(root).json.name}") if p.parent != here)
    if not found:
        raise SweepError(f"resume=latest with -m: no sweep with a {SweepDir(root).json.name} under "
                         f"{root}/ (start the sweep without resume=, or pass resume=<sweep dir>)")
    return found[-1]


@dataclass
class ResumePlan:
    sweep_dir: Path
    old: list[JobRecord]  # per job of this invocation, in order: its record in the old sweep
    others: list[JobRecord]  # old records this invocation did not ask for (kept in sweep.json)
    doc: dict[str, Any]

    def rerun(self, i: int) -> bool:
        return self.old[i].state != JobState.OK


def plan(config: DictConfig, value: str, job_overrides: Sequence[Sequence[str]]) -> ResumePlan:
    sweep_dir = find_sweep(config, value)
    doc = sweep_mod.load(sweep_dir) or {}
    old = sweep_mod.records_of(doc)
    pool: dict[tuple, list[JobRecord]] = {}
    for r in old:
        pool.setdefault(match_key(r.overrides), []).append(r)
    matched = []
    for overrides in job_overrides:
        key = match_key(overrides)
        if not pool.get(key):
            known = "; ".join(" ".join(shlex.quote(o) for o in r.overrides) or "(none)"
                              for r in old[:6])
            raise SweepError(
                f"resume: job overrides [{' '.join(own_overrides(overrides))}] are not a job of "
                f"the sweep in {sweep_dir} (its jobs: {known}{' ...' if len(old) > 6 else ''}); "
                f"repeat that sweep's overrides with resume=latest")
        matched.append(pool[key].pop(0))
    used = {id(r) for r in matched}
    return ResumePlan(sweep_dir, matched, [r for r in old if id(r) not in used], doc)


def job_overrides(old: JobRecord, overrides: Sequence[str]) -> list[str]:
    """The rerun job's overrides: its own, with resume.run pointing at its own journal."""
    out = [o for o in overrides if sweep_mod.split_override(o)[0] != "resume.run"]
    d = Path(old.dir)
    if old.dir and RunDir(d).journal.is_file() and RunDir(d).task_config.is_file():
        out.append("resume.run=" + _quote(str(d)))
    return out


def _quote(text: str) -> str:
    """A Hydra override value that survives any path (quoted, quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def kept_return(old: JobRecord, overrides: Sequence[str]) -> JobReturn:
    """The JobReturn of a job a resume did not rerun, rebuilt from its run dir."""
    hydra_dir = Path(old.dir) / ".hydra"
    ret = JobReturn(overrides=list(overrides), working_dir=str(Path.cwd()),
                    status=JobStatus.COMPLETED,
                    _return_value=(sweep_mod.ExitStatus(old.exit_code)
                                   if old.exit_code is not None else old.value))
    if (hydra_dir / "config.yaml").is_file():
        ret.cfg = OmegaConf.load(hydra_dir / "config.yaml")
    if (hydra_dir / "hydra.yaml").is_file():
        ret.hydra_cfg = OmegaConf.load(hydra_dir / "hydra.yaml")
        ret.task_name = OmegaConf.select(ret.hydra_cfg, "hydra.job.name", default=None)
    return ret


def drop_fresh_dir(config: DictConfig) -> None:
    """A refused resume leaves no trace: remove the fresh dir if it holds only multirun.yaml."""
    fresh = Path(str(config.hydra.sweep.dir)).absolute()
    if fresh.is_dir() and {p.name for p in fresh.iterdir()} <= {SweepDir(fresh).multirun.name}:
        shutil.rmtree(fresh, ignore_errors=True)


def adopt_fresh_dir(config: DictConfig, old_sweep: Path) -> None:
    """Move the fresh sweep dir's multirun.yaml into the old sweep; drop the empty dir."""
    fresh = Path(str(config.hydra.sweep.dir)).absolute()
    if fresh == old_sweep.absolute() or not fresh.is_dir():
        return
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    multirun = SweepDir(fresh).multirun
    if multirun.is_file():
        shutil.move(str(multirun), str(SweepDir(old_sweep).multirun_of_resume(stamp)))
    try:
        fresh.rmdir()
    except OSError:  # something else is in it: leave it alone
        pass
