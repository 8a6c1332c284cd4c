"""Run-dir naming and resume: where a run lives, which run ``resume=latest`` means, and
whether a resume may change what it changes.

New runs live in ``<outputs>/<task>/<YYYY-mm-dd_HH-MM-SS.micro>`` (a ``-<pid>`` suffix if
that already exists), so two runs started in the same second never share a dir. Resuming
reuses the old dir: Hydra's files for the resume go to ``.hydra/resume-<time>/`` and each
resume adds a line to ``resumes.jsonl``.

A resume may change devices, batch size, chunking, limit, executor and the like; it may
not change anything in the task group that changes what an output means (the model chain,
fields, the input) except keys the task lists in ``resume_safe_keys``.
"""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from runner import journal_schema
from runner.errors import ConfigError
from runner.rundir import RunDir
from runner.runlock import RunLock



def claim_run_dir(outputs: str | Path, task: str) -> Path:
    """Make a new run's dir, ``<outputs>/<task>/<YYYY-mm-dd_HH-MM-SS.micro>``, and own it: a
    run started in the same microsecond gets the ``-<pid>`` variant (mkdir is the claim)."""
    base = Path(outputs) / task / datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
    for path in (base, base.with_name(f"{base.name}-{os.getpid()}")):
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise unwritable(outputs, path, exc) from None
    raise ConfigError(f"run dir {base} and its -{os.getpid()} variant both exist; "
                      f"start the run again")


def unwritable(outputs: str | Path, path: Path, exc: OSError) -> ConfigError:
    """The one line for an ``outputs=`` where no run dir can be made."""
    return ConfigError(f"outputs={outputs}: cannot create {path} ({exc.strerror or exc}); "
                       f"choose a writable folder with outputs=<dir>")


def check_outputs(outputs: str | Path) -> None:
    """``outputs`` exists as a folder this process can write in, or can be made so."""
    root = Path(outputs)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".runner-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise unwritable(outputs, root, exc) from None


def new_run_dir(outputs: str | Path, task: str) -> Path:
    """The name a new run's dir would get now (nothing is made): the timestamp, or its
    ``-<pid>`` variant when that exists already."""
    base = Path(outputs) / task / datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
    return base.with_name(f"{base.name}-{os.getpid()}") if base.exists() else base


# what makes Hydra print or inspect instead of running a job (nothing to claim), or compose
# from another config than conf/ (the resolver names that run's dir)
_NO_JOB = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion",
           "-sc", "--version", "--resolve", "--package", "-p", "-m", "--multirun",
           "--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def _compose(argv: list[str], conf: str) -> Any:
    """The config this command line composes to, or None when Hydra would refuse it (Hydra
    itself reports that next)."""
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv[1:] if not a.startswith(("-", "hydra.", "hydra/", "+hydra"))]
    try:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return compose("config", overrides=overrides)
    except Exception:
        return None


def claim_for(argv: list[str], conf: str) -> tuple[list[str], RunLock | None]:
    """A new single run: make its dir here (:func:`claim_run_dir`), lock it for this
    process's life (the lock is returned: keep it) and hand it to Hydra as
    ``hydra.run.dir=...``, so that no config resolver creates anything. A sweep: its
    ``outputs`` must be writable. Other command lines (a resume, --help, --cfg, a run dir
    given) are left as typed."""
    args = argv[1:]
    sweep = any(a in ("-m", "--multirun") for a in args)
    if any(a.split("=", 1)[0] in _NO_JOB for a in args if a not in ("-m", "--multirun")) or any(
            a.startswith(("hydra.run.dir=", "resume.run=", "+hydra.run.dir=")) for a in args):
        return argv, None
    # a sweep's swept values (a,b / range(...)) do not compose: its outputs= is what counts
    cfg = _compose([a for a in argv if not (sweep and ("," in a or "(" in a))], conf)
    if cfg is None or any(c in str(cfg.outputs) for c in "'\"\\,"):
        return argv, None  # (a path Hydra's grammar needs escapes for: the resolver names it)
    if sweep:
        check_outputs(cfg.outputs)
        return argv, None
    if cfg.resume.run:
        return argv, None
    from runner.config import quote_value, validate

    validate(cfg)  # a bad setting is refused before a run dir is made for it

    path = claim_run_dir(cfg.outputs, cfg.task.name)
    lock = RunLock.acquire(RunDir(path).lock)
    return [*argv, quote_value(f"hydra.run.dir={path}")], lock


