"""The sweep record: ``<sweep dir>/sweep.json`` and ``sweep.md``, one row per job.

Written by the launcher (hydra_plugins/runner_launcher) when the sweep starts, each time a
job starts or ends, and at the end, so the files exist and are current even when jobs
failed or the launcher itself was killed; a resumed sweep rewrites them with every job.

Each row: the parameters that vary between the jobs of the sweep (and only those), the
device the job had, its status (``ok``; ``failed`` with the reason: an exception, the
signal that killed it, a nonzero exit code; ``not started``), wall time, items/s and the
task's key figure from the job's ``summary.json``: RTF for subtitles (``rtf``, lower is
better), sentences/s for embed (``items_per_s``, higher is better); other tasks are ranked
by items/s. A runner job's exit code travels as :class:`ExitStatus` (0 ok, 3 some items
failed, 130 interrupted; anything but 0 counts as failed here).

Any other app's job is ``ok`` when it returned and ``failed`` when it raised; its return value
is recorded (``value``) when it is a number or a flat dict of numbers, and shown in sweep.md
(one column, or one per dict key). Which row is best is the launcher's
``hydra.launcher.best`` (:class:`Ranking`): max / min of the value (``best_key`` of a dict),
none, or auto (runner's key figure, for runner jobs only).

``sweep.json`` is also what ``resume=latest`` with ``-m`` reads to know which jobs finished.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Sequence

from runner.rundir import RunDir, SweepDir, atomic_write_json, atomic_write_text



@dataclass(frozen=True)
class ExitStatus:
    """runner's own exit code as a job's return value: typed, so a plain int another app
    returns is that app's value and never read as an exit code."""

    code: int


@dataclass(frozen=True)
class Ranking:
    """Which row is best: ``mode`` auto | max | min | none; ``key`` for dict values."""

    mode: str = "auto"
    key: Optional[str] = None


def plain_value(value: Any) -> Any:
    """``value`` when it is a number or a flat dict of numbers (as JSON), else None."""
    def num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x

    if hasattr(value, "item") and callable(value.item) and not isinstance(value, dict):
        try:  # numpy / torch scalars
            value = value.item()
        except Exception:
            return None
    if num(value):
        return value
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        out = {}
        for k, v in value.items():
            v = plain_value(v) if not isinstance(v, dict) else None
            if v is None:
                return None
            out[k] = v
        return out
    try:  # an OmegaConf DictConfig of numbers
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            return plain_value(OmegaConf.to_container(value, resolve=True))
    except Exception:
        pass
    return None


class JobState(str, Enum):
    """A sweep job's state in sweep.json. Legal moves (:func:`check_job_move`)::

        PENDING --its process got the device--> RUNNING --returned 0 / a value--> OK
           |                                       +--raised, killed, exit code != 0--> FAILED
           +--its config does not compose--> FAILED
           +--fail_fast or an interrupt first--> NOT_STARTED
        any state but OK --a resume reruns it--> PENDING
    """

    PENDING = "pending"  # not handed out yet
    RUNNING = "running"
    OK = "ok"  # returned exit code 0 (or, for a non-runner app, returned normally)
    FAILED = "failed"  # exception, process killed, or a nonzero exit code (see reason)
    NOT_STARTED = "not started"  # fail_fast or an interrupt stopped the sweep first


_JOB_MOVES: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PENDING, JobState.RUNNING, JobState.FAILED,
                                 JobState.NOT_STARTED}),
    JobState.RUNNING: frozenset({JobState.OK, JobState.FAILED, JobState.PENDING}),
    JobState.FAILED: frozenset({JobState.PENDING}),
    JobState.NOT_STARTED: frozenset({JobState.PENDING}),
    JobState.OK: frozenset(),
}


class IllegalJobMove(RuntimeError):
    pass


def check_job_move(old: JobState, new: JobState) -> None:
    """The one place that says which moves of a sweep job are legal."""
    if new not in _JOB_MOVES[old]:
        raise IllegalJobMove(f"sweep job state {old.value} -> {new.value} is not allowed")


@dataclass(frozen=True)
class KeyFigure:
    label: str  # column title
    field: str  # key in summary.json
    higher_is_better: bool


KEY_FIGURES = {
    "subtitles": KeyFigure("RTF", "rtf", False),
    "embed": KeyFigure("sentences/s", "items_per_s", True),
}
DEFAULT_FIGURE = KeyFigure("items/s", "items_per_s", True)


