"""``python -m runner.diff --rev A[..B]``: what a change to conf/ does to every preset.

The ``conf/`` of a git repository (the one the command runs in, or ``--repo PATH``) is
read at two revisions straight from git objects (``git archive``; the working tree is not
touched); B defaults to the working tree as it is. Each side is composed for:

* the default config (``default``);
* every option of every group (conf/<group>/*.yaml at either revision) with the other
  groups at their defaults (``devices=cuda2``); the default option itself is skipped;
* the presets of ``conf/review.yaml`` (combinations a project cares about)::

      presets:
        subtitles-ladder: task=subtitles devices=cuda2 models=whisper_ladder
      machine: {cpu_cores: 16, cuda: 8, xpu: 2}   # what the plans are made for

Only combinations whose composed config differs are shown, key by key. For each one the
dry-run plan is made at both sides without devices (a synthetic machine, ``machine``
above: every worker slot with its device, isolation variable and threads, the batch size
per call, the model chain per backend, chunking) and its differences are shown too.

The revision's YAML is composed with *this checkout's* schemas (runner/config.py) and
planned with this checkout's code: the review shows what the YAML change does.

A side that does not compose (or has no option by that name, or no conf/) is a finding of
that combination, not a crash. A revision that does not exist and a path that is not a git
repository are one-line errors (:class:`ConfigError`).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

from runner.errors import ConfigError

REVIEW_FILE = "review.yaml"
MACHINE = {"cpu_cores": 16, "cuda": 8, "xpu": 2}  # conf/review.yaml `machine` overrides it
SKIP_GROUPS = ("hydra",)
WORKTREE = "working tree"
SCHEMAS = "each revision's YAML is composed with this checkout's schemas (runner/config.py)"


# ---- git ------------------------------------------------------------------------------------
def _git(root: Path, *args: str, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=text,
                          timeout=60)


def repo_root(path: Path) -> Path:
    """The top of the git repository ``path`` is in; a ConfigError when it is in none."""
    if not path.is_dir():
        raise ConfigError(f"{path}: no such directory (--repo takes a git repository)")
    proc = _git(path, "rev-parse", "--show-toplevel")
    if proc.returncode != 0:
        raise ConfigError(f"{path} is not a git repository (run it inside one, or pass "
                          f"--repo PATH)")
    return Path(proc.stdout.strip())


def resolve_rev(root: Path, rev: str) -> str:
    """The commit ``rev`` names; a ConfigError when it names none."""
    proc = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if proc.returncode != 0 or not rev or rev.startswith("-"):
        raise ConfigError(f"revision {rev!r} does not exist in {root} (a branch, tag or commit)")
    return proc.stdout.strip()


def extract_conf(root: Path, commit: str, dest: Path) -> Optional[Path]:
    """conf/ at ``commit`` written under ``dest`` (from git objects); None: no conf/ there."""
    proc = _git(root, "archive", "--format=tar", commit, "conf", text=False)
    if proc.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # a Python without extraction filters (before 3.10.12 / 3.11.4)
            tar.extractall(dest)
    return dest / "conf"


def parse_rev(spec: str) -> tuple[str, Optional[str]]:
    """``A`` -> (A, None: the working tree); ``A..B`` -> (A, B)."""
    a, dots, b = spec.partition("..")
    if b.startswith("."):
        raise ConfigError(f"--rev {spec!r}: give A or A..B (two dots)")
    return a, (b if dots and b else None)


# ---- one side -------------------------------------------------------------------------------
@dataclasses.dataclass
class Side:
    """One revision's conf/: where it is, its groups, default choices and presets."""

    label: str  # main (1a2b3c4) | working tree
    conf: Optional[Path]
    missing: str = ""  # why there is no conf/ to compose
    options: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # group -> choice
    presets: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    machine: dict[str, int] = dataclasses.field(default_factory=lambda: dict(MACHINE))
    notes: list[str] = dataclasses.field(default_factory=list)
    base: dict[str, Any] = dataclasses.field(default_factory=dict)  # the default, composed


