"""A test task whose model runs out of memory on purpose, the way real models do (issue 5).

Plugged in through ``_target_`` exactly as a user's own task would be
(``task=sleep task._target_=tests.oom_task.OOMTask +task.oom_slots=[0] ...``).

Items ``item-000`` .. are trivial; the "model" is a dict. Out of memory is injected only on
the slots in ``oom_slots`` (the worker reads its slot from ``RUNNER_SLOT``, set by the
runner in every worker's environment), so a run has a small-memory device and a big one:

* ``oom_models``      processing a batch with one of these models runs out of memory at any
                      batch size (a model too large for the card);
* ``oom_batch_over``  a batch larger than this runs out of memory, whatever the model;
* ``slot_batch_over`` one limit per slot, by ``RUNNER_SLOT``: on slot i a batch larger than
                      entry i runs out of memory, whatever the model and ``oom_slots`` (cards
                      with different memory: what ``batch_size=auto`` probes for);
* ``load_oom_models`` loading one of these models runs out of memory;
* ``oom_kind``        what the error looks like: ``torch`` (a real ``torch.OutOfMemoryError``,
                      as CUDA and XPU raise it), ``ctranslate2`` (``RuntimeError: CUDA failed
                      with error out of memory``) or ``mps`` (``MPS backend out of memory``);
* ``fail_items``      these items raise an ordinary RuntimeError on every slot: an item
                      error, which must not be taken for out of memory.

Each item's output ``results/<id>.json`` records its provenance: model, batch size, device.
torch is imported only for ``oom_kind=torch`` and only when the error is raised.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

from runner import names
from runner.rundir import atomic_write_text
from runner.tasks.base import Item, ModelRung, Task, WriteContext

MPS_MESSAGE = ("MPS backend out of memory (MPS allocated: 17.95 GB, other allocations: 4.50 MB, "
               "max allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool. Use "
               "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory "
               "allocations (may cause system failure).")


def make_oom(kind: str, what: str) -> BaseException:
    """An out-of-memory error as the named backend raises it."""
    if kind == "torch":
        import torch

        return torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            f"7.79 GiB of which 1.02 GiB is free ({what})")
    if kind == "ctranslate2":
        return RuntimeError("CUDA failed with error out of memory")
    if kind == "mps":
        return RuntimeError(MPS_MESSAGE)
    raise ValueError(f"oom_kind={kind!r} is not one of torch, ctranslate2, mps")


class OOMTask(Task):
    name = "oomtest"
    output_dir = "results"

    def __init__(self, count: int = 16, models: list[str] | None = None,
                 oom_slots: list[int] | None = None, oom_models: list[str] | None = None,
                 oom_batch_over: int | None = None, load_oom_models: list[str] | None = None,
                 oom_kind: str = "torch", fail_items: list[str] | None = None,
                 default_batch_size: int = 8, slot_batch_over: list[int] | None = None,
                 **_: Any):
        self.count = count
        self.models = list(models or ["big", "medium", "small"])
        self.oom_slots = None if oom_slots is None else {int(s) for s in oom_slots}
        self.oom_models = set(oom_models or ())
        self.oom_batch_over = oom_batch_over
        self.load_oom_models = set(load_oom_models or ())
        self.oom_kind = oom_kind
        self.fail_items = set(fail_items or ())
        self.default_batch_size = default_batch_size
        self.slot_batch_over = [int(n) for n in slot_batch_over or ()]

    # ---- controller ----------------------------------------------------------------------
    def discover(self) -> Iterator[Item]:
        for i in range(self.count):
            yield Item(f"item-{i:03d}", 1.0, str(i))

    def model_chain(self, backend: str) -> list[ModelRung]:
        return [ModelRung(m, m, True, "test model") for m in self.models]

    # ---- worker --------------------------------------------------------------------------
    def _small_memory(self) -> bool:
        slot = int(os.environ.get("RUNNER_SLOT", "-1"))
        return self.oom_slots is None or slot in self.oom_slots

    def _slot_limit(self) -> int | None:
        slot = int(os.environ.get("RUNNER_SLOT", "-1"))
        return self.slot_batch_over[slot] if 0 <= slot < len(self.slot_batch_over) else None

    def load_model(self, rung: ModelRung, device: str) -> Any:
        if self._small_memory() and rung.name in self.load_oom_models:
            raise make_oom(self.oom_kind, f"loading {rung.name}")
        return {"name": rung.name, "device": device}

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        if self._small_memory():
            if model["name"] in self.oom_models:
                raise make_oom(self.oom_kind, f"{model['name']} does not fit")
            if self.oom_batch_over is not None and len(items) > self.oom_batch_over:
                raise make_oom(self.oom_kind, f"batch of {len(items)}")
        limit = self._slot_limit()
        if limit is not None and len(items) > limit:
            raise make_oom(self.oom_kind, f"batch of {len(items)} over this card's {limit}")
        for it in items:
            if it.id in self.fail_items:
                raise RuntimeError(f"shape mismatch in layer 3 for {it.id} (an item error)")
        return [int(it.payload) * 2 for it in items]

    def write(self, items: Sequence[Item], results: Sequence[Any], ctx: WriteContext) -> list[str]:
        out = []
        for it, r in zip(items, results):
            rel = f"{self.output_dir}/{names.flat(it.name or names.component(it.id))}.json"
            atomic_write_text(ctx.run_dir / rel, json.dumps({
                "id": it.id, "result": r, "model": ctx.model, "batch_size": ctx.batch_size,
                "device": ctx.device, "slot": ctx.slot, "pid": os.getpid()}))
            out.append(rel)
        return out
