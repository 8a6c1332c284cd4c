"""``python -m runner.diff A B [--json]``: what differs between two runs, for a code review.

A and B are run dirs or sweep job dirs (the same layout). Four sections, in this order,
each listing only the keys whose values differ (a key missing on one side shows
``<absent>``):

* config    the resolved job config: ``config.resolved.yaml`` where the run has one, else
            ``.hydra/config.yaml`` resolved where it can be. Hydra's own keys are compared
            too, except those that always differ between two runs (dirs, times, job num,
            mode, the override list itself: its effect is in the other keys).
* versions  ``versions.json``: Python, platform, package versions, git commit and dirty flag.
* devices   the device inventory as discovered (``versions.json``) and the worker slots the
            run had (``plan.yaml``: device and threads per slot).
* summary   ``summary.json``: status, exit code, wall time, items done, items/s, RTF,
            failures, and items/s per device; numbers show their relative change.

A and B may also be two YAML files (e.g. ``conf/devices/cpu2.yaml`` and a changed copy):
their keys are compared as they are. ``--compose 'task=embed' 'task=embed batch_size=64'``
composes the app's config (``conf/``, or ``--conf DIR_A [DIR_B]``) with each override set
and compares the two results, so a reviewer sees what a change to a YAML file or to a
command line does to the composed config.

Plain text by default (paste it into a review); ``--json`` for scripts. Exit code 0, or 1
with a one-line error when an input is not a run dir / cannot be composed.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from runner.rundir import RunDir
from runner.tasks.base import ConfigError

ABSENT = "<absent>"
SECTIONS = ("config", "versions", "devices", "summary")
# hydra keys that differ between any two runs: not compared
VOLATILE = ("hydra.run.", "hydra.sweep.", "hydra.runtime.", "hydra.job.num", "hydra.job.id",
            "hydra.overrides.", "hydra.mode", "hydra.output_subdir",
            "hydra.job.override_dirname", "hydra.job_logging.handlers.file.filename")
SUMMARY_KEYS = ("status", "exit_code", "wall_s", "items_done", "items_per_s", "rtf", "media_s",
                "speedup_over_slowest_device")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists stay whole values (they are compared whole)."""
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d} if prefix else {}


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    fa, fb = flatten(a), flatten(b)
    rows = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, ABSENT), fb.get(k, ABSENT)
        if va != vb:
            rows.append({"key": k, "a": va, "b": vb})
    return rows


# ---- reading a run dir ----------------------------------------------------------------------
def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config_of(run: Path) -> dict[str, Any]:
    resolved = _yaml(RunDir(run).resolved_config())
    if isinstance(resolved, dict):
        cfg = resolved
    else:
        from omegaconf import OmegaConf

        from runner.provenance import resolve_tolerant

        cfg = resolve_tolerant(OmegaConf.load(RunDir(run).hydra_config), "", frozenset())
    flat = flatten(cfg)
    return {k: v for k, v in flat.items() if not k.startswith(VOLATILE)}


def _devices_of(run: Path, versions: dict[str, Any]) -> dict[str, Any]:
    out = dict(inventory=versions.get("inventory") or {})
    plan = _yaml(RunDir(run).plan) or {}
    out["slots"] = [f"{s.get('device')} threads={s.get('threads')}" for s in plan.get("slots", [])]
    out["backend"] = plan.get("backend")
    return out


def _summary_of(summary: dict[str, Any]) -> dict[str, Any]:
    out = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
    counts = summary.get("counts") or {}
    if counts:
        out["failed_items"] = counts.get("failed")
    if "failures" in summary:
        out["failures"] = len(summary["failures"])
    for label, d in (summary.get("devices") or {}).items():
        out[f"devices.{label}.items_per_s"] = d.get("items_per_s")
        if "rtf" in d:
            out[f"devices.{label}.rtf"] = d["rtf"]
    return out


