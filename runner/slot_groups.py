"""Mixed backends in one run: slot groups (``devices=mixed``) and ``devices=all``.

``devices=mixed`` lists slot groups in ``devices.slots``; each group is one backend and has
the fields a single-backend devices option has, plus its speed::

    devices.slots=[{backend: cuda, ids: [0, 1]}, {backend: xpu, ids: [0]},
                   {backend: cpu, threads_per_worker: 4}]

A group's ``workers_per_device``, ``threads_per_worker`` and ``speed`` default to the
top-level ``devices.*`` values; ``count``/``ids`` are the group's own (a card group with
neither takes every card found, a CPU group with neither is one slot). ``devices=all`` is
the groups discovery finds: every CUDA card, every Intel Arc card, and
``devices.cpu_workers`` CPU slots (one CPU slot when no card is found and it is 0).

Slots are numbered in group order. Each gets its own backend's environment
(:func:`runner.devices._env`: ``CUDA_VISIBLE_DEVICES=<id>`` / ``ZE_AFFINITY_MASK=<id>``, and
``CUDA_VISIBLE_DEVICES=""`` for a CPU slot). Threads not fixed by a group are split: a card
slot feeds its card and keeps max(1, min(4, cores // slots)), as a single-backend card
option does; CPU slots share what the card slots and the fixed groups leave.

Every refusal is one line naming the group (``devices.slots[1] (backend xpu, ids [0]): no
Intel Arc (XPU) card found ...``) or its key (``devices.slots[0].count=0 is out of range``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.devices import (MAX_WORKERS_PER_CARD, Inventory, Slot, _cpu_cores, _env,
                            slot_maximum)
from runner.errors import ConfigError

#: the backends a slot group may name
SLOT_BACKENDS = ("cpu", "cuda", "xpu")
#: the keys of one slot group
GROUP_KEYS = ("backend", "ids", "count", "workers_per_device", "threads_per_worker", "speed")
CARD_NAMES = {"cuda": "NVIDIA (CUDA) card", "xpu": "Intel Arc (XPU) card"}
EXAMPLE = "'devices.slots=[{backend:cuda,ids:[0]},{backend:cpu,threads_per_worker:4}]'"


@dataclass(frozen=True)
class SlotGroup:
    """Slots of one backend, as one group of ``devices.slots`` (or of ``devices=all``) asks."""

    key: str  # the config path its own keys hang under: devices.slots[1] (devices: for all)
    where: str  # how a refusal names it: devices.slots[1] (backend xpu, ids [0])
    backend: str  # cpu | cuda | xpu
    ids: tuple[int, ...] | None  # cards by id; None: count decides
    count: int | None  # cards (CPU: slots); None: every card found (CPU: 1)
    workers_per_device: int  # worker processes per card (CPU: per count)
    threads_per_worker: int | None  # None: split (module docstring)
    speed: float  # relative speed of its slots (Slot.speed)


def _plain(value: Any) -> Any:
    """Hydra's DictConfig/ListConfig as plain dicts and lists (plain values pass)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _fields() -> dict[str, Any]:
    from runner.config import DevicesConfig
    from runner.ranges import numeric_fields

    return {nf.name: nf for nf in numeric_fields(DevicesConfig)}


def _describe(key: str, backend: str, ids: Any, count: Any) -> str:
    asked = (f"ids {list(ids)}" if ids is not None else f"count {count}" if count is not None
             else "one slot" if backend == "cpu" else "every card found")
    return f"{key} (backend {backend}, {asked})"