@dataclass
class JobRecord:
    """One job of a sweep, as the launcher knows it (serialised into sweep.json)."""

    num: int  # hydra.job.num
    overrides: list[str]  # the sweeper's overrides for this job (no device pins, no resume.*)
    dir: str  # the job's run dir (hydra.runtime.output_dir)
    state: JobState = JobState.PENDING
    reason: str = ""  # why it failed or did not start
    device: str = ""  # the lease it ran on (cuda:1, cpu:0)
    pid: Optional[int] = None
    exit_code: Optional[int] = None  # runner's exit code (an ExitStatus return value)
    value: Any = None  # the app's return value: a number or a flat dict of numbers
    started: Optional[float] = None  # epoch seconds (launcher's clock)
    finished: Optional[float] = None
    runs: int = 0  # how many times it was started (a resume adds one)

    def move(self, new: JobState) -> None:
        check_job_move(self.state, new)
        self.state = new

    @property
    def wall_s(self) -> Optional[float]:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "JobRecord":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["state"] = JobState(known.get("state", "pending"))
        return cls(**known)


def split_override(text: str) -> tuple[str, str]:
    """``+task.ms=20`` -> ("task.ms", "20"); group overrides keep their group name."""
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def varying_keys(records: Sequence[JobRecord]) -> list[str]:
    """Override keys whose value is not the same in every job, in first-seen order."""
    keys: list[str] = []
    values: dict[str, set] = {}
    for r in records:
        for o in r.overrides:
            k, v = split_override(o)
            if k not in values:
                keys.append(k)
                values[k] = set()
            values[k].add(v)
    out = []
    for k in keys:
        present = [any(split_override(o)[0] == k for o in r.overrides) for r in records]
        if len(values[k]) > 1 or not all(present):
            out.append(k)
    return out


def params(record: JobRecord, keys: Sequence[str]) -> dict[str, str]:
    mine = dict(split_override(o) for o in record.overrides)
    return {k: mine.get(k, "(default)") for k in keys}


def _summary(job_dir: str) -> dict[str, Any]:
    if not job_dir:  # not composed yet: no dir
        return {}
    try:
        return json.loads(RunDir(Path(job_dir)).summary.read_text())
    except (OSError, ValueError):
        return {}


def _value_of(row: dict[str, Any], key: Optional[str]) -> Any:
    v = row.get("value")
    if isinstance(v, dict):
        if key is None and len(v) == 1:
            key = next(iter(v))
        v = v.get(key) if key is not None else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def build(records: Sequence[JobRecord], task: Optional[str], sweep_dir: Path,
          extra: Optional[dict[str, Any]] = None,
          ranking: Optional[Ranking] = None) -> dict[str, Any]:
    """The sweep.json document for ``records``."""
    ranking = ranking or Ranking()
    fig = KEY_FIGURES.get(task or "", DEFAULT_FIGURE)
    keys = varying_keys(records)
    rows = []
    for r in sorted(records, key=lambda r: r.num):
        s = _summary(r.dir)
        row = r.to_json()
        row.update({"params": params(r, keys), "wall_s": _round(r.wall_s, 3),
                    "items_done": s.get("items_done"), "items_per_s": s.get("items_per_s"),
                    "failed_items": (s.get("counts") or {}).get("failed"),
                    "key_figure": s.get(fig.field), "best": False})
        rows.append(row)
    if ranking.mode in ("max", "min"):
        score, higher = (lambda row: _value_of(row, ranking.key)), ranking.mode == "max"
        what = "value" + (f"[{ranking.key}]" if ranking.key else "")
    elif ranking.mode == "auto":
        score, higher, what = (lambda row: row["key_figure"]), fig.higher_is_better, fig.label
    else:
        score, higher, what = (lambda row: None), True, ""
    ranked = [row for row in rows if row["state"] == JobState.OK.value
              and isinstance(score(row), (int, float)) and not isinstance(score(row), bool)]
    best = None
    if ranked:
        pick = max if higher else min
        best = pick(ranked, key=score)
        best["best"] = True
    return {"sweep_dir": str(sweep_dir), "task": task, "updated": time.time(),
            "key_figure": asdict(fig), "varying": keys,
            "ranking": {**asdict(ranking), "by": what, "higher_is_better": higher,
                        "score": score(best) if best else None},
            "best": best["num"] if best else None, "jobs": rows, **(extra or {})}


