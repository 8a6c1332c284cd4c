"""The run context: what one job carries from Hydra's composed config to its report.

:func:`prepare` turns the composed config into a :class:`RunContext` -- the run dir, the task,
the devices and their worker slots, the model chain per backend, the batch size, whether
this is a resume -- checking every setting on the way (a ConfigError names the one that
cannot work). Nothing here imports torch or creates a GPU context. The app then hands this
one frozen object to discovery, planning, the executor and the report, instead of relaying
a dozen arguments.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from runner import config as config_mod
from runner import devices as devices_mod
from runner import oom
from runner import chains as chains_mod
from runner import provenance, resume as resume_mod
from runner import slot_groups
from runner.devices import Inventory, Slot
from runner.errors import ConfigError
from runner.messages import WorkerSpec
from runner.rundir import RunDir, atomic_write_json
from runner.runlock import RunLock
from runner.tasks.base import ModelRung, Task, instantiate_task

log = logging.getLogger("runner")


@dataclass(frozen=True)
class RunContext:
    """One job, resolved: everything the steps after composition need."""

    cfg: DictConfig  # the composed config (validated)
    argv: tuple[str, ...]  # the command line, for versions.json
    overrides: tuple[str, ...]  # Hydra's task overrides, for the resume command
    rundir: RunDir
    task: Task  # instantiated in the controller (check, discover, model_chain, finalize)
    task_cfg: dict  # the task group, resolved: what every worker instantiates again
    inventory: Inventory | None  # the devices found (None: a dry run did not probe)
    slots: tuple[Slot, ...]  # one per worker, each with its full environment (task's included)
    chains: dict[str, list[ModelRung]]  # backend -> the fallback chain as resolved there
    warnings: tuple[str, ...]  # models skipped, and why
    batch_size: int  # items per dispatched call (batch_size=auto: runner.oom.call_size)
    resume: dict  # {} for a new run; when, overrides, retry_failed for a resume
    lock: RunLock  # this controller's hold on the run dir (released when the job ends)

    def spec(self, slot: Slot, incarnation: int) -> WorkerSpec:
        """What the worker of ``slot`` is spawned with: its batch size, and with
        ``batch_size=auto`` on an accelerator its probe bounds (runner.oom.slot_batch)."""
        start, probe = oom.slot_batch(self.cfg.batch_size, self.cfg.batch_probe.floor,
                                      self.cfg.batch_probe.max,
                                      getattr(self.task, "default_batch_size", 1), slot.backend)
        return WorkerSpec(slot, incarnation, self.task_cfg, tuple(self.chains[slot.backend]),
                          start, str(self.rundir.root),
                          str(self.rundir.worker_log(slot.index)), self.cfg.seed, probe=probe)

    @property
    def resume_command(self) -> str:
        """The command that resumes this run (printed when it stops early)."""
        return " ".join(["python -m runner",
                         *[shlex.quote(a) for a in self.overrides if not a.startswith("resume")],
                         f"resume={shlex.quote(str(self.rundir.root))}"])


def _inventory(cfg: DictConfig) -> Inventory | None:
    d = cfg.devices
    if cfg.dry_run and d.backend in ("auto", "all") and d.ids is None:
        # auto and all must plan what a real run would get: nvidia-smi looks without
        # importing torch; the XPU probe needs torch (in a subprocess), so a dry run skips it.
        found = devices_mod.discover(("cuda",))
        return _noted(cfg, dataclasses.replace(found, notes=found.notes + (
            "xpu: not probed in a dry run (the probe imports torch in a subprocess)",)))
    if cfg.dry_run:  # (mixed too: a dry run plans what its groups ask, on any machine)
        return None
    if cfg.executor.kind == "ray" and cfg.executor.address:
        from runner.executor_ray import cluster_inventory  # slots from the cluster's resources

        return _noted(cfg, cluster_inventory(cfg.executor.address))
    if d.backend in ("mixed", "all"):  # both card kinds, where auto stops at CUDA
        return _noted(cfg, devices_mod.discover(devices_mod.probe_for(d), every=True))
    return devices_mod.discover(devices_mod.backends_to_probe(d.backend))


def _noted(cfg: DictConfig, inventory: Inventory) -> Inventory:
    """devices=all that found no card says so (plan.yaml's discovery, the dry run, the log)."""
    note = slot_groups.all_note(cfg.devices, inventory)
    if note is None:
        return inventory
    log.info(note)
    return dataclasses.replace(inventory, notes=inventory.notes + (note,))


def _chains(task: Task, task_cfg: dict, backends: list[str], group: dict[str, list[str]],
            overrides: tuple[str, ...]) -> tuple[dict[str, list[ModelRung]], tuple[str, ...]]:
    """backend -> its chain: the models group's for a backend it names, else task.models
    (runner/chains.py); warnings: models skipped, a typed task.models the group shadows."""
    name = chains_mod.group_name()
    chains, warnings = chains_mod.resolve(task, task_cfg, backends, group, name)
    shadowed = chains_mod.shadowed(overrides, backends, group, name)
    for w in shadowed:
        log.warning(w)
    return chains, warnings + shadowed


def prepare(cfg: DictConfig, argv: list[str]) -> RunContext:
    """Check the config, make the run dir, the task, the slots and the model chains."""
    config_mod.validate(cfg)
    group = chains_mod.group_chains(cfg.models)  # the models group's chains, checked
    if cfg.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor=ray needs Ray: pip install 'runner[ray]' (or pip install ray), "
                          "or use executor=local")
    hydra_cfg = HydraConfig.get()
    rundir = RunDir(Path(hydra_cfg.runtime.output_dir))
    lock = RunLock.acquire(rundir.lock)  # one controller per run dir (a no-op if main took it)
    rundir.make()
    provenance.write_run_files(rundir, cfg)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task = instantiate_task(task_cfg)
    inventory = _inventory(cfg)
    slots = devices_mod.make_slots(cfg.devices, inventory)
    backends = list(dict.fromkeys(s.backend for s in slots))  # in slot order
    task.check(frozenset(backends))
    chains, warnings = _chains(task, task_cfg, backends, group, tuple(hydra_cfg.overrides.task))
    extra_env = task.worker_env()  # the task's own variables join every slot's, once
    slots = tuple(dataclasses.replace(s, env={**s.env, **extra_env}) for s in slots)
    resume: dict[str, Any] = {}
    if cfg.resume.run:
        old = json.loads(rundir.task_config.read_text())
        resume_mod.check_compatible(old, task_cfg, tuple(task.resume_safe_keys))
        chains_mod.check_resume(rundir.hydra_config, group)  # the models group, likewise
        resume = {"resumed": str(rundir.root), "time": time.time(),
                  "overrides": list(hydra_cfg.overrides.task),
                  "retry_failed": cfg.resume.retry_failed}
    elif not cfg.dry_run:
        atomic_write_json(rundir.task_config, task_cfg)
    return RunContext(cfg, tuple(argv), tuple(hydra_cfg.overrides.task), rundir, task, task_cfg,
                      inventory, slots, chains, warnings,
                      oom.call_size(cfg.batch_size, cfg.batch_probe.floor, cfg.batch_probe.max,
                                    getattr(task, "default_batch_size", 1),
                                    {s.backend for s in slots}), resume, lock)
