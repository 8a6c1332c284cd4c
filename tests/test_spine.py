"""Layer: unit. The spine's shared pieces: slot states and their one checker, exit codes,
one-line errors, the run dir claimed by callable code, the mechanics protocol."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from runner.errors import ExitCode, describe, one_line
from runner.executor import Executor
from runner.slots import IllegalSlotMove, SlotState, check_slot_move, _SLOT_MOVES
from runner.resume import claim_run_dir

ROOT = Path(__file__).resolve().parents[1]
LEGAL = {(a, b) for a, targets in _SLOT_MOVES.items() for b in targets}


@pytest.mark.parametrize("old,new", list(itertools.product(SlotState, SlotState)))
def test_slot_moves_follow_the_table(old, new):
    if (old, new) in LEGAL:
        check_slot_move(old, new)
    else:
        with pytest.raises(IllegalSlotMove):
            check_slot_move(old, new)


def test_slot_table_says_what_the_docstring_says():
    assert _SLOT_MOVES[SlotState.LOST] == frozenset() and _SLOT_MOVES[SlotState.STOPPED] == frozenset()
    assert SlotState.READY in _SLOT_MOVES[SlotState.STARTING]
    assert SlotState.READY not in _SLOT_MOVES[SlotState.DORMANT]  # a dormant slot starts first
    assert all(s is SlotState.LOST or SlotState.STOPPED in _SLOT_MOVES[s] or s is SlotState.STOPPED
               for s in SlotState)


def test_exit_codes_are_one_enum_with_their_meaning():
    assert [int(c) for c in ExitCode] == [0, 1, 3, 4, 129, 130, 143]
    assert ExitCode.for_signal("SIGTERM") == ExitCode.TERMINATED == 143
    assert ExitCode.describe(3) == "exit 3 (items failed)" and ExitCode.describe(7) == "exit 7"


def test_one_line_errors():
    assert one_line(ValueError("a\n  b\tc")) == "a b c" and one_line(KeyError()) == "KeyError"
    assert describe(ValueError("bad\nthing")) == "ValueError: bad thing"
    assert len(one_line("x" * 50, 20)) == 20


def test_the_run_dir_is_claimed_by_a_function(tmp_path):
    a, b = claim_run_dir(tmp_path, "embed"), claim_run_dir(tmp_path, "embed")
    assert a != b and a.is_dir() and b.is_dir() and a.parent == tmp_path / "embed"


def test_both_backends_implement_the_mechanics_protocol():
    from runner.executor import Mechanics
    from runner.executor_local import LocalMechanics

    wanted = {n for n in vars(Mechanics) if not n.startswith("_")} | {"self_exiting"}
    assert wanted <= set(dir(LocalMechanics))
    try:
        from runner.executor_ray import RayMechanics
    except Exception:  # ray absent: the local one alone
        return
    assert wanted <= set(dir(RayMechanics))
    private = {n for n in vars(LocalMechanics) if n.startswith("_") and not n.startswith("__")}
    assert not private & set(vars(Executor))  # mechanics replace no part of the loop


def test_resolving_the_config_makes_no_dir_and_main_claims_one(tmp_path):
    import subprocess
    import sys

    from runner.resume import RunDirResolver

    named = RunDirResolver()(str(tmp_path / "out"), "embed", None)
    assert not (tmp_path / "out").exists() and named.startswith(str(tmp_path / "out" / "embed"))
    r = subprocess.run([sys.executable, "-m", "runner", "task=embed", "devices=cpu", "limit=2",
                        "dry_run=true", f"outputs={tmp_path / 'out'}"], cwd=ROOT, text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (tmp_path / "out" / "embed").iterdir()
    assert (run / "plan.yaml").is_file() and (run / ".hydra" / "config.yaml").is_file()
