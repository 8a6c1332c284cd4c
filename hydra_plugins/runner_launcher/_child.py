"""The job process: entry point of one sweep job, started by the launcher (_servers.py).

It starts with its lease's environment already in place (device mask, threads) and
SIGINT ignored. It leaves the launcher's process group, so a terminal's Ctrl-C reaches the
launcher alone (which forwards it, as the same signal), takes SIGINT back (Ctrl-C semantics
for what the launcher forwards), and asks the kernel for SIGTERM if the launcher dies. Its
stdout/stderr go to ``<job dir>/console.log``. Then Hydra's own ``run_job`` after
``Singleton.set_state``: .hydra/, job logging and callbacks behave as under any launcher.
A job that raises has its traceback logged through the job's own logging (its log file)
and console.log the moment it fails. The JobReturn goes back to
the launcher over a pipe, pickled with cloudpickle.

The task function travels as a :class:`TaskRef`: by module and name when it is importable
(``module:qualname``, or the script's path when the app is a script run as ``__main__``
with an ``if __name__ == "__main__":`` guard), so its tracebacks show the user's file and
line; by value (cloudpickle) only when it is not importable (a closure, a function made at
run time) or the script has no guard (importing it would start Hydra again). The job's log
gets one line saying which device the job holds.

A spare (``spare_main``) is such a process started before its device is free; given a
*staged* order it runs ``run_job``'s set-up (job dir, .hydra/, logging) at once and calls
the task function only on :class:`Go`; on :class:`Cancel` it leaves, removing the job dir if
it made it. Messages: _messages.py.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import pickle
import shutil
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path
from typing import Any, Optional

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, run_job, setup_globals

from hydra_plugins.runner_launcher._messages import Cancel, Common, Go, Order, Ready
from runner.errors import describe
from runner.rundir import SweepDir


@dataclass(frozen=True)
class TaskRef:
    """How the job process finds the task function (parent -> child, with the payload)."""

    module: Optional[str] = None  # importable module name
    path: Optional[str] = None  # a script run as __main__ (loaded as __mp_main__)
    qualname: str = ""
    by_value: Optional[bytes] = None  # cloudpickle, when it cannot be imported

    @classmethod
    def of(cls, fn: Any) -> "TaskRef":
        mod = getattr(fn, "__module__", None)
        qual = getattr(fn, "__qualname__", "")
        if mod and qual and "<" not in qual:
            if mod != "__main__":
                if _resolve(importlib.import_module(mod), qual) is fn:
                    return cls(module=mod, qualname=qual)
            else:
                path = getattr(sys.modules["__main__"], "__file__", None)
                if path and _has_main_guard(path) and _resolve(sys.modules["__main__"], qual) is fn:
                    return cls(path=os.path.abspath(path), qualname=qual)
        code = getattr(fn, "__code__", None)
        return cls(by_value=cloudpickle.dumps(fn), qualname=qual,
                   path=code.co_filename if code is not None else None)

    def load(self) -> Any:
        if self.by_value is not None:
            fn = pickle.loads(self.by_value)
            if self.path and hasattr(fn, "__code__"):  # cloudpickle says "<dynamic-code>"
                with contextlib.suppress(Exception):
                    fn.__code__ = _refile(fn.__code__, self.path)
            return fn
        if self.module is not None:
            return _resolve(importlib.import_module(self.module), self.qualname)
        main = sys.modules.get("__mp_main__")
        if main is None or getattr(main, "__file__", None) != self.path:
            spec = importlib.util.spec_from_file_location("__mp_main__", self.path)
            main = importlib.util.module_from_spec(spec)
            sys.modules["__mp_main__"] = main
            sys.path.insert(0, os.path.dirname(self.path))
            spec.loader.exec_module(main)
        sys.modules["__main__"] = main
        return _resolve(main, self.qualname)


def _refile(code: Any, path: str) -> Any:
    """``code`` (and the code nested in it) naming ``path`` as its file: tracebacks of a
    function sent by value show the user's file and line again."""
    consts = tuple(_refile(c, path) if isinstance(c, type(code)) else c for c in code.co_consts)
    return code.replace(co_filename=path, co_consts=consts)


def _resolve(module: Any, qualname: str) -> Any:
    """``module.<qualname>``, unwrapped past decorators (``@hydra.main`` keeps ``__wrapped__``)."""
    obj = module
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    return inspect_unwrap(obj)


def inspect_unwrap(obj: Any) -> Any:
    while hasattr(obj, "__wrapped__") and callable(obj):
        obj = obj.__wrapped__
    return obj


