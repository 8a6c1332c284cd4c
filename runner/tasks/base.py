"""The task protocol: what an item is, how a worker turns items into outputs.

A task is a class named by ``_target_`` in the ``task`` config group; Hydra instantiates it
with the group's fields as keyword arguments, in the controller *and* in every worker.
The two halves never share state:

    controller (no torch, no GPU context)       worker (one device, env already set)
    -------------------------------------       ------------------------------------
    check(backends)  plan-time checks           load_model(rung, device)  -> handle
    discover()       -> Item | BadItem ...      process(handle, items)    -> results
    model_chain(be)  availability rungs         write(items, results, ctx) -> outputs
    finalize(ctx)    run-level outputs          worker_env()  (read by the controller)

Rules a task follows:

* ``discover`` and ``check`` must not import torch or any accelerator stack.
* ``process`` gets up to ``batch_size`` items; raising :class:`BadInput` marks the item (or
  the whole batch, which the worker then retries one by one) failed without retries; any
  other exception is retried up to ``max_attempts``; out-of-memory is recognised by
  :mod:`runner.oom` and walks the ladder instead.
* ``write`` makes every output file appear whole or not at all (use
  :func:`runner.rundir.atomic_write_bytes` / ``atomic_path``) and returns one output path per
  item, relative to the run dir.
"""
from __future__ import annotations

import stat as stat_mod
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence


#: what a task's ``on_duplicate_id`` may say (runner.intake applies it)
ON_DUPLICATE = ("error", "keep_first", "suffix")
#: what ``resume.on_changed`` may say (runner.intake applies it)
ON_CHANGED = ("requeue", "error")


# the errors a task raises live in runner.errors (one home); named here for task authors
from runner.errors import BadInput, ConfigError  # noqa: E402,F401
# a task's numeric settings declare their range with ranged(); TaskConfig checks them
from runner.ranges import check_ranges, ranged  # noqa: E402,F401


@dataclass(frozen=True)
class Item:
    """One unit of work. Crosses the process boundary, so it stays small and picklable."""

    id: str  # stable, unique within a run, in the input's own spelling
    cost: float  # estimate for batching and size_balanced (seconds of media, tokens)
    payload: str  # what the worker needs: the text itself, or a file path
    # the item's own files are named from this (a relative stem, folders joined by "/");
    # "" = runner.names.component(id). The journal makes it unique and keeps it for good.
    name: str = ""
    fingerprint: str = ""  # what the item was made from (text hash; size:mtime_ns:head hash)
    where: str = ""  # where it is in the input, for messages ("corpus.jsonl line 7")


@dataclass(frozen=True)
class BadItem:
    """An item discovery already knows is broken (an empty line, an unreadable file)."""

    id: str
    error: str  # one line: what is wrong and with which item
    name: str = ""  # as Item.name
    fingerprint: str = ""  # as Item.fingerprint: a fixed input is retried on resume
    where: str = ""  # as Item.where


@dataclass(frozen=True)
class Written:
    """``write``'s answer for one item when there is more to say than its output path."""

    path: str  # relative to the run dir, as a plain str answer would be
    placed: tuple[str, ...] = ()  # absolute paths of copies written outside the run dir
    warning: str = ""  # one line: a copy not placed (exists, read-only), one replaced

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class ModelRung:
    """One model in the fallback chain, as resolved at plan time."""

    name: str  # as the user wrote it in task.models
    source: str  # what will be loaded: a local path or a backend-specific name
    available: bool  # False: skipped with `reason`
    reason: str = ""  # why it is unavailable (or where it was found)


@dataclass(frozen=True)
class WriteContext:
    """What a worker's ``write`` may know about where it is (crosses no boundary)."""

    run_dir: Path
    batch_no: int  # unique per dispatched batch within a run, also across resumes
    slot: int
    device: str  # e.g. "cuda:1", "xpu:0", "cpu:0" as the plan names it
    model: str  # the rung actually used
    batch_size: int  # the batch size actually used
    offset: int = 0  # position of these items within the dispatched batch
    whole: bool = True  # False when the batch was split (OOM ladder, isolating a bad item)


@dataclass(frozen=True)
class FinalizeContext:
    """Run-level view handed to ``finalize`` in the controller after the run."""

    run_dir: Path
    done: Sequence[tuple[str, str, str]] = field(default_factory=tuple)  # (id, output, model)


