"""Layer: contract (every executor passes it).

One contract every executor passes (as Hydra's LauncherTestSuite does for launchers):
same outputs for the same items (bitwise for embeddings on CPU), the same journal, and
the same behaviour when a worker or actor is killed. Runs the real CLI in a subprocess."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, identity_line, only_run_dir, query_journal, run_cli

HAS_RAY = importlib.util.find_spec("ray") is not None
EXECUTORS = ["local", pytest.param("ray", marks=pytest.mark.skipif(
    not HAS_RAY, reason="ray is not installed (pip install 'runner[ray]')"))]


def run_bare(*overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m runner`` in a bare environment (no inherited Ray or CUDA settings)."""
    env = {"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return run_cli(overrides, timeout=timeout, env=env)


def journal(run: Path) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in query_journal(run, "SELECT id, status, output, model FROM items")}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_items_done_journal_and_outputs(tmp_path, executor):
    p = run_bare("task=sleep", "task.count=30", "task.ms=40", "devices=cpu2",
                 f"executor={executor}", f"outputs={tmp_path}", "progress=off")
    assert p.returncode == 0, p.stderr[-2000:]
    run = only_run_dir(tmp_path, "sleep")
    rows = journal(run)
    assert len(rows) == 30 and {r[0] for r in rows.values()} == {"done"}
    for item_id, (_, output, model) in rows.items():
        assert model == "sleep"
        assert json.loads((run / output).read_text())["id"] == item_id
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["items_done"] == 30
    assert [s["device"] for s in summary["slots"]] == ["cpu:0", "cpu:1"]
    worked = [s["slot"] for s in summary["slots"] if s["items"]]
    assert worked  # a slot whose actor had not started when the work ran out may do none
    for slot in worked:
        first = identity_line(run, slot)
        assert first.startswith("PID=") and f"slot={slot}" in first


@pytest.mark.timeout(240)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_killed_worker_items_return_and_finish(tmp_path, executor):
    markers = tmp_path / "markers"
    markers.mkdir()
    p = run_bare("task=sleep", "task._target_=tests.contract_task.KillOnceTask", "task.count=24",
                 "task.ms=5", "+task.kill_ids=[item-000005,item-000017]",
                 f"+task.marker_dir={markers}", "devices=cpu2", f"executor={executor}",
                 f"outputs={tmp_path / 'out'}", "progress=off")
    assert p.returncode == 0, p.stderr[-3000:]
    run = only_run_dir(tmp_path / "out", "sleep")
    rows = journal(run)
    assert len(rows) == 24 and {r[0] for r in rows.values()} == {"done"}
    assert sorted(m.name for m in markers.iterdir()) == ["killed-item-000005", "killed-item-000017"]
    summary = json.loads((run / "summary.json").read_text())
    assert sum(s["deaths"] for s in summary["slots"]) == 2
    assert sum(s["items"] for s in summary["slots"]) == 24  # each item counted once
    attempts = dict(query_journal(run, "SELECT id, attempts FROM items"))
    assert attempts["item-000005"] == 2 and attempts["item-000017"] == 2


@pytest.mark.timeout(300)
@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'runner[ray]')")
def test_embeddings_bitwise_equal_across_executors(tmp_path):
    import pyarrow.parquet as pq

    vectors = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        p = run_bare("task=embed", "limit=12", "batch_size=4", "devices=cpu",
                     f"executor={executor}", f"outputs={out}", "progress=off", timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        run = only_run_dir(out, "embed")
        import pyarrow as pa

        table = pa.concat_tables(pq.read_table(f) for f in
                                 sorted((run / "embeddings").glob("part-*.parquet"))).to_pydict()
        vectors[executor] = dict(zip(table["id"], table["vector"]))
        assert journal(run).keys() == vectors[executor].keys()
    assert vectors["local"].keys() == vectors["ray"].keys() and len(vectors["local"]) == 12
    for key, vec in vectors["local"].items():
        assert vec == vectors["ray"][key], key  # bitwise: same floats


def test_ray_missing_is_one_line_error(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "import importlib.util as u; u.find_spec = lambda name, *a: None if name == 'ray' "
            "else _orig(name, *a)\n")
    code = ("import importlib.util as u, sys\n_orig = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name == 'ray' else _orig(name, *a)\n"
            "from runner.app import main\nsys.argv = ['runner', 'task=sleep', 'executor=ray', "
            f"'outputs={tmp_path}']\nmain()\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    lines = [l for l in p.stderr.splitlines() if l.startswith("runner: error:")]
    assert len(lines) == 1 and "pip install" in lines[0] and "executor=local" in lines[0]


@pytest.mark.timeout(240)
@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'runner[ray]')")
def test_cluster_address_counts_slots_from_cluster(tmp_path):
    """executor.address=<head>: the plan counts slots from the cluster's resources."""
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="rt-")  # Ray's socket paths must stay short
    env = {"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=3",
                    f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=120)
    try:
        p = run_bare("task=sleep", "task.count=12", "task.ms=5", "devices=cpu2", "executor=ray",
                     f"executor.address=127.0.0.1:{port}", f"outputs={tmp_path}", "progress=off")
        assert p.returncode == 0, p.stderr[-3000:]
        run = only_run_dir(tmp_path, "sleep")
        plan = (run / "plan.yaml").read_text()
        assert "ray cluster at 127.0.0.1" in plan and "1 node(s), 3 CPU(s)" in plan
        summary = json.loads((run / "summary.json").read_text())
        assert len(summary["slots"]) == 2 and summary["items_done"] == 12  # cpu2 x 1 node
        assert not (run / "ray").exists()  # a cluster keeps its own temp dir
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