class RunDirResolver:
    """OmegaConf resolver for hydra.run.dir; answers the same within one process. It names
    and never makes: a new run's dir is claimed before Hydra starts (:func:`claim_for`)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, str] = {}

    def __call__(self, outputs: str, task: str, resume: str | None) -> str:
        key = (outputs, task, resume)
        if key not in self._cache:
            self._cache[key] = self._resolve(outputs, task, resume)
        return self._cache[key]

    @staticmethod
    def _resolve(outputs: str, task: str, resume: str | None) -> str:
        if resume in (None, "", "None", "null"):
            return str(new_run_dir(outputs, task))
        return str(find_run(outputs, task, resume))


def output_subdir(resume: str | None) -> str:
    if resume in (None, "", "None", "null"):
        return ".hydra"
    return RunDir.resume_hydra_subdir(datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f'))


def find_run(outputs: str, task: str, resume: str, key: str = "resume",
             exclude: Path | None = None) -> Path:
    """The run dir ``<key>=latest`` (the newest run of ``task`` under ``outputs`` with a
    journal, other than ``exclude``) or ``<key>=<run dir>`` names; one-line errors."""
    if resume == "latest":
        root = Path(outputs) / task
        skip = exclude.resolve() if exclude is not None else None
        runs = sorted(p.parent for p in root.glob(f"*/{RunDir(root).journal.name}")
                      if p.parent.resolve() != skip) if root.is_dir() else []
        if not runs:
            raise ConfigError(f"{key}=latest: no {'earlier ' if exclude else ''}run of "
                              f"task={task} with a journal under {root}/ (start one without "
                              f"{key}=, or pass {key}=<run dir>)")
        return runs[-1]
    path = Path(resume).expanduser()
    if not RunDir(path).journal.is_file():
        raise ConfigError(f"{key}={resume}: no {RunDir(path).journal.name} there; pass a run "
                          f"dir made with checkpoint=resume (or {key}=latest)")
    return path


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>"))
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_compatible(old_task: dict[str, Any], new_task: dict[str, Any],
                     safe_keys: tuple[str, ...]) -> None:
    """Refuse a resume whose task config changes what outputs mean, key by key."""
    changes = [c for c in diff(old_task, new_task) if c[0] not in safe_keys]
    if changes:
        listing = "; ".join(f"task.{k}: {a!r} -> {b!r}" for k, a, b in changes)
        raise ConfigError(f"resume refused: the task config changes what outputs mean ({listing}); "
                          f"start a new run, or resume with the original values")


def check_resume(argv: list[str], conf: str) -> RunLock | None:
    """Find the run ``resume.run=...`` names before Hydra does, check its journal and lock
    the run dir for this process's life (the lock is returned: keep it), so that a missing
    run, a broken journal or a run another controller holds is a one-line error (exit 1)
    with nothing written into the run dir."""
    values = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("resume.run=")]
    reuse = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("reuse.run=")]
    if values and reuse and values[-1] not in ("", "null") and reuse[-1] not in ("", "null"):
        raise ConfigError(f"reuse={reuse[-1]} makes a new run and resume={values[-1]} "
                          f"continues one: give only one of them")
    if (not values or values[-1] in ("", "null", "None") or "," in values[-1]
            or any(a in ("-m", "--multirun") for a in argv[1:])):
        return None
    cfg = _compose(argv, conf)
    if cfg is None:
        return None
    run = RunDir(find_run(cfg.outputs, cfg.task.name, values[-1]))
    journal_schema.verify(run.journal)  # (read-only: a refused journal's dir is left as found)
    return RunLock.acquire(run.lock)
