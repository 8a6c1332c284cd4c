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

``--rev A[..B]`` reviews a change to ``conf/`` between two git revisions (B: the working
tree): every group option and ``conf/review.yaml`` preset, composed and planned at both
(runner/review.py).

``--format text`` (default; paste it into a review), ``md`` (a PR comment: a headline and
collapsible sections) or ``json`` (``--json``) for scripts. Exit code 0, or 1 with a one-line
error when an input is not a run dir / cannot be composed / is no revision. ``--check``
exits 1 when anything differs (for run dirs: config, versions or devices; a summary's
timings differ between any two runs) and 2 on an error: a CI gate.
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


def md_cell(v: Any) -> str:
    """A value in a Markdown table cell: code, pipes escaped."""
    text = _show(v).replace("|", "\\|").replace("`", "'").replace("\n", " ")
    return f"`{text}`"


def md_table(rows: list[dict[str, Any]], a: str, b: str) -> list[str]:
    out = [f"| key | {a} | {b} |", "|---|---|---|"]
    return out + [f"| {md_cell(r['key'])} | {md_cell(r['a'])} | {md_cell(r['b'])} |"
                  for r in rows]


def render_md(doc: dict[str, Any]) -> str:
    """Markdown for a PR comment: a headline, one collapsible table per section."""
    changed = [(n, rows) for n, rows in doc["sections"].items() if rows]
    head = ("no differences" if not changed else
            ", ".join(f"{n} {len(rows)} key{'s' if len(rows) != 1 else ''}"
                      for n, rows in changed) + " differ")
    lines = [f"### runner diff: `{doc['a']}` → `{doc['b']}`", "", f"**{head}**", ""]
    for name, rows in doc["sections"].items():
        if not rows:
            lines += [f"- {name}: same", ""]
            continue
        if name == "summary":
            rows = [{**r, "b": f"{_show(r['b'])}{_change(r['a'], r['b'])}"} for r in rows]
        lines += ["<details>", f"<summary><b>{name}</b>: {len(rows)} key"
                               f"{'s' if len(rows) != 1 else ''}</summary>", ""]
        lines += md_table(rows, "A", "B") + ["", "</details>", ""]
    return "\n".join(lines)


#: sections --check looks at for run dirs: what was asked and where (a summary's timings
#: differ between any two runs)
CHECKED = ("config", "versions", "devices")


def differs(doc: dict[str, Any]) -> bool:
    """Whether --check fails: a revision review with any change, or run dirs / composed
    configs with a difference in config, versions or devices."""
    if doc.get("kind") == "rev":
        return bool(doc["changes"])
    return any(doc["sections"].get(s) for s in CHECKED)


# ---- output of --rev (runner/review.py) -----------------------------------------------------
def _counts(c: dict[str, Any]) -> str:
    if c["status"] == "breaks":
        return "does not compose at B"
    if c["status"] == "fixed":
        return "composes again at B (not at A)"
    n, p = len(c["config"]), len(c["plan"])
    what = f"{n} config key{'s' if n != 1 else ''}"
    if c["status"] in ("added", "removed"):
        kind = "option" if c["group"] else "preset"
        return (f"new {kind} at B" if c["status"] == "added" else f"{kind} removed at B") + (
            f", sets {what} vs the defaults" if n else "")
    return what + f", {p} plan key{'s' if p != 1 else ''}"


