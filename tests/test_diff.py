"""Layer: cli (a real sweep, then ``python -m runner.diff`` as a subprocess); the in-process
``diff.main`` cases are unit.

``python -m runner.diff``: run dirs / sweep job dirs, YAML files, and --compose."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner import diff
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory) -> tuple[Path, Path]:
    """A real 2-job sweep that differs only in batch_size (sweep job dirs are run dirs)."""
    out = tmp_path_factory.mktemp("diff")
    proc = run_cli(["-m", "task=sleep", "task.count=6", "task.ms=5", "devices=cpu2",
                    "batch_size=1,2", f"outputs={out}", "progress=off", "hydra.launcher.live=off"],
                   timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (out / "multirun" / "sleep").iterdir()
    return sweep_dir / "0", sweep_dir / "1"


@pytest.mark.timeout(160)
def test_two_runs_differing_in_batch_size(two_jobs) -> None:
    a, b = two_jobs
    proc = subprocess.run([sys.executable, "-m", "runner.diff", str(a), str(b)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "config: 1 key differs\n  batch_size  1  ->  2\n" in text
    assert "versions: same" in text and "devices: same" in text
    assert "task.count" not in text and "seed" not in text  # same keys are not shown
    summary = text.split("summary:", 1)[1]
    assert "items_per_s" in summary and "%)" in summary  # numbers with their change

    doc = json.loads(subprocess.run([sys.executable, "-m", "runner.diff", str(a), str(b), "--json"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=60).stdout)
    assert doc["sections"]["config"] == [{"key": "batch_size", "a": 1, "b": 2}]
    assert doc["sections"]["versions"] == [] and doc["sections"]["devices"] == []
    keys = {r["key"] for r in doc["sections"]["summary"]}
    assert "status" not in keys and "exit_code" not in keys  # both ok


@pytest.mark.timeout(60)
def test_a_run_against_itself_and_against_a_failed_one(two_jobs, tmp_path: Path, capsys) -> None:
    a, _ = two_jobs
    assert diff.main([str(a), str(a)]) == 0
    out = capsys.readouterr().out
    assert all(f"{s}: same" in out for s in diff.SECTIONS)

    # a copy whose summary says it failed, on another machine
    import shutil

    b = tmp_path / "b"
    shutil.copytree(a, b)
    summary = json.loads((b / "summary.json").read_text())
    summary.update(status="finished with failed items", exit_code=3)
    summary["counts"]["failed"] = 2
    (b / "summary.json").write_text(json.dumps(summary))
    versions = json.loads((b / "versions.json").read_text())
    versions["packages"]["torch"] = "9.9.9"
    versions["inventory"]["cpu_cores"] = 64
    (b / "versions.json").write_text(json.dumps(versions))
    assert diff.main([str(a), str(b), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sections"]["config"] == []
    assert [r["key"] for r in doc["sections"]["versions"]] == ["packages.torch"]
    assert [r["key"] for r in doc["sections"]["devices"]] == ["inventory.cpu_cores"]
    summ = {r["key"]: (r["a"], r["b"]) for r in doc["sections"]["summary"]}
    assert summ["exit_code"] == (0, 3) and summ["failed_items"] == (0, 2)


def test_compose_two_override_sets(capsys) -> None:
    assert diff.main(["--compose", "task=embed", "task=embed batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "config: 1 key differs\n  batch_size  null  ->  64\n" in out
    assert diff.main(["--compose", "task=embed", "task=embed devices=cpu2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sections"]["config"]
    assert {r["key"]: r["b"] for r in rows} == {"devices.name": "cpu2", "devices.backend": "cpu",
                                                 "devices.count": 2}


def test_compose_with_a_changed_conf_dir(tmp_path: Path, capsys) -> None:
    """What a change to a YAML file in conf/ does to the composed config."""
    import shutil

    changed = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", changed)
    path = changed / "devices" / "cpu2.yaml"
    path.write_text(path.read_text() + "threads_per_worker: 1\n")
    assert diff.main(["--compose", "task=embed devices=cpu2", "task=embed devices=cpu2",
                      "--conf", str(ROOT / "conf"), str(changed), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sections"]["config"]
    assert rows == [{"key": "devices.threads_per_worker", "a": None, "b": 1}]


def test_two_yaml_files_and_bad_inputs(tmp_path: Path, capsys) -> None:
    conf = ROOT / "conf" / "devices"
    assert diff.main([str(conf / "cpu2.yaml"), str(conf / "cpu4.yaml")]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(x.split()) for x in out.splitlines()]
    assert "count 2 -> 4" in lines and "name cpu2 -> cpu4" in lines and "backend" not in out
    assert diff.main([str(tmp_path), str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a run dir" in err
    assert diff.main(["--compose", "task=nope", "task=embed"]) == 1
    assert "cannot compose 'task=nope'" in capsys.readouterr().err


def test_flatten_and_compare() -> None:
    a = {"x": {"y": 1, "z": [1, 2]}, "same": "s", "gone": 1}
    b = {"x": {"y": 2, "z": [1, 2]}, "same": "s", "new": {"k": None}}
    assert diff.compare(a, b) == [
        {"key": "gone", "a": 1, "b": diff.ABSENT},
        {"key": "new.k", "a": diff.ABSENT, "b": None},
        {"key": "x.y", "a": 1, "b": 2},
    ]


def test_markdown_and_check_for_two_yaml_files(capsys) -> None:
    conf = ROOT / "conf" / "devices"
    a, b = str(conf / "cpu2.yaml"), str(conf / "cpu4.yaml")
    assert diff.main([a, b, "--format", "md"]) == 0
    assert capsys.readouterr().out == (
        f"### runner diff: `{a}` → `{b}`\n\n**config 2 keys differ**\n\n<details>\n"
        "<summary><b>config</b>: 2 keys</summary>\n\n| key | A | B |\n|---|---|---|\n"
        "| `count` | `2` | `4` |\n| `name` | `cpu2` | `cpu4` |\n\n</details>\n")
    assert diff.main([a, b, "--check"]) == 1  # a CI gate: something differs
    assert diff.main([a, a, "--check", "--format", "json"]) == 0
    capsys.readouterr()
    assert diff.main([a, "/nonexistent.yaml", "--check"]) == 2  # an error, not a difference


@pytest.mark.timeout(60)
def test_markdown_and_check_for_run_dirs(two_jobs, tmp_path: Path, capsys) -> None:
    import shutil

    a, b = two_jobs
    assert diff.main([str(a), str(b), "--format", "md", "--check"]) == 1  # batch_size differs
    md = capsys.readouterr().out
    assert md.startswith(f"### runner diff: `{a}` → `{b}`\n\n**config 1 key, summary ")
    assert ("<summary><b>config</b>: 1 key</summary>\n\n| key | A | B |\n|---|---|---|\n"
            "| `batch_size` | `1` | `2` |\n") in md
    assert "- versions: same" in md and "- devices: same" in md and "%)`" in md
    # only the summary's measurements differ: --check passes (what ran, and where, is the same)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    summary = json.loads((c / "summary.json").read_text())
    summary["wall_s"] = summary["wall_s"] * 2 + 1
    (c / "summary.json").write_text(json.dumps(summary))
    assert diff.main([str(a), str(c), "--check"]) == 0
    assert "wall_s" in capsys.readouterr().out