def _group(i: int, raw: Any, cfg: Any, nf: dict[str, Any]) -> SlotGroup:
    from runner.ranges import range_problem

    key = f"devices.slots[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}={raw!r} is not a slot group: write a mapping with the keys "
                          f"{', '.join(GROUP_KEYS)}, e.g. {{backend: cuda, ids: [0]}}")
    unknown = [k for k in raw if k not in GROUP_KEYS]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown slot group key; allowed "
                          f"{', '.join(GROUP_KEYS)}")
    backend = raw.get("backend")
    if backend is None:
        raise ConfigError(f"{key}.backend is missing: give one of {', '.join(SLOT_BACKENDS)}")
    if backend not in SLOT_BACKENDS:
        hint = " (devices=all takes every card found)" if backend in ("auto", "all") else ""
        raise ConfigError(f"{key}.backend={backend!r} is not one of "
                          f"{', '.join(SLOT_BACKENDS)}{hint}")
    values = {"workers_per_device": cfg.workers_per_device,
              "threads_per_worker": cfg.threads_per_worker, "speed": cfg.speed, **raw}
    for name in ("ids", "count", "workers_per_device", "threads_per_worker", "speed"):
        problem = range_problem(f"{key}.{name}", values.get(name), nf[name])
        if problem:
            raise ConfigError(problem)
    ids, count = values.get("ids"), values.get("count")
    if ids is not None:
        if len(ids) == 0:
            raise ConfigError(f"{key}.ids=[] must be a non-empty list of ids >= 0 (or null)")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{key}.ids={list(ids)!r} names a device twice")
        if backend == "cpu":
            raise ConfigError(f"{key}.ids is for cuda/xpu cards; for CPU set {key}.count")
        if count is not None:
            raise ConfigError(f"{key}.count={count}: give ids or count, not both (ids "
                              f"{list(ids)} already names the cards)")
    return SlotGroup(key, _describe(key, backend, ids, count), backend,
                     tuple(ids) if ids is not None else None, count,
                     values["workers_per_device"], values["threads_per_worker"],
                     float(values["speed"]))


def slot_groups(cfg: Any) -> list[SlotGroup]:
    """The groups of ``devices.slots`` (devices=mixed), each checked: one line naming
    ``devices.slots[i].<key>`` for the first thing wrong."""
    slots = _plain(cfg.slots)
    if slots is None:
        raise ConfigError(f"devices={cfg.name} (devices.backend=mixed) needs devices.slots: a "
                          f"list of slot groups, e.g. {EXAMPLE}")
    if not isinstance(slots, list) or not slots:
        raise ConfigError(f"devices.slots={slots!r} is not a non-empty list of slot groups, "
                          f"e.g. {EXAMPLE}")
    nf = _fields()
    return [_group(i, raw, cfg, nf) for i, raw in enumerate(slots)]


def all_groups(cfg: Any, inventory: Inventory | None) -> list[SlotGroup]:
    """``devices=all``: every CUDA and Arc card ``inventory`` has, then
    ``devices.cpu_workers`` CPU slots (one when there is no card and it is 0)."""
    groups = []
    for backend in ("cuda", "xpu"):
        n = inventory.count(backend) if inventory is not None else 0
        if n:
            groups.append(SlotGroup("devices", f"devices={cfg.name} ({backend}: {n} card(s) "
                                               f"found)", backend, tuple(range(n)), None,
                                    cfg.workers_per_device, cfg.threads_per_worker,
                                    float(cfg.speed)))
    cpu = cfg.cpu_workers or (0 if groups else 1)
    if cpu:
        groups.append(SlotGroup("devices", f"devices.cpu_workers={cfg.cpu_workers}", "cpu", None,
                                cpu, 1, cfg.threads_per_worker, float(cfg.speed)))
    return groups


def all_note(cfg: Any, inventory: Inventory | None) -> str | None:
    """The note a ``devices=all`` plan carries when it found no card (one CPU slot)."""
    if cfg.backend != "all" or cfg.cpu_workers or (
            inventory is not None and (inventory.cuda or inventory.xpu)):
        return None
    return (f"devices={cfg.name}: no CUDA or Intel Arc card found, so one CPU worker slot "
            f"(devices.cpu_workers=N plans N CPU slots)")


def check_options(cfg: Any) -> None:
    """The devices keys that belong to one kind of option: ``slots`` to mixed,
    ``cpu_workers`` to all; ``ids``/``count`` are per group under mixed and found under all.
    A mixed option's groups are checked too (:func:`slot_groups`)."""
    backend = cfg.backend
    if cfg.slots is not None and backend != "mixed":
        raise ConfigError(f"devices.slots is for devices=mixed (devices.backend=mixed), not "
                          f"devices={cfg.name} (backend {backend}); use devices=mixed "
                          f"{EXAMPLE}")
    if cfg.cpu_workers and backend != "all":
        raise ConfigError(f"devices.cpu_workers={cfg.cpu_workers} is for devices=all, not "
                          f"devices={cfg.name} (backend {backend}); under devices=mixed add a "
                          f"group {{backend: cpu, count: {cfg.cpu_workers}}}")
    if backend in ("mixed", "all"):
        for name in ("ids", "count"):
            value = getattr(cfg, name)
            if value is not None:
                shown = list(value) if name == "ids" else value
                fix = (f"set it per group: devices.slots[i].{name}" if backend == "mixed" else
                       "devices=all takes every card found; to choose cards use devices=mixed")
                raise ConfigError(f"devices.{name}={shown} does not apply to devices={cfg.name} "
                                  f"(backend {backend}): {fix}")
    if backend == "mixed":
        slot_groups(cfg)


