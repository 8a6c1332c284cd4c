"""The device pool of a sweep: one lease per job slot, its environment and its pins.

Where the pool comes from (``hydra.launcher.devices``):

* ``null`` (the default): the app's own ``devices`` group when the app is runner, or its
  ``devices`` node has runner's schema (backend, ids, count, workers_per_device,
  threads_per_worker); otherwise ``auto``. With runner's group the pool is resolved exactly
  as a single run resolves it (:func:`runner.devices.make_slots` over
  :func:`runner.devices.discover`, which makes no GPU context):

  - CPU (``cpu2``: two slots): one lease per slot. A job on it is pinned to one CPU worker
    with the slot's thread count (``devices.count=1 devices.workers_per_device=1
    devices.threads_per_worker=<slot threads>``).
  - CUDA / XPU (``cuda4``, ``arc2``): one lease per card, however many workers per device
    the group asks for. A job on it is pinned to that card (``devices.ids=[<id>]
    devices.count=1``; its ``workers_per_device`` is kept).

  Pins are set in the job's composed config (not in its overrides, so the job's directory
  does not depend on which device it drew); only runner's own group is ever pinned.
* ``auto | cuda | xpu | cpu``: the launcher's own pool, for any Hydra app. ``auto``: every
  CUDA card nvidia-smi lists, else every Intel GPU, else the CPU. ``hydra.launcher.ids``
  picks cards; ``hydra.launcher.jobs_per_device`` jobs share a card. The CPU is one slot per
  job at once: ``max_parallel`` of them (null: ``jobs_per_device``). Nothing in the job's
  config changes: the job gets the card's mask (``CUDA_VISIBLE_DEVICES`` /
  ``ZE_AFFINITY_MASK``; ``CUDA_VISIBLE_DEVICES=`` on CPU) and, only when
  ``hydra.launcher.threads_per_job`` is set, ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``.

Every lease's ``env`` also has ``RUNNER_SWEEP_DEVICE=<label>``; the launcher puts it in
place around ``Process.start()``, so the job process sees only its device from its first
instruction. A pool that cannot be made is one line (:class:`PoolError`) before any job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

LEASE_VARIABLE = "RUNNER_SWEEP_DEVICE"
POOL_KINDS = ("auto", "cuda", "xpu", "cpu")
RUNNER_DEVICES_KEYS = ("backend", "ids", "count", "workers_per_device", "threads_per_worker")


class PoolError(CompactHydraException):
    """A device pool that cannot be made; Hydra prints the message as one line."""


@dataclass(frozen=True)
class Lease:
    """One job slot of the pool: at most one job holds it at a time."""

    index: int
    label: str  # cuda:1, xpu:0, cpu:0 (slot:0 for an app without devices)
    backend: Optional[str]
    device_id: Optional[int]
    threads: Optional[int]
    env: dict[str, str] = field(default_factory=dict)  # set before the job process starts
    pins: dict[str, Any] = field(default_factory=dict)  # key -> value set in the job's config


def uses_runner_devices(config: DictConfig, task_function: Any = None) -> bool:
    """The app is runner, or has runner's ``devices`` group (every key of its schema)."""
    devices = OmegaConf.select(config, "devices", default=None)
    if not isinstance(devices, DictConfig):
        return False
    if getattr(task_function, "__module__", None) == "runner.app":
        return "backend" in devices
    return all(k in devices for k in RUNNER_DEVICES_KEYS)


def make_pool(config: DictConfig, max_parallel: Optional[int], kind: Optional[str] = None,
              ids: Any = None, jobs_per_device: int = 1, threads_per_job: Optional[int] = None,
              task_function: Any = None) -> list[Lease]:
    """The leases for a sweep over ``config`` (the sweep's composed config)."""
    if kind is None:
        if uses_runner_devices(config, task_function):
            return _runner_pool(config, max_parallel)
        if task_function is None and OmegaConf.select(config, "devices", default=None) is None:
            return [Lease(i, f"slot:{i}", None, None, None) for i in range(max_parallel or 1)]
        kind = "auto"
    return own_pool(kind, max_parallel, ids, jobs_per_device, threads_per_job)


