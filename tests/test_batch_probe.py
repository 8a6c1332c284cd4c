"""Layer: processes (CLI runs, spawned workers); the sizing and _Ladder tests at the top are unit.

``batch_size=auto`` per slot, and the OOM ladder's restart from the top after a step-down
(issue 17).

Unit: ``runner.oom.slot_batch`` / ``call_size`` (what a slot starts at, how many items a call
holds), ``RunContext.spec``, and the worker's ``_Ladder`` driven through the real
``run_call`` by a scripted model family with a memory limit per model (no processes).

Processes: the real CLI with tests/oom_task.py. No CUDA card can exist here, so only the
driver's tool is faked: an ``nvidia-smi`` on PATH that lists two cards. Discovery, the cuda
slots (``CUDA_VISIBLE_DEVICES``), the specs, the spawned workers and the ladder are the real
ones; the task runs out of memory per slot (``slot_batch_over``, by ``RUNNER_SLOT``) with a
real ``torch.OutOfMemoryError``. Each run checks summary.json's per-slot ``ladder``, the
journal's batch_size column and that every item was done once.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from runner.context import RunContext
from runner.devices import Slot
from runner.messages import Call, ChunkDone, ItemFailed, RungChanged, WorkerSpec
from runner.oom import call_size, slot_batch
from runner.rundir import RunDir
from runner.tasks.base import Item, ModelRung
from runner.worker import _Ladder, run_call
from tests.test_oom import HALVED, NEXT, Run

LOG = logging.getLogger("tests.test_batch_probe")


# ---- sizing: what a slot starts at, how big a call is -----------------------------------------
@pytest.mark.parametrize("setting, backend, want", [
    ("auto", "cuda", (1, (1, 256))),
    ("auto", "xpu", (1, (1, 256))),
    ("auto", "cpu", (64, None)),  # CPU: the task's default, no probe
    (16, "cuda", (16, None)),
    (None, "cuda", (64, None)),
    (None, "cpu", (64, None)),
])
def test_slot_batch(setting, backend, want):
    assert slot_batch(setting, 1, 256, 64, backend) == want


@pytest.mark.parametrize("setting, backends, default, want", [
    ("auto", {"cuda"}, 64, 256),  # calls of batch_probe.max: the worker grows within a call
    ("auto", {"cpu"}, 64, 64),  # nothing probes: calls of the task's default
    ("auto", {"cpu", "cuda"}, 64, 256),
    ("auto", {"cpu", "cuda"}, 512, 512),  # a CPU slot's chunk is never cut by the call
    (16, {"cuda", "cpu"}, 64, 16),
    (None, {"cuda"}, 64, 64),
])
def test_call_size(setting, backends, default, want):
    assert call_size(setting, 1, 256, default, backends) == want


def test_spec_gives_accelerator_slots_a_probe_and_cpu_slots_the_default(tmp_path):
    cpu, cuda = Slot(0, "cpu", None, 1), Slot(1, "cuda", 0, 1)
    rung = [ModelRung("m", "m", True)]
    ctx = RunContext(OmegaConf.create({"batch_size": "auto", "seed": 0,
                                       "batch_probe": {"floor": 2, "max": 128}}),
                     (), (), RunDir(tmp_path), SimpleNamespace(default_batch_size=64), {}, None,
                     (cpu, cuda), {"cpu": rung, "cuda": rung}, (), 128, {}, None)
    assert (ctx.spec(cuda, 0).batch_size, ctx.spec(cuda, 0).probe) == (2, (2, 128))
    assert (ctx.spec(cpu, 0).batch_size, ctx.spec(cpu, 0).probe) == (64, None)
    fixed = RunContext(**{**ctx.__dict__, "cfg": OmegaConf.create(
        {"batch_size": 16, "seed": 0, "batch_probe": {"floor": 2, "max": 128}}), "batch_size": 16})
    assert (fixed.spec(cuda, 0).batch_size, fixed.spec(cuda, 0).probe) == (16, None)


# ---- the ladder, driven through run_call by a scripted model family ---------------------------
class Family:
    """Models with a memory limit each: a batch over the limit runs out of memory (0: any
    batch; absent: no limit). ``bad`` items raise an ordinary error (an item error)."""

    def __init__(self, limits: dict[str, int], bad: frozenset[str] = frozenset()):
        self.limits, self.bad = limits, bad
        self.calls: list[tuple[str, int]] = []  # (model, items) per process() call

    def load_model(self, rung: ModelRung, device: str) -> str:
        return rung.name

    def process(self, model: str, items) -> list[str]:
        self.calls.append((model, len(items)))
        limit = self.limits.get(model)
        if limit is not None and len(items) > limit:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({model}, "
                               f"batch of {len(items)})")
        if any(it.id in self.bad for it in items):
            raise ValueError("shape mismatch (an item error)")
        return [it.payload for it in items]

    def write(self, items, results, ctx) -> list[str]:
        return [f"out/{it.id}" for it in items]

    def item_metrics(self, item, result) -> dict:
        return {}


class Pipe:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)

    def rungs(self) -> list[tuple[str, int, str]]:
        return [(m.model, m.batch_size, m.reason) for m in self.sent if isinstance(m, RungChanged)]

    def done(self) -> list[tuple[str, str, int]]:
        """(item, model, batch size) of every item done, in order."""
        return [(d.item_id, d.model, d.batch_size) for m in self.sent if isinstance(m, ChunkDone)
                for d in m.done]

    def failed(self) -> list[str]:
        return [m.item_id for m in self.sent if isinstance(m, ItemFailed)]


def drive(tmp_path: Path, family: Family, count: int, call: int, batch: int,
          probe: tuple[int, int] | None = None, models=("big", "small")) -> tuple[_Ladder, Pipe]:
    """``count`` items through one worker's ladder (cuda slot) in calls of ``call`` items."""
    tmp_path.mkdir(exist_ok=True)
    spec = WorkerSpec(Slot(0, "cuda", 0, 1), 0, {}, tuple(ModelRung(m, m, True) for m in models),
                      batch, str(tmp_path), str(tmp_path / "worker-0.log"), probe=probe)
    pipe = Pipe()
    ladder = _Ladder(spec, family, LOG, pipe)
    assert ladder.load_next("")
    items = [Item(f"item-{i:03d}", 1.0, str(i)) for i in range(count)]
    for n, start in enumerate(range(0, count, call)):
        assert run_call(Call(n, tuple(items[start:start + call])), ladder, spec, LOG, pipe)
    return ladder, pipe


def every_item_once(pipe: Pipe, count: int, failed: tuple[str, ...] = ()) -> None:
    done = [i for i, _, _ in pipe.done()]
    assert sorted(done + pipe.failed()) == [f"item-{i:03d}" for i in range(count)]
    assert len(set(done)) == len(done) and pipe.failed() == list(failed)


def test_probe_doubles_on_real_items_and_settles_at_the_last_size_that_fit(tmp_path):
    family = Family({"big": 8})
    ladder, pipe = drive(tmp_path, family, 64, 64, 1, probe=(1, 64))
    every_item_once(pipe, 64)
    assert pipe.rungs() == [("big", 8, "batch probe: 8 fits (16 ran out of memory)")]
    assert family.calls[:6] == [("big", 1), ("big", 2), ("big", 4), ("big", 8), ("big", 16),
                                ("big", 8)]  # the items of the 16 that ran out, again at 8
    assert [b for _, _, b in pipe.done()] == [1] + [2] * 2 + [4] * 4 + [8] * 56 + [1]
    assert ladder.batch_size == 8 and not ladder.probing


def test_probe_stops_at_the_max(tmp_path):
    ladder, pipe = drive(tmp_path, Family({}), 64, 64, 2, probe=(2, 16))
    every_item_once(pipe, 64)
    assert pipe.rungs() == [("big", 16, "batch probe: 16 fits (batch_probe.max)")]
    assert [b for _, _, b in pipe.done()] == [2] * 2 + [4] * 4 + [8] * 8 + [16] * 48 + [2] * 2


def test_a_short_chunk_proves_nothing(tmp_path):
    # calls of 3: chunks of 1 and 2, then each call whole at size 4: 3 items went through,
    # 4 is not known to fit, so the probe neither grows past 4 nor settles
    ladder, pipe = drive(tmp_path / "a", Family({}), 9, 3, 1, probe=(1, 64))
    every_item_once(pipe, 9)
    assert [b for _, _, b in pipe.done()] == [1, 2, 2] + [3] * 6
    assert pipe.rungs() == [] and (ladder.probing, ladder.batch_size, ladder.fits) == (True, 4, 2)
    # a short chunk that runs out of memory settles at the last size that fitted
    ladder, pipe = drive(tmp_path / "b", Family({"big": 2}), 6, 3, 1, probe=(1, 64))
    every_item_once(pipe, 6)
    assert [b for _, _, b in pipe.done()] == [1, 2, 2, 2, 2, 1]
    assert pipe.rungs() == [("big", 2, "batch probe: 2 fits (3 ran out of memory)")]


def test_out_of_memory_at_the_floor_is_the_plain_ladder(tmp_path):
    ladder, pipe = drive(tmp_path, Family({"big": 2}), 16, 16, 8, probe=(8, 64))
    every_item_once(pipe, 16)
    assert pipe.rungs() == [("big", 4, HALVED), ("big", 2, HALVED)]
    assert {b for _, _, b in pipe.done()} == {2}  # never grows once below the floor


def test_after_a_step_down_the_next_model_starts_at_the_configured_size(tmp_path):
    family = Family({"big": 0, "small": 8})
    _, pipe = drive(tmp_path, family, 48, 16, 16)
    every_item_once(pipe, 48)
    assert pipe.rungs() == [("big", 8, HALVED), ("big", 4, HALVED), ("big", 2, HALVED),
                            ("big", 1, HALVED), ("small", 16, NEXT), ("small", 8, HALVED)]
    assert {(m, b) for _, m, b in pipe.done()} == {("small", 8)}


def test_after_a_step_down_the_next_model_probes_again_from_the_floor(tmp_path):
    _, pipe = drive(tmp_path, Family({"big": 0, "small": 8}), 64, 64, 2, probe=(2, 64))
    every_item_once(pipe, 64)
    assert pipe.rungs() == [("big", 1, HALVED), ("small", 2, NEXT),
                            ("small", 8, "batch probe: 8 fits (16 ran out of memory)")]
    assert {m for _, m, _ in pipe.done()} == {"small"}
    assert max(b for _, _, b in pipe.done()) == 8


def test_the_old_rule_behind_the_switch_stays_at_1(tmp_path, monkeypatch):
    """What bench/bench_ladder.py measures against: the next model kept batch size 1."""
    monkeypatch.setattr(_Ladder, "_restart_from_top", False)
    _, pipe = drive(tmp_path, Family({"big": 0, "small": 8}), 16, 16, 8)
    every_item_once(pipe, 16)
    assert pipe.rungs()[-1] == ("small", 1, NEXT)
    assert {b for _, _, b in pipe.done()} == {1}


def test_an_item_error_while_probing_fails_that_item_alone(tmp_path):
    family = Family({}, bad=frozenset({"item-005"}))
    ladder, pipe = drive(tmp_path, family, 40, 40, 1, probe=(1, 16))
    every_item_once(pipe, 40, failed=("item-005",))
    # 1, 2, then the 4 with the bad item one by one (no growth on those), then 4 again, 8, 16
    assert family.calls == [("big", 1), ("big", 2), ("big", 4), ("big", 1), ("big", 1),
                            ("big", 1), ("big", 1), ("big", 4), ("big", 8), ("big", 16),
                            ("big", 5)]
    assert pipe.rungs() == [("big", 16, "batch probe: 16 fits (batch_probe.max)")]


# ---- real runs: two fake CUDA cards of different memory ---------------------------------------
def fake_cuda_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has an ``nvidia-smi`` that lists two cards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0, Fake Card A, 16384 MiB\\n1, Fake Card B, 81920 MiB\\n'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def batches(run: Run, device: str) -> dict[int, int]:
    """batch size -> items, from the journal, for one device."""
    out: dict[int, int] = {}
    for r in run.rows.values():
        if r["device"] == device:
            out[r["batch_size"]] = out.get(r["batch_size"], 0) + 1
    return out


