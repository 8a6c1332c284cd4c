"""A light test task whose items misbehave on purpose: the fault table of tests/test_faults.py.

Plugged in exactly as a user's task is, through ``_target_`` on the sleep group::

    python -m runner task=sleep task._target_=tests.faulty_task.FaultyTask \
        '+task.faults=3:sigkill:process:always;5:raise:write:once' '+task.load_fault=exit:2'

Items ``item-000000`` .. sleep ``ms`` each (payload) and write one JSON file per item,
``faulty/<id>.json`` = {"id", "pid", "slot", "batch_no", "batch_size", "model"}, atomically.

``faults``: ``;``-separated ``<index>:<kind>[:<where>[:<when>]]``

* kind  — ``raise`` (RuntimeError), ``badinput`` (BadInput: failed at once, no retry),
  ``exit`` (``sys.exit(3)``), ``sigkill`` (``os.kill(getpid(), SIGKILL)``), ``segv``
  (``ctypes.string_at(0)``), ``segv_fh`` (``faulthandler._sigsegv()``);
* where — ``process`` (default; the item's turn inside the batch, so mid-batch when it is
  not first), ``write`` (after the batch's earlier items are already on disk) or
  ``inwrite`` (inside the item's atomic write: its temp file exists, its output does not);
* when  — ``always`` (default: a poison item) or ``once`` (only the first attempt: a marker
  file ``<run dir>/fault-markers/<id>.<where>`` created with O_EXCL before the fault).

``slow``: ``;``-separated ``<index>:<ms>``: those items sleep that long instead of ``ms``.

``load_fault``: ``<kind>:<n>`` — the first ``n`` model loads of the run (counted with
markers in the run dir, across every slot and restart) do ``kind``; ``<kind>:always`` —
every load does. Empty: loads are clean.

The run dir reaches workers as ``FAULTY_RUN_DIR`` through :meth:`worker_env` (the
controller reads it from Hydra), so markers survive worker deaths and resumes.
"""
from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from runner import names
from runner.rundir import atomic_path
from runner.tasks.base import BadInput, ConfigError, Item, ModelRung, Task, WriteContext

KINDS = ("raise", "badinput", "exit", "sigkill", "segv", "segv_fh")
WHERES = ("process", "write", "inwrite")
WHENS = ("always", "once")
RUN_DIR_ENV = "FAULTY_RUN_DIR"


def parse_faults(text: str) -> dict[str, tuple[str, str, str]]:
    """``"3:sigkill:write:once;5:raise"`` -> {item id: (kind, where, when)}."""
    out: dict[str, tuple[str, str, str]] = {}
    for entry in filter(None, (e.strip() for e in (text or "").split(";"))):
        parts = entry.split(":")
        index, kind = parts[0], parts[1] if len(parts) > 1 else ""
        where = parts[2] if len(parts) > 2 else "process"
        when = parts[3] if len(parts) > 3 else "always"
        if not index.isdigit() or kind not in KINDS or where not in WHERES or when not in WHENS:
            raise ConfigError(f"task.faults entry {entry!r}: want <index>:<{'|'.join(KINDS)}>"
                              f"[:<{'|'.join(WHERES)}>[:<{'|'.join(WHENS)}>]]")
        out[item_id(int(index))] = (kind, where, when)
    return out


def item_id(index: int) -> str:
    return f"item-{index:06d}"


def do_fault(kind: str, what: str) -> None:
    """Misbehave now, the way ``kind`` says."""
    if kind == "raise":
        raise RuntimeError(f"injected fault in {what}")
    if kind == "badinput":
        raise BadInput(f"{what}: injected bad input")
    if kind == "exit":
        sys.exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # the signal is on its way
    if kind == "segv":
        faulthandler.disable()  # keep the worker log short; the exit code tells the story
        ctypes.string_at(0)
    if kind == "segv_fh":
        faulthandler._sigsegv()
    raise AssertionError(f"fault {kind!r} did not happen")


