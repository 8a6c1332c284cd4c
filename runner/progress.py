"""Live progress: one bar per device slot plus a total (rich), or plain log lines.

``progress=auto`` uses rich on a TTY and a plain line every 10 s otherwise (CI, nohup,
redirected output), so progress is never lost when output is not a terminal.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("runner")


class Progress:
    """The interface the ledger drives; this base class shows nothing."""

    def start(self, labels: dict[int, str], total: int, planned: dict[int, int]) -> None:
        self.labels, self.total, self.planned = labels, total, planned
        self.done = {i: 0 for i in labels}
        self.failed = 0
        self.t0 = time.monotonic()

    def advance(self, slot: int, n: int, failed: int = 0) -> None:
        self.done[slot] += n
        self.failed += failed

    def slot_state(self, slot: int, state: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def line(self) -> str:
        n = sum(self.done.values())
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = n / dt
        left = self.total - n - self.failed
        eta = f"{left / rate:.0f}s" if rate > 0 and left > 0 else "-"
        per = ", ".join(f"{self.labels[i]} {self.done[i]}" for i in self.labels)
        return (f"{n}/{self.total} done, {self.failed} failed, {rate:.1f} items/s, "
                f"ETA {eta} [{per}]")


class PlainProgress(Progress):
    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self._last = 0.0

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            log.info("progress: %s", self.line())

    def close(self) -> None:
        log.info("progress: %s", self.line())


class RichProgress(Progress):
    def start(self, labels, total, planned) -> None:
        super().start(labels, total, planned)
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bars = Bars(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("{task.fields[rate]:>8} it/s"), TimeRemainingColumn(),
                         TimeElapsedColumn(), TextColumn("{task.fields[state]}"),
                         refresh_per_second=4)
        self.total_id = self.bars.add_task("total", total=total, rate="", state="")
        self.ids = {i: self.bars.add_task(label, total=planned.get(i) or None, rate="",
                                          state="starting")
                    for i, label in labels.items()}
        self.bars.start()

    def advance(self, slot, n, failed=0) -> None:
        super().advance(slot, n, failed)
        dt = max(time.monotonic() - self.t0, 1e-9)
        self.bars.update(self.ids[slot], advance=n, rate=f"{self.done[slot] / dt:.1f}")
        self.bars.update(self.total_id, advance=n + failed,
                         rate=f"{sum(self.done.values()) / dt:.1f}",
                         state=f"{self.failed} failed" if self.failed else "")

    def slot_state(self, slot, state) -> None:
        self.bars.update(self.ids[slot], state=state)

    def message(self, text) -> None:
        self.bars.console.print(text)

    def close(self) -> None:
        self.bars.stop()


def make_progress(mode: str) -> Progress:
    if mode == "off":
        return Progress()
    if mode == "rich" or (mode == "auto" and sys.stderr.isatty()):
        return RichProgress()
    return PlainProgress()