# ---- inputs: what discovery may open --------------------------------------------------------
_KINDS = ((stat_mod.S_ISFIFO, "a FIFO"), (stat_mod.S_ISCHR, "a character device"),
          (stat_mod.S_ISBLK, "a block device"), (stat_mod.S_ISSOCK, "a socket"),
          (stat_mod.S_ISDIR, "a folder"), (stat_mod.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """``a FIFO``, ``a character device``, ... for a stat mode; "" for a regular file.
    Discovery must never open anything but a regular file: opening a FIFO blocks until a
    writer comes, reading /dev/zero never ends."""
    if stat_mod.S_ISREG(mode):
        return ""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_input_path(key: str, path: Path, what: str) -> None:
    """``task.input`` must be a regular file or a folder: one line naming what it is
    otherwise (``task.input=/dev/zero is not a regular file or folder (a character
    device); give a file or a folder``). ``what``: the words for a missing path."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{key}={str(path)!r} does not exist; {what}") from None
    except OSError as exc:
        raise ConfigError(f"{key}={str(path)!r} cannot be read ({exc.strerror or exc}); "
                          f"{what}") from None
    if not stat_mod.S_ISDIR(mode) and file_kind(mode):
        raise ConfigError(f"{key}={path} is not a regular file or folder ({file_kind(mode)}); "
                          f"give a file or a folder")


def too_big(what: str, size: int, limit: int) -> str:
    """The reason for an item over ``task.max_item_bytes``: ``the line is 52,428,800 bytes,
    over task.max_item_bytes=1,000,000; split it or raise task.max_item_bytes``."""
    return (f"{what} is {size:,} bytes, over task.max_item_bytes={limit:,}; split it or "
            f"raise task.max_item_bytes")


@dataclass
class TaskConfig:
    """Fields every task group has; a task's own config dataclass extends it.

    Every int/float field declares its range with :func:`ranged`; ``__post_init__`` checks
    them (a subclass with its own ``__post_init__`` calls ``super().__post_init__()``), so a
    task that builds its config dataclass from its keyword arguments gets the one-line
    ConfigError for free, in dry runs too.
    """

    _target_: str = "runner.tasks.embed.EmbedTask"  # the Task class to instantiate
    name: str = "task"  # short name: run dirs are grouped by it, resume=latest matches it
    input: str = ""  # a file or a folder of inputs
    models: list[str] = field(default_factory=list)  # fallback chain, first preferred
    # the largest item discovery accepts, in bytes as stored (a line, a cell, a file); a
    # bigger one is failed at discovery with a line saying so, the others go on. null = no
    # limit. Each task says what it measures and sets its own default.
    max_item_bytes: Optional[int] = ranged(None, ge=1, none="no limit")

    def __post_init__(self) -> None:
        check_ranges(type(self), self, "task.")


class Task(ABC):
    """Base class for tasks; subclasses are dataclass-like and take config fields as kwargs."""

    name: str = "task"
    #: Name of the per-task output folder inside the run dir (e.g. "embeddings").
    output_dir: str = "outputs"
    #: Config keys (under ``task``) that do NOT change what an output means; everything
    #: else in the task group is compared when resuming.
    resume_safe_keys: tuple[str, ...] = ("max_item_bytes",)
    #: True when items share output files (embed's shards hold many rows); False: the journal
    #: refuses to record one output path for two items
    shared_outputs: bool = False

    # ---- controller side -------------------------------------------------------------
    def check(self, backends: frozenset[str]) -> None:
        """Raise ConfigError for a setting that cannot work here (missing tool, bad path).

        ``backends`` are the device backends of the plan's slots ("cuda", "xpu", "cpu").
        """

    @abstractmethod
    def discover(self) -> Iterator[Item | BadItem]:
        """Yield items in a stable order (limit takes the first N)."""

    @abstractmethod
    def model_chain(self, backend: str) -> list[ModelRung]:
        """The fallback chain from task.models, each resolved for a device backend. (A
        models group's chain for a backend is resolved by a task built with ``models`` set
        to it: runner/chains.py.)"""

    def model_problem(self, name: str, backend: str) -> str:
        """Why ``name`` is no model this task can load on ``backend`` at all, or "" (whether
        its files are on this machine is ``model_chain``'s business). A models group naming
        such a model is refused with this reason; the default refuses nothing."""
        return ""

    def worker_env(self) -> dict[str, str]:
        """Extra environment for every worker (set before the worker starts)."""
        return {}

    def finalize(self, ctx: FinalizeContext) -> dict[str, Any]:
        """Write run-level outputs (manifests); return figures for summary.json."""
        return {}

    def output_files(self, output: str) -> list[str]:
        """Every file (relative to the run dir) of an item whose journal output is
        ``output``: what reuse= links into a new run. Default: that one file."""
        return [output]

    # ---- worker side -----------------------------------------------------------------
    @abstractmethod
    def load_model(self, rung: ModelRung, device: str) -> Any:
        """Load one model on ``device`` ("cuda", "xpu" or "cpu": index 0 of the slot)."""

    @abstractmethod
    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        """Run the model on a batch; one result per item, in order."""

    @abstractmethod
    def write(self, items: Sequence[Item], results: Sequence[Any],
              ctx: WriteContext) -> Sequence[str | Written]:
        """Write outputs atomically; return each item's output path relative to the run dir
        (a :class:`Written` to also report copies placed elsewhere or a warning). Per-item
        files are named from ``item.name``, which the journal keeps unique."""

    def item_metrics(self, item: Item, result: Any) -> dict[str, float]:
        """Per-item figures the controller sums per device (e.g. media seconds for RTF)."""
        return {}


def _has_target(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_target(v) for v in value)
    return False


def instantiate_task(config: dict) -> Any:
    """The task object from its (resolved, plain) config: the one path the controller and
    every worker take.

    A flat config -- ``_target_`` naming ``module.Class`` plus plain fields, what every
    task group is -- is a plain import and call: importing hydra costs a worker ~0.2 s of
    CPU, most of a light task's start-up (8 workers on 2 cores: ~1.5 s). Anything else
    (nested ``_target_``, ``_partial_``, ``_args_``, a target that is not module.attr) goes
    through hydra's instantiate as before.
    """
    import importlib

    target = config.get("_target_")
    plain = (isinstance(target, str) and "." in target
             and not any(k.startswith("_") and k != "_target_" for k in config)
             and not any(_has_target(v) for k, v in config.items() if k != "_target_"))
    if plain:
        module, _, name = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            cls = None  # e.g. a nested attribute path: hydra resolves (or explains) it
        if cls is not None:
            return cls(**{k: v for k, v in config.items() if k != "_target_"})
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(config, _convert_="all")
    except InstantiationException as exc:  # a ConfigError stays the one line it is
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise
