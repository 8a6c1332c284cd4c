"""Layer: unit (in-process ``diff.main`` / ``review.review``), plus one cli subprocess.

``python -m runner.diff --rev A[..B]``: a temporary git repository with this project's conf/
copied in, and commits that change a group option, add one, change a default and break
composition; the review of each in Markdown, JSON and text, and --check."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner import diff, review
from tests.conftest import ROOT

TAGS = ("base", "option", "added", "default", "broken")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """conf/ at five tagged commits: base, option (cuda2: workers_per_device 2), added
    (devices/cuda16.yaml), default (chunking: size_balanced), broken (devices: nope)."""
    repo = tmp_path_factory.mktemp("review") / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    shutil.copytree(ROOT / "conf", repo / "conf")
    conf = repo / "conf"
    steps = {
        "base": lambda: None,
        "option": lambda: _edit(conf / "devices" / "cuda2.yaml", "count: 2\n",
                                "count: 2\nworkers_per_device: 2\n"),
        "added": lambda: (conf / "devices" / "cuda16.yaml").write_text(
            (conf / "devices" / "cuda4.yaml").read_text().replace("cuda4", "cuda16")
            .replace("count: 4", "count: 16")),
        "default": lambda: _edit(conf / "config.yaml", "- chunking: dynamic",
                                 "- chunking: size_balanced"),
        "broken": lambda: _edit(conf / "config.yaml", "- devices: auto", "- devices: nope"),
    }
    for tag, step in steps.items():
        step()
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", tag)
        _git(repo, "tag", tag)
    return repo


def _label(repo: Path, tag: str) -> str:
    return f"{tag} ({_git(repo, 'rev-parse', '--short=7', tag)})"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = diff.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_changed_group_option_in_markdown_and_json(repo: Path, capsys) -> None:
    code, md, _ = _run(capsys, "--rev", "base..option", "--repo", str(repo), "--format", "md")
    assert code == 0
    a, b = _label(repo, "base"), _label(repo, "option")
    head = ("**2 presets change: devices=cuda2 (workers_per_device 1 -> 2), "
            "preset subtitles-ladder-cuda2 (devices.workers_per_device 1 -> 2)**")
    cuda2 = f"""<details>
<summary><b>devices=cuda2</b>: 1 config key, 4 plan keys</summary>

`python -m runner devices=cuda2`

**config**

| key | {a} | {b} |
|---|---|---|
| `devices.workers_per_device` | `1` | `2` |

**plan** (dry run)

| key | {a} | {b} |
|---|---|---|
| `slot_count` | `2` | `4` |
| `slots.1` | `cuda:1 threads=4 CUDA_VISIBLE_DEVICES=1 (devices=cuda2)` | `cuda:0 threads=4 CUDA_VISIBLE_DEVICES=0 (devices=cuda2)` |
| `slots.2` | `<absent>` | `cuda:1 threads=4 CUDA_VISIBLE_DEVICES=1 (devices=cuda2)` |
| `slots.3` | `<absent>` | `cuda:1 threads=4 CUDA_VISIBLE_DEVICES=1 (devices=cuda2)` |

