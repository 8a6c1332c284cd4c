"""Per-lease fork servers: where job processes come from (``hydra.launcher.start_method``).

``forkserver`` (the default where the OS has it): each lease gets a multiprocessing fork
server of its own, started once with that lease's environment in place (device mask,
threads, ``RUNNER_SWEEP_DEVICE``) and Hydra, the launcher's child module and the task's
module imported. Every job process of the lease is forked from it (~10 ms, against
~0.15-0.3 s for a new interpreter that imports Hydra): still a fresh process per job, with
the lease's environment from its first instruction, its own pid, sentinel and exit code
(multiprocessing's forkserver machinery: the server reports both). The server never
touches a device; a task module that initialises CUDA when imported must use ``spawn``.

Lifetimes: a server exits when the launcher does (EOF on its "alive" pipe; each forked job
closes its inherited copy of the launcher's end); its jobs get SIGTERM when it dies (their
parent). A server that died is started again, with its lease's environment, for the next
job; the jobs it took with it are failed with that reason.

``spawn``: a new interpreter per job process, started with the lease's environment.

Both give a ``multiprocessing.Process``: the launcher's loop cannot tell them apart.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import time
import types
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.connection import wait
from multiprocessing.context import ForkServerProcess, set_spawning_popen
from typing import Any, Iterator

from runner.errors import describe
from runner.processes import spawn_environment

log = logging.getLogger(__name__)

START_METHODS = ("forkserver", "spawn")
# imported by every lease's server before it forks anything (an ImportError is ignored)
PRELOAD = ["hydra_plugins.runner_launcher._child", "hydra._internal.config_loader_impl",
           "hydra._internal.callbacks", "hydra.core.utils", "omegaconf", "cloudpickle"]
STOP_WAIT_S = 5.0
START_WAIT_S = 120.0  # a server's imports (the task's module: torch ...) may take a while


def default_start_method() -> str:
    """forkserver where fds can be passed between processes (Linux, macOS), else spawn."""
    return "forkserver" if reduction.HAVE_SEND_HANDLE else "spawn"


@contextlib.contextmanager
def without_main() -> Iterator[None]:
    """spawn re-runs the parent's ``__main__`` script in the child (as ``__mp_main__``): a
    script without a ``__main__`` guard would start Hydra again there, and any script costs
    its imports twice. The child loads the task function itself (TaskRef), so the spawn
    sees a bare ``__main__`` while it starts."""
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


class _LeasePopen(popen_forkserver.Popen):
    """multiprocessing's forkserver Popen, asking the lease's own server (CPython 3.11's
    ``_launch`` with ``self.server`` in place of the module's single server)."""

    server: forkserver.ForkServer

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = self.server.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        # the server answers with the pid once its imports are done: never wait forever
        if not wait([self.sentinel], START_WAIT_S):
            raise TimeoutError(f"no answer from the fork server in {START_WAIT_S:.0f} s")
        self.pid = forkserver.read_signed(self.sentinel)

    server_lost = False  # the server went before it could report this process's exit

    def poll(self, flag: int = os.WNOHANG) -> Any:
        if self.returncode is None:
            if not wait([self.sentinel], 0 if flag == os.WNOHANG else None):
                return None
            try:
                self.returncode = forkserver.read_signed(self.sentinel)
            except (OSError, EOFError):
                self.server_lost, self.returncode = True, 255
        return self.returncode


def server_lost(proc: Any) -> bool:
    """``proc``'s fork server died before it reported how ``proc`` ended (its jobs get
    SIGTERM when it dies: their parent is gone)."""
    return bool(getattr(getattr(proc, "_popen", None), "server_lost", False))


class Servers:
    """One fork server per lease (``forkserver``), or plain spawns (``spawn``)."""

    def __init__(self, method: str, ctx_mp: Any, task_ref: Any):
        self.method, self.ctx_mp = method, ctx_mp
        self.preload = list(PRELOAD)
        if task_ref.module:
            self.preload.append(task_ref.module)
        # a script with a __main__ guard: loaded as __mp_main__ in the server (_preload_main)
        self.main_path = task_ref.path if task_ref.by_value is None else None
        if self.main_path:
            self.preload.append("hydra_plugins.runner_launcher._preload_main")
        self.servers: dict[int, forkserver.ForkServer] = {}

    def process(self, lease: Any, target: Any, args: tuple, name: str) -> Any:
        """A started process running ``target(*args)`` with ``lease``'s environment."""
        if self.method == "forkserver":
            try:
                return self._forked(lease, target, args, name)
            except (OSError, EOFError) as exc:  # the server died starting (its imports)
                log.warning(f"runner launcher: the fork server for {lease.label} cannot start "
                            f"job processes ({describe(exc, 200)}); they are spawned from now "
                            f"on (hydra.launcher.start_method=spawn)")
                self.close()
                self.method = "spawn"
        proc = self.ctx_mp.Process(target=target, name=name, daemon=False, args=args)
        with spawn_environment(lease.env), without_main():
            proc.start()
        return proc

    def _forked(self, lease: Any, target: Any, args: tuple, name: str) -> Any:
        server = self._server(lease)
        proc = ForkServerProcess(target=target, name=name, daemon=False, args=args)

        def popen(process_obj: Any) -> Any:
            del process_obj._Popen  # the process object is pickled next: not this closure
            p = _LeasePopen.__new__(_LeasePopen)
            p.server = server
            p.__init__(process_obj)
            return p

        proc._Popen = popen  # this process asks the lease's server
        # the job loads its task itself (no __main__ re-run); the lease's environment is in
        # place in case the server has to be started again (it died): it is started with
        # whatever environment this process has then
        with spawn_environment(lease.env), without_main():
            proc.start()
        return proc

    def _server(self, lease: Any) -> forkserver.ForkServer:
        server = self.servers.get(lease.index)
        if server is None:
            server = forkserver.ForkServer()
            server.set_forkserver_preload(self.preload)
            env = dict(lease.env)
            if self.main_path:
                env["RUNNER_LAUNCHER_PRELOAD_MAIN"] = self.main_path  # popped there
            with spawn_environment(env), without_main():
                server.ensure_running()
            self.servers[lease.index] = server
        return server

    def close(self) -> None:
        """Stop every server (they exit on EOF of their alive pipe); never waits longer
        than STOP_WAIT_S for one."""
        for server in self.servers.values():
            _stop(server)
        self.servers.clear()


def _stop(server: forkserver.ForkServer) -> None:
    pid = server._forkserver_pid
    if pid is None:
        return
    with contextlib.suppress(OSError):
        os.close(server._forkserver_alive_fd)
    deadline = time.monotonic() + STOP_WAIT_S
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break
        if done:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    address = server._forkserver_address
    if address and not util.is_abstract_socket_namespace(address):
        with contextlib.suppress(OSError):
            os.unlink(address)
    server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
