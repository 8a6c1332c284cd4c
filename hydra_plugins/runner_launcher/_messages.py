"""What crosses between the launcher and a job process: one frozen dataclass per message.

launcher -> job process:

* :class:`Common` (a spawn argument): what every job of this ``launch()`` shares, pickled
  once per launch and unpickled by a spare before it has a job.
* :class:`Order` (a spawn argument for a fresh process; over the inbox pipe for a spare):
  one job. ``go=False`` stages it: Hydra's job set-up runs (job dir, .hydra/, logging),
  then the task function waits for :class:`Go`.
* :class:`Go`: the staged job's device is free: run the task function now.
* :class:`Cancel`: the staged job will run elsewhere (or not at all): leave without running
  it, removing the job dir if the staging made it.

job process -> launcher (the result pipe):

* :class:`Ready` (spares only): imports done, the task and the sweep's context loaded.
* then the job's ``JobReturn``, as cloudpickle bytes (Hydra's own object).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Common:
    context: bytes  # cloudpickle of (HydraContext, Singleton state)
    task: Any  # _child.TaskRef: how the task function is found
    console_log: bool  # stdout/stderr to <job dir>/console.log


@dataclass(frozen=True)
class Order:
    config: bytes  # cloudpickle of the job's composed config (the lease's pins applied)
    job_dir: str  # hydra.sweep.dir/subdir, as run_job makes it
    go: bool  # True: run now; False: set up, then wait for Go or Cancel


@dataclass(frozen=True)
class Go:
    pass  # the device is this job's now


@dataclass(frozen=True)
class Cancel:
    reason: str  # why, for the job's console.log


@dataclass(frozen=True)
class Ready:
    pid: int
