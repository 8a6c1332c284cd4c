"""A synthetic task whose items sleep for their cost: device time that needs no CPU.

Plugged in through ``_target_`` exactly as a user's own task would be::

    python -m runner task=sleep ... (see bench/bench_scheduling.py)
    python -m runner task._target_=runner.tasks.sleep.SleepTask ...

Items: ``count`` items with costs from ``dist`` (fixed: ``ms`` each; lognormal: median
``ms``, sigma ``sigma``), drawn with ``seed``. Output: one small JSON file per item.
``slow_slots``: ``"<slot>:<factor>;..."`` -- the worker of that slot sleeps ``factor`` times
as long (an uneven machine: one device 4x slower is ``"3:4"``), read from ``RUNNER_SLOT``.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Iterator, Sequence

from runner import names
from runner.rundir import atomic_write_text
from runner.tasks.base import Item, ModelRung, Task, WriteContext


class SleepTask(Task):
    name = "sleep"
    output_dir = "sleeps"

    def __init__(self, count: int = 100, ms: float = 10.0, dist: str = "fixed", sigma: float = 1.0,
                 seed: int = 0, write_outputs: bool = True, slow_slots: str = "", **_: Any):
        self.count, self.ms, self.dist, self.sigma, self.seed = count, ms, dist, sigma, seed
        self.write_outputs = write_outputs
        self.default_batch_size = 1
        factors = dict(part.split(":") for part in str(slow_slots).split(";") if part.strip())
        self.factor = float(factors.get(os.environ.get("RUNNER_SLOT", ""), 1.0))

    def discover(self) -> Iterator[Item]:
        rng = random.Random(self.seed)
        for i in range(self.count):
            s = self.ms / 1000.0
            if self.dist == "lognormal":
                s *= rng.lognormvariate(0.0, self.sigma)
            yield Item(f"item-{i:06d}", s, f"{s:.6f}", fingerprint=f"{s:.6f}")

    def model_chain(self, backend: str) -> list[ModelRung]:
        return [ModelRung("sleep", "sleep", True, "synthetic")]

    def load_model(self, rung: ModelRung, device: str) -> Any:
        return rung.name

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        for it in items:
            time.sleep(float(it.payload) * self.factor)
        return [float(it.payload) for it in items]

    def write(self, items: Sequence[Item], results: Sequence[Any], ctx: WriteContext) -> list[str]:
        out = []
        for it, r in zip(items, results):
            rel = f"{self.output_dir}/{names.flat(it.name or names.component(it.id))}.json"
            if self.write_outputs:
                atomic_write_text(ctx.run_dir / rel, json.dumps({"id": it.id, "slept": r}))
            out.append(rel)
        return out
