"""Layer: cli (a real watching run of the real Whisper model) -- ``watch=true`` (issue 19).

The run keeps looking at its folder: a file dropped in while it watches is done within two
looks, with the model still loaded (one worker start for the whole run); a file still being
written is not picked up half-written (it changes between two looks, so it waits); Ctrl-C
ends the run as a stop request (exit 130), and every output is there.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

from tests.conftest import identities, start_run, stop_leftover, wait_until
from tests.speech import normalise, synthesise


def _done(run_dir: Path | None, statuses: str = "'done'") -> dict[str, str]:
    if run_dir is None or not (run_dir / "journal.sqlite").exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True, timeout=1)
        try:
            return dict(db.execute(f"SELECT id, fingerprint FROM items WHERE status IN "
                                   f"({statuses})"))
        finally:
            db.close()
    except sqlite3.Error:
        return {}


def test_watch_picks_up_new_files_and_waits_for_one_being_written(tmp_path):
    media, out, spare = tmp_path / "archive", tmp_path / "o", tmp_path / "spare"
    media.mkdir()
    spare.mkdir()
    synthesise("the quick brown fox jumps over the lazy dog", media / "first.wav")
    synthesise("good morning everyone and welcome to the meeting", spare / "second.wav")
    synthesise("please remember to water the garden tomorrow", spare / "third.wav")
    proc = start_run(["task=subtitles", f"task.input={media}", "devices=cpu", f"outputs={out}",
                      "progress=off", "watch=true", "watch.every_s=1"])
    run_dir = None
    try:
        def planned():
            found = sorted(p.parent for p in out.glob("subtitles/*/plan.yaml"))
            return found[0] if found else None
        run_dir = wait_until(planned, 120, proc=proc)
        wait_until(lambda: "first.wav" in _done(run_dir), 120, proc=proc)

        shutil.move(spare / "second.wav", media / "second.wav")  # dropped in whole
        t0 = time.monotonic()
        wait_until(lambda: "second.wav" in _done(run_dir), 60, proc=proc)
        assert time.monotonic() - t0 < 15, "not done within two looks (plus its transcription)"

        data = (spare / "third.wav").read_bytes()  # written slowly, across several looks
        with open(media / "third.wav", "wb") as fh:
            step = len(data) // 8
            for k in range(8):
                fh.write(data[k * step:(k + 1) * step] if k < 7 else data[k * step:])
                fh.flush()
                time.sleep(0.6)
                assert "third.wav" not in _done(run_dir, "'pending','running','done','failed'"), \
                    "picked up while still being written"
        final = f"{os.path.getsize(media / 'third.wav')}"
        done = wait_until(lambda: _done(run_dir).get("third.wav"), 60, proc=proc)
        assert done.startswith(final + ":"), (done, final)  # made from the whole file
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_leftover(proc)
    assert proc.returncode == 130, err[-3000:]
    srt = (run_dir / "subtitles" / "third.en.srt").read_text()
    assert {"garden", "tomorrow"} <= set(normalise(srt)), srt
    assert {p.name for p in (run_dir / "subtitles").glob("*.srt")} == {
        "first.en.srt", "second.en.srt", "third.en.srt"}
    assert len(identities(run_dir)) == 1, "the worker was started again: the model reloaded"
