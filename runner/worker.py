"""The worker: one spawned process, one device slot, one model at a time.

The controller started this process with the slot's environment already in place (the
device mask, thread counts) and with SIGINT ignored, so nothing here sets either: by the
time anything imports torch the process can only see its own device, as index 0. This
module itself imports no accelerator stack; the task does, inside ``load_model``.

Life of a worker::

    log identity line -> instantiate task -> load first available rung -> Ready
    loop: poll(pipe, timeout) -- EOF (controller gone) -> exit
                              -- Stop -> exit 0
                              -- Call -> run the batch through the ladder -> results

The OOM ladder lives here, per worker: out of memory halves the batch size and retries
the same items; at batch size 1 it loads the next model of the chain, which starts again
from the configured batch size (a smaller model usually fits a bigger batch); a model's
batch never steps back up. With ``batch_size=auto`` on an accelerator (``spec.probe``) each
model first grows its batch from ``batch_probe.floor`` by doubling on the real items it is
given, up to ``batch_probe.max``; the first out of memory settles it at the last size that
worked. Out of memory while loading a model goes straight to the next one. When the last model
runs out of memory at batch size 1 the slot is exhausted: that one item fails here (the
ledger may retry it on another device), the rest of the worker's items go back to the
queue, and the worker exits. A batch that fails for another reason is retried item by
item, so one bad item fails alone.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import select
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from runner.devices import MASK_VARIABLE
from runner.errors import describe, storage_problem
from runner.messages import (BatchDone, Call, ChunkDone, ItemDone, ItemFailed, Ready, RungChanged,
                             RaceLost, SlotExhausted, StartFailed, Stop, WorkerSpec,
                             WriteRefused)
from runner.oom import free_memory, is_oom
from runner.rundir import RunDir
from runner.tasks.base import BadInput, Item, WriteContext, instantiate_task


def identity_line(spec: WorkerSpec) -> str:
    """PID, slot, backend, device id, the mask as seen inside this process, threads."""
    slot = spec.slot
    var = MASK_VARIABLE.get(slot.backend, "CUDA_VISIBLE_DEVICES")
    seen = os.environ.get(var, "<unset>")
    return (f"PID={os.getpid()} slot={slot.index} backend={slot.backend} "
            f"device={slot.label} {var}={seen!s} threads={slot.threads} "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '<unset>')} "
            f"incarnation={spec.incarnation}")


def _logger(spec: WorkerSpec) -> logging.Logger:
    log = logging.getLogger(f"runner.worker.{spec.slot.index}")
    log.propagate = False
    handler = logging.FileHandler(spec.log_path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return log



class _Ladder:
    """The worker's position on the OOM ladder: which model, which batch size.

    Each model starts at ``spec.batch_size`` (the configured size, or the probe's floor):
    after a step-down the next model starts there again and halves as it needs, since a
    smaller model usually fits a bigger batch. With ``spec.probe`` (batch_size=auto on an
    accelerator) each model's batch grows by doubling on real items: a full chunk that went
    through at the current size (written as any other) makes the next chunk twice as big,
    up to the probe's max; the first out of memory settles the batch at the last size that
    worked and the same items run again at it. The settled size is announced (RungChanged)
    once per model. An out of memory before anything fitted is the plain ladder's.
    """

    # the bench's switch (bench/bench_ladder.py): False is the old rule, where the next
    # model kept the batch size the previous one had shrunk to (1)
    _restart_from_top = True

    def __init__(self, spec: WorkerSpec, task: Any, log: logging.Logger, conn: Any):
        self.spec, self.task, self.log, self.conn = spec, task, log, conn
        self.rungs = [r for r in spec.rungs if r.available]
        self.index = -1
        self.batch_size = spec.batch_size
        self.probing = False  # growing: the batch has met neither out of memory nor the max
        self.fits: int | None = None  # the largest batch seen to go through while probing
        self.model: Any = None

    @property
    def name(self) -> str:
        return self.rungs[self.index].name

    def _from_top(self) -> None:
        """A model starts at the configured size, or probes again from the floor."""
        if self.index > 0 and not self._restart_from_top:
            return
        self.batch_size = self.spec.batch_size
        self.probing, self.fits = self.spec.probe is not None, None
        if self.spec.probe is not None:
            self.log.info("batch probe with %s: from %d, doubling up to %d", self.name,
                          self.batch_size, self.spec.probe[1])

    def load_next(self, reason: str) -> bool:
        """Load the next available model; False when the chain is exhausted."""
        self.model = None
        free_memory(self.spec.slot.torch_device)
        skipped = []
        while self.index + 1 < len(self.rungs):
            self.index += 1
            rung = self.rungs[self.index]
            try:
                self.model = self.task.load_model(rung, self.spec.slot.torch_device)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                self.log.warning("out of memory loading %s (%s): next model", rung.name, describe(exc))
                skipped.append(rung.name)
                free_memory(self.spec.slot.torch_device)
                continue
            self._from_top()
            if skipped:  # the ladder moved at load time too: say so (summary, journal)
                reason = "; ".join(filter(None, [reason, f"out of memory loading "
                                                         f"{', '.join(skipped)}: next model"]))
            if reason:
                self.conn.send(RungChanged(self.spec.slot.index, rung.name, self.batch_size, reason))
            return True
        return False

    def _settle(self, reason: str) -> None:
        """The probe is over: say where it settled (summary.json's ladder, the worker log)."""
        self.probing = False
        self.log.info("%s with %s", reason, self.name)
        self.conn.send(RungChanged(self.spec.slot.index, self.name, self.batch_size, reason))

    def went_through(self, size: int) -> None:
        """A chunk of ``size`` items went through: while probing, and when it was a whole
        chunk at the current batch size, the next chunk is twice as big (up to the max)."""
        if not self.probing or size != self.batch_size:
            return  # a short chunk (the end of a call) proves nothing about the batch size
        self.fits = size
        top = self.spec.probe[1]
        if size >= top:
            self._settle(f"batch probe: {size} fits (batch_probe.max)")
            return
        self.batch_size = min(2 * size, top)
        self.log.info("batch probe: %d fits with %s; trying %d", size, self.name, self.batch_size)

    def out_of_memory(self, tried: int) -> bool:
        """A chunk of ``tried`` items ran out of memory. True: run the same items again at
        the (smaller) batch size now set; False: already at 1, the next model's turn."""
        if self.probing and self.fits is not None and self.fits < tried:
            self.batch_size = self.fits  # back to the last size that worked
            self._settle(f"batch probe: {self.fits} fits ({tried} ran out of memory)")
            return True
        self.probing = False  # at the floor, or at a size that fitted: the plain ladder
        return self.shrink()

    def shrink(self) -> bool:
        if self.batch_size <= 1:
            return False
        self.batch_size = max(1, self.batch_size // 2)
        self.conn.send(RungChanged(self.spec.slot.index, self.name, self.batch_size,
                                   "out of memory: batch halved"))
        return True


def run_call(call: Call, ladder: _Ladder, spec: WorkerSpec, log: logging.Logger,
             conn: Any) -> bool:
    """Process one dispatched batch. Returns False when the slot is exhausted.

    Race (speculation): the call's first write claims its race (RunDir.claim); a call whose
    race another call claimed first -- before it starts or before its first write -- writes
    nothing and sends RaceLost, so the outputs of an item are only ever one call's."""
    task, slot = ladder.task, spec.slot
    items = list(call.items)
    rundir, claimed = RunDir(Path(spec.run_dir)), False
    if rundir.claimed(call.race_id):  # the other copy of this batch is done already
        conn.send(RaceLost(slot.index, call.batch_no, tuple(it.id for it in items)))
        return True
    i, single_until = 0, 0
    while i < len(items):
        single = i < single_until  # after a batch failed: its items one by one
        size = 1 if single else ladder.batch_size
        chunk: list[Item] = items[i:i + size]
        started = time.time()
        try:
            results = task.process(ladder.model, chunk)
            if len(results) != len(chunk):
                raise RuntimeError(f"task returned {len(results)} results for {len(chunk)} items")
            ctx = WriteContext(Path(spec.run_dir), call.batch_no, slot.index, slot.label,
                               ladder.name, len(chunk), i, len(chunk) == len(items))
            if not claimed:
                claimed = rundir.claim(call.race_id)
                if not claimed:  # the other copy claimed it first: its outputs stand
                    log.info("batch %d: its race %d went to another copy; nothing written",
                             call.batch_no, call.race_id)
                    conn.send(RaceLost(slot.index, call.batch_no, tuple(it.id for it in items)))
                    return True
            try:
                outputs = task.write(chunk, results, ctx)
            except Exception as exc:
                refused = storage_problem(exc)
                if refused is None:
                    raise
                # the place is full or closed, not the items: none of the rest is charged
                log.error("could not write the outputs of batch %d: %s", call.batch_no, refused)
                conn.send(WriteRefused(slot.index, call.batch_no,
                                       tuple(item.id for item in items[i:]), refused))
                return True
        except Exception as exc:
            if is_oom(exc):
                log.warning("out of memory on batch of %d with %s: %s", len(chunk), ladder.name,
                            describe(exc))
                free_memory(slot.torch_device)
                if ladder.out_of_memory(len(chunk)):
                    continue
                if ladder.load_next("out of memory at batch size 1: next model"):
                    continue
                error = (f"out of memory on {slot.label} with every model of the chain "
                         f"({', '.join(r.name for r in ladder.rungs)}) at batch size 1")
                # Only the item that needs more memory fails here (retryable: another device
                # may have it, within checkpoint.max_attempts); the untried rest of this call
                # and any prefetched call go back to the queue when this worker exits.
                now = time.time()
                for item in chunk:
                    conn.send(ItemFailed(slot.index, call.batch_no, item.id, error, "", False,
                                         ladder.name, started, now))
                conn.send(SlotExhausted(slot.index, error))
                return False
            if len(chunk) > 1:  # find the bad one: retry these items one by one
                log.warning("batch of %d failed (%s); retrying one by one", len(chunk), describe(exc))
                single_until = i + len(chunk)
                continue
            tb = traceback.format_exc()
            log.error("item %s failed: %s\n%s", chunk[0].id, describe(exc), tb)
            conn.send(ItemFailed(slot.index, call.batch_no, chunk[0].id, describe(exc), tb,
                                 isinstance(exc, BadInput), ladder.name, started, time.time()))
            i += 1
            continue
        finished = time.time()
        if not single:
            ladder.went_through(len(chunk))
        i += len(chunk)
        last = i >= len(items)
        conn.send(ChunkDone(slot.index, call.batch_no, tuple(
            ItemDone(slot.index, call.batch_no, item.id, str(output), ladder.name, len(chunk),
                     started, finished, task.item_metrics(item, result),
                     tuple(getattr(output, "placed", ())), getattr(output, "warning", ""))
            for item, result, output in zip(chunk, results, outputs)), last))
        if last:
            return True
    conn.send(BatchDone(slot.index, call.batch_no))
    return True


def _seed(seed: int) -> None:
    random.seed(seed)
    for name in ("numpy", "torch"):
        mod = sys.modules.get(name)
        if mod is not None:
            (mod.random.seed if name == "numpy" else mod.manual_seed)(seed)




def start_worker(spec: WorkerSpec, conn: Any) -> tuple[_Ladder, logging.Logger] | None:
    """Identity line, task, first model, Ready. ``conn`` is anything with ``send``.

    Shared by the process worker below and the Ray actor (runner/executor_ray.py).
    Returns None when the worker cannot start (StartFailed/SlotExhausted already sent).
    """
    log = _logger(spec)
    log.info(identity_line(spec))
    try:
        task = instantiate_task(spec.task_config)
        ladder = _Ladder(spec, task, log, conn)
        t0 = time.time()
        if not ladder.load_next(""):
            error = f"out of memory loading every model of the chain on {spec.slot.label}"
            conn.send(SlotExhausted(spec.slot.index, error))
            return None
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(spec.slot.threads)
        _seed(spec.seed)
        load_s = time.time() - t0
        log.info("loaded %s on %s in %.2fs", ladder.name, spec.slot.label, load_s)
        conn.send(Ready(spec.slot.index, os.getpid(), identity_line(spec), ladder.name, load_s))
        return ladder, log
    except Exception as exc:
        log.error("could not start: %s\n%s", describe(exc), traceback.format_exc())
        conn.send(StartFailed(spec.slot.index, describe(exc), traceback.format_exc()))
        return None


def pipe_poller(conn: Connection) -> Any:
    """A ``select.poll`` on one pipe: a wait is one syscall, where ``Connection.poll`` builds
    a selectors object every time (shared with the controller's side, executor.py)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return poller


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned worker process (module-level, so it pickles).

    An orderly end (Stop, controller gone, chain exhausted, could not start) runs the exit
    handlers (logging, multiprocessing's finalizers, ...) and then skips the rest of the
    interpreter's teardown: with torch and transformers imported that takes ~2 s of module
    and object clean-up the OS does anyway, while the controller waits to finish the run.
    Outputs are already fsynced. An unexpected exception still ends the process the normal
    way (traceback, exit 1).
    """
    _serve(spec, conn)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _serve(spec: WorkerSpec, conn: Connection) -> None:
    # Library noise (progress bars, warnings) goes to this worker's log, not the terminal.
    with open(spec.log_path, "ab", buffering=0) as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    parent = os.getppid()
    started = start_worker(spec, conn)
    if started is None:
        return
    ladder, log = started
    poller = pipe_poller(conn)
    while True:
        try:
            if not poller.poll(int(spec.poll_s * 1000)):
                if os.getppid() != parent:
                    log.error("controller is gone; exiting")
                    return
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            log.info("controller closed the pipe; exiting")
            return
        if isinstance(msg, Stop):
            log.info("stop requested; exiting")
            return
        if isinstance(msg, Call):
            try:
                if not run_call(msg, ladder, spec, log, conn):
                    return
            except (BrokenPipeError, EOFError, OSError) as exc:
                log.error("lost the controller while sending results (%s); exiting", exc)
                return
