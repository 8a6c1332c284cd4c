"""The Ray executor: the same plan, ledger and worker code, with an actor per slot.

    Ledger (controller, unchanged) ──Call──> actor.run.remote(call) ──> ObjectRef
          ^                                        (runner.worker.run_call inside)
          └── ray.wait(refs, timeout) ── messages ─┘   RayActorError = the worker died

Only the mechanics differ (:class:`RayMechanics`, the protocol of runner/executor.py): an
actor instead of a process, an ObjectRef instead of a pipe, RayActorError instead of a
process sentinel. The loop, the journal, retries, quarantine, restarts, Ctrl-C handling,
the summary and the exit codes are :class:`runner.executor.Executor`'s and the ledger's.

Environment before import: each actor gets the slot's environment through
``runtime_env={"env_vars": ...}``, which Ray applies when it starts the actor's process.
On CUDA, Ray itself sets ``CUDA_VISIBLE_DEVICES`` for an actor created with ``num_gpus=1``,
so the slot's own mask is left out there.

``executor.address=null`` starts a local Ray instance for the run with its temp dir under
the run dir (through a short symlink in /tmp when the run dir path is too long for Ray's
Unix sockets) and ``RAY_AUTH_MODE=disabled`` (unless set), in Ray's local-only mode
(:func:`_loopback_only`): its node address is 127.0.0.1, so every process it starts (GCS,
raylet and its object manager, agents, the actors, and this process's own core worker)
listens on loopback only -- without authentication, nothing of it may be reachable from
another machine, and a Ray that would still bind elsewhere is refused. ``auto`` or
``ray://host:port`` joins a cluster as it is (its network and its authentication are the
cluster's), where outputs must go to a run dir on storage every node mounts at the same path.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import threading
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
except ImportError as exc:  # pragma: no cover - exercised when ray is absent
    from runner.tasks.base import ConfigError

    raise ConfigError("executor=ray needs Ray: pip install 'runner[ray]' (or pip install ray), "
                      "or use executor=local") from exc

try:  # where Ray keeps the switch of its local-only mode (see _loopback_only)
    from ray._private import ray_constants as _ray_constants
except ImportError:  # pragma: no cover - a Ray without it: _check_loopback_node decides
    _ray_constants = None

from runner.devices import Inventory, Slot
from runner.errors import ConfigError
from runner.executor import Executor
from runner.slots import Death, SlotState, Worker
from runner.messages import Call, WorkerSpec
from runner.rundir import RunDir
from runner.worker import run_call, start_worker

log = logging.getLogger("runner")


def cluster_inventory(address: str) -> Inventory:
    """What a Ray cluster offers, as an Inventory: GPUs in total, CPUs per node, nodes.

    CUDA slots on a cluster are counted from the cluster's GPUs (Ray places each actor and
    sets its CUDA_VISIBLE_DEVICES); CPU groups (cpu2, ...) are per node, times the nodes.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, log_to_driver=False)
    try:
        res = ray.cluster_resources()
        nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    finally:
        ray.shutdown()
    gpus = int(res.get("GPU", 0))
    return Inventory(cpu_cores=max(1, int(res.get("CPU", 1)) // nodes),
                     cuda=tuple(f"cluster GPU {i}" for i in range(gpus)), nodes=nodes,
                     notes=(f"ray cluster at {address}: {nodes} node(s), "
                            f"{int(res.get('CPU', 0))} CPU(s), {gpus} GPU(s)",))


class _Outbox:
    """Stands in for the pipe inside an actor: collects what the worker code sends."""

    def __init__(self) -> None:
        self.messages: list = []

    def send(self, msg: Any) -> None:
        self.messages.append(msg)

    def take(self) -> list:
        out, self.messages = self.messages, []
        return out


class SlotActor:
    """One slot's worker as a Ray actor (decorated with ray.remote at use)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.outbox = _Outbox()
        self.started = start_worker(spec, self.outbox)

    def hello(self) -> list:
        return self.outbox.take()

    def run(self, call: Call) -> list:
        if self.started is not None:
            marker = RunDir(Path(self.spec.run_dir)).running_marker(self.spec.slot.index)
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(f"{self.spec.incarnation} {call.batch_no}")
            os.replace(tmp, marker)  # whole, no fsync: it only has to outlive this process
            ladder, log_ = self.started
            if not run_call(call, ladder, self.spec, log_, self.outbox):
                self.started = None
        return self.outbox.take()

    def pid(self) -> int:
        return os.getpid()


@contextlib.contextmanager
def _temp_dir(run_dir: Path | None):
    """Ray's temp dir inside the run dir; Ray's socket paths must stay under ~107 bytes, so
    a long run dir is reached through a short symlink in /tmp, removed afterwards."""
    if run_dir is None:
        yield None
        return
    target = run_dir / "ray"
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target)) <= 40:
        yield str(target)
        return
    holder = Path(tempfile.mkdtemp(prefix="rr-"))
    (holder / "r").symlink_to(target)
    try:
        yield str(holder / "r")
    finally:
        (holder / "r").unlink()
        holder.rmdir()


# Ray's switch for its local-only mode (the default on macOS and Windows): off, Ray takes
# 127.0.0.1 as the node's address, and its gRPC servers and agents bind the node's address.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only():
    """Ray's local-only mode for the instance started inside: the processes it starts read
    the environment variable; this process imported Ray already, so its constant (read when
    Ray picks the node's address) is switched too. Both are put back afterwards."""
    saved_env = os.environ.get(LOCAL_ONLY_ENV)
    saved = getattr(_ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[LOCAL_ONLY_ENV] = "0"
    if _ray_constants is not None:
        _ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved_env
        if saved is not None:
            _ray_constants.ENABLE_RAY_CLUSTER = saved


def _check_loopback_node() -> None:
    """The local instance's node address must be loopback (its servers bind it), unless the
    user turned Ray's token authentication on: otherwise it is shut down and refused."""
    node_ip = ray.util.get_node_ip_address()
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(node_ip).is_loopback:
            return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return
    ray.shutdown()
    raise ConfigError(f"the local Ray instance took {node_ip} as its address, not loopback: "
                      "it would listen beyond this machine without authentication; set "
                      "RAY_AUTH_MODE=token (Ray's token authentication) or use executor=local")


class RayMechanics:
    """The executor's mechanics on Ray: an actor per slot, an ObjectRef per call."""

    self_exiting = False  # an actor lives on after SlotExhausted / StartFailed: the loop ends it

    def __init__(self, address: str | None, run_dir: Path | None, stop_timeout_s: float):
        self.address = address
        self.run_dir = Path(run_dir) if run_dir else None
        self.stop_timeout_s = stop_timeout_s
        self.refs: dict[Any, tuple[Worker, Call | None]] = {}

    @contextlib.contextmanager
    def session(self, slots: list[Slot]):
        if ray.is_initialized():  # a caller's own Ray session: use it as it is
            yield
            return
        local = not self.address
        with _temp_dir(self.run_dir if local else None) as temp, \
                (_loopback_only() if local else contextlib.nullcontext()):
            # ray.init installs its own SIGTERM handler: the executor's counter is put back
            # (SIGTERM/SIGHUP stop the run at once, exit 143/129, as with executor=local)
            handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
            if local:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(num_cpus=max(2, sum(s.threads for s in slots)), include_dashboard=False,
                         log_to_driver=False, _temp_dir=temp)
                _check_loopback_node()
            else:
                ray.init(address=self.address, log_to_driver=False)
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
            try:
                yield
            finally:
                ray.shutdown()

    def start(self, slot: Slot, spec: WorkerSpec) -> Worker:
        env = dict(slot.env)
        if slot.backend == "cuda":
            env.pop("CUDA_VISIBLE_DEVICES", None)  # Ray assigns the GPU
        actor_cls = ray.remote(SlotActor).options(
            num_cpus=slot.threads, num_gpus=1 if slot.backend == "cuda" else 0,
            runtime_env={"env_vars": env}, max_restarts=0, max_concurrency=1)
        actor = actor_cls.remote(spec)
        w = Worker(slot, spec.incarnation, actor, None, time.monotonic())
        self.refs[actor.hello.remote()] = (w, None)
        return w

    def send(self, w: Worker, call: Call) -> bool:
        self.refs[w.handle.run.remote(call)] = (w, call)
        return True

    def wait(self, workers: list[Worker], timeout: float):
        if not self.refs:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:
            more, _ = ray.wait([r for r in self.refs if r not in ready],
                               num_returns=max(1, len(self.refs) - len(ready)), timeout=0)
            ready = ready + more
        for ref in ready:
            entry = self.refs.pop(ref, None)
            if entry is None:  # its actor was already reaped
                continue
            w = entry[0]
            try:
                messages = ray.get(ref, timeout=self.stop_timeout_s)
            except (RayActorError, GetTimeoutError) as exc:
                yield w, [], Death(f"actor died ({exc.__class__.__name__})",
                                   self._running_call(w))
                continue
            yield w, messages, None

    def _running_call(self, w: Worker) -> int | None:
        """The batch the dead actor was running, from its marker (None: unknown): the calls
        before it finished, but their replies may have died with it."""
        if self.run_dir is None:
            return None
        marker = RunDir(self.run_dir).running_marker(w.slot.index)
        try:
            incarnation, batch_no = marker.read_text().split()
        except (OSError, ValueError):
            return None
        return int(batch_no) if int(incarnation) == w.incarnation else None

    def drain(self, w: Worker) -> list:
        return []  # results arrive through ObjectRefs, handled in wait

    def reap(self, w: Worker) -> int | None:
        for ref in [r for r, (ww, _) in self.refs.items() if ww is w]:
            del self.refs[ref]
        with contextlib.suppress(Exception):
            ray.kill(w.handle, no_restart=True)
        return 0 if w.state == SlotState.EXHAUSTED else None  # exhausted: an orderly end

    def kill(self, w: Worker) -> bool:
        return False  # an actor has no sentinel to report it: the loop ends it now

    def stop_all(self, workers: list[Worker], deadline_s: float) -> None:
        for w in workers:
            with contextlib.suppress(Exception):
                ray.kill(w.handle, no_restart=True)
        self.refs.clear()


class RayExecutor(Executor):
    """The executor over Ray actors (``executor=ray``)."""

    def __init__(self, make_spec, max_restarts, grace_s, stop_timeout_s, start_timeout_s,
                 prefetch, address: str | None = None, run_dir: Path | None = None,
                 item_timeout_s: float | None = None):
        super().__init__(RayMechanics(address, run_dir, stop_timeout_s), make_spec,
                         max_restarts, grace_s, stop_timeout_s, start_timeout_s, prefetch,
                         item_timeout_s)
