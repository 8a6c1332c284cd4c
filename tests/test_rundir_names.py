"""Unit: RunDir and SweepDir are the one owner of every file name of the run-directory
contract -- no other module of runner/ or hydra_plugins/ spells one."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["plan.yaml", "summary.json", "timeline.png", "journal.sqlite", "versions.json",
         "task.json", "resumes.jsonl", "config.resolved.yaml", "rerun.sh", "runner.log",
         "sweep.json", "sweep.md", "console.log", "multirun.yaml", "worker-", ".running-",
         "resume-", ".hydra/config.yaml"]
OWNERS = {"runner/rundir.py"}


def _code_lines(path: Path):
    """Lines of code, without comments and docstrings (names may be mentioned there)."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r'"""(.|\n)*?"""', lambda m: "\n" * m.group(0).count("\n"), text)
    for n, line in enumerate(text.splitlines(), start=1):
        yield n, line.split("#", 1)[0]


def test_no_run_dir_file_name_is_spelled_outside_its_owner():
    found = []
    for path in sorted([*ROOT.glob("runner/**/*.py"), *ROOT.glob("hydra_plugins/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in OWNERS:
            continue
        for n, line in _code_lines(path):
            for name in NAMES:
                if re.search(r"[\"'][^\"']*(?<![\w-])" + re.escape(name), line):
                    found.append(f"{rel}:{n}: {name}: {line.strip()}")
    assert not found, "run-dir names spelled outside RunDir/SweepDir:\n" + "\n".join(found)


def test_the_test_can_fail(tmp_path):
    """The scan finds a literal where one is."""
    bad = tmp_path / "x.py"
    bad.write_text('p = root / "summary.json"\n', encoding="utf-8")
    assert any('"summary.json"' in line for _, line in _code_lines(bad))


def test_help_lists_every_option_a_user_can_pick_and_no_schema():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "runner", "--help"], cwd=ROOT, text=True,
                         capture_output=True, timeout=60).stdout
    groups = out.split("Groups (group=option):", 1)[1].split("Keys:", 1)[0]
    assert "_schema" not in out
    for group in ("task", "devices", "chunking", "checkpoint", "executor"):
        line = next(x for x in groups.splitlines() if x.strip().startswith(group + " "))
        options = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
        listed = {w for w in re.split(r"[\s|]+", line.split(None, 1)[1]) if w}
        assert options <= listed, (group, options - listed)
