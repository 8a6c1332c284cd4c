"""Devices: discovery without a GPU context, and worker slots with their environment.

Discovery never imports torch in the controller:

* CUDA: ``nvidia-smi --query-gpu`` (NVML underneath, no CUDA context); without nvidia-smi,
  the entries of ``/proc/driver/nvidia/gpus``.
* Intel Arc (XPU): only when sysfs shows an Intel display device (vendor 0x8086 under
  ``/sys/class/drm``), a short-lived subprocess asks ``torch.xpu.device_count()`` — Level
  Zero's own numbering is what ``ZE_AFFINITY_MASK`` uses, and sysfs order need not match it.
* CPU: ``os.sched_getaffinity`` (the cores this process may use).

A slot is one worker process: its backend, device id, thread count, relative speed and the
exact environment it starts with. One run may mix backends: ``devices=mixed`` lists slot
groups in ``devices.slots`` (:func:`slot_groups` checks each), ``devices=all`` takes every
CUDA and Arc card found plus ``devices.cpu_workers`` CPU slots; each slot gets its own
backend's variables, and CPU threads are split so that card slots keep a few each and CPU
slots share the rest (:func:`_group_slots`). More slots than a machine sensibly takes (:func:`slot_maximum`
CPU slots, :data:`MAX_WORKERS_PER_CARD` per card) are refused unless ``devices.force``. The isolation variable (``CUDA_VISIBLE_DEVICES=<id>`` or
``ZE_AFFINITY_MASK=<id>``, a plain ordinal: ``0.0`` is invalid under the FLAT hierarchy) is
part of that environment, so the worker sees its card as index 0 before torch is imported.
``RUNNER_SLOT=<index>`` is there too, so a task can tell its workers apart.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from runner.tasks.base import ConfigError

MASK_VARIABLE = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}


@dataclass(frozen=True)
class Inventory:
    """What this machine has, as discovered (recorded in the run dir)."""

    cpu_cores: int
    cuda: tuple[str, ...] = ()  # one name per card, index = device id
    xpu: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # how each was found, or why not
    nodes: int = 1  # machines (a Ray cluster has several; devices groups are per node)

    def count(self, backend: str) -> int:
        return {"cuda": len(self.cuda), "xpu": len(self.xpu)}.get(backend, self.cpu_cores)


@dataclass(frozen=True)
class Slot:
    """One worker process: where it runs and the environment it is started with."""

    index: int  # 0..n-1, names logs/worker-<index>.log
    backend: str  # cpu | cuda | xpu
    device_id: int | None  # the card's id on the machine; None for CPU
    threads: int  # CPU threads (OMP_NUM_THREADS, torch.set_num_threads)
    env: dict[str, str] = field(default_factory=dict)  # set before the process starts
    # relative speed (devices.speed, or its group's speed): the scheduler weighs slots by it
    # until it has measured them; 1 = as fast as any
    speed: float = 1.0
    group: str = ""  # the setting that made it: devices=cpu2, devices.slots[1]

    @property
    def label(self) -> str:
        """How humans and the journal name the device: cuda:1, xpu:0, cpu:0."""
        return f"{self.backend}:{self.device_id if self.device_id is not None else self.index}"

    @property
    def torch_device(self) -> str:
        """The device as the worker addresses it: always index 0 of what it can see."""
        return self.backend


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _discover_cuda(notes: list[str]) -> tuple[str, ...]:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout
            cards = tuple(line.split(",", 1)[1].strip() for line in out.splitlines() if "," in line)
            notes.append(f"cuda: {len(cards)} card(s) from nvidia-smi")
            return cards
        except (subprocess.SubprocessError, OSError) as exc:
            notes.append(f"cuda: nvidia-smi failed ({exc.__class__.__name__})")
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        cards = tuple(sorted(p.name for p in proc.iterdir()))
        notes.append(f"cuda: {len(cards)} card(s) from {proc}")
        return cards
    notes.append("cuda: no NVIDIA driver found")
    return ()


def _intel_gpu_in_sysfs() -> bool:
    for vendor in Path("/sys/class/drm").glob("card*/device/vendor"):
        try:
            if vendor.read_text().strip() == "0x8086":
                return True
        except OSError:
            continue
    return False


def _discover_xpu(notes: list[str]) -> tuple[str, ...]:
    if not _intel_gpu_in_sysfs():
        notes.append("xpu: no Intel GPU in /sys/class/drm")
        return ()
    probe = ("import torch; n = torch.xpu.device_count() if hasattr(torch, 'xpu') else 0\n"
             "print('\\n'.join(torch.xpu.get_device_name(i) for i in range(n)))")
    try:
        # machine ids, as nvidia-smi gives for CUDA: a sweep job's own mask must not hide cards
        env = {k: v for k, v in os.environ.items() if k != "ZE_AFFINITY_MASK"}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=120, check=True, env=env).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        notes.append(f"xpu: torch.xpu probe failed ({exc.__class__.__name__})")
        return ()
    cards = tuple(line for line in out.splitlines() if line.strip())
    notes.append(f"xpu: {len(cards)} card(s) from a torch.xpu probe subprocess")
    return cards


def backends_to_probe(backend: str) -> tuple[str, ...]:
    """Which accelerators ``devices.backend`` asks discovery to look for (mixed: see
    :func:`probe_for`, which reads the groups)."""
    return {"auto": ("cuda", "xpu"), "cuda": ("cuda",), "xpu": ("xpu",), "all": ("cuda", "xpu"),
            "mixed": ("cuda", "xpu")}.get(backend, ())


def probe_for(cfg) -> tuple[str, ...]:
    """The accelerators a devices config needs discovery to look for: for ``mixed``, the
    card backends its groups name (a CPU-only mix probes nothing)."""
    if cfg.backend != "mixed":
        return backends_to_probe(cfg.backend)
    from runner.slot_groups import slot_groups

    named = {g.backend for g in slot_groups(cfg)}
    return tuple(b for b in ("cuda", "xpu") if b in named)


def discover(backends: tuple[str, ...] = ("cuda", "xpu"), *, every: bool = False) -> Inventory:
    """Find what the machine has; only the accelerator kinds in ``backends`` are probed.
    ``auto`` wants CUDA else XPU, so the XPU probe (a torch import in a subprocess) is
    skipped when CUDA cards were found, unless ``every`` (devices=all, mixed: both kinds)."""
    notes: list[str] = []
    cuda = _discover_cuda(notes) if "cuda" in backends else ()
    xpu = _discover_xpu(notes) if "xpu" in backends and (every or not cuda) else ()
    return Inventory(cpu_cores=_cpu_cores(), cuda=cuda, xpu=xpu, notes=tuple(notes))


def resolve_backend(requested: str, inventory: Inventory | None) -> str:
    """``auto``: all CUDA, else all XPU, else CPU (a dry run without inventory says cpu)."""
    if requested != "auto":
        return requested
    if inventory is None:
        return "cpu"
    if inventory.cuda:
        return "cuda"
    if inventory.xpu:
        return "xpu"
    return "cpu"


def _device_ids(cfg, backend: str, inventory: Inventory | None) -> list[int]:
    found = inventory.count(backend) if inventory is not None else None
    if cfg.ids is not None:
        ids = list(cfg.ids)
    elif cfg.count is not None:
        ids = list(range(cfg.count))
    elif found is not None:
        ids = list(range(found))
    else:  # dry run of an "all you find" group without looking
        ids = [0]
    if inventory is not None and backend != "cpu":
        missing = [i for i in ids if i >= found]
        if missing:
            names = ", ".join(f"{backend}:{i}" for i in range(found)) or "none"
            raise ConfigError(
                f"devices={cfg.name} asks for {backend} device(s) {ids} but this machine has "
                f"{found} ({names}); pick another devices group, set devices.ids, or add "
                f"dry_run=true to only see the plan")
    return ids


#: the most worker processes one card takes without devices.force: each holds its own
#: context and model copy in the card's memory, and past this the card is time-sliced anyway
MAX_WORKERS_PER_CARD = 8


def slot_maximum(cores: int) -> int:
    """The most CPU worker slots one machine takes without ``devices.force``: max(8, 4 x
    cores). Each slot is a process with its own model copy; beyond a few per core they only
    contend (the scheduling bench runs 8 slots on 2 cores)."""
    return max(8, 4 * cores)


def _check_slot_count(cfg, backend: str, cores: int, nodes: int) -> None:
    """One line naming the setting when a devices config asks for more worker slots than
    this machine sensibly takes (unless ``devices.force=true``)."""
    if getattr(cfg, "force", False):
        return
    per = cfg.workers_per_device
    if backend == "cpu":
        count = cfg.count if cfg.count is not None else 1
        most = slot_maximum(cores)
        if count * per > most:
            where = f"{cores} core(s)" + (f", per node of {nodes}" if nodes > 1 else "")
            raise ConfigError(
                f"devices.count={count} x devices.workers_per_device={per} = {count * per} "
                f"CPU worker slots is over the maximum of {most} for {where} (max(8, 4 x "
                f"cores)); lower devices.count or devices.workers_per_device, or set "
                f"devices.force=true")
    elif per > MAX_WORKERS_PER_CARD:
        raise ConfigError(
            f"devices.workers_per_device={per} is over the maximum of {MAX_WORKERS_PER_CARD} "
            f"workers per {backend} card; lower it, or set devices.force=true")


def make_slots(cfg, inventory: Inventory | None) -> list[Slot]:
    """The worker slots for a devices config; ``inventory=None`` plans without checking the
    devices exist (the slot maximum is checked either way). ``mixed`` and ``all`` (several
    backends) are planned by :func:`runner.slot_groups.group_slots`."""
    backend = resolve_backend(cfg.backend, inventory)
    if backend in ("mixed", "all"):
        from runner.slot_groups import group_slots

        return group_slots(cfg, inventory)
    cores = inventory.cpu_cores if inventory is not None else _cpu_cores()
    per = cfg.workers_per_device
    nodes = inventory.nodes if inventory is not None else 1
    speed = float(getattr(cfg, "speed", 1.0))
    group = f"devices={getattr(cfg, 'name', backend)}"
    _check_slot_count(cfg, backend, cores, nodes)
    if backend == "cpu":
        n = (cfg.count if cfg.count is not None else 1) * per * nodes
        threads = cfg.threads_per_worker or max(1, cores // n)
        return [Slot(i, "cpu", None, threads, _env(i, None, None, threads), speed, group)
                for i in range(n)]
    ids = _device_ids(cfg, backend, inventory)
    threads = cfg.threads_per_worker or max(1, min(4, cores // (len(ids) * per)))
    slots = []
    for dev in ids:
        for _ in range(per):
            slots.append(Slot(len(slots), backend, dev, threads,
                              _env(len(slots), backend, dev, threads), speed, group))
    return slots


def _env(index: int, backend: str | None, device_id: int | None, threads: int) -> dict[str, str]:
    env = {
        "RUNNER_SLOT": str(index),  # the worker's slot: lets a task tell its workers apart
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        # HF tokenizers (Rust, a rayon pool) get the same thread budget as torch: parallel
        # with more than one thread (bare encode() tokenises in parallel too), off with one.
        "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false",
        "RAYON_NUM_THREADS": str(threads),
    }
    if backend is None:  # CPU worker: no accelerator visible at all
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env[MASK_VARIABLE[backend]] = str(device_id)
        if backend == "cuda":
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # ids mean what nvidia-smi shows
    return env