def read_run(path: Path) -> dict[str, dict[str, Any]]:
    """The four sections of one run dir (a section's file may be missing: empty section)."""
    rd = RunDir(path)
    if not (rd.hydra_config.is_file() or rd.resolved_config().is_file()):
        raise ConfigError(f"{path} is not a run dir (no {rd.hydra_config.relative_to(path)}); "
                          f"pass two run dirs "
                          f"or sweep job dirs, two YAML files, or --compose 'A overrides' "
                          f"'B overrides'")
    versions = _json(rd.versions) or {}
    kept = {k: v for k, v in versions.items() if k not in ("inventory", "command")}
    return {"config": _config_of(path), "versions": kept,
            "devices": _devices_of(path, versions),
            "summary": _summary_of(_json(rd.summary) or {})}


def diff_paths(a: Path, b: Path) -> dict[str, Any]:
    if a.is_file() and b.is_file():
        sides = [{"config": _yaml_file(p)} for p in (a, b)]
    else:
        sides = [read_run(p) for p in (a, b)]
    return {"a": str(a), "b": str(b),
            "sections": {s: compare(sides[0].get(s, {}), sides[1].get(s, {}))
                         for s in SECTIONS if s in sides[0]}}


def _yaml_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML file ({exc.__class__.__name__})") from None
    return data if isinstance(data, dict) else {"(value)": data}


# ---- composing ------------------------------------------------------------------------------
def compose(overrides: str, conf_dir: Optional[str] = None) -> dict[str, Any]:
    """The app's config composed with ``overrides`` (one string, shell-split), resolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner import app
    from runner.config import rewrite_argv
    from runner.provenance import resolve_tolerant

    app.setup()
    conf = str(Path(conf_dir or app.CONF).resolve())
    args = rewrite_argv(shlex.split(overrides))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = hydra_compose("config", overrides=args)
    except Exception as exc:
        raise ConfigError(f"cannot compose {overrides!r} with {conf}: "
                          f"{' '.join(str(exc).split())}") from None
    return resolve_tolerant(cfg, "", frozenset())


def diff_compose(a: str, b: str, conf_a: Optional[str] = None,
                 conf_b: Optional[str] = None) -> dict[str, Any]:
    ca, cb = compose(a, conf_a), compose(b, conf_b or conf_a)
    return {"a": a, "b": b, "sections": {"config": compare(ca, cb)}}


# ---- output ---------------------------------------------------------------------------------
def _show(v: Any) -> str:
    if isinstance(v, str):
        return v if v else "''"
    return json.dumps(v, default=str)


def _change(a: Any, b: Any) -> str:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if not numbers or a == 0 or not math.isfinite(a) or not math.isfinite(b):
        return ""
    return f"  ({(b - a) / abs(a) * 100:+.1f}%)"


def render(doc: dict[str, Any]) -> str:
    lines = ["runner diff", f"  A  {doc['a']}", f"  B  {doc['b']}", ""]
    for name, rows in doc["sections"].items():
        if not rows:
            lines.append(f"{name}: same")
            continue
        lines.append(f"{name}: {len(rows)} key{'s' if len(rows) != 1 else ''} differ"
                     f"{'s' if len(rows) == 1 else ''}")
        width = min(40, max(len(r["key"]) for r in rows))
        for r in rows:
            change = _change(r["a"], r["b"]) if name == "summary" else ""
            lines.append(f"  {r['key']:<{width}}  {_show(r['a'])}  ->  {_show(r['b'])}{change}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.diff", description=__doc__.split("\n")[0])
    p.add_argument("a", help="run dir, sweep job dir or YAML file (with --compose: overrides)")
    p.add_argument("b", help="the other one")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--compose", action="store_true",
                   help="A and B are override sets, composed with the app's config")
    p.add_argument("--conf", nargs="+", metavar="DIR",
                   help="with --compose: config dir for A (and B); default: the app's conf/")
    args = p.parse_args(argv)
    try:
        if args.compose:
            conf = args.conf or []
            doc = diff_compose(args.a, args.b, conf[0] if conf else None,
                               conf[1] if len(conf) > 1 else None)
        else:
            doc = diff_paths(Path(args.a), Path(args.b))
    except ConfigError as exc:
        print(f"runner diff: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2, default=str) if args.json else render(doc), end="" if not
          args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
