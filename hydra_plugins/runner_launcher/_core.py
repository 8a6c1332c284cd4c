"""The launcher's work: a pool of devices, one spawned process per sweep job.

Parent (the process Hydra's sweeper runs in)::

    check the launcher's settings; make the pool (_pool.py): runner's `devices` group, or
      hydra.launcher.devices/ids/jobs_per_device; either wrong -> one line, nothing runs
    compose every job's config first (a bad override fails the sweep before anything runs)
    loop:
      a lease is free and a job is waiting (and the stagger has passed) ->
          pin runner's `devices` to that lease (runner's group only), spawn its process
          with the lease's env in place (runner.processes.spawn_environment) and without
          the parent's __main__ (the child loads the task itself: _child.TaskRef),
          daemon=False so the job may spawn its own workers
      wait(result pipes + process sentinels, poll_s)   never longer
      result on a pipe -> keep the JobReturn; its return value: runner's ExitStatus ->
                          the job's exit code; a number / flat dict of numbers -> its value
      sentinel         -> the job ended: with its JobReturn, or killed (SIGKILL ...) or
                          crashed before returning -> a FAILED JobReturn made here
      a job failed and fail_fast -> hand out no more jobs
      SIGINT/SIGTERM/SIGHUP -> hand out no more jobs; forward the same signal to running
                          jobs (runner: SIGINT drains, then stops; SIGTERM/SIGHUP stop at
                          once, nothing charged); a second one is forwarded too (runner
                          stops now); a third kills them
    sweep.json / sweep.md after every change (runner/sweep.py); live view (_live.py)

The job process itself (its own process group, console.log, Singleton.set_state, Hydra's
run_job, the JobReturn back over a pipe): _child.py.
Resuming a sweep: see _resume.py.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Optional, Sequence

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.runner_launcher import _live, _pool, _resume
from hydra_plugins.runner_launcher._child import TaskRef, job_main
from hydra_plugins.runner_launcher._spares import Spares, without_main
from runner import sweep as sweep_mod
from runner.errors import ConfigError, ExitCode, describe
from runner.processes import SignalCounter, exit_name, reap, spawn_environment
from runner.rundir import SweepDir
from runner.runlock import RunLock
from runner.sweep import ExitStatus, JobRecord, JobState, Ranking, plain_value

log = logging.getLogger(__name__)


class JobFailed(CompactHydraException):
    """What a failed job's JobReturn raises in the sweeper: one line naming job and cause."""


@dataclass
class _Job:
    index: int  # position in this launch() call
    overrides: list[str]  # what the job is composed with (resume.run may be rewritten)
    config: DictConfig  # composed, hydra.job.num set; pins are applied on a copy at start
    record: JobRecord
    ret: Optional[JobReturn] = None
    process: Any = None
    conn: Any = None
    lease: Optional[_pool.Lease] = None
    data: Optional[bytes] = None  # the pickled JobReturn, once received
    eof: bool = False  # the pipe closed (with or without a result)



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
        cfg = _compose(ctx, config, ovr, num, old)
        record = old or JobRecord(num, _resume.own_overrides(overrides), _job_dir(cfg))
        record.state, record.reason, record.exit_code = JobState.PENDING, "", None
        record.value = None
        record.started = record.finished = record.pid = None
        jobs.append(_Job(i, ovr, cfg, record))

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


def _compose(ctx, config: DictConfig, overrides: list[str], num: int,
             old: Optional[JobRecord]) -> DictConfig:
    cfg = ctx.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = num
        cfg.hydra.job.num = num
        if old is not None:  # a resumed job keeps its directory, whatever the subdir pattern
            job_dir = Path(old.dir)
            cfg.hydra.sweep.dir = str(job_dir.parent)
            cfg.hydra.sweep.subdir = job_dir.name
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


