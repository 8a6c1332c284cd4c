"""The launcher's loop: free leases get jobs, job processes are watched until every job ended.

The data flow is drawn in _core.py. Here: :class:`_Job` (one job of a ``launch()`` call) and
:class:`_Loop`, which hands each free lease the job staged on its spare (Go), else the next
waiting job -- composed now if it was not yet (Hydra's sweeper has validated every
override; a job that still does not compose fails alone, one line) -- to a spare of that
lease or a fresh process, and turns what the processes report into JobReturns and
sweep.json rows.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import os
import pickle
import signal
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import wait
from typing import Any, Callable, Optional

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.runner_launcher import _live, _pool
from hydra_plugins.runner_launcher._child import TaskRef, job_main
from hydra_plugins.runner_launcher._messages import Common, Order
from hydra_plugins.runner_launcher._servers import Servers, default_start_method, server_lost
from hydra_plugins.runner_launcher._spares import Hooks, Spare, Spares
from runner import sweep as sweep_mod
from runner.errors import ExitCode, describe
from runner.processes import SignalCounter, exit_name, reap
from runner.rundir import SweepDir
from runner.sweep import ExitStatus, JobRecord, JobState, plain_value

GPU_BACKENDS = ("cuda", "xpu")  # a lease of these is free only once its job's process ended


class JobFailed(CompactHydraException):
    """What a failed job's JobReturn raises in the sweeper: one line naming job and cause."""


