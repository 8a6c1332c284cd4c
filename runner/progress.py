"""Live progress: one bar per device slot plus a total (rich), or plain log lines.

``progress=auto`` uses rich on a TTY and a plain line every 10 s otherwise (CI, nohup,
redirected output), so progress is never lost when output is not a terminal.

While the rich display is on, the console's log handlers (Hydra's ``console`` handler on
stderr) are swapped for one that prints through the live console, above the bars: a log
line ('worker ready', a warning) no longer leaves a stale copy of the bars on screen. The
file handlers (runner.log) are untouched; the swap is undone by :meth:`RichProgress.close`.
A slot's bar shows its planned share (static chunking) or, with dynamic chunking, the items
it has done and its rate; every line fits an 80-column terminal.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("runner")

#: the widest the rich display gets: an 80-column terminal (tmux's default pane, a VT100)
WIDTH = 80


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
        per = ", ".join(f"{self.labels[i]} {self.done[i]}" + (
            f"/{self.planned[i]}" if self.planned.get(i) else "") for i in self.labels)
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


class LiveLogHandler(logging.Handler):
    """Prints each record through a rich console (the live display's), formatted as the
    handler it stands in for would have: rich draws it above the bars and redraws them."""

    def __init__(self, console, replaced: logging.Handler):
        super().__init__(replaced.level)
        self.console = console
        self.setFormatter(replaced.formatter)
        for f in replaced.filters:
            self.addFilter(f)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from rich.text import Text

            self.console.print(Text(self.format(record)), soft_wrap=True)
        except Exception:  # pragma: no cover - a log line must never stop the run
            self.handleError(record)


def _console_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """The handlers that write to the terminal (a StreamHandler on stderr or stdout, not a
    file), on the root logger and the ``runner`` logger."""
    out = []
    for logger in (logging.getLogger(), log):
        for h in logger.handlers:
            if (type(h) is logging.StreamHandler
                    and getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__,
                                                       sys.__stdout__)):
                out.append((logger, h))
    return out


def _replace(logger: logging.Logger, old: logging.Handler, new: logging.Handler) -> None:
    """Put ``new`` where ``old`` is among ``logger``'s handlers (or at the end)."""
    with logging._lock:  # the lock logging's own addHandler/removeHandler take
        handlers = logger.handlers
        if old in handlers:
            handlers[handlers.index(old)] = new
        else:
            handlers.append(new)


def short_time(s: float | None) -> str:
    """``12s``, ``4m05s``, ``2h03m``; blank for None."""
    if s is None:
        return ""
    s = int(max(s, 0))
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _columns():
    from rich.progress import BarColumn, ProgressColumn, TextColumn
    from rich.text import Text

    class Count(ProgressColumn):
        """``done/planned``, or ``done`` alone when the slot has no planned share (dynamic)."""

        def render(self, task):
            n = int(task.completed)
            shared = task.fields.get("shared") or task.total is None
            return Text((f"{n}" if shared else f"{n}/{int(task.total)}").rjust(11))

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.fields.get('rate') or '':>6} it/s")

    class Eta(ProgressColumn):
        """Time left, for a bar with a total (``12s``, ``4m05s``); blank without one."""

        def render(self, task):
            left = None if task.fields.get("shared") else task.time_remaining
            return Text(short_time(left).rjust(7), style="cyan")

    class State(ProgressColumn):
        def render(self, task):
            s = str(task.fields.get("state") or "")
            return Text(s if len(s) <= 18 else s[:17] + "…", style="dim")

    return (TextColumn("{task.description:<7.7}"), BarColumn(bar_width=18), Count(), Rate(),
            Eta(), State())


class RichProgress(Progress):
    def start(self, labels, total, planned) -> None:
        super().start(labels, total, planned)
        from rich.console import Console
        from rich.progress import Progress as Bars

        # at most 80 columns (a wider terminal keeps it compact; a narrower one crops it)
        console = Console(stderr=True)
        if console.width > WIDTH:
            console = Console(stderr=True, width=WIDTH)
        self.console = console
        self.bars = Bars(*_columns(), console=console, refresh_per_second=4,
                         redirect_stdout=True, redirect_stderr=True)
        self.total_id = self.bars.add_task("total", total=total, rate="", state="",
                                           shared=False)
        # a planned share (static chunking), or -- dynamic: no share is fixed -- the bar is
        # the slot's part of the whole run and the count its items done
        self.ids = {i: self.bars.add_task(label, total=planned.get(i) or max(total, 1),
                                          rate="", state="starting",
                                          shared=not planned.get(i))
                    for i, label in labels.items()}
        self._swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []
        for logger, h in _console_handlers():  # swapped in place: the order is kept
            live = LiveLogHandler(console, h)
            _replace(logger, h, live)
            self._swapped.append((logger, h, live))
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
        if not self._swapped:  # else the ledger's log record of it is printed already
            self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        try:
            self.bars.stop()
        finally:
            for logger, h, live in self._swapped:
                _replace(logger, live, h)
            self._swapped = []


def make_progress(mode: str) -> Progress:
    if mode == "off":
        return Progress()
    if mode == "rich" or (mode == "auto" and sys.stderr.isatty()):
        return RichProgress()
    return PlainProgress()
