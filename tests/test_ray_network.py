"""Integration: a live ``executor=ray`` run's local Ray instance listens on loopback only.

Issue 16, point 7: ``executor=ray`` without an address starts a Ray instance for the run,
with Ray's authentication off (``RAY_AUTH_MODE=disabled``); Ray trusts its network, so a
socket of that instance open on another interface would let anyone who can reach the
machine submit code to it while the run lasts. This test starts a real Ray run of the CLI
(the sleep task, two CPU slots), waits until both actors are up and an item is done (a
journal row and the worker logs, never a fixed sleep), then lists every listening TCP socket
and every unconnected bound UDP socket of the run's processes and fails, naming each
offender (process, pid, address, port), when one is bound to a non-loopback address
(``0.0.0.0``, ``::`` or an interface's address). The run is then stopped with SIGINT to
the controller (Ctrl-C: in-flight items finish, exit 130; not SIGTERM, whose handler
``ray.init`` replaces in the controller) and every process of its Ray instance must end.

The run's processes: the controller and its descendants (gcs_server, raylet, agents,
actors), every process of its session (start_run gives the run a session of its own, so one
re-parented to init still counts), and every process whose command line names the run's Ray
session dir. Sockets are read from ``/proc`` (``net/tcp``, ``tcp6``, ``udp``, ``udp6`` and
each process's ``fd`` links), so nothing beyond the standard library is needed.

The second test drives :class:`runner.executor_ray.RayMechanics` in a child interpreter:
the local-only switch is put back after the session, and a local instance whose node
address is not loopback (the switch taken away) is shut down and refused.
"""
from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, committed, log_has, run_dirs, start_run, stop_leftover, wait_until

HAS_RAY = importlib.util.find_spec("ray") is not None
pytestmark = pytest.mark.skipif(not HAS_RAY,
                                reason="ray is not installed (pip install 'runner[ray]')")

TCP_LISTEN, UDP_UNCONNECTED = "0A", "07"  # the st column of /proc/net/{tcp,udp}*


# ---- processes --------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a live process; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[3]))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def run_processes(root: int, marker: str) -> set[int]:
    """The run's processes: ``root`` and its descendants, its session's processes, and every
    process whose command line contains ``marker`` (the run's Ray session dir name)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    found |= {pid for pid, (_, sid) in stats.items() if sid == root}  # root leads its session
    found |= {pid for pid in stats if marker in _cmdline(pid)}
    return {pid for pid in found if pid in stats}


# ---- sockets ----------------------------------------------------------------------------------
def _address(hexaddr: str, v6: bool) -> tuple[str, int]:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if v6:  # four host-order 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def _socket_table(pid: int) -> dict[str, tuple[str, str, int]]:
    """inode -> (proto, address, port) of the listening TCP and unconnected bound UDP sockets
    of the network namespace ``pid`` is in."""
    table = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{proto}") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            state, inode = f[3], f[9]
            wanted = TCP_LISTEN if proto.startswith("tcp") else UDP_UNCONNECTED
            if state == wanted:
                host, port = _address(f[1], proto.endswith("6"))
                if port:
                    table[inode] = (proto, host, port)
    return table


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def listening_sockets(pids: set[int]) -> list[tuple[int, str, str, str, int]]:
    """(pid, process name, proto, address, port) of every listening socket of ``pids``."""
    rows, tables = [], {}
    for pid in sorted(pids):
        try:
            netns = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if netns not in tables:
            tables[netns] = _socket_table(pid)
        for inode in _socket_inodes(pid):
            if inode in tables[netns]:
                rows.append((pid, _name(pid), *tables[netns][inode]))
    return rows


def is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback


# ---- the test ---------------------------------------------------------------------------------
def _ray_session(run_dir: Path) -> str | None:
    """The name of the run's Ray session dir (session_<date>_<pid>), once Ray made it."""
    sessions = [p.name for p in (run_dir / "ray").glob("session_2*")]
    return sessions[0] if len(sessions) == 1 else None