@functools.lru_cache(maxsize=8)
def _has_main_guard(path: str) -> bool:
    """The script runs nothing at import but under ``if __name__ == "__main__":``: no
    top-level call statement outside such a block (a bare ``train()`` would start Hydra)."""
    try:
        tree = ast.parse(Path(path).read_text(), path)
    except (OSError, SyntaxError, ValueError):
        return False
    return not any(isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                   for node in tree.body)


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


def _announce(task_function: Any) -> Any:
    """The task function, preceded in the job's log by the device line (after run_job has
    configured the job's logging)."""
    device = os.environ.get("RUNNER_SWEEP_DEVICE")
    if not device:
        return task_function
    masks = " ".join(f"{k}={os.environ[k]}" for k in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK",
                                                     "OMP_NUM_THREADS") if k in os.environ)

    def with_device_line(cfg: Any) -> Any:
        logging.getLogger("hydra_plugins.runner_launcher").info(
            "runner launcher: this job holds %s (%s)", device, masks or "no mask")
        return task_function(cfg)

    return with_device_line


def _enter() -> None:
    """A job process's first steps: its own process group (a terminal's Ctrl-C reaches the
    launcher alone), Ctrl-C semantics back for what the launcher forwards, SIGTERM if its
    parent dies: the launcher, or the lease's fork server (which exits when the launcher
    does -- once no job holds the launcher's end of its "alive" pipe, so a forked job lets
    go of the copy it inherited)."""
    with contextlib.suppress(OSError):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # out of the terminal's group now
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:  # forked by a fork server: this job starts no processes through it
        with contextlib.suppress(OSError):
            os.close(alive)
        server._forkserver_alive_fd = None
    _die_with_parent()


def job_main(common: Common, order: Order, conn: Any) -> None:
    """Entry point of a fresh job process: Hydra's run_job, the JobReturn back to the parent."""
    _enter()
    _run(common, order, conn, None, None)


def spare_main(common: Common, inbox: Any, conn: Any) -> None:
    """Entry point of a spare: a job process started ahead of its job while its device is
    still busy (runner_launcher/_spares.py), so that interpreter start-up, Hydra's imports,
    the task's module and the sweep's context are loaded when the device frees. It says
    :class:`Ready`, then takes one :class:`Order` from ``inbox`` (EOF: not needed, it exits).
    A staged order (``go=False``) runs Hydra's job set-up at once and waits for Go."""
    _enter()
    context = None
    with contextlib.suppress(Exception):  # what cannot load fails in _run, as usual
        common.task.load()
        context = pickle.loads(common.context)
    try:
        conn.send_bytes(pickle.dumps(Ready(os.getpid())))
        order = _next_message(inbox)
    except (EOFError, OSError):
        return
    if not isinstance(order, Order):
        return
    try:
        _run(common, order, conn, inbox, context)
    except _Cancelled:
        pass
    finally:
        inbox.close()


class _Cancelled(BaseException):
    """A staged job told not to run here (a BaseException: run_job lets it through)."""


def _next_message(inbox: Any) -> Any:
    """The next message on ``inbox``; waits in 1 s steps (the launcher's death ends this
    process through PR_SET_PDEATHSIG); EOF raises EOFError."""
    while not inbox.poll(1.0):
        pass
    return pickle.loads(inbox.recv_bytes())


def _gated(task_function: Any, inbox: Any, job_dir: str, made_dir: bool) -> Any:
    """``task_function``, run only once the launcher says Go (a staged job)."""

    def when_go(cfg: Any) -> Any:
        try:
            msg = _next_message(inbox)
        except (EOFError, OSError):
            msg = Cancel("the launcher closed the pipe")
        if not isinstance(msg, Go):
            print(f"runner launcher: not run in this process: {getattr(msg, 'reason', msg)}",
                  file=sys.stderr)
            if made_dir:  # nothing of this job stays behind: it runs elsewhere or not at all
                os.chdir("/")
                shutil.rmtree(job_dir, ignore_errors=True)
            raise _Cancelled()
        return task_function(cfg)

    return when_go


def _run(common: Common, order: Order, conn: Any, inbox: Any, context: Any) -> None:
    made_dir = not os.path.exists(order.job_dir)
    if common.console_log:
        _redirect(order.job_dir)
    ctx, state = context if context is not None else pickle.loads(common.context)
    config = pickle.loads(order.config)
    task_function = _announce(common.task.load())
    if not order.go:
        task_function = _gated(task_function, inbox, order.job_dir, made_dir)
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
