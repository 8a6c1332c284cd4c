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
#: a batch that failed, one that succeeded only on a later attempt, a slot's idle time
FAILED_COLOUR, RETRIED_COLOUR, IDLE_COLOUR = "tab:red", "tab:orange", "#f4f4f4"
H = 0.56  # a lane's bar height (lanes are 1 apart: room for the rung above, a label below)


@dataclass
class Batch:
    """One bar of the timeline: the items one slot started together (one call)."""

    slot: int
    start: float
    end: float
    items: int = 0
    failed: int = 0
    retried: int = 0  # done items that needed more than one attempt
    model: str = ""
    batch_size: int | None = None
    first: str = ""  # its first item's id

    @property
    def kind(self) -> str:
        return "failed" if self.failed else "retried" if self.retried else "ok"


def timeline_batches(db: Any, since: float) -> tuple[list[Batch], tuple | None]:
    """The batches (grouped by slot and start time) of every item started since ``since``,
    and the longest: (first item id, slot, start, seconds, items), or None. ``db``: the
    journal's connection (read-only is enough). An item's ``started`` is when it was sent;
    a worker runs its calls in order, so a batch queued behind another (prefetch) is drawn
    from the end of the one before it."""
    batches: dict[tuple[int, float], Batch] = {}
    cur = db.execute(
        "SELECT slot, started, finished, status, attempts, model, batch_size, id FROM items "
        "WHERE finished IS NOT NULL AND started IS NOT NULL AND slot IS NOT NULL AND started>=? "
        "ORDER BY started, seq", (since,))
    while rows := cur.fetchmany(5000):
        for slot, start, end, status, attempts, model, bs, item_id in rows:
            b = batches.setdefault((slot, start), Batch(slot, start, end, first=item_id))
            b.end = max(b.end, end)
            b.items += 1
            b.failed += status == "failed"
            b.retried += status == "done" and (attempts or 0) > 1
            b.model = b.model or (model or "")
            b.batch_size = b.batch_size or bs
    out = sorted(batches.values(), key=lambda b: (b.slot, b.start, b.end))
    longest = None
    for k, b in enumerate(out):
        if k and out[k - 1].slot == b.slot:
            b.start = min(max(b.start, out[k - 1].end), b.end)
        if longest is None or b.end - b.start > longest[3]:
            longest = (b.first, b.slot, b.start, b.end - b.start, b.items)
    return out, longest


def idle_gaps(batches: Sequence[Batch], slot: int, t0: float, t1: float,
              least: float) -> list[tuple[float, float]]:
    """(start, length) of each stretch of at least ``least`` s in [t0, t1] when ``slot`` ran
    no batch."""
    gaps, at = [], t0
    for b in sorted((b for b in batches if b.slot == slot), key=lambda b: b.start):
        if b.start - at >= least:
            gaps.append((at, b.start - at))
        at = max(at, b.end)
    if t1 - at >= least:
        gaps.append((at, t1 - at))
    return gaps


def timeline(journal: Journal, rundir: RunDir, labels: dict[int, str], since: float,
             threads: dict[int, int] | None = None) -> dict[str, Any]:
    """timeline.png: one lane per slot, labelled with its device (``cuda:1``: the backend
    first), threads and the model rung / batch size it ran; one bar per batch coloured by
    backend, orange when an item of it needed a retry, red when one failed; idle time
    hatched grey (a gap of 2% of the run or more is marked with its length); the item that
    ran longest named. Returns what was drawn (for tests): per-kind bar counts, the gaps,
    the longest item."""
    batches, longest = timeline_batches(journal.db, since)
    return draw_timeline(batches, longest, labels, rundir.timeline, threads)


