"""The launcher's work: a pool of devices, one fresh process per sweep job.

Parent (the process Hydra's sweeper runs in)::

    check the launcher's settings; make the pool (_pool.py): runner's `devices` group, or
      hydra.launcher.devices/ids/jobs_per_device; either wrong -> one line, nothing runs
    one _Job per override list; each is composed when first needed (Hydra's sweeper has
      already composed every one to validate it: a bad override stopped the sweep there)
    loop (_loop.py):
      a lease is free (and the stagger has passed) ->
          a job is staged on this lease's spare -> Go: it runs now
          else the next waiting job: compose it, pin runner's `devices` to the lease
            (runner's group only) -> Order(go) to a ready or starting spare of this lease,
            else start a fresh process with the lease's env in place (_servers.py: forked
            from the lease's fork server, or spawned), without the parent's __main__ (the
            child loads the task itself: _child.TaskRef), daemon=False (jobs may spawn
            workers)
          else (nothing waits) a job staged on a busy lease is taken back (Cancel) and
            runs here once its spare has left
      more jobs wait than leases are free -> spares for the busy lease (_spares.py): spawned
          with its env, they say Ready, get the next job staged (Order, go=False: Hydra's
          job set-up runs, the task function waits for Go)
      wait(result pipes + process sentinels + spares' pipes and sentinels, poll_s)
      result on a pipe -> keep the JobReturn; its return value: runner's ExitStatus ->
                          the job's exit code; a number / flat dict of numbers -> its value;
                          a CPU lease is free again now
      sentinel         -> the job ended (a GPU lease is free again now): with its JobReturn,
                          or killed (SIGKILL ...) or crashed before returning -> a FAILED
                          JobReturn made here
      a spare died with its job staged -> the job waits again, first, to run unstaged
      a job failed and fail_fast -> hand out no more jobs; staged jobs are cancelled
      SIGINT/SIGTERM/SIGHUP -> the same, and forward the same signal to running jobs
                          (runner: SIGINT drains, then stops; SIGTERM/SIGHUP stop at once,
                          nothing charged); a second one is forwarded too (runner stops
                          now); a third kills them
    sweep.json / sweep.md after every change (runner/sweep.py); live view (_live.py)

Job process (_child.py): its own process group, console.log, Singleton.set_state, Hydra's
run_job (a staged one waits for Go before the task function), the JobReturn back over a
pipe. Messages: _messages.py. Resuming a sweep: _resume.py.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.runner_launcher import _pool, _resume
from hydra_plugins.runner_launcher._loop import _Job, _Loop
from runner import sweep as sweep_mod
from runner.errors import ConfigError
from runner.rundir import SweepDir
from runner.runlock import RunLock
from runner.sweep import JobRecord, JobState, Ranking

log = logging.getLogger(__name__)


# ---- parent -------------------------------------------------------------------------------
def launch(launcher: Any, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    config, ctx = launcher.config, launcher.hydra_context
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    problem = launcher.check_settings()
    if problem:
        raise _pool.PoolError(problem)
    leases = _pool.make_pool(config, launcher.max_parallel, launcher.devices, launcher.ids,
                             launcher.jobs_per_device, launcher.threads_per_job,
                             launcher.task_function)
    resume_value = _resume.requested(config)
    try:
        plan = _resume.plan(config, resume_value, job_overrides) if resume_value else None
    except _resume.SweepError:
        _resume.drop_fresh_dir(config)
        raise
    sweep_dir = plan.sweep_dir if plan else Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:  # one launcher per sweep dir, held until launch() returns (each job locks its own)
        lock = RunLock.acquire(SweepDir(sweep_dir).lock, "sweep dir")
    except ConfigError as exc:
        if plan:
            _resume.drop_fresh_dir(config)
        raise _resume.SweepError(str(exc)) from None
    if plan:
        _resume.adopt_fresh_dir(config, sweep_dir)
    task_name = OmegaConf.select(config, "task.name", default=None)

    jobs, kept, returns = [], [], [None] * len(job_overrides)
    for i, overrides in enumerate(job_overrides):
        if plan and not plan.rerun(i):
            kept.append(plan.old[i])
            returns[i] = _resume.kept_return(plan.old[i], overrides)
            continue
        old = plan.old[i] if plan else None
        ovr = _resume.job_overrides(old, overrides) if old else list(overrides)
        num = old.num if old else initial_job_idx + i
        record = old or JobRecord(num, _resume.own_overrides(overrides), "")
        record.move(JobState.PENDING)  # a resume reruns what is not ok
        record.reason, record.exit_code = "", None
        record.value = None
        record.started = record.finished = record.pid = None
        jobs.append(_Job(i, ovr, functools.partial(_compose, ctx, config, ovr, record), record))

    records = [j.record for j in jobs] + kept + (plan.others if plan else [])
    # a sweeper that calls launch() once per batch (optuna: n_jobs trials at a time) gets
    # one sweep.json with every batch's jobs
    mine = {r.num for r in records}
    if getattr(launcher, "earlier_dir", None) == sweep_dir:
        records += [r for r in launcher.earlier_records if r.num not in mine]
    launcher.earlier_dir, launcher.earlier_records = sweep_dir, records
    resumes = list((plan.doc.get("resumes") or []) if plan else [])
    if plan:
        resumes.append({"time": time.time(), "rerun": [j.record.num for j in jobs],
                        "kept": [r.num for r in kept]})
    extra = {"devices": [lease.label for lease in leases], "resumes": resumes}

    ranking = Ranking(launcher.best, launcher.best_key)

    def record_sweep() -> None:
        sweep_mod.write(sweep_dir, records, task_name, extra, ranking)

    log.info(f"runner launcher: {len(jobs)} job(s) on {len(leases)} device(s) "
             f"({_pool.describe(leases)}), sweep dir {sweep_dir}"
             + (f"; resuming, {len(kept)} job(s) already done" if plan else ""))
    for j in jobs:
        log.info(f"\t#{j.record.num} : {' '.join(filter_overrides(j.overrides))}")
    record_sweep()
    _Loop(launcher, ctx, jobs, leases, records, record_sweep).run()
    record_sweep()
    for j in jobs:
        returns[j.index] = j.ret
    _note_exit_codes(launcher.task_function, [j.record.exit_code for j in jobs])
    lock.release()
    return returns  # type: ignore[return-value]


def _note_exit_codes(task_function: Any, codes: list[Optional[int]]) -> None:
    """runner's app exits with the worst code of the jobs it ran (3: items failed, 130:
    interrupted); its jobs ran in other processes here, so tell it their codes."""
    if getattr(task_function, "__module__", None) != "runner.app":
        return
    note = getattr(sys.modules.get("runner.app"), "note_exit_code", None)
    if note is not None:
        for code in codes:
            if isinstance(code, int):
                note(code)


def _compose(ctx, config: DictConfig, overrides: list[str], record: JobRecord) -> DictConfig:
    """The job's config (Hydra's sweep composition); ``record.dir`` is filled in from it."""
    cfg = ctx.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = record.num
        cfg.hydra.job.num = record.num
        if record.dir:  # a resumed job keeps its directory, whatever the subdir pattern
            job_dir = Path(record.dir)
            cfg.hydra.sweep.dir = str(job_dir.parent)
            cfg.hydra.sweep.subdir = job_dir.name
    if not record.dir:
        record.dir = _job_dir(cfg)
    return cfg


def _job_dir(cfg: DictConfig) -> str:
    """hydra.sweep.dir/hydra.sweep.subdir as run_job will compute it."""
    hc = HydraConfig.instance()
    saved = hc.cfg
    try:
        hc.set_config(cfg)
        base = str(OmegaConf.select(cfg, "hydra.sweep.dir"))
        sub = OmegaConf.select(cfg, "hydra.sweep.subdir")
        return os.path.abspath(os.path.join(base, str(sub)) if sub is not None else base)
    finally:
        hc.cfg = saved


