"""The report: the run's outcome -- summary.json, the summary table, timeline.png (one lane
per slot), the last words and the exit code (:func:`outcome`). Each slot's row says its
device (``cuda:1``), backend, threads, speed and the models it used, so a mixed run reads
per backend; the table shows threads and models, the timeline colours lanes by backend."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from runner.devices import Slot
from runner.errors import ExitCode
from runner.journal import Journal
from runner.rundir import RunDir, atomic_path, atomic_write_json
from runner.ledger import SlotStats, Ledger
from runner.tasks.base import FinalizeContext

if TYPE_CHECKING:
    from runner.context import RunContext

log = logging.getLogger("runner")


def summarize(stats: dict[int, SlotStats], wall_s: float, counts: dict[str, int],
              failures: list[tuple[str, str]], extra: dict[str, Any], exit_code: int,
              status: str, notes: list[str], slots_planned: Sequence[Slot] = ()) -> dict[str, Any]:
    """``slots_planned``: the run's slots, whose backend, threads and speed each row carries
    (a mixed run has several backends)."""
    total = sum(s.items for s in stats.values()) or 0
    planned = {s.index: s for s in slots_planned}
    slots = []
    for idx, s in sorted(stats.items()):
        rate = s.items / s.busy_s if s.busy_s > 0 else 0.0
        row = {"slot": idx, "device": s.label, "items": s.items, "failed": s.failed,
               "busy_s": round(s.busy_s, 3), "items_per_s": round(rate, 3),
               "share": round(s.items / total, 4) if total else 0.0, "deaths": s.deaths,
               "pids": s.pids, "models": s.models, "ladder": s.rungs}
        if idx in planned:
            p = planned[idx]
            row.update(backend=p.backend, threads=p.threads, speed=p.speed, group=p.group)
        if "media_s" in s.metrics and s.metrics["media_s"] > 0:
            row["media_s"] = round(s.metrics["media_s"], 3)
            row["rtf"] = round(s.busy_s / s.metrics["media_s"], 4)
        slots.append(row)
    devices: dict[str, dict[str, Any]] = {}
    models: dict[str, int] = {}
    for row in slots:
        d = devices.setdefault(row["device"], {"backend": row.get("backend", row["device"].split(
            ":")[0]), "items": 0, "busy_s": 0.0, "media_s": 0.0, "models": {}})
        d["items"] += row["items"]
        d["busy_s"] += row["busy_s"]
        d["media_s"] += row.get("media_s", 0.0)
        for model, n in row["models"].items():  # items per model per device
            d["models"][model] = d["models"].get(model, 0) + n
            models[model] = models.get(model, 0) + n
    for d in devices.values():
        d["items_per_s"] = round(d["items"] / d["busy_s"], 3) if d["busy_s"] > 0 else 0.0
        if d["media_s"] > 0:
            d["rtf"] = round(d["busy_s"] / d["media_s"], 4)
        else:
            d.pop("media_s")
    rates = [d["items_per_s"] for d in devices.values() if d["items_per_s"] > 0]
    overall = total / wall_s if wall_s > 0 else 0.0
    # Speed-up compares processing with processing: the slowest device's time for all items
    # over the window from the first item started to the last finished (model loading is
    # outside both; against wall_s a short run showed x0.05 on two devices).
    starts = [s.first_start for s in stats.values() if s.first_start is not None]
    ends = [s.last_finish for s in stats.values() if s.last_finish is not None]
    processing = max(ends) - min(starts) if starts and ends else 0.0
    summary = {
        "status": status, "exit_code": exit_code, "wall_s": round(wall_s, 3),
        "items_done": total, "items_per_s": round(overall, 3),
        "processing_s": round(processing, 3),
        "speedup_over_slowest_device": round((total / min(rates)) / processing, 3)
        if rates and processing > 0 else None,
        "counts": counts, "slots": slots, "devices": devices,
        "failures": [{"id": i, "error": e} for i, e in failures],
        "models": models, "warnings": mixed_models_warning(models, devices),
        "notes": notes, **extra,
    }
    media = sum(d.get("media_s", 0.0) for d in devices.values())
    if media > 0:
        summary["media_s"] = round(media, 3)
        summary["rtf"] = round(wall_s / media, 4)  # wall clock over audio: the run's own RTF
    return summary


def mixed_models_warning(models: dict[str, int], devices: dict[str, dict[str, Any]]) -> list[str]:
    """A run whose outputs came from more than one model (the OOM ladder moved) says so."""
    if len(models) < 2:
        return []
    per_device = "; ".join(f"{dev}: " + ", ".join(f"{m} {n}" for m, n in d["models"].items())
                           for dev, d in devices.items() if d["models"])
    return [f"outputs mix {len(models)} models ({per_device}): the out-of-memory ladder moved "
            f"some devices to a smaller model, so quality differs between items; the journal's "
            f"model column says which item used which"]


def print_table(summary: dict[str, Any]) -> str:
    """The summary as a text table (also returned, for tests and logs)."""
    has_rtf = any("rtf" in r for r in summary["slots"])
    head = (f"{'slot':<5}{'device':<9}{'thr':>4}{'items':>7}{'failed':>7}{'busy s':>9}"
            f"{'items/s':>9}{'share':>7}")
    head += f"{'RTF':>8}" if has_rtf else ""
    lines = [head + "  model"]
    for r in summary["slots"]:
        line = (f"{r['slot']:<5}{r['device']:<9}{r.get('threads', ''):>4}{r['items']:>7}"
                f"{r['failed']:>7}{r['busy_s']:>9.1f}{r['items_per_s']:>9.1f}"
                f"{r['share'] * 100:>6.0f}%")
        line += f"{r.get('rtf', float('nan')):>8.3f}" if has_rtf else ""
        line += "  " + ", ".join(r["models"]) if r["models"] else ""
        lines.append(line)
    sp = summary["speedup_over_slowest_device"]
    lines.append(f"wall {summary['wall_s']:.1f}s, {summary['items_done']} done, "
                 f"{summary['items_per_s']:.1f} items/s"
                 + (f", speed-up over the slowest single device x{sp:.2f}" if sp else "")
                 + (f", RTF {summary['rtf']:.3f}" if "rtf" in summary else ""))
    for f in summary["failures"][:10]:
        lines.append(f"failed: {f['id']}: {f['error']}")
    for w in summary.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


#: bar colour per backend in timeline.png (a mixed run shows which lane is which kind)
COLOURS = {"cuda": "tab:green", "xpu": "tab:blue", "cpu": "tab:gray"}


def timeline(journal: Journal, rundir: RunDir, labels: dict[int, str], since: float,
             threads: dict[int, int] | None = None) -> None:
    """timeline.png: one lane per slot, labelled with its device (``cuda:1``: the backend
    first) and threads, one bar per processed chunk coloured by backend (red: failed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: dict[int, set] = {i: set() for i in labels}
    failed: dict[int, set] = {i: set() for i in labels}
    for slot, start, end, status in journal.timeline_rows(since):
        if slot in bars:
            (failed if status == "failed" else bars)[slot].add((start - since, max(end - start, 1e-3)))
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(labels) + 1.2))
    kinds = {i: labels[i].split(":")[0] for i in labels}
    for lane, idx in enumerate(sorted(labels)):
        ax.broken_barh(sorted(bars[idx]), (lane - 0.4, 0.8),
                       facecolors=COLOURS.get(kinds[idx], "tab:blue"), edgecolor="white",
                       linewidth=0.3)
        if failed[idx]:
            ax.broken_barh(sorted(failed[idx]), (lane - 0.4, 0.8), facecolors="tab:red")
    thr = threads or {}
    ax.set_yticks(range(len(labels)), [f"[{i}] {labels[i]}" + (f" ({thr[i]} thr)" if i in thr
                                                                 else "") for i in sorted(labels)])
    if len(set(kinds.values())) > 1:  # a mixed run: say which colour is which backend
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=COLOURS.get(k, "tab:blue"), label=k)
                           for k in dict.fromkeys(kinds[i] for i in sorted(kinds))],
                  loc="upper right", fontsize="small")
    ax.set_xlabel("seconds since start")
    ax.set_title("runner timeline: one lane per worker slot")
    fig.tight_layout()
    with atomic_path(rundir.timeline) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write(summary: dict[str, Any], rundir: RunDir) -> None:
    atomic_write_json(rundir.summary, summary)