def draw_timeline(batches: Sequence[Batch], longest: tuple | None, labels: dict[int, str],
                  path: Any, threads: dict[int, int] | None = None) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min((b.start for b in batches), default=0.0)
    t1 = max((b.end for b in batches), default=t0 + 1.0)
    span = max(t1 - t0, 1e-3)
    least = max(0.02 * span, 1e-3)
    fig, ax = plt.subplots(figsize=(11, 0.75 * max(len(labels), 1) + 1.6))
    kinds = {i: labels[i].split(":")[0] for i in labels}
    drawn = {"ok": 0, "retried": 0, "failed": 0}
    gaps_by_lane: dict[int, list] = {}
    ticks = []
    thr = threads or {}
    for lane, idx in enumerate(sorted(labels)):
        mine = [b for b in batches if b.slot == idx]
        ax.broken_barh([(0, span)], (lane - H / 2, H), facecolors=IDLE_COLOUR,
                       edgecolor="#d0d0d0", hatch="///", linewidth=0)
        colour = {"ok": COLOURS.get(kinds[idx], "tab:blue"), "retried": RETRIED_COLOUR,
                  "failed": FAILED_COLOUR}
        for kind in drawn:
            bars = [(b.start - t0, max(b.end - b.start, 1e-3)) for b in mine if b.kind == kind]
            drawn[kind] += len(bars)
            if bars:
                ax.broken_barh(bars, (lane - H / 2, H), facecolors=colour[kind],
                               edgecolor="white", linewidth=0.3)
        gaps = idle_gaps(batches, idx, t0, t1, least) if mine else [(0.0, span)]
        gaps_by_lane[idx] = [(round(g0 - t0 if mine else g0, 3), round(n, 3)) for g0, n in gaps]
        for g0, n in gaps_by_lane[idx]:
            if n >= 0.06 * span:  # wide enough for its label
                ax.text(g0 + n / 2, lane, f"idle {n:.1f}s", ha="center", va="center",
                        fontsize=7, color="#707070")
        # the rung (model, batch size) a lane ran, written where it changes
        rungs, last = [], None
        for b in mine:
            if b.batch_size is None and b.failed:
                continue  # (a failed item records no batch size: not a rung of its own)
            if (b.model, b.batch_size) != last:
                last = (b.model, b.batch_size)
                rungs.append(last)
                ax.text(b.start - t0, lane - H / 2 - 0.02, f"{b.model or '?'} b{b.batch_size or '?'}",
                        fontsize=7, va="bottom", ha="left", color="#303030", clip_on=True)
        rung = (" > ".join(f"{m or '?'} b{n or '?'}" for m, n in rungs[:3])
                + (" > ..." if len(rungs) > 3 else ""))
        ticks.append(f"[{idx}] {labels[idx]}" + (f" ({thr[idx]} thr)" if idx in thr else "")
                     + (f"\n{rung}" if rung else ""))
    ax.set_yticks(range(len(labels)), ticks, fontsize=8)
    lanes = {idx: lane for lane, idx in enumerate(sorted(labels))}
    if longest is not None and longest[1] in lanes:
        item_id, slot, start, secs, n = longest
        what = f"longest item: {item_id}" if n == 1 else f"longest batch: {item_id} +{n - 1}"
        ax.annotate(f"{what} ({secs:.1f}s)", xy=(start - t0 + secs / 2,
                    lanes[slot] + H / 2), xytext=(0, -2), textcoords="offset points",
                    ha="center", va="top", fontsize=7, color="#202020")
    handles = [Patch(color=COLOURS.get(k, "tab:blue"), label=f"batch ({k})")
               for k in dict.fromkeys(kinds[i] for i in sorted(kinds))]
    handles += [Patch(color=RETRIED_COLOUR, label="retried"),
                Patch(color=FAILED_COLOUR, label="failed"),
                Patch(facecolor=IDLE_COLOUR, edgecolor="#d0d0d0", hatch="///", label="idle")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.02 * len(
        labels)), ncol=len(handles), fontsize="small", frameon=False)
    ax.set_xlim(0, span * 1.01)
    ax.set_ylim(len(labels) - 0.3, -0.6)  # slot 0 on top; room below for the longest's label
    ax.set_xlabel("seconds since the first batch")
    ax.set_title("runner timeline: one lane per worker slot, one bar per batch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return {"bars": drawn, "gaps": gaps_by_lane, "longest": longest, "span_s": span}


def result_paths(rundir: RunDir, output_dir: str, failed: int) -> list[tuple[str, str]]:
    """The paths a user copies next: the run dir, its outputs folder, and -- when items
    failed -- its errors folder."""
    paths = [("run dir", str(rundir.root)), ("outputs", str(rundir.output(output_dir)))]
    if failed:
        paths.append(("errors", str(rundir.errors)))
    return paths


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
    paths = result_paths(rundir, ctx.task.output_dir, counts["failed"])
    summary.update({"run_dir": str(rundir.root), "outputs_dir": str(
        rundir.output(ctx.task.output_dir)), "errors_dir": str(rundir.errors)})
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
    sys.stderr.flush()
    # the last words: where the results are (what a user copies next)
    for what, path in paths:
        print(f"{what + ':':<9}{path}", flush=True)
    return code
