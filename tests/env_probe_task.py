"""A test task that reports, from inside each worker, the environment the worker started with.

Plugged in through ``_target_`` (``task=sleep task._target_=tests.env_probe_task.EnvProbeTask``).
What it records for every item (``probe/<id>.json``):

* ``pid`` of the worker, the device masks (``CUDA_VISIBLE_DEVICES``, ``ZE_AFFINITY_MASK``),
  ``OMP_NUM_THREADS`` and ``RUNNER_SLOT`` as this process sees them;
* ``torch_at_import``: was torch already imported when this module was imported in the
  worker (it must not be: the mask must be in place before anything imports torch);
* ``torch_at_load``: was torch imported when ``load_model`` was entered;
* ``threads_at_import``: ``torch.get_num_threads()`` right after this task imported torch
  (what OMP_NUM_THREADS gave it) and ``threads``: at process time (after the worker's
  ``torch.set_num_threads``).

``use_torch=false`` skips torch altogether (a fast probe of the environment only).
``app_at_load``: was the Hydra app (runner.app) imported in the worker (it must not be:
spawn re-runs the parent's main script, and the console script must not drag the app in).
``finalize_s`` makes the controller's finalize take that long (it first creates
``finalize.started`` in the run dir, for a test to wait on).
``discover_s`` makes discovery (in the controller) take that long; ``loaded_at`` and
``processed_at`` (time.time() in the worker) then show whether the worker had booted and
loaded its model before discovery was over.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from runner import names
from runner.rundir import atomic_write_text
from runner.tasks.base import Item, ModelRung, Task, WriteContext

FINALIZING = "finalize.started"  # <run dir>/finalize.started: finalize() has begun
TORCH_AT_IMPORT = "torch" in sys.modules
ENV_AT_IMPORT = {k: os.environ.get(k) for k in
                 ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK", "OMP_NUM_THREADS", "RUNNER_SLOT")}


class EnvProbeTask(Task):
    name = "probe"
    output_dir = "probe"
    resume_safe_keys = ("discover_s", "finalize_s")  # timings only: outputs do not change

    def __init__(self, count: int = 8, use_torch: bool = True, discover_s: float = 0.0,
                 finalize_s: float = 0.0, **_: Any):
        self.count = count
        self.use_torch = use_torch
        self.discover_s = discover_s
        self.finalize_s = finalize_s
        self.default_batch_size = 1

    def discover(self) -> Iterator[Item]:
        time.sleep(self.discover_s)
        for i in range(self.count):
            yield Item(f"item-{i:03d}", 1.0, str(i))

    def finalize(self, ctx: Any) -> dict[str, Any]:
        (Path(ctx.run_dir) / FINALIZING).touch()  # what a test waits on: finalize has begun
        time.sleep(self.finalize_s)
        return {}

    def model_chain(self, backend: str) -> list[ModelRung]:
        return [ModelRung("probe", "probe", True, "test model")]

    def load_model(self, rung: ModelRung, device: str) -> Any:
        seen = {"pid": os.getpid(), "device": device, "loaded_at": time.time(),
                "torch_at_import": TORCH_AT_IMPORT, "torch_at_load": "torch" in sys.modules,
                "app_at_load": "runner.app" in sys.modules, "env_at_import": ENV_AT_IMPORT,
                **{k: os.environ.get(k) for k in ENV_AT_IMPORT}}
        if self.use_torch:
            import torch

            seen["threads_at_import"] = torch.get_num_threads()
        return seen

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        threads = sys.modules["torch"].get_num_threads() if self.use_torch else None
        return [{**model, "threads": threads, "processed_at": time.time()} for _ in items]

    def write(self, items: Sequence[Item], results: Sequence[Any], ctx: WriteContext) -> list[str]:
        out = []
        for it, r in zip(items, results):
            rel = f"{self.output_dir}/{names.flat(it.name or names.component(it.id))}.json"
            atomic_write_text(ctx.run_dir / rel, json.dumps({"id": it.id, "slot": ctx.slot, **r}))
            out.append(rel)
        return out
