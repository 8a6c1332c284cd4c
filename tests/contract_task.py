"""A task for the executor contract suite: SleepTask whose listed items kill their own
worker process (SIGKILL) the first time they run — a marker file in the run dir records
that the kill happened, so the retry succeeds."""
from __future__ import annotations

import os
import signal
from typing import Any, Sequence

from runner.tasks.sleep import SleepTask
from runner.tasks.base import Item


class KillOnceTask(SleepTask):
    def __init__(self, kill_ids: list[str] | None = None, marker_dir: str = "", **kw: Any):
        super().__init__(**kw)
        self.kill_ids = set(kill_ids or [])
        self.marker_dir = marker_dir

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        for it in items:
            marker = os.path.join(self.marker_dir, f"killed-{it.id}")
            if it.id in self.kill_ids and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().process(model, items)
