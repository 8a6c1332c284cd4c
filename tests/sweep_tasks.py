"""A test task for launcher tests: SleepTask plus ways for a sweep job to fail.

Plugged in as ``task=sleep task._target_=tests.sweep_tasks.SweepProbeTask``; the extra
fields need ``+`` (the sleep group has no schema): ``+task.fail=raise`` or
``+task.kill_after=N``.

* ``fail=raise``: the job's controller raises ``RuntimeError("boom from job")`` at plan
  time (``check``), so the job process returns a FAILED JobReturn with that exception.
* ``fail=items``: item ``item-000001`` is bad input (failed, no retry), so the job finishes
  with exit code 3.
* ``kill_after=N`` (N >= 0): once a worker has written N items it SIGKILLs its parent,
  the job's controller process — a real external SIGKILL of the job process, mid-run. It
  happens once per run dir (a marker file), so resuming that job runs it to the end.
* Every job that reaches ``finalize`` writes ``job_env.json`` into its run dir: the job
  process's pid and the environment it was started with (device masks, thread counts,
  the launcher's lease variable).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Sequence

from runner.tasks.sleep import SleepTask
from runner.rundir import atomic_write_text
from runner.tasks.base import BadInput, FinalizeContext, Item, WriteContext

ENV_KEYS = ("RUNNER_SWEEP_DEVICE", "CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "RUNNER_SLOT")
MARKER = ".killed-once"


class SweepProbeTask(SleepTask):
    def __init__(self, fail: str = "none", kill_after: int = -1, **kw: Any):
        super().__init__(**kw)
        self.fail = str(fail)
        self.kill_after = int(kill_after)
        self._written = 0

    def check(self, backends: frozenset[str]) -> None:
        if self.fail == "raise":
            raise RuntimeError("boom from job")

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        if self.fail == "items" and any(it.id == "item-000001" for it in items):
            raise BadInput("item-000001: bad on purpose")
        return super().process(model, items)

    def write(self, items: Sequence[Item], results: Sequence[Any], ctx: WriteContext) -> list[str]:
        out = super().write(items, results, ctx)
        self._written += len(items)
        marker = Path(ctx.run_dir) / MARKER
        if 0 <= self.kill_after <= self._written and not marker.exists():
            marker.write_text(str(time.time()))
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(5)  # the controller is gone; this worker exits on the closed pipe
        return out

    def finalize(self, ctx: FinalizeContext) -> dict[str, Any]:
        env = {k: os.environ.get(k) for k in ENV_KEYS}
        atomic_write_text(Path(ctx.run_dir) / "job_env.json",
                          json.dumps({"pid": os.getpid(), "time": time.time(), "env": env}))
        return {}
