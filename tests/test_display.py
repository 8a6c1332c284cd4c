"""Layer: cli and report (issue 22, points 3-5): what a run shows while it runs and at its end.

* the live display in a real pseudo-terminal (pexpect) read back through a terminal
  emulator (pyte): log lines go through the live console, so no stale copy of the bars is
  left on screen; per-slot bars show a count, never ``0/?``; every line fits 80 columns;
* timeline.png: batches that failed or needed a retry in their own colours, idle gaps, the
  rung (model, batch size) per lane, the longest item named;
* the last words: the run dir, the outputs folder and, with failures, the errors folder.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
import sys

import pytest

from tests.conftest import ROOT, cli, cli_args, only_run_dir, run_cli


def _screen_lines(data: bytes, cols: int = 80, rows: int = 30) -> list[str]:
    """Everything a terminal of ``cols`` x ``rows`` shows after ``data``, scrolled-off lines
    first (what a user sees scrolling back in tmux)."""
    import pyte

    screen = pyte.HistoryScreen(cols, rows, history=5000)
    screen.set_mode(pyte.modes.LNM)  # a pty turns \n into \r\n; pexpect's log is the raw bytes
    pyte.ByteStream(screen).feed(data)
    top = ["".join(line[x].data for x in range(cols)).rstrip() for line in screen.history.top]
    return top + [line.rstrip() for line in screen.display]


@pytest.mark.timeout(180)
def test_live_display_in_a_pty_stays_clean(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    pytest.importorskip("pyte")
    args = [a for a in cli_args(tmp_path, "batch_size=1", count=24, ms=120,
                                faults="3:raise:process:once")
            if a != "progress=off"] + ["progress=auto"]
    argv = cli(args)
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    child = pexpect.spawn(argv[0], argv[1:], cwd=str(ROOT), env=env, dimensions=(30, 80),
                          timeout=150)
    out = io.BytesIO()
    child.logfile_read = out
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, out.getvalue()[-3000:]
    lines = _screen_lines(out.getvalue())
    text = "\n".join(lines)
    # the retry's warning went through the live console, as a line of its own
    flat = "".join(lines)  # a line longer than 80 wraps on screen: read it whole
    assert "][WARNING] item item-000003 failed on cpu:" in flat, text
    # one copy of the bars on screen: the final one (none left behind by a log line)
    bars = [ln for ln in lines if ln.startswith(("total ", "cpu:0 ", "cpu:1 "))]
    assert [b.split()[0] for b in bars] == ["total", "cpu:0", "cpu:1"], text
    assert "24/24" in bars[0]
    assert not any("?" in b for b in bars), bars  # dynamic: items done, not 0/?
    assert sum(int(next(w for w in b.split()[1:] if w.isdigit())) for b in bars[1:]) == 24, bars
    assert all(len(ln) <= 80 for ln in lines)
    run = only_run_dir(tmp_path)  # the last words: the run dir and its outputs folder
    assert flat.endswith(f"run dir: {run}outputs: {run / 'faulty'}"), text


def test_bars_fit_80_columns_and_show_a_count_per_slot():
    from rich.console import Console

    from runner.progress import RichProgress

    labels = {i: f"cuda:{i}" for i in range(12)}
    for planned in ({}, {i: 100 for i in labels}):
        p = RichProgress()
        p.start(labels, 1200, planned)
        try:
            for i in range(60):
                p.advance(i % 12, 1)
            p.slot_state(0, "ready (large-v3-turbo, 12.3s) and a long tail of words")
            p.advance(1, 0, failed=1)
        finally:
            p.close()
        c = Console(width=80, record=True, file=io.StringIO(), color_system=None)
        c.print(p.bars.get_renderable())
        lines = c.export_text().splitlines()
        assert len(lines) == 13 and all(len(ln) <= 80 for ln in lines), lines
        assert lines[0].startswith("total ") and "61/1200" in lines[0].split()
        slot = lines[2].split()
        assert slot[0] == "cuda:1"
        assert ("5/100" if planned else "5") in slot, lines[2]
        assert "?" not in "\n".join(lines)


def test_log_records_go_through_the_live_console_while_it_is_on(capsys):
    from runner.progress import LiveLogHandler, RichProgress

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    mem = logging.FileHandler(os.devnull)
    root.addHandler(console)
    root.addHandler(mem)
    try:
        p = RichProgress()
        p.start({0: "cpu:0"}, 3, {})
        assert console not in root.handlers and mem in root.handlers
        assert any(isinstance(h, LiveLogHandler) for h in root.handlers)
        logging.getLogger("runner").warning("worker cpu:0 ready")
        p.message("worker cpu:0 ready")  # the ledger's note: printed once, by its log record
        p.close()
        assert console in root.handlers and mem in root.handlers
        assert not any(isinstance(h, LiveLogHandler) for h in root.handlers)
    finally:
        root.removeHandler(console)
        root.removeHandler(mem)
        mem.close()
    err = capsys.readouterr().err
    assert err.count("worker cpu:0 ready") == 1 and "[WARNING] worker cpu:0 ready" in err


def test_timeline_shows_gaps_retries_failures_rungs_and_the_longest_item(tmp_path):
    from runner.report import Batch, draw_timeline, idle_gaps, timeline_batches

    b = [Batch(0, 0.0, 1.0, items=4, model="large-v3", batch_size=8, first="a"),
         Batch(0, 5.0, 6.0, items=4, retried=1, model="medium", batch_size=4, first="b"),
         Batch(1, 0.0, 9.0, items=1, model="large-v3", batch_size=8, first="c"),
         Batch(1, 9.0, 10.0, items=1, failed=1, model="large-v3", first="d")]
    assert idle_gaps(b, 0, 0.0, 10.0, 0.2) == [(1.0, 4.0), (6.0, 4.0)]
    png = tmp_path / "timeline.png"
    info = draw_timeline(b, ("c", 1, 0.0, 9.0, 1), {0: "cuda:0", 1: "cuda:1"}, png, {0: 4, 1: 4})
    assert png.stat().st_size > 1000
    assert info["bars"] == {"ok": 2, "retried": 1, "failed": 1}
    assert info["gaps"] == {0: [(1.0, 4.0), (6.0, 4.0)], 1: []}
    assert info["longest"][0] == "c"

    # a real run: one item fails for good, one succeeds on its second attempt, one is slow
    r = run_cli(cli_args(tmp_path, "batch_size=1", count=12, ms=50,
                         faults="3:raise;5:raise:process:once") + ["+task.slow='7:900'"])
    assert r.returncode == 3, r.stderr[-3000:]
    run = only_run_dir(tmp_path)
    assert (run / "timeline.png").is_file()
    db = sqlite3.connect(f"file:{run / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        batches, longest = timeline_batches(db, 0)
    finally:
        db.close()
    kinds = {bt.first: bt.kind for bt in batches}
    assert kinds["item-000003"] == "failed" and kinds["item-000005"] == "retried"
    assert longest[0] == "item-000007" and longest[3] >= 0.9
    for s in {bt.slot for bt in batches}:  # a lane's batches never overlap (prefetch)
        mine = [bt for bt in batches if bt.slot == s]
        assert all(x.end <= y.start + 1e-9 for x, y in zip(mine, mine[1:]))
    # the last words: the three paths a user copies next, and summary.json has them too
    assert r.stdout.splitlines()[-3:] == [f"run dir: {run}", f"outputs: {run / 'faulty'}",
                                          f"errors:  {run / 'logs' / 'errors'}"]
    s = json.loads((run / "summary.json").read_text())
    assert (s["run_dir"], s["outputs_dir"], s["errors_dir"]) == (
        str(run), str(run / "faulty"), str(run / "logs" / "errors"))
    ok = run_cli(cli_args(tmp_path / "ok", count=3))
    assert ok.returncode == 0, ok.stderr[-2000:]
    good = only_run_dir(tmp_path / "ok")
    assert ok.stdout.splitlines()[-2:] == [f"run dir: {good}", f"outputs: {good / 'faulty'}"]
