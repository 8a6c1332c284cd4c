"""A light test task whose items misbehave on purpose: the fault table of tests/test_faults.py.

Plugged in exactly as a user's task is, through ``_target_`` on the sleep group::

    python -m runner task=sleep task._target_=tests.faulty_task.FaultyTask \
        '+task.faults=3:sigkill:process:always;5:raise:write:once' '+task.load_fault=exit:2'

Items ``item-000000`` .. sleep ``ms`` each (payload) and write one JSON file per item,
``faulty/<id>.json`` = {"id", "pid", "slot", "batch_no", "batch_size", "model"}, atomically.

``faults``: ``;``-separated ``<index>:<kind>[:<where>[:<when>]]``

* kind  — ``raise`` (RuntimeError), ``badinput`` (BadInput: failed at once, no retry),
  ``exit`` (``sys.exit(3)``), ``sigkill`` (``os.kill(getpid(), SIGKILL)``), ``segv``
  (``ctypes.string_at(0)``), ``segv_fh`` (``faulthandler._sigsegv()``);
* where — ``process`` (default; the item's turn inside the batch, so mid-batch when it is
  not first), ``write`` (after the batch's earlier items are already on disk) or
  ``inwrite`` (inside the item's atomic write: its temp file exists, its output does not);
* when  — ``always`` (default: a poison item) or ``once`` (only the first attempt: a marker
  file ``<run dir>/fault-markers/<id>.<where>`` created with O_EXCL before the fault).

``slow``: ``;``-separated ``<index>:<ms>``: those items sleep that long instead of ``ms``.
``slow_slots``: ``;``-separated ``<slot>:<factor>``: that slot's worker sleeps factor x as
long (an uneven machine; tests/test_speculation.py).

``load_fault``: ``<kind>:<n>`` — the first ``n`` model loads of the run (counted with
markers in the run dir, across every slot and restart) do ``kind``; ``<kind>:always`` —
every load does. Empty: loads are clean.

Each item's ``process`` begins by creating ``<run dir>/started/<id>``: a test waits on that
instead of sleeping (``started_items`` in tests/conftest.py, with ``cli_args``,
``check_consistent`` and the other helpers the fault, resume and interrupt tests share).

The run dir reaches workers as ``FAULTY_RUN_DIR`` through :meth:`worker_env` (the
controller reads it from Hydra), so markers survive worker deaths and resumes.
"""
from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from runner import names
from runner.rundir import atomic_path
from runner.tasks.base import BadInput, ConfigError, Item, ModelRung, Task, WriteContext

KINDS = ("raise", "badinput", "exit", "sigkill", "segv", "segv_fh")
WHERES = ("process", "write", "inwrite")
WHENS = ("always", "once")
RUN_DIR_ENV = "FAULTY_RUN_DIR"
STARTED = "started"  # <run dir>/started/<id>: that item's process() has begun


def parse_faults(text: str) -> dict[str, tuple[str, str, str]]:
    """``"3:sigkill:write:once;5:raise"`` -> {item id: (kind, where, when)}."""
    out: dict[str, tuple[str, str, str]] = {}
    for entry in filter(None, (e.strip() for e in (text or "").split(";"))):
        parts = entry.split(":")
        index, kind = parts[0], parts[1] if len(parts) > 1 else ""
        where = parts[2] if len(parts) > 2 else "process"
        when = parts[3] if len(parts) > 3 else "always"
        if not index.isdigit() or kind not in KINDS or where not in WHERES or when not in WHENS:
            raise ConfigError(f"task.faults entry {entry!r}: want <index>:<{'|'.join(KINDS)}>"
                              f"[:<{'|'.join(WHERES)}>[:<{'|'.join(WHENS)}>]]")
        out[item_id(int(index))] = (kind, where, when)
    return out


def item_id(index: int) -> str:
    return f"item-{index:06d}"