def _scope(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    presets = len(doc["presets"])
    return (f"{doc['combinations']} combinations composed at both sides: the default config, "
            f"every option of every group with the others at their defaults, and {presets} "
            f"preset{'s' if presets != 1 else ''} from conf/review.yaml; {doc['schemas']}. "
            f"Plans are dry runs for a machine with {m['cpu_cores']} CPU cores, {m['cuda']} "
            f"CUDA and {m['xpu']} XPU cards (no devices probed).")


def _errors(c: dict[str, Any], doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(doc[s], c[f"{s}_error"]) for s in ("a", "b") if c.get(f"{s}_error")]


def render_rev_text(doc: dict[str, Any]) -> str:
    lines = ["runner diff --rev", f"  A  {doc['a']}", f"  B  {doc['b']}", "",
             doc["headline"], ""]
    lines += [f"note: {n}" for n in doc["notes"]]
    same = [c["label"] for c in doc["changes"] if c.get("as_default")]
    for c in (c for c in doc["changes"] if not c.get("as_default")):
        lines.append(f"{c['label']}: {_counts(c)}")
        if c.get("plan_note"):
            lines.append(f"  plan: {c['plan_note']}")
        for side, err in _errors(c, doc):
            lines.append(f"  at {side}: {err}")
        for name in ("config", "plan"):
            if c[name]:
                lines.append(f"  {name}:")
                width = min(40, max(len(r["key"]) for r in c[name]))
                lines += [f"    {r['key']:<{width}}  {_show(r['a'])}  ->  {_show(r['b'])}"
                          for r in c[name]]
    if same:
        lines.append(f"same change as the default: {', '.join(same)}")
    lines += ["", _scope(doc)]
    return "\n".join(lines) + "\n"


def render_rev_md(doc: dict[str, Any]) -> str:
    """Markdown for a PR comment: a headline, then one collapsible section per change."""
    lines = [f"### Config review: `conf/` at A = {doc['a']} → B = {doc['b']}", "",
             f"**{doc['headline']}**", ""]
    lines += [f"> note: {n}" for n in doc["notes"]]
    same = [c["label"] for c in doc["changes"] if c.get("as_default")]
    for c in (c for c in doc["changes"] if not c.get("as_default")):
        lines += ["<details>", f"<summary><b>{c['label']}</b>: {_counts(c)}</summary>", ""]
        if c["overrides"]:
            lines += [f"`python -m runner {c['overrides']}`", ""]
        for side, err in _errors(c, doc):
            lines += [f"- at {side}: {md_cell(err)}"]
        if _errors(c, doc):
            lines.append("")
        if c["config"]:
            base = " (B's defaults vs this option)" if c["status"] in ("added", "removed") else ""
            lines += [f"**config**{base}", ""] + md_table(
                c["config"], *(("defaults", "with it") if base else (doc["a"], doc["b"]))) + [""]
        if c["plan"]:
            lines += ["**plan** (dry run)", ""] + md_table(c["plan"], doc["a"], doc["b"]) + [""]
        if c.get("plan_note"):
            lines += [f"**plan** (dry run): {md_cell(c['plan_note'])}", ""]
        lines += ["</details>", ""]
    if same:
        lines += [f"Same change as the default: {', '.join(same)}.", ""]
    lines += [f"<sub>{_scope(doc)}</sub>"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.diff",
                                description=__doc__.split("\n", 1)[0])
    p.add_argument("a", nargs="?", help="run dir, sweep job dir or YAML file "
                                        "(with --compose: overrides)")
    p.add_argument("b", nargs="?", help="the other one")
    p.add_argument("--rev", metavar="A[..B]",
                   help="review conf/ at git revision A against B (default: the working tree): "
                        "every group option and conf/review.yaml preset, config and plan")
    p.add_argument("--repo", metavar="PATH", default=".",
                   help="with --rev: the git repository (default: the current directory)")
    p.add_argument("--format", choices=("text", "md", "json"), default=None,
                   help="text (default), md (a PR comment) or json")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when anything differs (a CI gate; errors exit 2)")
    p.add_argument("--compose", action="store_true",
                   help="A and B are override sets, composed with the app's config")
    p.add_argument("--conf", nargs="+", metavar="DIR",
                   help="with --compose: config dir for A (and B); default: the app's conf/")
    args = p.parse_args(argv)
    fmt = args.format or ("json" if args.json else "text")
    try:
        if args.rev is not None:
            if args.a or args.b or args.compose:
                raise ConfigError("--rev A[..B] takes no run dirs or --compose")
            from runner import review

            doc = review.review(Path(args.repo), *review.parse_rev(args.rev))
        elif args.a is None or args.b is None:
            raise ConfigError("give two run dirs (or YAML files), --compose 'A' 'B', "
                              "or --rev A[..B]")
        elif args.compose:
            conf = args.conf or []
            doc = diff_compose(args.a, args.b, conf[0] if conf else None,
                               conf[1] if len(conf) > 1 else None)
        else:
            doc = diff_paths(Path(args.a), Path(args.b))
    except ConfigError as exc:
        print(f"runner diff: error: {exc}", file=sys.stderr)
        return 2 if args.check else 1
    if fmt == "json":
        print(json.dumps(doc, indent=2, default=str))
    elif doc.get("kind") == "rev":
        print(render_rev_md(doc) if fmt == "md" else render_rev_text(doc), end="")
    else:
        print(render_md(doc) if fmt == "md" else render(doc), end="")
    return 1 if args.check and differs(doc) else 0


if __name__ == "__main__":
    sys.exit(main())
