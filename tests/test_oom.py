"""Layer: processes (spawned workers); the is_oom table at the top is unit.

The OOM ladder (issue 5): smaller batch, then the next model -- from the configured batch
size again (issue 17) -- recorded per item.

Unit part: ``runner.oom.is_oom`` over a table of real-world messages, OOM and not.

Process part: real runs of the CLI with real spawned workers and the test task
tests/oom_task.py (plugged in through ``_target_``), which runs out of memory on slot 0 only
(slot 1 is "the card with more memory"). Each run checks the rungs taken (summary.json
``slots[].ladder``), the provenance of every item (journal columns model / batch_size /
device, and the same in the item's own output), that no item is lost or duplicated, and
what happens to the other device.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from runner.oom import is_oom
from tests.conftest import query_journal, read_summary, run_cli
from tests.oom_task import MPS_MESSAGE, make_oom

HALVED = "out of memory: batch halved"
NEXT = "out of memory at batch size 1: next model"


# ---- is_oom -----------------------------------------------------------------------------------
def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


OOM = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB"),
    torch.OutOfMemoryError("XPU out of memory. Tried to allocate 2.00 GiB"),
    torch.OutOfMemoryError(""),  # the type alone is enough
    RuntimeError("CUDA failed with error out of memory"),  # CTranslate2 (faster-whisper)
    RuntimeError(MPS_MESSAGE),  # Apple MPS
    RuntimeError("CUDA out of memory. Tried to allocate 128.00 MiB (GPU 0; 7.79 GiB total)"),
    RuntimeError("XPU out of memory. Tried to allocate 512.00 MiB"),
    RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("level_zero backend failed with error: 39 (UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY)"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 10000000000000 bytes."),
    MemoryError(),
    _chained(RuntimeError("batch failed"), torch.OutOfMemoryError("CUDA out of memory.")),
    _chained(ValueError("decode failed"), RuntimeError("CUDA failed with error out of memory")),
]
NOT_OOM = [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu"),
    RuntimeError("shape mismatch in layer 3 for item-020 (an item error)"),
    RuntimeError("CUDA failed with error unspecified launch failure"),  # CTranslate2, not OOM
    RuntimeError("memory format is not supported"),
    ValueError("CUDA out of memory"),  # a message alone makes no OOM outside RuntimeError
    KeyError("out of memory"),
    OSError(12, "Cannot open file"),
    _chained(RuntimeError("batch failed"), ValueError("bad text")),
]


@pytest.mark.parametrize("exc", OOM, ids=lambda e: f"{type(e).__name__}:{str(e)[:40]}")
def test_is_oom_recognises(exc):
    assert is_oom(exc) is True


@pytest.mark.parametrize("exc", NOT_OOM, ids=lambda e: f"{type(e).__name__}:{str(e)[:40]}")
def test_is_oom_refuses(exc):
    assert is_oom(exc) is False


def test_test_task_raises_what_the_backends_raise():
    assert type(make_oom("torch", "x")) is torch.OutOfMemoryError
    assert all(is_oom(make_oom(k, "x")) for k in ("torch", "ctranslate2", "mps"))


# ---- real runs ---------------------------------------------------------------------------------
class Run:
    """One CLI run of the OOM task, and what it left behind."""

    def __init__(self, tmp_path: Path, count: int, *overrides: str, devices: str = "cpu2",
                 env: dict[str, str] | None = None):
        self.count = count
        self.proc = run_cli(
            ["task=sleep", "task._target_=tests.oom_task.OOMTask", f"task.count={count}",
             f"devices={devices}", "chunking=contiguous", f"outputs={tmp_path}", "progress=off",
             *overrides], timeout=150, **({"env": env} if env is not None else {}))
        (self.dir,) = (tmp_path / "sleep").iterdir()
        assert (self.dir / "summary.json").exists(), self.proc.stderr[-3000:]
        self.summary = read_summary(self.dir)
        self.plan = yaml.safe_load((self.dir / "plan.yaml").read_text())
        self.rows = {r[0]: dict(zip(("status", "attempts", "slot", "device", "model", "batch_size",
                                     "output", "error"), r[1:]))
                     for r in query_journal(self.dir, "SELECT id, status, attempts, slot, device, "
                                            "model, batch_size, output, error FROM items")}

    def ladder(self, slot: int) -> list[list]:
        return self.summary["slots"][slot]["ladder"]

    def check_invariants(self) -> None:
        """No item lost or duplicated; provenance for every item, journal = its output."""
        ids = {f"item-{i:03d}" for i in range(self.count)}
        assert set(self.rows) == ids
        done = {i for i, r in self.rows.items() if r["status"] == "done"}
        failed = {i for i, r in self.rows.items() if r["status"] == "failed"}
        assert done | failed == ids and not done & failed
        assert self.summary["counts"] == {"pending": 0, "running": 0, "done": len(done),
                                          "failed": len(failed)}
        assert sum(s["items"] for s in self.summary["slots"]) == len(done)
        assert sum(self.summary["models"].values()) == len(done)
        outputs = {p.stem for p in (self.dir / "results").glob("*.json")}
        assert outputs == done
        for i in done:
            r = self.rows[i]
            assert r["model"] and r["batch_size"] and r["device"], (i, r)
            out = json.loads((self.dir / r["output"]).read_text())
            assert (out["id"], out["model"], out["batch_size"], out["device"]) == (
                i, r["model"], r["batch_size"], r["device"]), (i, r, out)
            assert out["result"] == int(i.split("-")[1]) * 2
        per_device: dict[str, dict[str, int]] = {}
        for i in done:
            d = per_device.setdefault(self.rows[i]["device"], {})
            d[self.rows[i]["model"]] = d.get(self.rows[i]["model"], 0) + 1
        assert {k: v["models"] for k, v in self.summary["devices"].items() if v["models"]} == per_device
        for i in failed:
            assert (self.dir / "logs" / "errors" / f"{i}.json").exists()

    def worker_log(self, slot: int) -> str:
        return (self.dir / "logs" / f"worker-{slot}.log").read_text()


@pytest.mark.timeout(180)
def test_torch_oom_halves_then_next_model_other_device_stays(tmp_path):
    run = Run(tmp_path, 32, "+task.models=[big,medium,small]", "+task.oom_slots=[0]",
              "+task.oom_models=[big]", "+task.oom_kind=torch", "batch_size=8")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    run.check_invariants()
    # the plan shows each device's starting rung
    assert [s["model"] for s in run.plan["slots"]] == ["big", "big"]
    assert [r["name"] for r in run.plan["chain"]["cpu"]] == ["big", "medium", "small"]
    # slot 0: 8 -> 4 -> 2 -> 1 on big, then medium from the top again: 8 (issue 17)
    assert run.ladder(0) == [["big", 4, HALVED], ["big", 2, HALVED], ["big", 1, HALVED],
                             ["medium", 8, NEXT]]
    assert run.ladder(1) == []  # the card with more memory stays on the larger model
    for i in range(32):
        r = run.rows[f"item-{i:03d}"]
        if i < 16:
            assert (r["device"], r["model"], r["batch_size"]) == ("cpu:0", "medium", 8)
        else:
            assert (r["device"], r["model"], r["batch_size"]) == ("cpu:1", "big", 8)
    assert run.summary["devices"]["cpu:0"]["models"] == {"medium": 16}
    assert run.summary["devices"]["cpu:1"]["models"] == {"big": 16}
    # a real torch.OutOfMemoryError went through the worker
    assert "out of memory on batch of 8 with big: OutOfMemoryError: CUDA out of memory" in run.worker_log(0)
    # a run that mixes models says so
    (warning,) = run.summary["warnings"]
    assert "mix 2 models" in warning and "cpu:0: medium 16" in warning and "cpu:1: big 16" in warning
    assert "warning: outputs mix 2 models" in run.proc.stdout


@pytest.mark.timeout(120)
def test_ctranslate2_oom_halves_and_an_item_error_is_not_oom(tmp_path):
    run = Run(tmp_path, 32, "+task.models=[big,small]", "+task.oom_slots=[0]",
              "+task.oom_batch_over=2", "+task.oom_kind=ctranslate2",
              "+task.fail_items=[item-020]", "batch_size=8", "checkpoint.max_attempts=2")
    assert run.proc.returncode == 3, run.proc.stderr[-3000:]
    run.check_invariants()
    assert run.ladder(0) == [["big", 4, HALVED], ["big", 2, HALVED]]
    # slot 1 met a RuntimeError that is not OOM: no rung, the batch retried one by one
    assert run.ladder(1) == []
    failed = {i for i, r in run.rows.items() if r["status"] == "failed"}
    assert failed == {"item-020"}
    r = run.rows["item-020"]
    assert r["attempts"] == 2 and "shape mismatch in layer 3" in r["error"]
    err = json.loads((run.dir / "logs" / "errors" / "item-020.json").read_text())
    assert "RuntimeError: shape mismatch" in err["error"] and err["attempt"] == 2
    for i in range(16):
        r = run.rows[f"item-{i:03d}"]
        assert (r["device"], r["model"], r["batch_size"]) == ("cpu:0", "big", 2)
    for i in range(16, 24):  # the batch with the bad item, retried one by one
        if i != 20:
            r = run.rows[f"item-{i:03d}"]
            assert (r["device"], r["model"], r["batch_size"]) == ("cpu:1", "big", 1)
    for i in range(24, 32):
        r = run.rows[f"item-{i:03d}"]
        assert (r["device"], r["model"], r["batch_size"]) == ("cpu:1", "big", 8)
    assert "CUDA failed with error out of memory" in run.worker_log(0)
    assert run.summary["warnings"] == []  # one model throughout
    assert "1 item(s) failed" in run.proc.stderr


@pytest.mark.timeout(120)
def test_mps_oom_and_oom_while_loading_goes_to_the_next_model(tmp_path):
    run = Run(tmp_path, 16, "+task.models=[big,medium,small]", "+task.oom_slots=[0]",
              "+task.load_oom_models=[big]", "+task.oom_models=[medium]", "+task.oom_kind=mps",
              "batch_size=4")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    run.check_invariants()
    assert run.ladder(0) == [["medium", 4, "out of memory loading big: next model"],
                             ["medium", 2, HALVED], ["medium", 1, HALVED], ["small", 4, NEXT]]
    assert run.ladder(1) == []
    assert run.summary["slots"][0]["models"] == {"small": 8}
    assert run.summary["slots"][1]["models"] == {"big": 8}
    assert "out of memory loading big" in run.worker_log(0)
    assert "MPS backend out of memory" in run.worker_log(0)


@pytest.mark.timeout(120)
def test_exhausted_chain_fails_only_that_item_and_the_other_device_goes_on(tmp_path):
    run = Run(tmp_path, 24, "+task.models=[big,small]", "+task.oom_slots=[0]",
              "+task.oom_models=[big,small]", "+task.oom_kind=ctranslate2", "batch_size=4",
              "checkpoint.max_attempts=1")
    assert run.proc.returncode == 3, run.proc.stderr[-3000:]
    run.check_invariants()
    # small starts from the configured 4 again and halves down to 1 before giving up
    assert run.ladder(0) == [["big", 2, HALVED], ["big", 1, HALVED], ["small", 4, NEXT],
                             ["small", 2, HALVED], ["small", 1, HALVED]]
    failed = {i for i, r in run.rows.items() if r["status"] == "failed"}
    assert failed == {"item-000"}  # only the item that met the end of the chain
    r = run.rows["item-000"]
    assert "every model of the chain (big, small) at batch size 1" in r["error"]
    assert r["device"] == "cpu:0" and r["model"] == "small"
    # slot 0 stopped in order (no death); slot 1 did everything else, its list and slot 0's
    assert run.summary["slots"][0]["items"] == 0 and run.summary["slots"][0]["deaths"] == 0
    assert run.summary["slots"][1]["items"] == 23
    assert any("this slot stops, the others go on" in n for n in run.summary["notes"])


@pytest.mark.timeout(120)
def test_one_model_means_no_fallback_and_the_item_moves_to_another_device(tmp_path):
    run = Run(tmp_path, 12, "+task.models=[only]", "+task.oom_slots=[0]",
              "+task.oom_models=[only]", "+task.oom_kind=ctranslate2", "batch_size=4")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    run.check_invariants()
    assert [r["name"] for r in run.plan["chain"]["cpu"]] == ["only"]
    assert run.ladder(0) == [["only", 2, HALVED], ["only", 1, HALVED]]  # no next model
    # the item it exhausted on was retried on the other device, within max_attempts
    r = run.rows["item-000"]
    assert (r["status"], r["device"], r["attempts"]) == ("done", "cpu:1", 2)
    assert all(r["device"] == "cpu:1" for r in run.rows.values())
    assert run.summary["slots"][1]["items"] == 12