def do_fault(kind: str, what: str) -> None:
    """Misbehave now, the way ``kind`` says."""
    if kind == "raise":
        raise RuntimeError(f"injected fault in {what}")
    if kind == "badinput":
        raise BadInput(f"{what}: injected bad input")
    if kind == "exit":
        sys.exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # the signal is on its way
    if kind == "segv":
        faulthandler.disable()  # keep the worker log short; the exit code tells the story
        ctypes.string_at(0)
    if kind == "segv_fh":
        faulthandler._sigsegv()
    raise AssertionError(f"fault {kind!r} did not happen")


def _claim(marker: Path) -> bool:
    """Create ``marker`` if it is not there yet; True for the one caller that created it."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class FaultyTask(Task):
    name = "sleep"
    output_dir = "faulty"

    def __init__(self, count: int = 20, ms: float = 5.0, faults: str = "", load_fault: str = "",
                 models: Any = ("m1",), slow: str = "", slow_slots: str = "", **_: Any):
        self.count, self.ms = int(count), float(ms)
        factors = dict(e.split(":") for e in str(slow_slots).split(";") if e)
        self.factor = float(factors.get(os.environ.get("RUNNER_SLOT", ""), 1.0))
        self.slow = {int(i): float(v) for i, v in (e.split(":") for e in str(slow).split(";") if e)}
        self.faults = parse_faults(faults)
        self.load_fault = load_fault or ""
        self.models = list(models)
        self.default_batch_size = 1

    # ---- controller ----------------------------------------------------------------------
    def discover(self) -> Iterator[Item]:
        for i in range(self.count):
            s = self.slow.get(i, self.ms) / 1000.0
            yield Item(item_id(i), s, f"{s:.6f}")

    def model_chain(self, backend: str) -> list[ModelRung]:
        return [ModelRung(m, m, True, "synthetic") for m in self.models]

    def worker_env(self) -> dict[str, str]:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        return {RUN_DIR_ENV: str(HydraConfig.get().runtime.output_dir)}

    # ---- worker --------------------------------------------------------------------------
    def _markers(self) -> Path:
        run_dir = os.environ.get(RUN_DIR_ENV)
        if not run_dir:
            raise RuntimeError(f"{RUN_DIR_ENV} is not set: run FaultyTask through the runner")
        return Path(run_dir) / "fault-markers"

    def _mark_started(self, item: Item) -> None:
        """What a test waits on to know a worker is inside this item (tests/conftest.py)."""
        if not os.environ.get(RUN_DIR_ENV):
            return
        started = self._markers().parent / STARTED
        started.mkdir(exist_ok=True)
        (started / names.component(item.id)).touch()

    def _maybe_fault(self, item: Item, where: str) -> None:
        spec = self.faults.get(item.id)
        if spec is None or spec[1] != where:
            return
        kind, _, when = spec
        if when == "once" and not _claim(self._markers() / f"{names.component(item.id)}.{where}"):
            return
        do_fault(kind, f"{item.id} ({where})")

    def load_model(self, rung: ModelRung, device: str) -> Any:
        if self.load_fault:
            kind, _, n = self.load_fault.partition(":")
            if n == "always":
                do_fault(kind, "load_model")
            for k in range(int(n or 1)):
                if _claim(self._markers() / f"load-{k}"):
                    do_fault(kind, "load_model")
        return rung.name

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        out = []
        for it in items:
            self._mark_started(it)
            time.sleep(float(it.payload) * self.factor)
            self._maybe_fault(it, "process")
            out.append(float(it.payload))
        return out

    def write(self, items: Sequence[Item], results: Sequence[Any], ctx: WriteContext) -> list[str]:
        out = []
        for it, _r in zip(items, results):
            self._maybe_fault(it, "write")
            rel = f"{self.output_dir}/{names.flat(it.name or names.component(it.id))}.json"
            with atomic_path(ctx.run_dir / rel) as tmp:
                tmp.write_text(json.dumps({
                    "id": it.id, "pid": os.getpid(), "slot": ctx.slot, "batch_no": ctx.batch_no,
                    "batch_size": ctx.batch_size, "model": ctx.model}))
                self._maybe_fault(it, "inwrite")
            out.append(rel)
        return out