@dataclass(frozen=True)
class EarlyStop:
    """Why a run ended before its work did: a signal, or a write the file system refused."""

    code: ExitCode  # INTERRUPTED, TERMINATED, HANGUP or STORAGE
    why: str  # the signal's name, or the refused write (one line)


def outcome(ctx: "RunContext", journal: Journal, ledger: Ledger, stop: EarlyStop | None,
            wall: float, t0: float) -> ExitCode:
    """Run-level outputs (the task's finalize), summary, timeline and the last words; the
    exit code: all done, failed items (or items left: every slot lost), or stopped early."""
    rundir = ctx.rundir
    extra = ctx.task.finalize(FinalizeContext(rundir.root, journal.done_view()))
    counts = journal.counts()
    left = counts["pending"] + counts["running"]
    if stop is not None:
        code, status = stop.code, stop.code.meaning
    elif counts["failed"] or left:
        code, status = ExitCode.FAILED, "finished with failed items" if not left else "slots lost"
    else:
        code, status = ExitCode.OK, "all done"
    # The controller's own CPU time: on a CPU-only box it is taken from the workers' cores.
    extra = {"task": extra, "controller_cpu_s": round(time.process_time(), 3),
             "speculation": dict(ledger.copies),  # tail copies made, and won by the copy
             "reuse": journal.get_meta("reuse")}  # reuse=: reused / new / changed / removed
    summary = summarize(ledger.stats, wall, counts, journal.failures(), extra, int(code),
                        status, ledger.notes, ctx.slots)
    write(summary, rundir)
    labels = {s.index: s.label for s in ctx.slots}
    try:
        timeline(journal, rundir, labels, t0 - 1, {s.index: s.threads for s in ctx.slots})
    except Exception as exc:  # a plot must never cost the run its exit code
        log.warning("%s not written: %s", rundir.timeline.name, exc)
    print(print_table(summary))
    resume = ctx.resume_command
    if stop is not None and stop.code == ExitCode.STORAGE:
        print(f"runner: stopped: could not write ({stop.why}); {left} item(s) not done, none "
              f"charged (journal intact). Free space or fix the folder, then resume with: "
              f"{resume}", file=sys.stderr)
    elif stop is not None and stop.code == ExitCode.INTERRUPTED:
        print(f"runner: interrupted; {left} item(s) not done. Resume with: {resume}",
              file=sys.stderr)
    elif stop is not None:
        print(f"runner: stopped by {stop.why}; {left} item(s) not done, none charged an "
              f"attempt. Resume with: {resume}", file=sys.stderr)
    elif left:
        print(f"runner: every worker slot was lost; {left} item(s) not done (journal intact). "
              f"See {rundir.logs}; resume with: {resume}", file=sys.stderr)
    elif counts["failed"]:
        print(f"runner: {counts['failed']} item(s) failed (errors in {rundir.errors}); "
              f"retry them with: {resume} resume.retry_failed=true", file=sys.stderr)
    return code
