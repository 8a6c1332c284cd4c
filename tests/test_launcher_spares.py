"""Layer: processes (the launcher's spare job processes, staged jobs and fork servers).

While a device is busy the launcher starts the next jobs' processes (spares) and stages a
job on each: Hydra's job set-up (job dir, .hydra/, logging) runs before the device frees,
the task function waits for Go. Each job still gets a fresh process of its own. Proven here
with the example app (tests/fixtures/any_app) on CPU slots, for both start methods:

* one device: jobs never overlap, each has its own pid, and a job's .hydra/ was written
  before the job before it ended (it was staged);
* a staged spare SIGKILLed before its job ran: the job runs anyway, in another process;
* two devices, a long job on one: a job staged on the long job's device is taken back and
  runs on the device that freed (no waiting behind the long job);
* an interrupt while jobs are staged: they are not started, their dirs are gone, the sweep
  says so and exits non-zero;
* the launcher SIGKILLed: its running job and staged spares end too (both start methods);
* a lease's fork server SIGKILLed: its job fails saying so, the next jobs run in a new
  server with the lease's environment;
* a job that returned but whose process cannot exit (a non-daemon thread) is killed after
  exit_wait_s, its result kept.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_launcher_any_app import app, jobs, max_overlap, seen  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(180)


def start_app(app: Path, *args: str) -> subprocess.Popen:  # noqa: F811
    return subprocess.Popen([sys.executable, "train.py", "-m", f"hydra.sweep.dir={app / 'sweep'}",
                             "hydra.launcher.live=off", "hydra.launcher.devices=cpu", *args],
                            cwd=app, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@contextlib.contextmanager
def held_sweep(app: Path, tmp_path: Path, *args: str):  # noqa: F811
    """A sweep of ``args`` whose job with lr=0.1 runs until ``release()``; killed if it is
    still running when the block ends. Yields (process, release)."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "0.1").write_text("")
    proc = start_app(app, f"hold={hold}", *args)
    try:
        yield proc, (hold / "0.1").unlink
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def wait_for(what, timeout: float = 60.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended first: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def holders_of(path: Path) -> list[int]:
    """Pids of the processes that have ``path`` (or a file under it) open."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(path) or os.readlink(fd).startswith(f"{path}/")
                   for fd in (d / "fd").iterdir()):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_one_device_jobs_are_staged_in_fresh_processes(app: Path, method: str) -> None:  # noqa: F811
    proc = start_app(app, "lr=0.1,0.2,0.3,0.4,0.5,0.6", "sleep_s=0.4",
                     "hydra.launcher.max_parallel=1", f"hydra.launcher.start_method={method}")
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err[-3000:]
    rows = jobs(app)
    assert [rows[n]["state"] for n in range(6)] == ["ok"] * 6
    runs = [seen(rows[n]) for n in range(6)]
    assert len({r["pid"] for r in runs}) == 6  # a fresh process per job
    assert max_overlap([(r["start"], r["end"]) for r in runs]) == 1
    assert all(r["env"]["RUNNER_SWEEP_DEVICE"] == "cpu:0" for r in runs)
    # staged: job n's Hydra set-up (.hydra/config.yaml) was written while job n-1 still ran
    staged = [n for n in range(1, 6)
              if (Path(rows[n]["dir"]) / ".hydra" / "config.yaml").stat().st_mtime
              < runs[n - 1]["end"]]
    assert len(staged) >= 3, staged
    # ... and it started right after: the device did not wait for a process
    gaps = sorted(runs[n]["start"] - runs[n - 1]["end"] for n in staged)
    assert gaps[len(gaps) // 2] < 0.1, gaps


def test_a_staged_spare_killed_gives_its_job_back(app: Path, tmp_path: Path) -> None:  # noqa: F811
    with held_sweep(app, tmp_path, "lr=0.1,0.2,0.3", "hydra.launcher.max_parallel=1") \
            as (proc, release):
        job1 = app / "sweep" / "1"
        wait_for(lambda: (job1 / ".hydra" / "config.yaml").is_file(), proc=proc)
        victims = wait_for(lambda: holders_of(job1 / "console.log"), proc=proc)
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        wait_for(lambda: not alive(victims[0]), proc=proc)  # gone before job 0 ends
        release()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    rows = jobs(app)
    assert [rows[n]["state"] for n in range(3)] == ["ok"] * 3, rows
    assert seen(rows[1])["pid"] != victims[0]


def test_a_job_staged_behind_a_long_job_runs_on_the_free_device(app: Path, tmp_path: Path) -> None:  # noqa: F811,E501
    with held_sweep(app, tmp_path, "lr=0.1,0.2,0.3,0.4", "sleep_s=0.5",
                    "hydra.launcher.max_parallel=2") as (proc, release):
        # every other job ends while job 0 still runs: none waits behind it
        wait_for(lambda: all((app / "sweep" / str(n) / "seen.json").is_file() for n in (1, 2, 3)),
                 timeout=90, proc=proc)
        assert not (app / "sweep" / "0" / "seen.json").is_file()
        release()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    rows = jobs(app)
    assert all(rows[n]["state"] == "ok" for n in range(4))
    assert {rows[n]["device"] for n in (1, 2, 3)} == {"cpu:1"}, rows
    assert len({seen(rows[n])["pid"] for n in range(4)}) == 4


def test_an_interrupt_leaves_staged_jobs_not_started(app: Path, tmp_path: Path) -> None:  # noqa: F811
    with held_sweep(app, tmp_path, "lr=0.1,0.2,0.3,0.4", "hydra.launcher.max_parallel=1") \
            as (proc, _):
        wait_for(lambda: (app / "sweep" / "1" / ".hydra" / "config.yaml").is_file(), proc=proc)
        proc.send_signal(signal.SIGINT)  # job 0 (Hydra's app, not runner) ends on Ctrl-C
        out, err = proc.communicate(timeout=60)
    rows = jobs(app)
    assert rows[0]["state"] == "failed"
    assert [rows[n]["state"] for n in (1, 2, 3)] == ["not started"] * 3, rows
    assert not (app / "sweep" / "1").exists()  # the staged job's dir went with it
    assert proc.returncode != 0
    # no process of the sweep is left behind with a file of it open
    assert not holders_of(app / "sweep")


def test_spare_and_job_states_refuse_illegal_moves() -> None:
    from hydra_plugins.runner_launcher._spares import IllegalSpareMove, SpareState, check_spare_move
    from runner.sweep import IllegalJobMove, JobState, check_job_move

    check_spare_move(SpareState.STAGED, SpareState.LAUNCHED)
    check_spare_move(SpareState.STAGED, SpareState.CANCELLED)
    for old, new in [(SpareState.STARTING, SpareState.STAGED),  # no order before Ready
                     (SpareState.CANCELLED, SpareState.LAUNCHED),  # a cancelled job never runs there
                     (SpareState.LAUNCHED, SpareState.CANCELLED), (SpareState.ENDED, SpareState.READY)]:
        with pytest.raises(IllegalSpareMove):
            check_spare_move(old, new)
    check_job_move(JobState.FAILED, JobState.PENDING)  # a resume reruns it
    for old, new in [(JobState.OK, JobState.PENDING), (JobState.NOT_STARTED, JobState.RUNNING),
                     (JobState.PENDING, JobState.OK)]:
        with pytest.raises(IllegalJobMove):
            check_job_move(old, new)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_jobs_end_when_the_launcher_is_killed(app: Path, tmp_path: Path, method: str) -> None:  # noqa: F811,E501
    with held_sweep(app, tmp_path, "lr=0.1,0.2,0.3", "hydra.launcher.max_parallel=1",
                    f"hydra.launcher.start_method={method}") as (proc, _):
        wait_for(lambda: (app / "sweep" / "1" / ".hydra" / "config.yaml").is_file(), proc=proc)
        left = holders_of(app / "sweep")  # job 0 and the spare with job 1 staged
        assert len(left) >= 2, left
        proc.kill()  # SIGKILL: the launcher gets no say
        proc.communicate(timeout=30)
        wait_for(lambda: not any(alive(p) for p in left), timeout=30)


def fork_servers(parent: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and "multiprocessing.forkserver" in cmd:
            out.append(int(d.name))
    return out


def test_a_dead_fork_server_is_started_again_with_its_devices_environment(
        app: Path, tmp_path: Path) -> None:  # noqa: F811
    with held_sweep(app, tmp_path, "lr=0.1,0.2,0.3", "hydra.launcher.max_parallel=1") \
            as (proc, _):
        wait_for(lambda: (app / "sweep" / "1" / ".hydra" / "config.yaml").is_file(), proc=proc)
        servers = fork_servers(proc.pid)
        assert len(servers) == 1, servers
        os.kill(servers[0], signal.SIGKILL)  # its jobs get SIGTERM (their parent died)
        out, err = proc.communicate(timeout=120)
    rows = jobs(app)
    assert rows[0]["state"] == "failed" and "fork server died" in rows[0]["reason"], rows[0]
    assert [rows[n]["state"] for n in (1, 2)] == ["ok", "ok"], rows
    for n in (1, 2):  # the new server had the lease's environment
        assert seen(rows[n])["env"]["RUNNER_SWEEP_DEVICE"] == "cpu:0"
        assert seen(rows[n])["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert proc.returncode == 1


def test_a_module_that_fails_in_the_fork_server_falls_back_to_spawn(app: Path) -> None:  # noqa: F811
    """The task's module raises when imported with a device lease (in the fork server, and
    in any job process): the launcher says so in one warning, spawns job processes instead,
    and each job fails on its own with the error in its console.log."""
    script = app / "train.py"
    script.write_text(script.read_text().replace(
        "\n\n@hydra.main(",
        "\n\nif os.environ.get('RUNNER_SWEEP_DEVICE'):\n"
        "    raise RuntimeError('this module cannot be imported in a job')\n\n\n@hydra.main(", 1))
    proc = start_app(app, "lr=0.1,0.2", "hydra.launcher.max_parallel=1")
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 1, err[-3000:]
    assert "cannot start job processes" in out + err and "spawned from now on" in out + err, (out + err)[-3000:]
    rows = jobs(app)
    assert [rows[n]["state"] for n in (0, 1)] == ["failed", "failed"], rows
    assert "this module cannot be imported in a job" in (app / "sweep" / "0" / "console.log").read_text()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_job_that_returned_but_cannot_exit_is_killed(app: Path, tmp_path: Path,  # noqa: F811
                                                       device: str) -> None:
    env = None
    if device == "cuda":  # a GPU lease is free only once the process has ended
        from tests.test_launcher_any_app import fake_gpus
        env = fake_gpus(tmp_path, 1)
    proc = subprocess.Popen([sys.executable, "train.py", "-m", f"hydra.sweep.dir={app / 'sweep'}",
                             "hydra.launcher.live=plain", f"hydra.launcher.devices={device}",
                             "lr=0.1,0.2", "linger=true", "hydra.launcher.max_parallel=1",
                             "hydra.launcher.exit_wait_s=1"],
                            cwd=app, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    rows = jobs(app)
    assert [rows[n]["state"] for n in (0, 1)] == ["ok", "ok"], rows
    assert round(rows[0]["value"], 6) == 0.04
    assert "has not exited: killed" in out + err
    assert not any(alive(seen(rows[n])["pid"]) for n in (0, 1))