def own_pool(kind: str, max_parallel: Optional[int], ids: Any, jobs_per_device: int,
             threads_per_job: Optional[int]) -> list[Lease]:
    """The launcher's own pool (``hydra.launcher.devices=auto|cuda|xpu|cpu``)."""
    from runner import devices as devices_mod

    inv = devices_mod.discover(devices_mod.backends_to_probe(kind)) if kind != "cpu" else None
    backend = devices_mod.resolve_backend(kind, inv) if inv is not None else "cpu"
    threads = {"OMP_NUM_THREADS": str(threads_per_job),
               "MKL_NUM_THREADS": str(threads_per_job)} if threads_per_job else {}
    leases: list[Lease] = []
    if backend == "cpu":
        if ids is not None:
            raise PoolError(f"hydra.launcher.ids={list(ids)} picks cards, but the pool is the "
                            f"CPU (hydra.launcher.devices={kind}); drop ids or set "
                            f"hydra.launcher.devices=cuda or xpu")
        for i in range(max_parallel or jobs_per_device):
            leases.append(Lease(i, f"cpu:{i}", "cpu", None, threads_per_job,
                                {"CUDA_VISIBLE_DEVICES": "", **threads,
                                 LEASE_VARIABLE: f"cpu:{i}"}))
        return leases
    found = inv.count(backend)
    if not found:
        where = "nvidia-smi lists none" if backend == "cuda" else "no Intel GPU was found"
        raise PoolError(f"hydra.launcher.devices={kind}: this machine has no {backend} device "
                        f"({where}); use hydra.launcher.devices=cpu or auto")
    chosen = list(range(found)) if ids is None else [int(i) for i in ids]
    missing = [i for i in chosen if not 0 <= i < found]
    if missing or not chosen:
        raise PoolError(f"hydra.launcher.ids={chosen} names {backend} device(s) {missing or '[]'}"
                        f" but this machine has {found} ({', '.join(f'{backend}:{i}' for i in range(found))})")
    mask = devices_mod.MASK_VARIABLE[backend]
    for dev in chosen:
        for _ in range(jobs_per_device):
            label = f"{backend}:{dev}"
            env = {mask: str(dev), **threads, LEASE_VARIABLE: label}
            if backend == "cuda":
                env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # ids mean what nvidia-smi shows
            leases.append(Lease(len(leases), label, backend, dev, threads_per_job, env))
    # round-robin order: the first jobs go to different cards
    leases.sort(key=lambda lease: (lease.index % jobs_per_device, lease.index))
    leases = [Lease(i, x.label, x.backend, x.device_id, x.threads, x.env) for i, x in enumerate(leases)]
    return leases[:max_parallel] if max_parallel else leases


def _runner_pool(config: DictConfig, max_parallel: Optional[int]) -> list[Lease]:
    from runner import devices as devices_mod
    from runner.errors import ConfigError

    devices = config.devices
    try:
        inventory = devices_mod.discover(devices_mod.backends_to_probe(str(devices.backend)))
        slots = devices_mod.make_slots(devices, inventory)
    except ConfigError as exc:
        raise PoolError(str(exc)) from None
    leases: list[Lease] = []
    if slots[0].backend == "cpu":
        for s in slots:
            pins = {"devices.backend": "cpu", "devices.ids": None, "devices.count": 1,
                    "devices.workers_per_device": 1, "devices.threads_per_worker": s.threads}
            leases.append(Lease(len(leases), f"cpu:{s.index}", "cpu", None, s.threads,
                                {**s.env, LEASE_VARIABLE: f"cpu:{s.index}"}, pins))
    else:
        seen: set[int] = set()
        for s in slots:
            if s.device_id in seen:
                continue
            seen.add(s.device_id)
            pins = {"devices.backend": s.backend, "devices.ids": [s.device_id],
                    "devices.count": 1, "devices.threads_per_worker": s.threads}
            leases.append(Lease(len(leases), s.label, s.backend, s.device_id, s.threads,
                                {**s.env, LEASE_VARIABLE: s.label}, pins))
    return leases[:max_parallel] if max_parallel else leases


def describe(leases: list[Lease]) -> str:
    return ", ".join(lease.label for lease in leases)
