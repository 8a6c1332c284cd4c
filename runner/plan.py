"""The plan: pure data saying what a run will do, written as plan.yaml before it starts.

:func:`build` makes it from the run context and the journal (after discovery): it recovers
the journal, lets the scheduler assign the work, and writes plan.yaml. ``dry_run=true``
prints :meth:`Plan.render` and stops; nothing here imports torch. Each slot says its
backend, the devices setting that made it (a mixed plan has several groups), its threads,
speed and environment, and the chain of models it will walk; the plan says where each
backend's chain comes from (the models group, or task.models).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import yaml
from omegaconf import OmegaConf

from runner import chains as chains_mod
from runner.devices import Inventory, Slot
from runner.journal import Journal
from runner.rundir import atomic_write_text
from runner.scheduler import Scheduler, page_size
from runner.tasks.base import ModelRung

if TYPE_CHECKING:
    from runner.context import RunContext


@dataclass(frozen=True)
class SlotPlan:
    index: int
    device: str  # cuda:1, xpu:0, cpu:0
    backend: str  # cpu | cuda | xpu (a mixed plan has several)
    device_id: int | None
    group: str  # the devices setting that made it: devices=cpu2, devices.slots[1]
    threads: int
    speed: float  # relative speed the scheduler starts from (devices.speed / the group's)
    env: dict[str, str]  # exactly what the worker process starts with (beyond the parent's)
    model: str  # the rung it will start on
    chain: list[str]  # the models it may walk, in order (its backend's available rungs)
    planned_items: int | None  # static strategies: how many items it is given
    planned_cost: float | None


@dataclass(frozen=True)
class Plan:
    task: str
    target: str
    input: str
    devices: str  # the devices option chosen (auto, cpu2, cuda4, ...)
    backend: str  # as resolved; a mixed plan joins its backends in slot order: cuda+xpu+cpu
    slots: tuple[SlotPlan, ...]
    chain: dict[str, list[dict]]  # backend -> rungs (name, source, available, reason)
    # backend -> where its chain comes from: models.cuda (models=whisper_ladder) | task.models
    chain_source: dict[str, str]
    batch_size: int
    chunking: str
    prefetch: int
    items: dict[str, Any]  # count, total_cost, longest_cost, failed_at_discovery, already_done
    checkpoint: dict[str, Any]  # policy, max_attempts, journal
    executor: dict[str, Any]
    run_dir: str
    outputs: str
    resume: dict[str, Any] = field(default_factory=dict)
    discovery: list[str] = field(default_factory=list)  # how devices were found
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)

    def render(self) -> str:
        """The plan as a person reads it."""
        it = self.items
        lines = [
            f"plan for task={self.task} ({self.target})",
            f"  input     {self.input}",
            f"  items     {it['count']} to do (cost {it['total_cost']:.1f}, longest "
            f"{it['longest_cost']:.1f}); {it['already_done']} already done; "
            f"{it['failed_at_discovery']} bad at discovery",
            f"  devices   {self.devices} -> {self.backend}, {len(self.slots)} worker slot(s)",
            f"  chunking  {self.chunking}, batch_size {self.batch_size}, prefetch {self.prefetch}",
            f"  journal   {self.checkpoint['policy']}: {self.checkpoint['journal']} "
            f"(max_attempts {self.checkpoint['max_attempts']})",
            f"  outputs   {self.outputs}",
            f"  found     {'; '.join(self.discovery)}",
            "  slots:",
        ]
        groups = len({s.group for s in self.slots}) > 1
        for s in self.slots:
            env = " ".join(f"{k}={v!r}" if v == "" else f"{k}={v}" for k, v in s.env.items())
            share = (f", {s.planned_items} items / cost {s.planned_cost:.1f}"
                     if s.planned_items is not None else "")
            extra = (f" speed={s.speed:g}" if s.speed != 1 else "") + (
                f" ({s.group})" if groups else "")
            lines.append(f"    [{s.index}] {s.device:<8} threads={s.threads} model={s.model}"
                         f"{share}{extra}")
            lines.append(f"        chain: {' > '.join(s.chain) or 'none available'}")
            lines.append(f"        env: {env}")
        lines.append("  model chain:")
        for backend, rungs in self.chain.items():
            lines.append(f"    {backend:<5} from {self.chain_source.get(backend, 'task.models')}")
            for r in rungs:
                mark = "ok  " if r["available"] else "SKIP"
                lines.append(f"    {backend:<5} {mark} {r['name']:<24} {r['reason']}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


def slot_plans(slots: Sequence[Slot], chains: dict[str, list[ModelRung]],
               load: dict[int, tuple[int, float]]) -> tuple[SlotPlan, ...]:
    out = []
    for s in slots:
        walk = [r.name for r in chains[s.backend] if r.available]
        n, c = load.get(s.index, (None, None))
        out.append(SlotPlan(s.index, s.label, s.backend, s.device_id,
                            s.group or f"devices ({s.backend})", s.threads, s.speed, dict(s.env),
                            walk[0] if walk else "none available", walk, n, c))
    return tuple(out)


def backends_of(slots: Sequence[Slot]) -> str:
    """The plan's backend: ``cpu``, or a mixed plan's backends in slot order: ``cuda+xpu+cpu``."""
    return "+".join(dict.fromkeys(s.backend for s in slots))


def chain_sources(cfg: Any, backends: Sequence[str]) -> dict[str, str]:
    """backend -> where its chain comes from (the models group or task.models)."""
    group = chains_mod.group_chains(cfg.models if "models" in cfg else None)
    name = chains_mod.group_name()
    return {b: chains_mod.label(b, group, name) for b in backends}


def chain_dict(chains: dict[str, list[ModelRung]]) -> dict[str, list[dict]]:
    return {b: [asdict(r) for r in rungs] for b, rungs in chains.items()}


def inventory_notes(inventory: Inventory | None) -> list[str]:
    if inventory is None:
        return ["dry run: devices were not probed; the plan shows what was asked for"]
    return [f"cpu: {inventory.cpu_cores} core(s)", *inventory.notes]


def build(ctx: "RunContext", journal: Journal,
          found: dict[str, int]) -> tuple[Scheduler, dict[int, tuple[int, float]], Plan]:
    """After discovery: recover the journal (running -> pending), assign the work with the
    chosen chunking, write plan.yaml. ``found``: intake's counts (repeats, renames, changes)."""
    cfg = ctx.cfg
    recovered = journal.recover(cfg.resume.retry_failed)
    before = journal.counts()
    sort_pages = bool(getattr(ctx.task, "sort_batches_by_cost", False))
    scheduler = Scheduler(journal, cfg.chunking.strategy, len(ctx.slots), ctx.batch_size,
                          page=page_size(ctx.batch_size, sort_pages), sort_pages=sort_pages,
                          guided_tail=cfg.chunking.guided_tail,
                          speeds=[float(getattr(s, "speed", 1.0)) for s in ctx.slots])
    load = scheduler.plan()
    count, total_cost, longest = journal.todo_stats()
    journal.commit()
    plan = Plan(
        task=ctx.task_cfg.get("name", ctx.task.name), target=ctx.task_cfg["_target_"],
        input=str(ctx.task_cfg.get("input", "")), devices=cfg.devices.name,
        backend=backends_of(ctx.slots), slots=slot_plans(ctx.slots, ctx.chains, load),
        chain=chain_dict(ctx.chains), chain_source=chain_sources(cfg, list(ctx.chains)),
        batch_size=ctx.batch_size,
        chunking=cfg.chunking.strategy, prefetch=cfg.chunking.prefetch,
        items={"count": count, "total_cost": total_cost, "longest_cost": longest,
               "failed_at_discovery": before["failed"], "already_done": before["done"],
               **recovered, **found},
        checkpoint={"policy": cfg.checkpoint.policy, "max_attempts": cfg.checkpoint.max_attempts,
                    "journal": str(ctx.rundir.journal) if journal.path else "in memory"},
        executor=OmegaConf.to_container(cfg.executor), run_dir=str(ctx.rundir.root),
        outputs=str(ctx.rundir.output(ctx.task.output_dir)), resume=dict(ctx.resume),
        discovery=inventory_notes(ctx.inventory), warnings=list(ctx.warnings))
    atomic_write_text(ctx.rundir.plan, plan.to_yaml())
    return scheduler, load, plan