def _round(x: Optional[float], n: int) -> Optional[float]:
    return None if x is None else round(x, n)


def _fmt(x: Any, spec: str = ".1f") -> str:
    if isinstance(x, bool) or x is None:
        return ""
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def status_text(row: dict[str, Any]) -> str:
    state = row["state"]
    return f"{state}: {row['reason']}" if row.get("reason") and state != "ok" else state


def render(doc: dict[str, Any]) -> str:
    """sweep.md: a Markdown table a person can paste into a review."""
    fig = KeyFigure(**doc["key_figure"])
    keys = doc["varying"]
    rank = doc.get("ranking") or {"by": fig.label, "higher_is_better": fig.higher_is_better}
    runner_rows = any(r.get("items_per_s") is not None or r.get("exit_code") is not None
                      for r in doc["jobs"])
    show_fig = fig != DEFAULT_FIGURE and runner_rows
    value_keys: list[str] = []
    scalar = False
    for r in doc["jobs"]:
        v = r.get("value")
        if isinstance(v, dict):
            value_keys += [k for k in v if k not in value_keys]
        elif v is not None:
            scalar = True
    head = ["job", *keys, "device", "status", "wall s"]
    head += ["items/s"] if runner_rows else []
    head += [fig.label] if show_fig else []
    head += (["value"] if scalar else []) + value_keys
    head += ["best"]
    best_line = (f"; best = {'highest' if rank['higher_is_better'] else 'lowest'} {rank['by']}"
                 if rank["by"] else "")
    lines = [f"# Sweep{': ' + doc['task'] if doc.get('task') else ''}", "",
             f"`{doc['sweep_dir']}` — {len(doc['jobs'])} job(s){best_line}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc["jobs"]:
        cells = [str(row["num"]), *(row["params"].get(k, "") for k in keys), row["device"] or "-",
                 status_text(row).replace("|", "/"), _fmt(row["wall_s"])]
        cells += [_fmt(row["items_per_s"])] if runner_rows else []
        cells += [_fmt(row["key_figure"], ".3f" if not fig.higher_is_better else ".1f")] \
            if show_fig else []
        v = row.get("value")
        cells += [_fmt(v, "g") if not isinstance(v, dict) else ""] if scalar else []
        cells += [_fmt(v.get(k), "g") if isinstance(v, dict) else "" for k in value_keys]
        cells += ["**best**" if row["best"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in doc["jobs"] if r["state"] == JobState.FAILED.value]
    lines.append("")
    if doc["best"] is not None:
        b = next(r for r in doc["jobs"] if r["num"] == doc["best"])
        what = " ".join(f"{k}={v}" for k, v in b["params"].items()) or f"job {b['num']}"
        score = rank.get("score", b.get("key_figure"))
        lines.append(f"Best: job {b['num']} ({what}), {rank['by']} {_fmt(score, '.4g')}.")
    if failed:
        lines.append(f"Failed: {len(failed)} job(s): "
                     + "; ".join(f"{r['num']} ({r['reason']}) in {r['dir']}" for r in failed))
    left = [r for r in doc["jobs"] if r["state"] in (JobState.NOT_STARTED.value,
                                                     JobState.PENDING.value)]
    if left:
        lines.append(f"Not run: {len(left)} job(s): {', '.join(str(r['num']) for r in left)}")
    return "\n".join(lines) + "\n"


def write(sweep_dir: Path, records: Sequence[JobRecord], task: Optional[str],
          extra: Optional[dict[str, Any]] = None,
          ranking: Optional[Ranking] = None) -> dict[str, Any]:
    """Write sweep.json and sweep.md atomically; return the document."""
    doc = build(records, task, sweep_dir, extra, ranking)
    atomic_write_json(SweepDir(Path(sweep_dir)).json, doc)
    atomic_write_text(SweepDir(Path(sweep_dir)).md, render(doc))
    return doc


def load(sweep_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(SweepDir(Path(sweep_dir)).json.read_text())
    except (OSError, ValueError):
        return None


def records_of(doc: dict[str, Any]) -> list[JobRecord]:
    return [JobRecord.from_json(j) for j in doc.get("jobs", [])]
