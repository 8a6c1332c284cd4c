"""Config schemas: one dataclass per config group, registered in Hydra's ConfigStore.

The YAML files in ``conf/`` pick values; these dataclasses say which keys exist, their
types and what each one means. Every int/float field declares its range
(:func:`runner.tasks.base.ranged`; README, "Settings and their ranges"). Hydra checks types;
:func:`validate` checks values and names the field, the value and the allowed set.

Users type ``resume=latest`` or ``resume=<run dir>`` (``reuse=...``, ``watch=true``);
:func:`rewrite_argv` turns that into ``resume.run=...`` (``reuse.run``, ``watch.enabled``) so
that ``resume.retry_failed=true`` (``reuse.accept_fallback``, ``watch.every_s``) can live
beside it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from runner.ranges import check_ranges, ranged
from runner.tasks.base import ON_CHANGED, ConfigError

BACKENDS = ("auto", "cpu", "cuda", "xpu", "mixed", "all")  # mixed, all: runner/slot_groups.py
STRATEGIES = ("dynamic", "size_balanced", "contiguous", "round_robin")
CHECKPOINT_POLICIES = ("resume", "off")
EXECUTORS = ("local", "ray")
PROGRESS_MODES = ("auto", "rich", "plain", "off")


@dataclass
class DevicesConfig:
    name: str = "cpu"  # the option's name, shown in the plan
    backend: str = "cpu"  # auto | cpu | cuda | xpu | mixed (devices.slots) | all (every card)
    # devices (CPU: worker slots) to use; null = every one found
    count: Optional[int] = ranged(1, ge=1, le=4096, none="every one found")
    # exact device ids (e.g. [1,3]); wins over count
    ids: Optional[list[int]] = ranged(None, ge=0, none="count decides")
    workers_per_device: int = ranged(1, ge=1, le=4096)  # worker processes per device (small models)
    # CPU threads a worker may use; null = cores/slots
    threads_per_worker: Optional[int] = ranged(None, ge=1, le=4096, none="cores / slots")
    # plan more worker slots than runner.devices.slot_maximum allows (CPU: max(8, 4 x cores)
    # slots in all; a card: 8 workers): for a machine you know takes them
    force: bool = False
    # devices=mixed: a list of slot groups, each with the fields above (backend, ids, count,
    # workers_per_device, threads_per_worker) and speed; null for a single-backend option
    slots: Optional[list[Any]] = None
    # devices=all: CPU worker slots beside every CUDA and Arc card found
    cpu_workers: int = ranged(0, ge=0, le=4096)
    # these slots' speed relative to others (size_balanced weighs slots by it until a
    # measured speed is known); 1 = as fast as any
    speed: float = ranged(1.0, gt=0, le=1e6)


@dataclass
class ChunkingConfig:
    strategy: str = "dynamic"  # dynamic | size_balanced | contiguous | round_robin
    prefetch: int = ranged(2, ge=1, le=64)  # batches handed to a worker ahead of the one it is running
    guided_tail: bool = True  # dynamic: the last batches shrink so that slots finish together
    # once the queue is empty, an idle slot runs a copy of the in-flight batch expected to
    # finish last when it would finish it sooner; the first result wins. null = on for
    # dynamic, off for the static strategies
    speculate: Optional[bool] = None


@dataclass
class CheckpointConfig:
    policy: str = "resume"  # resume: keep journal.sqlite; off: no journal, outputs overwritten
    # an item that failed or killed its worker this often is failed
    max_attempts: int = ranged(3, ge=1, le=100)
    # journal commit interval in seconds (a crash redoes at most this much); 0 = every change
    commit_every_s: float = ranged(0.5, ge=0, le=3600)


@dataclass
class ExecutorConfig:
    kind: str = "local"  # local: a process per slot | ray: an actor per slot
    # restarts of one slot after its worker died, then the slot is lost
    max_restarts: int = ranged(3, ge=0, le=1000)
    # after the first Ctrl-C: how long in-flight batches may finish (s); 0 = stop at once
    grace_s: float = ranged(30.0, ge=0)
    # SIGTERM -> SIGKILL deadline when stopping workers (s); 0 = SIGKILL at once
    stop_timeout_s: float = ranged(5.0, ge=0)
    # a worker that has not loaded its model by then (s) is dead
    start_timeout_s: float = ranged(600.0, gt=0)
    # the longest one item may run (s): a batch of n items is stopped after n x this many
    # seconds, its worker killed and the item(s) retried alone / failed; null = no limit
    item_timeout_s: Optional[float] = ranged(None, gt=0, none="no limit")
    address: Optional[str] = None  # ray only: auto | ray://host:port | null (local instance)


@dataclass
class BatchProbeConfig:
    floor: int = ranged(1, ge=1, le=1 << 20)  # batch_size=auto: the first batch size tried
    max: int = ranged(256, ge=1, le=1 << 20)  # batch_size=auto: never probe above this


@dataclass
class ResumeConfig:
    run: Optional[str] = None  # latest | <run dir> | null (a new run)
    retry_failed: bool = False  # also retry items that failed in the run being resumed
    # an item whose input changed since it was done: requeue (make it again) | error (refuse)
    on_changed: str = "requeue"


@dataclass
class ReuseConfig:
    # latest | <run dir> | null: a new run takes over the items an earlier run of the task
    # already made (same id, fingerprint and output-affecting config), linking their files
    run: Optional[str] = None
    accept_fallback: bool = False  # also reuse items an earlier run made with a fallback model


@dataclass
class WatchConfig:
    # watch=true: when the queue drains, look at the input again every every_s and process
    # what is new or changed (files stable across two looks), until Ctrl-C or SIGTERM
    enabled: bool = False
    every_s: float = ranged(10.0, gt=0, le=86400)  # seconds between two looks at the input


@dataclass
class RunnerConfig:
    devices: DevicesConfig = field(default_factory=DevicesConfig)  # where work runs
    task: Any = None  # the task group: _target_ plus the task's own fields
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)  # how items reach workers
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # what survives
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # process mechanics
    resume: ResumeConfig = field(default_factory=ResumeConfig)  # continue an earlier run
    reuse: ReuseConfig = field(default_factory=ReuseConfig)  # a new run over an earlier one's items
    watch: WatchConfig = field(default_factory=WatchConfig)  # keep looking at the input
    # items per batch: an integer >= 1; auto = the largest that fits, probed per slot on real
    # items (CPU slots: the task's default); null = the task's default
    batch_size: Any = None
    batch_probe: BatchProbeConfig = field(default_factory=BatchProbeConfig)  # batch_size=auto
    # per-backend model chains, e.g. {cuda: [large-v3, medium], cpu: [base]} (conf/models/);
    # null = task.models on every backend
    models: Any = None
    # only the first N items (stable order); null = all
    limit: Optional[int] = ranged(None, ge=0, none="all items")
    dry_run: bool = False  # print the plan and stop, importing no accelerator stack
    seed: int = ranged(0, ge=0, le=2**32 - 1)  # seeds torch/numpy/random in every worker
    progress: str = "auto"  # auto (rich on a TTY, plain lines otherwise) | rich | plain | off
    outputs: str = "outputs"  # root of run dirs: <outputs>/<task>/<timestamp>


def _choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not one of {', '.join(map(str, allowed))}")


def validate(cfg: Any) -> None:
    """Check values Hydra's type check cannot; raise ConfigError naming the key, the value
    and what is allowed. Every numeric field is checked against the range its schema
    declares (:func:`runner.tasks.base.check_ranges`); the task group's own fields are
    checked when the task builds its config (``TaskConfig.__post_init__``)."""
    check_ranges(RunnerConfig, cfg)
    d = cfg.devices
    _choice("devices.backend", d.backend, BACKENDS)
    if d.ids is not None:
        if len(d.ids) == 0:
            raise ConfigError("devices.ids=[] must be a non-empty list of ids >= 0 (or null)")
        if len(set(d.ids)) != len(d.ids):
            raise ConfigError(f"devices.ids={list(d.ids)!r} names a device twice")
        if d.backend == "cpu":
            raise ConfigError("devices.ids is for cuda/xpu cards; for CPU set devices.count")
    from runner.slot_groups import check_options

    check_options(d)  # slots (mixed), cpu_workers (all), and each group of devices.slots
    b = cfg.batch_size
    if not (b is None or b == "auto" or (isinstance(b, int) and not isinstance(b, bool)
                                          and 1 <= b <= 1 << 20)):
        raise ConfigError(f"batch_size={b!r} is not allowed: an integer in 1..{1 << 20}, auto "
                          f"(the largest that fits, per slot) or null (the task's default)")
    if cfg.batch_probe.floor > cfg.batch_probe.max:
        raise ConfigError(f"batch_probe.floor={cfg.batch_probe.floor} is above batch_probe.max="
                          f"{cfg.batch_probe.max}: the floor must be <= the max")
    _choice("chunking.strategy", cfg.chunking.strategy, STRATEGIES)
    _choice("checkpoint.policy", cfg.checkpoint.policy, CHECKPOINT_POLICIES)
    _choice("executor.kind", cfg.executor.kind, EXECUTORS)
    _choice("progress", cfg.progress, PROGRESS_MODES)
    _choice("resume.on_changed", cfg.resume.on_changed, ON_CHANGED)
    if cfg.reuse.run is not None and cfg.resume.run is not None:
        raise ConfigError(f"reuse={cfg.reuse.run} makes a new run and resume={cfg.resume.run} "
                          f"continues one: give only one of them")
    if cfg.reuse.run is not None and cfg.checkpoint.policy == "off":
        raise ConfigError("reuse= needs a journal: checkpoint=off keeps none (use checkpoint=resume)")
    if cfg.resume.run is not None and cfg.checkpoint.policy == "off":
        raise ConfigError("resume needs a journal: checkpoint=off keeps none (use checkpoint=resume)")
    if cfg.task is None or "_target_" not in cfg.task:
        raise ConfigError("task has no _target_: choose task=embed|subtitles or name your own class")


# what Hydra's override grammar takes in an unquoted value (OverrideLexer: ASCII letters,
# digits, _-/\\+.$%*@?| and spaces)
_UNQUOTED = re.compile(r"[A-Za-z0-9_\-/\\+.$%*@?| ]*")
_KEY = re.compile(r"[+~]{0,2}[A-Za-z_][\w.\-/@]*")


def quote_value(arg: str) -> str:
    """``key=value`` with a value Hydra's lexer refuses unquoted (a path in any script,
    with ``#``, ``&``, ``'``, brackets, emoji) -> ``key='value'``. Left as typed: values
    already quoted, lists, dicts, sweeps (``,``), interpolations, function calls, and
    values with a quote or backslash (quote those yourself)."""
    key, eq, value = arg.partition("=")
    if (not eq or arg.startswith("-") or not _KEY.fullmatch(key) or not value
            or _UNQUOTED.fullmatch(value) or value[0] in "[{'\"" or "," in value
            or "${" in value or any(c in value for c in "'\"\\") or value.endswith(")")):
        return arg
    return f"{key}='{value}'"


def rewrite_argv(argv: list[str]) -> list[str]:
    """``resume=X`` -> ``resume.run=X`` so that resume.retry_failed can sit beside it; a
    value Hydra would refuse unquoted is quoted (:func:`quote_value`)."""
    out = argv[:1]
    for arg in argv[1:]:
        if arg.startswith("resume=") or arg.startswith("+resume="):
            arg = "resume.run=" + arg.split("=", 1)[1]
        elif arg.startswith(("reuse=", "+reuse=")):
            arg = "reuse.run=" + arg.split("=", 1)[1]
        elif arg.startswith(("watch=", "+watch=")):
            arg = "watch.enabled=" + arg.split("=", 1)[1]
        out.append(quote_value(arg))
    return out


def check_group_options(argv: list[str], conf: Path) -> None:
    """``group=option`` naming an option that is not in ``conf/<group>/`` is a one-line
    ConfigError naming the key, the value and the options, before Hydra prints several lines
    for it. Left to Hydra: values it expands itself (``range(...)``, ``glob(...)``, lists),
    deletions (``~group``), and command lines that add config directories."""
    args = argv[1:]
    if any(a.split("=")[0] in ("--config-dir", "-cd", "--config-path", "-cp")
           or "searchpath" in a for a in args):
        return
    repo = ConfigStore.instance().repo
    for arg in args:
        key, eq, value = arg.partition("=")
        group = key.lstrip("+")
        if (arg.startswith(("-", "~")) or not eq or "/" in group or "." in group
                or not (conf / group).is_dir() or "(" in value or value.startswith("[")):
            continue
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        schemas = {name.rsplit(".", 1)[0] for name in repo.get(group, {})}
        for v in (v.strip() for v in value.split(",")):
            if len(v) > 1 and v[0] == v[-1] and v[0] in "'\"":
                v = v[1:-1]  # Hydra's quoted string: devices='cpu2'
            if v not in options and v not in schemas and v != "null":
                raise ConfigError(f"{group}={v!r} is not an option of {group}: choose one of "
                                  f"{', '.join(options)} (conf/{group}/)")


def register() -> None:
    """Register the schemas; YAML files in conf/ extend them through their defaults list."""
    from runner.tasks.embed import EmbedConfig
    from runner.tasks.subtitles import SubtitlesConfig

    cs = ConfigStore.instance()
    cs.store(name="runner_schema", node=RunnerConfig)
    cs.store(group="devices", name="devices_schema", node=DevicesConfig)
    cs.store(group="chunking", name="chunking_schema", node=ChunkingConfig)
    cs.store(group="checkpoint", name="checkpoint_schema", node=CheckpointConfig)
    cs.store(group="executor", name="executor_schema", node=ExecutorConfig)
    cs.store(group="task", name="embed_schema", node=EmbedConfig)
    cs.store(group="task", name="subtitles_schema", node=SubtitlesConfig)