@pytest.mark.timeout(240)
def test_local_ray_instance_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # runner's defaults
    env["PYTHONUNBUFFERED"] = "1"
    out = tmp_path / "out"
    pids: set[int] = set()
    proc = start_run(["task=sleep", "task.count=2000", "task.ms=50", "devices=cpu2",
                      "executor=ray", f"outputs={out}", "progress=off",
                      "executor.start_timeout_s=120", "executor.grace_s=30"], env=env)
    try:
        run_dir = wait_until(lambda: (run_dirs(out) or [None])[0], timeout=90, proc=proc)
        logs = [run_dir / "logs" / f"worker-{slot}.log" for slot in (0, 1)]

        def both_actors_working():
            return (all(log_has(log, "PID=") for log in logs)
                    and committed(run_dir, "done") >= 1 and _ray_session(run_dir))

        session = wait_until(both_actors_working, timeout=150, proc=proc, poll_s=0.1)
        pids = run_processes(proc.pid, session)
        rows = listening_sockets(pids)
        names = {_name(pid) for pid in pids}
        table = "\n".join(f"  {name} (pid {pid}): {p} {host} port {port}"
                          for pid, name, p, host, port in sorted(rows, key=lambda r: r[1]))
        # not vacuous: the instance's own daemons were found, and they do listen somewhere
        assert {"gcs_server", "raylet"} <= names, f"Ray's daemons not found among {names}"
        assert rows, f"no listening socket found in the run's processes {sorted(names)}"
        offenders = [r for r in rows if not is_loopback(r[3])]
        assert not offenders, ("the run's Ray instance listens beyond loopback:\n"
                               + "\n".join(f"  {name} (pid {pid}): {p} {host} port {port}"
                                           for pid, name, p, host, port in offenders)
                               + f"\nevery listening socket of the run:\n{table}")
        assert proc.poll() is None, "the run ended before its sockets were listed"

        # stop it cleanly: Ctrl-C to the controller, the in-flight items finish, exit 130
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130, stderr[-3000:]
        ray_pids = {pid for pid in pids if pid != proc.pid}

        def ray_instance_gone():
            return not [pid for pid in ray_pids if _stat(pid) is not None]

        try:
            wait_until(ray_instance_gone, timeout=60, poll_s=0.1)
        except AssertionError:
            left = {pid: _name(pid) for pid in ray_pids if _stat(pid) is not None}
            raise AssertionError(f"processes of the run's Ray instance outlived it: {left}")
    finally:
        stop_leftover(proc)
        for pid in pids:  # Ray's workers have process groups of their own: killpg misses them
            if pid != proc.pid and (_stat(pid) or (0, 0))[1] == proc.pid:  # still the run's
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


GUARD = """
import contextlib, os
from ray._private import ray_constants
import ray
import runner.executor_ray as ex
from runner.errors import ConfigError

with ex.RayMechanics(None, {run!r}, 3.0).session([]):
    print("node", ray.util.get_node_ip_address())
print("after", os.environ.get(ex.LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER)
ex._loopback_only = contextlib.nullcontext  # Ray left to pick the machine's address
try:
    with ex.RayMechanics(None, {run!r}, 3.0).session([]):
        print("not refused", ray.util.get_node_ip_address())
except ConfigError as exc:
    print("refused", ray.is_initialized(), exc)
"""


@pytest.mark.timeout(180)
def test_local_only_switch_is_restored_and_a_non_loopback_instance_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    p = subprocess.run([sys.executable, "-c", GUARD.format(run=str(tmp_path / "run"))], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert "node 127.0.0.1" in lines, p.stdout
    assert "after None True" in lines, p.stdout  # env variable and constant put back
    refused = [line for line in lines if line.startswith(("refused", "not refused"))]
    assert len(refused) == 1 and refused[0].startswith("refused False "), p.stdout
    assert "RAY_AUTH_MODE=token" in refused[0], refused[0]