@pytest.mark.timeout(120)
def test_auto_probes_a_batch_per_card(tmp_path):
    run = Run(tmp_path, 128, "+task.slot_batch_over=[4,16]", "batch_size=auto",
              "batch_probe.max=32", devices="cuda2", env=fake_cuda_env(tmp_path))
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    run.check_invariants()
    assert [s["device"] for s in run.summary["slots"]] == ["cuda:0", "cuda:1"]
    assert run.plan["batch_size"] == 32  # calls of batch_probe.max: each worker grows within
    assert run.ladder(0) == [["big", 4, "batch probe: 4 fits (8 ran out of memory)"]]
    assert run.ladder(1) == [["big", 16, "batch probe: 16 fits (32 ran out of memory)"]]
    # no item failed, every item done once; the journal has each chunk's size
    assert {(r["status"], r["attempts"]) for r in run.rows.values()} == {("done", 1)}
    # cuda:0: 1+2+4 of its first call of 32, then 4s (the call's last item alone)
    assert batches(run, "cuda:0") == {1: 2, 2: 2, 4: 60}
    # cuda:1: 1+2+4+8+16 of its first call of 32, its last item at 1, then 16s
    assert batches(run, "cuda:1") == {1: 2, 2: 2, 4: 4, 8: 8, 16: 48}
    for slot, line in ((0, "batch probe: 4 fits (8 ran out of memory)"),
                       (1, "batch probe: 16 fits (32 ran out of memory)")):
        log = run.worker_log(slot)
        assert f"backend=cuda device=cuda:{slot} CUDA_VISIBLE_DEVICES={slot}" in log
        assert line in log and "OutOfMemoryError" in log


@pytest.mark.timeout(120)
def test_auto_on_cpu_slots_takes_the_default_without_probing(tmp_path):
    run = Run(tmp_path, 32, "+task.slot_batch_over=[4,16]", "batch_size=auto")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    run.check_invariants()
    assert run.plan["batch_size"] == 8  # the task's default
    assert run.ladder(0) == [["big", 4, HALVED]]  # the plain ladder: no probe on a CPU
    assert run.ladder(1) == []
    assert batches(run, "cpu:1") == {8: 16}  # never grows past the default
    assert "batch probe" not in run.worker_log(0) + run.worker_log(1)


@pytest.mark.timeout(120)
def test_after_a_step_down_the_next_model_runs_at_the_configured_size(tmp_path):
    run = Run(tmp_path, 32, "+task.models=[big,small]", "+task.oom_slots=[0]",
              "+task.oom_models=[big]", "+task.oom_batch_over=8", "+task.oom_kind=ctranslate2",
              "batch_size=16")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    run.check_invariants()
    assert run.ladder(0) == [["big", 8, HALVED], ["big", 4, HALVED], ["big", 2, HALVED],
                             ["big", 1, HALVED], ["small", 16, NEXT], ["small", 8, HALVED]]
    assert {(r["model"], r["batch_size"]) for r in run.rows.values()
            if r["device"] == "cpu:0"} == {("small", 8)}  # not 1
    assert {(r["model"], r["batch_size"]) for r in run.rows.values()
            if r["device"] == "cpu:1"} == {("big", 16)}


@pytest.mark.timeout(120)
def test_auto_after_a_step_down_the_next_model_probes_again(tmp_path):
    run = Run(tmp_path, 32, "+task.models=[big,small]", "+task.oom_models=[big]",
              "+task.oom_batch_over=8", "batch_size=auto", "batch_probe.floor=4",
              "batch_probe.max=32", devices="cuda1", env=fake_cuda_env(tmp_path))
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    run.check_invariants()
    assert run.ladder(0) == [["big", 2, HALVED], ["big", 1, HALVED], ["small", 4, NEXT],
                             ["small", 8, "batch probe: 8 fits (16 ran out of memory)"]]
    assert {(r["status"], r["attempts"], r["model"]) for r in run.rows.values()} == {
        ("done", 1, "small")}
    assert batches(run, "cuda:0") == {4: 8, 8: 24}  # 4, 8, 16 out of memory, 8, 8, 4