def _claim(marker: Path) -> bool:
    """Create ``marker`` if it is not there yet; True for the one caller that created it."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class FaultyTask(Task):
    name = "sleep"
    output_dir = "faulty"

    def __init__(self, count: int = 20, ms: float = 5.0, faults: str = "", load_fault: str = "",
                 models: Any = ("m1",), slow: str = "", **_: Any):
        self.count, self.ms = int(count), float(ms)
        self.slow = {int(i): float(v) for i, v in (e.split(":") for e in str(slow).split(";") if e)}
        self.faults = parse_faults(faults)
        self.load_fault = load_fault or ""
        self.models = list(models)
        self.default_batch_size = 1

    # ---- controller ----------------------------------------------------------------------
    def discover(self) -> Iterator[Item]:
        for i in range(self.count):
            s = self.slow.get(i, self.ms) / 1000.0
            yield Item(item_id(i), s, f"{s:.6f}")

    def model_chain(self, backend: str) -> list[ModelRung]:
        return [ModelRung(m, m, True, "synthetic") for m in self.models]

    def worker_env(self) -> dict[str, str]:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        return {RUN_DIR_ENV: str(HydraConfig.get().runtime.output_dir)}

    # ---- worker --------------------------------------------------------------------------
    def _markers(self) -> Path:
        run_dir = os.environ.get(RUN_DIR_ENV)
        if not run_dir:
            raise RuntimeError(f"{RUN_DIR_ENV} is not set: run FaultyTask through the runner")
        return Path(run_dir) / "fault-markers"

    def _maybe_fault(self, item: Item, where: str) -> None:
        spec = self.faults.get(item.id)
        if spec is None or spec[1] != where:
            return
        kind, _, when = spec
        if when == "once" and not _claim(self._markers() / f"{names.component(item.id)}.{where}"):
            return
        do_fault(kind, f"{item.id} ({where})")

    def load_model(self, rung: ModelRung, device: str) -> Any:
        if self.load_fault:
            kind, _, n = self.load_fault.partition(":")
            if n == "always":
                do_fault(kind, "load_model")
            for k in range(int(n or 1)):
                if _claim(self._markers() / f"load-{k}"):
                    do_fault(kind, "load_model")
        return rung.name

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        out = []
        for it in items:
            time.sleep(float(it.payload))
            self._maybe_fault(it, "process")
            out.append(float(it.payload))
        return out

    def write(self, items: Sequence[Item], results: Sequence[Any], ctx: WriteContext) -> list[str]:
        out = []
        for it, _r in zip(items, results):
            self._maybe_fault(it, "write")
            rel = f"{self.output_dir}/{names.flat(it.name or names.component(it.id))}.json"
            with atomic_path(ctx.run_dir / rel) as tmp:
                tmp.write_text(json.dumps({
                    "id": it.id, "pid": os.getpid(), "slot": ctx.slot, "batch_no": ctx.batch_no,
                    "batch_size": ctx.batch_size, "model": ctx.model}))
                self._maybe_fault(it, "inwrite")
            out.append(rel)
        return out


# ---- helpers the fault, resume and interrupt tests share ----------------------------------
REPO = Path(__file__).resolve().parents[1]
TARGET = "tests.faulty_task.FaultyTask"
ITEM_STATES = ("pending", "running", "done", "failed")


def cli_args(outputs: Path, *extra: str, count: int = 12, ms: float = 5.0,
             faults: str = "", load_fault: str = "", devices: str = "cpu2") -> list[str]:
    """``python -m runner`` overrides for a FaultyTask run under ``outputs``."""
    args = ["task=sleep", f"task._target_={TARGET}", f"devices={devices}", f"outputs={outputs}",
            "progress=off", f"task.count={count}", f"task.ms={ms}",
            "executor.start_timeout_s=60", "executor.stop_timeout_s=3"]
    if faults:
        args.append(f"+task.faults='{faults}'")
    if load_fault:
        args.append(f"+task.load_fault='{load_fault}'")
    return args + list(extra)


def cli(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "runner", *args]


def run_cli(args: Sequence[str], timeout: float = 120) -> "subprocess.CompletedProcess[str]":
    import subprocess

    return subprocess.run(cli(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def start_run(args: Sequence[str]) -> "subprocess.Popen[str]":
    """``python -m runner`` in the background, in a session of its own: killpg reaches the
    controller and its workers, like a TTY's ^C."""
    import subprocess

    return subprocess.Popen(cli(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_until(proc: Any, cond: Any, timeout: float = 60.0) -> Any:
    """Poll ``cond()`` until it gives something truthy (returned) while the run goes on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {getattr(cond, '__name__', cond)}")


def stop_leftover(proc: Any) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_dirs(outputs: Path, task: str = "sleep") -> list[Path]:
    return sorted(p.parent for p in (Path(outputs) / task).glob("*/plan.yaml"))


def only_run_dir(outputs: Path) -> Path:
    dirs = run_dirs(outputs)
    if len(dirs) != 1:
        raise AssertionError(f"expected one run dir under {outputs}, found {dirs}")
    return dirs[0]


def journal_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    import sqlite3

    db = sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM items ORDER BY seq")}
    finally:
        db.close()


def identities(run_dir: Path) -> list[dict[str, str]]:
    """Every identity line of every worker log: PID=, slot=, incarnation= ..."""
    out = []
    for log in sorted((run_dir / "logs").glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("PID="):
                out.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return out


def output_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every visible output file, parsed (a torn file fails here): relative path -> content."""
    out = {}
    for p in sorted((run_dir / FaultyTask.output_dir).glob("*")):
        if p.name.startswith("."):
            continue  # a temp file of a write killed half-way is not an output
        out[str(p.relative_to(run_dir))] = json.loads(p.read_text())
    return out


def check_consistent(run_dir: Path, count: int, finished: bool = True) -> dict[str, dict]:
    """The invariants of issue 4 on a run dir; returns the journal rows.

    Every discovered item has one row; nothing is left ``running``; done <=> its output is
    on disk, whole, and names that item; failed items have no output and an error file;
    ``finished``: nothing is left pending either.
    """
    rows = journal_rows(run_dir)
    want = {item_id(i) for i in range(count)}
    assert set(rows) == want, f"journal ids differ: {sorted(set(rows) ^ want)[:5]}"
    states = {r["status"] for r in rows.values()}
    assert states <= set(ITEM_STATES), states
    running = [i for i, r in rows.items() if r["status"] == "running"]
    assert not running, f"items left running after the run ended: {running}"
    if finished:
        pending = [i for i, r in rows.items() if r["status"] == "pending"]
        assert not pending, f"items left pending: {pending}"
    files = output_files(run_dir)
    done = {i: r for i, r in rows.items() if r["status"] == "done"}
    for i, r in done.items():
        assert r["output"] in files, f"{i} is done but {r['output']} is not on disk"
        assert files[r["output"]]["id"] == i, f"{r['output']} holds {files[r['output']]['id']}"
        assert r["attempts"] >= 1 and r["finished"] is not None and r["model"], r
    owners = {f["id"] for f in files.values()}
    assert len(owners) == len(files), "two output files hold the same item"
    if finished:
        assert owners == set(done), f"outputs without a done item: {sorted(owners - set(done))}"
    for i, r in rows.items():
        if r["status"] == "failed":
            assert i not in owners, f"{i} failed but has an output"
            assert r["error"], f"{i} failed without an error"
            assert (run_dir / "logs" / "errors" / f"{names.component(i)}.json").is_file(), i
    return rows