</details>
"""
    assert md.startswith(f"### Config review: `conf/` at A = {a} → B = {b}\n\n{head}\n\n"
                         + cuda2), md
    assert "<summary><b>preset subtitles-ladder-cuda2</b>" in md
    assert "devices=cuda4" not in md and "<b>default</b>" not in md  # unchanged: not shown
    assert "this checkout's schemas" in md  # the revision's YAML, today's schemas

    code, out, _ = _run(capsys, "--rev", "base..option", "--repo", str(repo), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["a"] == a and doc["b"] == b and doc["combinations"] == 24
    assert [c["label"] for c in doc["changes"]] == ["devices=cuda2",
                                                     "preset subtitles-ladder-cuda2"]
    change = doc["changes"][0]
    assert change["status"] == "changed" and change["overrides"] == "devices=cuda2"
    assert change["config"] == [{"key": "devices.workers_per_device", "a": 1, "b": 2}]
    plan = {r["key"]: (r["a"], r["b"]) for r in change["plan"]}
    assert plan["slot_count"] == (2, 4)  # the plan section shows workers_per_device's effect
    assert plan["slots.3"] == (diff.ABSENT,
                               "cuda:1 threads=4 CUDA_VISIBLE_DEVICES=1 (devices=cuda2)")
    # --check: a CI gate
    assert _run(capsys, "--rev", "base..option", "--repo", str(repo), "--check")[0] == 1
    assert _run(capsys, "--rev", "option..option", "--repo", str(repo), "--check")[0] == 0


def test_an_added_group_option(repo: Path) -> None:
    doc = review.review(repo, "option", "added")
    (change,) = doc["changes"]
    assert change["label"] == "devices=cuda16" and change["status"] == "added"
    assert change["a_error"] is None and change["b_error"] is None
    assert {r["key"]: r["b"] for r in change["config"]} == {
        "devices.backend": "cuda", "devices.count": 16, "devices.name": "cuda16"}
    assert doc["headline"] == "1 preset changes: devices=cuda16 (new option)"
    assert "new option at B" in diff.render_rev_md(doc)
    removed = review.review(repo, "added", "option")["changes"][0]
    assert removed["status"] == "removed" and removed["label"] == "devices=cuda16"


def test_a_changed_default_shows_once(repo: Path) -> None:
    doc = review.review(repo, "added", "default")
    default = doc["changes"][0]
    assert default["label"] == "default"
    assert default["config"] == [{"key": "chunking.strategy", "a": "dynamic",
                                  "b": "size_balanced"}]
    assert {"key": "chunking.strategy", "a": "dynamic", "b": "size_balanced"} in default["plan"]
    labels = [c["label"] for c in doc["changes"]]
    # chunking=dynamic at A is A's default, at B it composes the same: no change; likewise
    # chunking=size_balanced (B's default now)
    assert "chunking=size_balanced" not in labels and "chunking=dynamic" not in labels
    assert all(c["as_default"] for c in doc["changes"][1:])  # each says "as the default"
    assert doc["headline"].startswith(
        f"{len(labels)} presets change: default (chunking.strategy dynamic -> size_balanced)")
    assert "more changes as the default does" in doc["headline"]
    text = diff.render_rev_text(doc)
    assert "same change as the default: " in text and "devices=cpu2" in text


def test_a_conf_that_does_not_compose_is_a_finding(repo: Path, capsys) -> None:
    code, out, err = _run(capsys, "--rev", "default..broken", "--repo", str(repo))
    assert code == 0 and err == ""
    assert "default: does not compose at B" in out
    assert "Could not find 'devices/nope'" in out
    doc = review.review(repo, "default", "broken")
    first = doc["changes"][0]
    assert first["label"] == "default" and first["status"] == "breaks"
    assert first["a_error"] is None and "devices/nope" in first["b_error"]
    assert doc["headline"].startswith(f"{len(doc['changes'])} presets change: default "
                                      f"(does not compose at B)")
    assert not any(c["label"].startswith("devices=") for c in doc["changes"])  # they compose
    back = review.review(repo, "broken", "default")["changes"][0]
    assert back["status"] == "fixed"
    assert _run(capsys, "--rev", "default..broken", "--repo", str(repo), "--check")[0] == 1


def test_the_working_tree_is_b_and_is_not_touched(repo: Path, capsys) -> None:
    assert _run(capsys, "--rev", "broken", "--repo", str(repo), "--check")[0] == 0
    path = repo / "conf" / "devices" / "cpu2.yaml"
    presets = repo / "conf" / "review.yaml"
    before, presets_before = path.read_text(), presets.read_text()
    try:
        path.write_text(before + "threads_per_worker: 1\n")
        _edit(presets, "presets:\n", "presets:\n  embed-cpu4: task=embed devices=cpu4\n")
        status = _git(repo, "status", "--porcelain")
        code, out, _ = _run(capsys, "--rev", "broken", "--repo", str(repo), "--json")
        doc = json.loads(out)
        assert doc["b"] == "working tree"
        (change,) = [c for c in doc["changes"] if c["label"] == "devices=cpu2"]
        assert change["config"] == [{"key": "devices.threads_per_worker", "a": None, "b": 1}]
        (added,) = [c for c in doc["changes"] if c["label"] == "preset embed-cpu4"]
        assert added["status"] == "added" and added["overrides"] == "task=embed devices=cpu4"
        assert "preset embed-cpu4 (new preset)" in doc["headline"]
        assert _git(repo, "status", "--porcelain") == status  # nothing written in the repo
        assert path.read_text() == before + "threads_per_worker: 1\n"
    finally:
        path.write_text(before)
        presets.write_text(presets_before)


def test_errors_are_one_line(repo: Path, tmp_path: Path, capsys) -> None:
    code, out, err = _run(capsys, "--rev", "nope..base", "--repo", str(repo))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "revision 'nope' does not exist" in err
    code, _, err = _run(capsys, "--rev", "base..nope", "--repo", str(repo), "--check")
    assert code == 2 and "revision 'nope' does not exist" in err  # --check: 2 is an error
    code, _, err = _run(capsys, "--rev", "main", "--repo", str(tmp_path))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "is not a git repository" in err


@pytest.mark.timeout(120)
def test_the_cli_in_the_repository_it_runs_in(repo: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "runner.diff", "--rev", "base..option",
                           "--format", "md"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("### Config review: `conf/` at A = base (")
    assert "**2 presets change: devices=cuda2 (workers_per_device 1 -> 2)" in proc.stdout