class _Loop:
    """Hands jobs to free leases and watches them until every job has ended."""

    def __init__(self, launcher, ctx, jobs: list[_Job], leases: list[_pool.Lease],
                 records: list[JobRecord], record_sweep) -> None:
        self.l, self.ctx, self.jobs, self.record_sweep = launcher, ctx, jobs, record_sweep
        self.pending = collections.deque(jobs)
        self.free = list(leases)
        self.running: dict[int, _Job] = {}
        self.stop_reason = ""
        self.next_start = 0.0
        self.signals = SignalCounter()
        self.live = _live.LiveView(launcher.live, launcher.live_every_s)
        self.view = [j.record for j in jobs]
        self.keys = sweep_mod.varying_keys(self.view)
        self.ctx_mp = get_context("spawn")
        self.state = None
        self.task = TaskRef.of(launcher.task_function)
        # the next job's process, started while its lease is busy (_spares.py)
        self.spares = Spares(self.ctx_mp, self.task, launcher.console_log)

    def run(self) -> None:
        self.state = Singleton.get_state()
        self.signals.install()
        try:
            self._loop()
        finally:
            self.signals.restore()
            self.spares.close()
            for j in list(self.running.values()):  # only after an error in this loop
                with contextlib.suppress(Exception):
                    j.process.kill()
                    j.process.join(5)
                self._finish(j)
            why = self.stop_reason or "the launcher stopped"
            for j in self.pending:
                j.record.state, j.record.reason = JobState.NOT_STARTED, why
                j.ret = _failed_return(j, f"job {j.record.num} was not started: {why}")
            self.pending.clear()
            self.live.update(self.view, self.keys)

    def _loop(self) -> None:
        while self.pending or self.running:
            self._signals()
            now = time.monotonic()
            while (not self.stop_reason and self.pending and self.free
                   and now >= self.next_start):
                self._start(self.pending.popleft(), self.free.pop(0))
                if self.l.stagger_s > 0:
                    self.next_start = time.monotonic() + self.l.stagger_s
                    break
            if not self.running:
                if self.stop_reason or not self.pending:
                    return
                time.sleep(max(0.0, min(self.l.poll_s, self.next_start - time.monotonic())))
                continue
            timeout = self.l.poll_s
            if self.pending and self.free and not self.stop_reason:
                timeout = max(0.0, min(timeout, self.next_start - time.monotonic()))
            waitables: dict[Any, _Job] = {}
            for j in self.running.values():
                waitables[j.process.sentinel] = j
                if not j.eof:
                    waitables[j.conn] = j
            for obj in wait(list(waitables), timeout=timeout):
                j = waitables[obj]
                if j.record.num not in self.running:
                    continue
                if obj is j.conn:
                    self._receive(j)
                else:
                    self._receive(j)
                    self._finish(j)
            self.live.update(self.view, self.keys)

    def _signals(self) -> None:
        if self.signals.count == self.signals.handled:
            return
        self.signals.handled = self.signals.count
        if not self.stop_reason:
            self.stop_reason = "the sweep was interrupted"
            self.live.message(f"runner launcher: interrupted; no more jobs are started, "
                              f"{len(self.running)} running job(s) are asked to stop "
                              f"(again: stop them now; a third time: kill them)")
        sig = (signal.SIGKILL if self.signals.count >= 3
               else signal.Signals[self.signals.signals[-1]])
        for j in self.running.values():
            with contextlib.suppress(OSError):
                os.kill(j.process.pid, sig)

    def _start(self, job: _Job, lease: _pool.Lease) -> None:
        cfg = copy.deepcopy(job.config)
        if lease.pins:
            with read_write(cfg), open_dict(cfg):
                for key, value in lease.pins.items():
                    OmegaConf.update(cfg, key, value, merge=False)
        payload = cloudpickle.dumps((self.ctx, cfg, self.task, self.state))
        spare = self.spares.run(lease, payload, job.record.dir)
        if spare is not None:
            proc, parent_conn = spare
        else:
            parent_conn, child_conn = self.ctx_mp.Pipe(duplex=False)
            proc = self.ctx_mp.Process(
                target=job_main, name=f"runner-sweep-job-{job.record.num}", daemon=False,
                args=(payload, child_conn, job.record.dir, self.l.console_log))
            with spawn_environment(lease.env), without_main():
                proc.start()
            child_conn.close()
        if len(self.pending) > len(self.free) and not self.stop_reason:
            self.spares.start(lease)  # this lease's next job will not wait for a process
        job.process, job.conn, job.lease = proc, parent_conn, lease
        r = job.record
        r.state, r.device, r.pid, r.started, r.runs = (JobState.RUNNING, lease.label, proc.pid,
                                                       time.time(), r.runs + 1)
        self.running[r.num] = job
        self.record_sweep()
        self.live.update(self.view, self.keys, force=True)

    def _receive(self, job: _Job) -> None:
        if job.eof:
            return
        try:
            if job.conn.poll(0):
                job.data = job.conn.recv_bytes()
                job.eof = True  # one message per job
        except (EOFError, OSError):
            job.eof = True

    def _finish(self, job: _Job) -> None:
        reap(job.process, job.conn, wait_s=5.0)  # the sentinel fired: a zombie-in-waiting
        r = job.record
        self.running.pop(r.num, None)
        self.free.append(job.lease)
        self.free.sort(key=lambda lease: lease.index)
        r.finished, r.pid = time.time(), None
        ret = None
        if job.data is not None:
            try:
                ret = pickle.loads(job.data)
            except Exception as exc:  # a return value the parent cannot import
                ret = None
                r.reason = f"its result could not be read ({exc.__class__.__name__}: {exc})"
        if ret is None:
            why = r.reason or (f"killed by {exit_name(job.process.exitcode)}"
                               if (job.process.exitcode or 0) < 0 else
                               f"ended with {exit_name(job.process.exitcode)} before returning")
            r.state, r.reason = JobState.FAILED, why
            job.ret = _failed_return(job, f"job {r.num} ({' '.join(r.overrides)}) {why}; "
                                          f"see {SweepDir.console_log(r.dir)}")
        elif ret.status == JobStatus.COMPLETED:
            value = ret._return_value
            code = value.code if isinstance(value, ExitStatus) else None
            r.exit_code, r.value = code, plain_value(value) if code is None else None
            r.state = JobState.OK if not code else JobState.FAILED
            r.reason = "" if not code else ExitCode.describe(code)
            job.ret = ret
        else:
            exc = ret._return_value
            r.state, r.reason = JobState.FAILED, describe(exc, 300)
            err = JobFailed(f"job {r.num} ({' '.join(r.overrides)}) raised {describe(exc, 300)}; "
                            f"traceback in {SweepDir.console_log(r.dir)} and the job's log")
            err.__cause__ = exc if isinstance(exc, BaseException) else None
            ret._return_value = err
            job.ret = ret
        if r.state == JobState.FAILED:
            self.live.message(f"runner launcher: job #{r.num} on {r.device} failed: {r.reason}"
                              f" ({r.dir})")
            if self.l.fail_fast and not self.stop_reason:
                self.stop_reason = f"fail_fast: job {r.num} failed"
                self.live.message("runner launcher: fail_fast: no more jobs are started")
        self.record_sweep()
        self.live.update(self.view, self.keys, force=True)


def _failed_return(job: _Job, message: str) -> JobReturn:
    """A FAILED JobReturn for a job that never returned one (killed, or never started)."""
    cfg = copy.deepcopy(job.config)
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = job.record.dir
    task_cfg = copy.deepcopy(cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    hydra_cfg = OmegaConf.masked_copy(cfg, "hydra")
    return JobReturn(overrides=list(job.overrides), cfg=task_cfg, hydra_cfg=hydra_cfg,
                     working_dir=os.getcwd(), task_name=str(cfg.hydra.job.name),
                     status=JobStatus.FAILED, _return_value=JobFailed(message))
