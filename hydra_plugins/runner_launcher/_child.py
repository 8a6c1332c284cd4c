"""The job process: entry point of one sweep job, spawned by the launcher (_core.py).

It starts with its lease's environment already in place (device mask, threads) and
SIGINT ignored. It leaves the launcher's process group, so a terminal's Ctrl-C reaches the
launcher alone (which forwards it, as the same signal), takes SIGINT back (Ctrl-C semantics
for what the launcher forwards), and asks the kernel for SIGTERM if the launcher dies. Its
stdout/stderr go to ``<job dir>/console.log``. Then Hydra's own ``run_job`` after ``Singleton.set_state``: .hydra/, job logging and callbacks behave as
under any launcher. A job that raises has its traceback logged through the job's own
logging (its log file) and console.log the moment it fails. The JobReturn goes back to
the launcher over a pipe, pickled with cloudpickle (task functions and OmegaConf resolvers
are often closures).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, run_job, setup_globals

from runner.errors import describe
from runner.rundir import SweepDir


def _die_with_parent() -> None:
    """Linux: SIGTERM this job if the launcher dies (runner then drains and stops)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _redirect(job_dir: str) -> None:
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(str(SweepDir.console_log(job_dir)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def job_main(payload: bytes, conn: Any, job_dir: str, console_log: bool) -> None:
    """Entry point of a job process: Hydra's run_job, the JobReturn back to the parent."""
    with contextlib.suppress(OSError):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # out of the terminal's group now
    _die_with_parent()
    if console_log:
        _redirect(job_dir)
    ctx, config, task_function, state = pickle.loads(payload)
    setup_globals()
    Singleton.set_state(state)
    HydraConfig.instance().set_config(config)
    ret = run_job(hydra_context=ctx, task_function=task_function, config=config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    if ret.status == JobStatus.FAILED:
        exc = ret._return_value
        logging.getLogger(__name__).error(
            "job %s failed", config.hydra.job.num,
            exc_info=(type(exc), exc, exc.__traceback__)
            if isinstance(exc, BaseException) else None)
        if not logging.getLogger().handlers:  # job logging disabled: stderr still has it
            traceback.print_exception(type(exc), exc, getattr(exc, "__traceback__", None))
        sys.stderr.flush()
    try:
        data = cloudpickle.dumps(ret)
    except Exception as exc:  # an unpicklable return value: keep the rest of the JobReturn
        ret._return_value = RuntimeError(f"return value not picklable: {describe(exc, 300)}")
        ret.status = JobStatus.FAILED
        data = cloudpickle.dumps(ret)
    conn.send_bytes(data)
    conn.close()
