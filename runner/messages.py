"""Every message that crosses a process boundary: frozen dataclasses, nothing else.

    controller -> worker:   WorkerSpec (process argument), Call, Stop
    worker -> controller:   Ready, ChunkDone (of ItemDone), ItemFailed, BatchDone, RungChanged,
                            SlotExhausted, StartFailed, WriteRefused, RaceLost
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runner.devices import Slot
from runner.tasks.base import Item, ModelRung


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, given as the spawned process's argument."""

    slot: Slot
    incarnation: int  # 0 for the first process of a slot, +1 per restart
    task_config: dict  # the task group, instantiated again in the worker
    rungs: tuple[ModelRung, ...]  # the slot's fallback chain, first preferred
    batch_size: int  # the batch size each model starts at (the floor when probing)
    run_dir: str
    log_path: str
    seed: int = 0
    poll_s: float = 1.0  # how often an idle worker checks that its controller lives
    # batch_size=auto on an accelerator slot: (batch_probe.floor, batch_probe.max), the
    # bounds each model's batch grows within, doubling on real items; None = no probe
    probe: tuple[int, int] | None = None


@dataclass(frozen=True)
class Call:
    """Process these items (one dispatched batch)."""

    batch_no: int
    items: tuple[Item, ...]
    # the race this call runs in: its own batch_no, or -- for a speculative copy -- the
    # batch_no of the call it copies. Of a race's calls only the first to claim it
    # (RunDir.claim) makes outputs; the others send RaceLost.
    race: int | None = None

    @property
    def race_id(self) -> int:
        return self.batch_no if self.race is None else self.race


@dataclass(frozen=True)
class Stop:
    """Finish nothing more; exit."""


@dataclass(frozen=True)
class Ready:
    slot: int
    pid: int
    identity: str  # the identity line, as logged
    model: str  # the rung it loaded
    load_s: float


@dataclass(frozen=True)
class ItemDone:
    slot: int
    batch_no: int
    item_id: str
    output: str  # relative to the run dir
    model: str
    batch_size: int
    started: float
    finished: float
    metrics: dict = field(default_factory=dict)
    placed: tuple[str, ...] = ()  # copies written outside the run dir (task.place)
    warning: str = ""  # one line from the writer (a copy not placed, one replaced)


@dataclass(frozen=True)
class ChunkDone:
    """Items written together arrive together: one message, so never half a shard."""

    slot: int
    batch_no: int
    done: tuple[ItemDone, ...]
    # the call's last chunk, all done: it stands for the BatchDone too (one message, one
    # wake-up of the controller per call instead of two)
    last: bool = False


@dataclass(frozen=True)
class ItemFailed:
    slot: int
    batch_no: int
    item_id: str
    error: str  # one line
    traceback: str
    permanent: bool  # BadInput or the model chain exhausted: no retry
    model: str
    started: float
    finished: float


@dataclass(frozen=True)
class BatchDone:
    slot: int
    batch_no: int


@dataclass(frozen=True)
class RungChanged:
    """The OOM ladder moved: smaller batch, or the next model."""

    slot: int
    model: str
    batch_size: int
    reason: str


@dataclass(frozen=True)
class SlotExhausted:
    """Every model in the chain ran out of memory here; the worker exits after this."""

    slot: int
    error: str


@dataclass(frozen=True)
class StartFailed:
    """The worker could not start (model load failed for a reason that is not OOM)."""

    slot: int
    error: str
    traceback: str


@dataclass(frozen=True)
class WriteRefused:
    """The file system refused a batch's output (full, read-only, no permission). It stands
    for the call's BatchDone: ``item_ids`` -- the call's items not yet done -- go back to
    pending uncharged (the items are fine) and the run stops dispatching."""

    slot: int
    batch_no: int
    item_ids: tuple[str, ...]
    error: str  # one line: what was refused, where (storage_problem)


@dataclass(frozen=True)
class RaceLost:
    """Another call of this call's race (a speculative copy, or the original) claimed it
    first: nothing of this call was written. It stands for the call's BatchDone;
    ``item_ids`` are the call's items."""

    slot: int
    batch_no: int
    item_ids: tuple[str, ...]