def _read_side(side: Side) -> None:
    conf = side.conf
    if conf is None or not (conf / "config.yaml").is_file():
        side.missing = side.missing or f"no conf/config.yaml at {side.label}"
        side.conf = None
        return
    for d in sorted(p for p in conf.iterdir() if p.is_dir() and p.name not in SKIP_GROUPS):
        side.options[d.name] = sorted(p.stem for p in d.glob("*.yaml"))
    path = conf / REVIEW_FILE
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text()) or {}
            for name, ov in (data.get("presets") or {}).items():
                side.presets[str(name)] = ov.split() if isinstance(ov, str) else [str(o) for o
                                                                                   in ov]
            side.machine.update({k: int(v) for k, v in (data.get("machine") or {}).items()
                                 if k in MACHINE})
        except (yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
            side.notes.append(f"conf/{REVIEW_FILE} at {side.label} is not readable "
                              f"({' '.join(str(exc).split())[:160]}); its presets are left out")


def _compose_all(side: Side, combos: list[tuple[str, list[str]]],
                 ) -> dict[str, dict[str, Any]]:
    """label -> {"cfg": DictConfig, "config": flat dict, "choices": ...} or {"error": why}."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from runner import app
    from runner.config import rewrite_argv
    from runner.diff import flatten
    from runner.provenance import resolve_tolerant

    if side.conf is None:
        return {label: {"error": side.missing} for label, _ in combos}
    app.setup()
    out: dict[str, dict[str, Any]] = {}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(side.conf.resolve()), version_base="1.3"):
            for label, overrides in combos:
                try:
                    cfg = compose("config", overrides=rewrite_argv(["", *overrides])[1:],
                                  return_hydra_config=True)
                    choices = dict(cfg.hydra.runtime.choices)
                    OmegaConf.set_struct(cfg, False)
                    cfg.pop("hydra")
                    out[label] = {"cfg": cfg, "choices": choices,
                                  "config": flatten(resolve_tolerant(cfg, "", frozenset()))}
                except Exception as exc:  # a finding: this side does not compose
                    why = " ".join(str(exc).split()).split(" Config search path:")[0]
                    out[label] = {"error": why[:300] or repr(exc)}
    finally:
        GlobalHydra.instance().clear()
    return out


def plan_of(cfg: Any, models_choice: Optional[str], machine: dict[str, int]) -> dict[str, Any]:
    """The dry-run plan of a composed config, flat, for ``machine`` (no devices probed):
    worker slots (device, threads, speed, environment), batch size per call, model chain
    per backend, chunking, executor and journal policy."""
    from omegaconf import OmegaConf

    from runner import chains as chains_mod
    from runner import config as config_mod
    from runner import devices as devices_mod
    from runner import oom
    from runner.tasks.base import instantiate_task

    config_mod.validate(cfg)
    group = chains_mod.group_chains(cfg.models)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task = instantiate_task(task_cfg)
    inventory = devices_mod.Inventory(cpu_cores=machine["cpu_cores"],
                                      cuda=("planned",) * machine["cuda"],
                                      xpu=("planned",) * machine["xpu"])
    slots = devices_mod.make_slots(cfg.devices, inventory)
    backends = list(dict.fromkeys(s.backend for s in slots))
    task.check(frozenset(backends))
    if group and "models" not in task_cfg:
        raise ConfigError(f"models={models_choice}: task={task_cfg.get('name')} has no "
                          f"model chain (no task.models)")
    plan: dict[str, Any] = {
        "backend": "+".join(backends), "slot_count": len(slots),
        "batch_size": oom.call_size(cfg.batch_size, cfg.batch_probe.floor, cfg.batch_probe.max,
                                    getattr(task, "default_batch_size", 1), set(backends)),
        "chunking.strategy": cfg.chunking.strategy, "chunking.prefetch": cfg.chunking.prefetch,
        "chunking.guided_tail": cfg.chunking.guided_tail,
        "executor.kind": cfg.executor.kind, "checkpoint.policy": cfg.checkpoint.policy,
        "worker_env": " ".join(f"{k}={v}" for k, v in sorted(task.worker_env().items()))}
    for b in backends:  # the chain as configured (which rungs this machine has is not asked)
        names = group.get(b) or task_cfg.get("models")
        for name in names or []:
            why = task.model_problem(name, b)
            if why:
                raise ConfigError(f"{chains_mod.label(b, group, models_choice)}: cannot load "
                                  f"{name} on {b}: {why}")
        plan[f"chain.{b}"] = " > ".join(names) if names else "(no task.models)"
        plan[f"chain_source.{b}"] = chains_mod.label(b, group, models_choice)
    for s in slots:
        mask = devices_mod.MASK_VARIABLE.get(s.backend, "CUDA_VISIBLE_DEVICES")
        plan[f"slots.{s.index}"] = (f"{s.label} threads={s.threads} {mask}={s.env.get(mask)!s}"
                                    + (f" speed={s.speed:g}" if s.speed != 1 else "")
                                    + f" ({s.group})")
    return plan


def _plan_side(res: dict[str, Any], machine: dict[str, int]) -> dict[str, Any]:
    if "error" in res:
        return {"(plan)": "no plan: the config does not compose"}
    try:
        return plan_of(res["cfg"], res["choices"].get("models"), machine)
    except Exception as exc:  # a plan that cannot be made is shown as such
        return {"(plan)": "cannot plan: " + " ".join(str(exc).split())[:300]}


# ---- both sides -----------------------------------------------------------------------------
def _combinations(a: Side, b: Side) -> list[tuple[str, str, Optional[str]]]:
    """(label, overrides, group) for default, each group option, each preset."""
    out: list[tuple[str, str, Optional[str]]] = [("default", "", None)]
    for group in sorted(set(a.options) | set(b.options)):
        defaults = {s.defaults.get(group) for s in (a, b) if "error" not in s.base}
        for opt in sorted(set(a.options.get(group, [])) | set(b.options.get(group, []))):
            if defaults != {opt}:
                out.append((f"{group}={opt}", f"{group}={opt}", group))
    for name in sorted(set(a.presets) | set(b.presets)):
        ov = b.presets.get(name, a.presets.get(name, []))
        out.append((f"preset {name}", " ".join(ov), None))
    return out


def _overrides_for(side: Side, label: str, overrides: str) -> Optional[list[str]]:
    if label.startswith("preset "):
        name = label[len("preset "):]
        return side.presets.get(name)
    return overrides.split()


def review(repo: Path, rev_a: str, rev_b: Optional[str] = None) -> dict[str, Any]:
    """The review document (JSON-ready) of conf/ at ``rev_a`` against ``rev_b`` (None: the
    working tree)."""
    root = repo_root(repo)
    commits = [resolve_rev(root, r) if r is not None else None for r in (rev_a, rev_b)]
    logging.getLogger("runner").setLevel(logging.ERROR)  # skipped models: same both sides
    with tempfile.TemporaryDirectory(prefix="runner-review-") as tmp:
        sides = []
        for i, (rev, commit) in enumerate(zip((rev_a, rev_b), commits)):
            if commit is None:
                sides.append(Side(WORKTREE, root / "conf"))
                continue
            label = f"{rev} ({commit[:7]})"
            conf = extract_conf(root, commit, Path(tmp) / "ab"[i])
            sides.append(Side(label, conf, "" if conf else f"no conf/ at {label}"))
        for s in sides:
            _read_side(s)
            s.base = _compose_all(s, [("default", [])])["default"]
            s.defaults = dict(s.base.get("choices") or {})
        a, b = sides
        combos = _combinations(a, b)
        results = []
        for s in sides:
            todo, absent = [], {}  # absent: not composed here (or already)
            for label, ov, group in combos:
                mine = _overrides_for(s, label, ov)
                if mine is None or (group and ov.split("=")[1] not in s.options.get(group, [])):
                    absent[label] = {"absent": True, "error": f"not at {s.label}"}
                elif label == "default":
                    absent[label] = s.base  # composed already
                else:
                    todo.append((label, mine))
            results.append({**_compose_all(s, todo), **absent})
        changes = [c for c in (_change(label, ov, group, a, b, results[0][label],
                                       results[1][label]) for label, ov, group in combos) if c]
    _group_as_default(changes)
    return {"kind": "rev", "repo": str(root), "a": a.label, "b": b.label, "schemas": SCHEMAS,
            "machine": b.machine, "combinations": len(combos),
            "presets": sorted(set(a.presets) | set(b.presets)),
            "notes": a.notes + b.notes, "headline": headline(changes), "changes": changes}


def _change(label: str, overrides: str, group: Optional[str], a: Side, b: Side,
            ra: dict[str, Any], rb: dict[str, Any]) -> Optional[dict[str, Any]]:
    from runner.diff import compare

    ea, eb = ra.get("error"), rb.get("error")
    if ea and eb and ea == eb:
        return None
    entry: dict[str, Any] = {"label": label, "overrides": overrides, "group": group,
                             "status": "changed", "a_error": ea, "b_error": eb,
                             "config": [], "plan": [], "as_default": False}
    if ra.get("absent") or rb.get("absent"):
        if ra.get("absent") and rb.get("absent"):
            return None
        added = bool(ra.get("absent"))
        entry["status"] = "added" if added else "removed"
        entry["a_error" if added else "b_error"] = None  # the status says it
        present, base = (rb, b.base) if added else (ra, a.base)
        if group and "error" not in present and "error" not in base:  # what choosing it does
            entry["config"] = compare(base["config"], present["config"])
        return entry
    if ea or eb:
        entry["status"] = "breaks" if eb else "fixed"
        return entry
    entry["config"] = compare(ra["config"], rb["config"])
    if not entry["config"]:
        return None
    pa, pb = _plan_side(ra, a.machine), _plan_side(rb, b.machine)
    entry["plan"] = compare(pa, pb)
    entry["plan_note"] = pb.get("(plan)") or pa.get("(plan)")  # a plan that cannot be made
    return entry


def _own(c: dict[str, Any], default: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config rows of a change that the default combination does not have too."""
    common = default["config"] if default and default["label"] == "default" else []
    return [r for r in c["config"] if r not in common]


def _group_as_default(changes: list[dict[str, Any]]) -> None:
    """A change whose config and plan rows are the default combination's says so
    (``as_default``) instead of repeating them: a changed default shows once."""
    first = changes[0] if changes and changes[0]["label"] == "default" else None
    for c in changes[1:] if first else []:
        c["as_default"] = all(c[k] == first[k] for k in ("status", "a_error", "b_error",
                                                          "config")) and (
            c["plan"] == first["plan"] or bool(c.get("plan_note")))  # no plan here: as config


def _short(key: str, group: Optional[str]) -> str:
    return key[len(group) + 1:] if group and key.startswith(group + ".") else key


def headline(changes: list[dict[str, Any]], most: int = 6) -> str:
    """``2 presets change: devices=cuda2 (workers_per_device 1 -> 2), ...``"""
    from runner.diff import _show

    if not changes:
        return "No preset changes: every combination composes to the same config"
    shown = [c for c in changes if not c.get("as_default")]
    parts = []
    for c in shown[:most]:
        if c["status"] == "breaks":
            what = "does not compose at B"
        elif c["status"] == "fixed":
            what = "composes again at B"
        elif c["status"] in ("added", "removed"):
            kind = "option" if c["group"] else "preset"
            what = f"new {kind}" if c["status"] == "added" else f"removed {kind}"
        else:
            rows = _own(c, changes[0]) or c["config"]
            what = ("as default, plus " if len(rows) < len(c["config"]) else "") + ", ".join(
                f"{_short(r['key'], c['group'])} {_show(r['a'])} -> {_show(r['b'])}"
                for r in rows[:2]) + (f", +{len(rows) - 2} more" if len(rows) > 2 else "")
        parts.append(f"{c['label']} ({what})")
    more = f", and {len(shown) - most} more" if len(shown) > most else ""
    same = len(changes) - len(shown)
    same = f"; {same} more change{'s' if same != 1 else ''} as the default does" if same else ""
    n = len(changes)
    return (f"{n} preset{'s' if n != 1 else ''} change{'s' if n == 1 else ''}: "
            + ", ".join(parts) + more + same)