@dataclass
class _Job:
    index: int  # position in this launch() call
    overrides: list[str]  # what the job is composed with (resume.run may be rewritten)
    compose: Callable[[], DictConfig]  # its config (hydra.job.num set; record.dir filled in)
    record: JobRecord
    config: Optional[DictConfig] = None  # composed when first needed; pins go on a copy
    ret: Optional[JobReturn] = None
    process: Any = None
    conn: Any = None
    lease: Optional[_pool.Lease] = None
    data: Optional[bytes] = None  # the pickled JobReturn, once received
    eof: bool = False  # the pipe closed (with or without a result)
    launched_at: float = 0.0  # time.monotonic() when it got its device
    returned_at: float = 0.0  # time.monotonic() when its result came
    freed: bool = False  # its lease is free again (CPU: on its result; GPU: on its exit)
    stage: bool = True  # False once a spare died with it staged: it runs unstaged
    went: bool = False  # launched by Go on a staged spare (its run time tells the spares)


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
        self.task = TaskRef.of(launcher.task_function)
        self.common: Optional[Common] = None
        self.spares: Optional[Spares] = None

    def run(self) -> None:
        self.common = Common(cloudpickle.dumps((self.ctx, Singleton.get_state())), self.task,
                             self.l.console_log)
        # the next jobs' processes, started (and their jobs staged) while leases are busy;
        # Hydra callbacks would see on_job_start before the job holds its device: no staging
        stage = not getattr(getattr(self.ctx, "callbacks", None), "callbacks", None)
        self.servers = Servers(self.l.start_method or default_start_method(), self.ctx_mp,
                               self.task)
        self.spares = Spares(self.servers, self.common,
                             Hooks(self._take, self._order, self._launched, self._requeue),
                             self.l.spares, stage, self.ctx_mp)
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
            self.servers.close()  # after the jobs: each reports its exit through its server
            why = self.stop_reason or "the launcher stopped"
            for j in self.pending:
                j.record.move(JobState.NOT_STARTED)
                j.record.reason = why
                j.ret = _failed_return(j, f"job {j.record.num} was not started: {why}")
            self.pending.clear()
            self.live.update(self.view, self.keys)

    def _loop(self) -> None:
        while self.pending or self.running or self.spares.holding():
            self._signals()
            self._hand_out()
            self._compose_ahead()
            if not (self.running or self.spares.holding()):
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
            spares = self.spares.waitables()
            for obj in wait(list(waitables) + list(spares), timeout=timeout):
                if obj in spares:
                    self.spares.event(spares[obj], obj)
                    continue
                j = waitables[obj]
                if j.record.num not in self.running:
                    continue
                self._receive(j)
                if obj is not j.conn:
                    self._finish(j)
            self.spares.tick()
            self._linger()
            self.live.update(self.view, self.keys)

    def _hand_out(self) -> None:
        """Free leases get work: the job staged on the lease's spare (Go), else the next
        waiting job (a spare of the lease, else a fresh process), else a job staged on a
        busy lease is taken back for it."""
        while not self.stop_reason and self.free and time.monotonic() >= self.next_start:
            lease = self.free.pop(0)
            if not self.spares.go(lease):
                job = self._next_job()
                if job is None:
                    self.free.insert(0, lease)
                    self.spares.steal(len(self.free))
                    return
                job.lease = lease
                if not self.spares.assign(lease, job):
                    self._spawn(job, lease)
            if self.l.stagger_s > 0:
                self.next_start = time.monotonic() + self.l.stagger_s
                return

    def _compose_ahead(self) -> None:
        """Compose the jobs the spares and free leases will take next, now -- right after
        the hand-out, while the jobs just started run -- not when a lease frees."""
        want = len(self.spares.spares) + len(self.free)
        for job in list(itertools.islice(self.pending, want)):
            if self.stop_reason:
                return
            if job.config is None and not self._composed(job):
                self.pending.remove(job)

    def _stop(self, reason: str) -> None:
        """Hand out no more jobs; staged ones are taken back from their spares."""
        self.stop_reason = reason
        self.spares.recall(reason)

    def _signals(self) -> None:
        if self.signals.count == self.signals.handled:
            return
        self.signals.handled = self.signals.count
        if not self.stop_reason:
            self._stop("the sweep was interrupted")
            self.live.message(f"runner launcher: interrupted; no more jobs are started, "
                              f"{len(self.running)} running job(s) are asked to stop "
                              f"(again: stop them now; a third time: kill them)")
        sig = (signal.SIGKILL if self.signals.count >= 3
               else signal.Signals[self.signals.signals[-1]])
        for j in self.running.values():
            with contextlib.suppress(OSError):
                os.kill(j.process.pid, sig)

    # ---- the spares' hooks, and a fresh process ------------------------------------------
    def _take(self) -> Optional[_Job]:
        """The next waiting job, composed, for a spare to stage -- unless a lease is free
        (it goes there) or the sweep is stopping."""
        while not self.stop_reason and not self.free and self.pending and self.pending[0].stage:
            job = self.pending.popleft()
            if self._composed(job):
                return job
        return None

    def _next_job(self) -> Optional[_Job]:
        """The next waiting job, composed (one that does not compose has failed)."""
        while self.pending:
            job = self.pending.popleft()
            if self._composed(job):
                return job
        return None

    def _composed(self, job: _Job) -> bool:
        """Compose ``job`` if it is not yet; False (the job failed, one line) if it cannot
        be: its overrides passed the sweeper's check but not this composition."""
        if job.config is not None:
            return True
        try:
            job.config = job.compose()
            return True
        except Exception as exc:  # Hydra's errors for a bad override, an interpolation
            r = job.record
            r.move(JobState.FAILED)
            r.reason = f"its config does not compose: {describe(exc, 300)}"
            job.ret = _failed_return(job, f"job {r.num} ({' '.join(r.overrides)}) {r.reason}")
            self._failed(job)
            return False

    def _order(self, job: _Job, lease: _pool.Lease, go: bool) -> Order:
        cfg = copy.deepcopy(job.config)
        if lease.pins:
            with read_write(cfg), open_dict(cfg):
                for key, value in lease.pins.items():
                    OmegaConf.update(cfg, key, value, merge=False)
        return Order(cloudpickle.dumps(cfg), job.record.dir, go)

    def _requeue(self, job: _Job, may_stage: bool) -> None:
        """A job a spare held and did not run waits again (first in line); the lease it was
        bound to, if any, is free again."""
        job.stage = job.stage and may_stage
        if job.lease is not None and job.process is None:
            self._free(job.lease)
        job.lease = None
        self.pending.appendleft(job)

    def _spawn(self, job: _Job, lease: _pool.Lease) -> None:
        parent_conn, child_conn = self.ctx_mp.Pipe(duplex=False)
        proc = self.servers.process(lease, job_main,
                                    (self.common, self._order(job, lease, True), child_conn),
                                    f"runner-sweep-job-{job.record.num}")
        child_conn.close()
        self._adopt(job, lease, proc, parent_conn)

    def _launched(self, spare: Spare) -> None:
        spare.job.went = spare.went
        self._adopt(spare.job, spare.lease, spare.proc, spare.results)

    def _adopt(self, job: _Job, lease: _pool.Lease, proc: Any, conn: Any) -> None:
        """``job`` runs in ``proc`` on ``lease`` from now."""
        job.process, job.conn, job.lease = proc, conn, lease
        job.launched_at = time.monotonic()
        r = job.record
        r.move(JobState.RUNNING)
        r.device, r.pid, r.started, r.runs = lease.label, proc.pid, time.time(), r.runs + 1
        self.running[r.num] = job
        if len(self.pending) > len(self.free) and not self.stop_reason:
            self.spares.top_up(lease)  # this lease's next jobs will not wait for a process
        self.record_sweep()
        self.live.update(self.view, self.keys, force=True)

    def _free(self, lease: _pool.Lease) -> None:
        self.free.append(lease)
        self.free.sort(key=lambda x: x.index)

    def _release(self, job: _Job) -> None:
        """The job's lease is free: on its result where the device holds nothing of the
        process (CPU), on the process's exit where it does (a GPU's memory)."""
        if not job.freed:
            job.freed = True
            if job.went:
                self.spares.job_ran(job.lease, time.monotonic() - job.launched_at)
            self._free(job.lease)

    def _receive(self, job: _Job) -> None:
        """The job's result, if it is on its pipe: the job is decided now (a failure stops
        a fail_fast sweep before its lease is handed out again); a CPU lease is free."""
        if job.eof:
            return
        try:
            if job.conn.poll(0):
                job.data = job.conn.recv_bytes()
                job.eof = True  # one message per job
                job.record.finished = time.time()  # its work ended; its process exits now
                job.returned_at = time.monotonic()
                self._conclude(job)
                if job.lease.backend not in GPU_BACKENDS:
                    self._release(job)
                self.record_sweep()
        except (EOFError, OSError):
            job.eof = True

    def _linger(self) -> None:
        """A job that returned but whose process has not exited after exit_wait_s (a
        non-daemon thread, a hung library teardown) is killed: its result is kept, and a
        GPU's lease (free only on exit) is not held for ever."""
        now = time.monotonic()
        for job in self.running.values():
            if job.returned_at and now - job.returned_at > self.l.exit_wait_s:
                if job.process.is_alive():
                    self.live.message(f"runner launcher: job #{job.record.num} returned "
                                      f"{self.l.exit_wait_s:g} s ago but its process "
                                      f"(pid {job.process.pid}) has not exited: killed")
                    job.process.kill()
                job.returned_at = 0.0

    def _finish(self, job: _Job) -> None:
        """The job's process ended (its sentinel fired)."""
        reap(job.process, job.conn, wait_s=5.0)  # the sentinel fired: a zombie-in-waiting
        r = job.record
        self.running.pop(r.num, None)
        r.finished, r.pid = r.finished or time.time(), None
        if job.ret is None:
            self._conclude(job)
        self._release(job)
        self.record_sweep()
        self.live.update(self.view, self.keys, force=True)

    def _conclude(self, job: _Job) -> None:
        """The job's state and JobReturn: from its result, or from how its process ended."""
        r = job.record
        ret = None
        if job.data is not None:
            try:
                ret = pickle.loads(job.data)
            except Exception as exc:  # a return value the parent cannot import
                ret = None
                r.reason = f"its result could not be read ({exc.__class__.__name__}: {exc})"
        if ret is None:
            why = r.reason or ("its device's fork server died (its jobs get SIGTERM with it)"
                               if server_lost(job.process) else
                               f"killed by {exit_name(job.process.exitcode)}"
                               if (job.process.exitcode or 0) < 0 else
                               f"ended with {exit_name(job.process.exitcode)} before returning")
            r.move(JobState.FAILED)
            r.reason = why
            job.ret = _failed_return(job, f"job {r.num} ({' '.join(r.overrides)}) {why}; "
                                          f"see {SweepDir.console_log(r.dir)}")
        elif ret.status == JobStatus.COMPLETED:
            value = ret._return_value
            code = value.code if isinstance(value, ExitStatus) else None
            r.exit_code, r.value = code, plain_value(value) if code is None else None
            r.move(JobState.OK if not code else JobState.FAILED)
            r.reason = "" if not code else ExitCode.describe(code)
            job.ret = ret
        else:
            exc = ret._return_value
            r.move(JobState.FAILED)
            r.reason = describe(exc, 300)
            err = JobFailed(f"job {r.num} ({' '.join(r.overrides)}) raised {describe(exc, 300)}; "
                            f"traceback in {SweepDir.console_log(r.dir)} and the job's log")
            err.__cause__ = exc if isinstance(exc, BaseException) else None
            ret._return_value = err
            job.ret = ret
        if r.state == JobState.FAILED:
            self._failed(job)

    def _failed(self, job: _Job) -> None:
        r = job.record
        where = f" on {r.device}" if r.device else ""
        self.live.message(f"runner launcher: job #{r.num}{where} failed: {r.reason}"
                          + (f" ({r.dir})" if r.dir else ""))
        if self.l.fail_fast and not self.stop_reason:
            self._stop(f"fail_fast: job {r.num} failed")
            self.live.message("runner launcher: fail_fast: no more jobs are started")


def _failed_return(job: _Job, message: str) -> JobReturn:
    """A FAILED JobReturn for a job that never returned one (killed, or never started)."""
    if job.config is None:  # never composed (not started, or its config does not compose)
        return JobReturn(overrides=list(job.overrides), cfg=OmegaConf.create(),
                         working_dir=os.getcwd(), status=JobStatus.FAILED,
                         _return_value=JobFailed(message))
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
