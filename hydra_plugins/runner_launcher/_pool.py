"""The device pool of a sweep: one lease per device, its environment and its pins.

The pool comes from the job's own ``devices`` group, resolved exactly as a single run
resolves it (:func:`runner.devices.make_slots` over :func:`runner.devices.discover`, which
makes no GPU context):

* CPU (``cpu2``: two slots): one lease per slot. A job on it is pinned to one CPU worker
  with the slot's thread count (``devices.count=1 devices.workers_per_device=1
  devices.threads_per_worker=<slot threads>``).
* CUDA / XPU (``cuda4``, ``arc2``): one lease per card, however many workers per device the
  group asks for. A job on it is pinned to that card (``devices.ids=[<id>]
  devices.count=1``; its ``workers_per_device`` is kept), so inside the job, runner's own
  executor starts its worker(s) on that card alone.

A lease's ``env`` is the slot's environment (device mask, thread counts) plus
``RUNNER_SWEEP_DEVICE=<label>``; the launcher puts it in place around ``Process.start()``,
so the job process sees only its device from its first instruction. Pins are set in the
job's composed config (not added to its overrides, so ``hydra.job.override_dirname`` and
the job's directory do not depend on which device it drew): ``.hydra/config.yaml`` shows
them, and the job's ``rerun.sh`` repeats them as overrides. An app without a ``devices``
group gets ``max_parallel`` plain leases with no environment and no pins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

LEASE_VARIABLE = "RUNNER_SWEEP_DEVICE"



@dataclass(frozen=True)
class Lease:
    """One device of the pool: at most one job holds it at a time."""

    index: int
    label: str  # cuda:1, xpu:0, cpu:0 (slot:0 for an app without devices)
    backend: Optional[str]
    device_id: Optional[int]
    threads: Optional[int]
    env: dict[str, str] = field(default_factory=dict)  # set before the job process starts
    pins: dict[str, Any] = field(default_factory=dict)  # key -> value set in the job's config


def make_pool(config: DictConfig, max_parallel: Optional[int]) -> list[Lease]:
    """The leases for a sweep over ``config`` (the sweep's composed config)."""
    devices = OmegaConf.select(config, "devices", default=None)
    if not isinstance(devices, DictConfig) or "backend" not in devices:
        return [Lease(i, f"slot:{i}", None, None, None) for i in range(max_parallel or 1)]
    from runner import devices as devices_mod

    inventory = devices_mod.discover(devices_mod.backends_to_probe(str(devices.backend)))
    slots = devices_mod.make_slots(devices, inventory)
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