def _why(inventory: Inventory, backend: str) -> str:
    notes = [n for n in inventory.notes if n.startswith(f"{backend}:")]
    return f" ({'; '.join(notes)})" if notes else ""


def _ids(g: SlotGroup, inventory: Inventory | None) -> list[int]:
    found = inventory.count(g.backend) if inventory is not None else None
    if g.ids is not None:
        ids = list(g.ids)
    elif g.count is not None:
        ids = list(range(g.count))
    else:  # every card found; a dry run that did not look plans one
        ids = list(range(found)) if found is not None else [0]
    if inventory is None:
        return ids
    if not found:
        raise ConfigError(f"{g.where}: no {CARD_NAMES[g.backend]} found{_why(inventory, g.backend)}"
                          f"; drop this group, or add dry_run=true to only see the plan")
    missing = [i for i in ids if i >= found]
    if missing:
        have = ", ".join(f"{g.backend}:{i}" for i in range(found))
        raise ConfigError(f"{g.where}: this machine has {found} {CARD_NAMES[g.backend]}(s) "
                          f"({have}), not {', '.join(f'{g.backend}:{i}' for i in missing)}; fix "
                          f"the group's ids or count, or add dry_run=true to only see the plan")
    return ids


def group_slots(cfg: Any, inventory: Inventory | None) -> list[Slot]:
    """The worker slots of ``devices=mixed`` or ``devices=all``; ``inventory=None`` (a dry run
    of mixed) plans what the groups ask without checking the cards exist."""
    groups = slot_groups(cfg) if cfg.backend == "mixed" else all_groups(cfg, inventory)
    cores = inventory.cpu_cores if inventory is not None else _cpu_cores()
    nodes = inventory.nodes if inventory is not None else 1
    force = bool(getattr(cfg, "force", False))
    planned: list[tuple[SlotGroup, int | None]] = []
    owner: dict[tuple[str, int], str] = {}
    for g in groups:
        if g.backend == "cpu":
            planned += [(g, None)] * ((g.count or 1) * g.workers_per_device * nodes)
            continue
        if not force and g.workers_per_device > MAX_WORKERS_PER_CARD:
            raise ConfigError(f"{g.key}.workers_per_device={g.workers_per_device} is over the "
                              f"maximum of {MAX_WORKERS_PER_CARD} workers per {g.backend} card; "
                              f"lower it, or set devices.force=true")
        for dev in _ids(g, inventory):
            if (g.backend, dev) in owner:
                raise ConfigError(f"{g.where}: {g.backend}:{dev} is already in "
                                  f"{owner[g.backend, dev]}; give each card to one group "
                                  f"(workers_per_device gives a card more workers)")
            owner[g.backend, dev] = g.key
            planned += [(g, dev)] * g.workers_per_device
    cpu_groups = [g for g in groups if g.backend == "cpu"]
    n_cpu = sum(1 for g, _ in planned if g.backend == "cpu")
    most = slot_maximum(cores)
    if not force and n_cpu > most:
        asked = ", ".join(f"{g.where}: {(g.count or 1) * g.workers_per_device * nodes}"
                          for g in cpu_groups)
        where = "devices.slots" if cfg.backend == "mixed" else f"devices={cfg.name}"
        raise ConfigError(f"{where}: {n_cpu} CPU worker slots ({asked}) is over the maximum "
                          f"of {most} for {cores} core(s) (max(8, 4 x cores)); lower the count "
                          f"or workers_per_device, or set devices.force=true")
    card = max(1, min(4, cores // len(planned)))
    fixed = sum(g.threads_per_worker or card for g, _ in planned
                if g.backend != "cpu" or g.threads_per_worker)
    free = sum(1 for g, _ in planned if g.backend == "cpu" and not g.threads_per_worker)
    share = max(1, (cores - fixed) // free) if free else 1
    slots = []
    for g, dev in planned:
        threads = g.threads_per_worker or (share if g.backend == "cpu" else card)
        i = len(slots)
        slots.append(Slot(i, g.backend, dev, threads,
                          _env(i, None if g.backend == "cpu" else g.backend, dev, threads),
                          g.speed, g.key if g.key != "devices" else f"devices={cfg.name}"))
    return slots
