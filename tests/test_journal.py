"""Layer: unit (real SQLite files); one case SIGKILLs a real child process.

The journal on its own: item states and their legal moves, recover(), paging, durability.

Real SQLite files in tmp_path; the one process test SIGKILLs a real child mid-run.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tracemalloc
import types

import pytest
from hypothesis import given, settings, strategies as st

from runner.journal import IllegalTransition, ItemStatus, Journal, check_transition
from runner.scheduler import Scheduler
from runner.tasks.base import BadItem, Item

S = ItemStatus
# The written transitions: pending -> running -> done | failed; running -> pending on
# a worker's death (or an orderly stop); failed -> pending only on resume.retry_failed;
# discovery puts an item in pending, or straight in failed when it is a BadItem; an item
# that can never run (chain exhausted while pending) may fail from pending. done is final.
LEGAL = {
    (S.NEW, S.PENDING), (S.NEW, S.FAILED),
    (S.PENDING, S.RUNNING), (S.PENDING, S.FAILED),
    (S.RUNNING, S.DONE), (S.RUNNING, S.FAILED), (S.RUNNING, S.PENDING),
    (S.FAILED, S.PENDING),
}


def test_states_are_a_str_enum():
    assert issubclass(ItemStatus, str)
    assert {s.value for s in ItemStatus} == {"new", "pending", "running", "done", "failed"}


@pytest.mark.parametrize("old,new", list(itertools.product(ItemStatus, ItemStatus)),
                         ids=lambda s: s.value)
def test_check_transition_table(old, new):
    if (old, new) in LEGAL:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
            check_transition(old, new)


def _journal(tmp_path, n=4, name="journal.sqlite"):
    j = Journal(tmp_path / name, commit_every_s=0)
    j.add(Item(f"i{k}", float(k), f"p{k}") for k in range(n))
    return j


def _put(j: Journal, item_id: str, state: ItemStatus) -> None:
    """Drive an item from pending to ``state`` through legal moves only."""
    if state == S.PENDING:
        return
    j.mark_running(item_id, 0, "cpu:0", 1.0)
    if state == S.DONE:
        j.mark_done(item_id, f"out/{item_id}", "m", 1, 1.0, 2.0)
    elif state == S.FAILED:
        j.mark_failed(item_id, "boom", 2.0)


MOVES = {
    S.RUNNING: lambda j, i: j.mark_running(i, 1, "cpu:1", 3.0),
    S.DONE: lambda j, i: j.mark_done(i, f"x/{i}", "m", 1, 3.0, 4.0),  # one output each
    S.FAILED: lambda j, i: j.mark_failed(i, "again", 4.0),
    S.PENDING: lambda j, i: j.mark_pending(i, error="requeued"),
}


@pytest.mark.parametrize("old,new", [(o, n) for o in (S.PENDING, S.RUNNING, S.DONE, S.FAILED)
                                     for n in MOVES], ids=lambda s: s.value)
def test_journal_refuses_every_illegal_move(tmp_path, old, new):
    j = _journal(tmp_path, 1)
    _put(j, "i0", old)
    before = j._db.execute("SELECT * FROM items").fetchall()
    if (old, new) in LEGAL:
        MOVES[new](j, "i0")
        assert j._db.execute("SELECT status FROM items").fetchone()[0] == new.value
    else:
        with pytest.raises(IllegalTransition):
            MOVES[new](j, "i0")
        assert j._db.execute("SELECT * FROM items").fetchall() == before, "a refused move wrote"
    j.close()


def test_unknown_item_is_refused(tmp_path):
    j = _journal(tmp_path, 1)
    for new, move in MOVES.items():
        with pytest.raises(IllegalTransition):
            move(j, "nope")
    j.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(list(MOVES))), max_size=30))
def test_random_moves_match_the_table(tmp_path_factory, ops):
    """Any sequence of moves: legal ones happen, illegal ones raise and change nothing."""
    j = _journal(tmp_path_factory.mktemp("j"), 3)
    model = {f"i{k}": S.PENDING for k in range(3)}
    for k, new in ops:
        item = f"i{k}"
        if (model[item], new) in LEGAL:
            MOVES[new](j, item)
            model[item] = new
        else:
            with pytest.raises(IllegalTransition):
                MOVES[new](j, item)
    got = dict(j._db.execute("SELECT id, status FROM items").fetchall())
    assert got == {i: s.value for i, s in model.items()}
    j.close()


def test_attempts_count_and_refund(tmp_path):
    j = _journal(tmp_path, 1)
    assert j.mark_running("i0", 0, "cpu:0", 1.0) == 1
    j.mark_pending("i0", error="worker died")  # a death: the attempt counts
    assert j.mark_running("i0", 0, "cpu:0", 1.0) == 2
    j.mark_pending("i0", refund=True)  # an orderly stop: it does not
    assert j.attempts("i0") == 1
    assert j._db.execute("SELECT error FROM items").fetchone()[0] == "worker died"
    j.close()


def test_batch_moves_match_one_by_one(tmp_path):
    """mark_*_many is one executemany; a refused row leaves the journal as per-item moves would."""
    j = _journal(tmp_path, 4)
    j.mark_running_many(["i0", "i1", "i2"], 1, "cpu:1", 5.0)
    assert [j.attempts(i) for i in ("i0", "i1", "i2", "i3")] == [1, 1, 1, 0]
    j.mark_done_many([("i0", "o0", "m", 3, 5.0, 6.0), ("i1", "o1", "m", 3, 5.0, 6.5)])
    rows = dict((r[0], r[1:]) for r in j._db.execute(
        "SELECT id, status, output, slot, device, started, finished FROM items"))
    assert rows["i0"] == ("done", "o0", 1, "cpu:1", 5.0, 6.0)
    assert rows["i1"] == ("done", "o1", 1, "cpu:1", 5.0, 6.5)
    assert rows["i2"][0] == "running" and rows["i3"][0] == "pending"
    # i3 is pending, so done is refused for it: i2 (before it) moves, i3 raises, i1 (already
    # done, after it) is never reached
    with pytest.raises(IllegalTransition, match="pending -> done"):
        j.mark_done_many([("i2", "o2", "m", 1, 5.0, 7.0), ("i3", "o3", "m", 1, 5.0, 7.0),
                          ("i1", "x", "m", 1, 0.0, 0.0)])
    got = dict(j._db.execute("SELECT id, status FROM items").fetchall())
    assert got == {"i0": "done", "i1": "done", "i2": "done", "i3": "pending"}
    assert j._db.execute("SELECT output FROM items WHERE id='i1'").fetchone()[0] == "o1"
    j.mark_running_many([], 0, "cpu:0", 1.0)  # nothing to move is not an error
    j.close()


def test_add_keeps_known_items_state_and_streams(tmp_path):
    j = _journal(tmp_path, 3)
    _put(j, "i0", S.DONE)
    _put(j, "i1", S.FAILED)
    j.commit()
    j.close()
    j = Journal(tmp_path / "journal.sqlite")
    assert j.gen == 1
    j.add([Item("i2", 2.0, "p2"), Item("i1", 1.0, "p1"), Item("i0", 0.0, "p0"),
           BadItem("bad", "empty text"), Item("i3", 3.0, "p3")])
    rows = {r[0]: r[1:] for r in j._db.execute("SELECT id, status, seq, gen FROM items")}
    assert rows["i0"] == ("done", 2, 1) and rows["i1"] == ("failed", 1, 1)
    assert rows["i2"] == ("pending", 0, 1) and rows["i3"] == ("pending", 4, 1)
    assert rows["bad"] == ("failed", 3, 1)
    assert j.counts() == {"pending": 2, "running": 0, "done": 1, "failed": 2}
    j.close()


def test_recover(tmp_path):
    """Start of a resume: running -> pending; failed -> pending (attempts reset) only with
    retry_failed and only for items this invocation discovered; done untouched."""
    j = _journal(tmp_path, 6)
    for item, state in zip(["i0", "i1", "i2", "i3", "i5"],
                           [S.DONE, S.RUNNING, S.FAILED, S.RUNNING, S.FAILED]):
        _put(j, item, state)
    j.commit()
    j.close()  # as a SIGKILLed controller leaves it: some items still running

    j = Journal(tmp_path / "journal.sqlite")
    j.add(Item(f"i{k}", float(k), "") for k in range(5))  # limit=5: i5 not rediscovered
    assert j.recover(retry_failed=False) == {"running_to_pending": 2, "failed_retried": 0}
    st_ = dict(j._db.execute("SELECT id, status FROM items").fetchall())
    assert st_ == {"i0": "done", "i1": "pending", "i2": "failed", "i3": "pending",
                   "i4": "pending", "i5": "failed"}
    assert j.attempts("i1") == 1  # a death mid-item still counts the attempt
    j.commit()
    j.close()

    j = Journal(tmp_path / "journal.sqlite")
    j.add(Item(f"i{k}", float(k), "") for k in range(5))
    assert j.recover(retry_failed=True) == {"running_to_pending": 0, "failed_retried": 1}
    row = j._db.execute("SELECT status, attempts, error FROM items WHERE id='i2'").fetchone()
    assert row == ("pending", 0, None)
    assert j._db.execute("SELECT status FROM items WHERE id='i5'").fetchone()[0] == "failed"
    assert j._db.execute("SELECT status, output FROM items WHERE id='i0'").fetchone() == \
        ("done", "out/i0")
    j.close()


def test_paging_is_seq_ordered_complete_and_lazy(tmp_path):
    """The scheduler pages pending items in discovery order, each exactly once, per slot
    for static strategies, skipping what is not pending — a page at a time."""
    n = 2500
    j = Journal(tmp_path / "journal.sqlite")
    j.add(Item(f"it{k:05d}", float(k % 7), "") for k in range(n))
    for k in range(0, n, 10):  # every tenth item already done
        _put(j, f"it{k:05d}", S.DONE)
    sch = Scheduler(j, "round_robin", 3, batch_size=7, page=100)
    load = sch.plan()
    assert sum(c for c, _ in load.values()) == n - n // 10
    got = {s: [] for s in range(3)}
    for s in itertools.cycle(range(3)):
        batch = sch.next_batch(s)
        if not batch and not sch.has_work():
            break
        got[s] += [item.id for item in batch]
        assert len(batch) <= 7
        assert all(len(c.buffer) <= 100 for c in sch.own.values())
    flat = [i for s in got for i in got[s]]
    assert len(flat) == len(set(flat)) == n - n // 10
    for s, ids in got.items():
        assert ids == sorted(ids), f"slot {s} got items out of discovery order"
        assert all(int(i[2:]) % 10 != 0 for i in ids)
    # reading back is lazy: generators over a cursor, never a list of every row
    assert isinstance(j.done_rows(), types.GeneratorType)
    assert isinstance(j.todo_costs(False), types.GeneratorType)
    j.close()


def _add_peak(path, n):
    tracemalloc.start()
    j = Journal(path)
    j.add(Item(f"item-{k:07d}", 1.0, "x" * 20) for k in range(n))
    j.recover(False)
    rows = sum(1 for _ in j.done_rows()) + j.todo_stats()[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    j.close()
    return rows, peak


def test_memory_does_not_grow_with_items(tmp_path):
    small, peak_small = _add_peak(tmp_path / "a.sqlite", 5_000)
    big, peak_big = _add_peak(tmp_path / "b.sqlite", 50_000)
    assert (small, big) == (5_000, 50_000)
    assert peak_big < 2 * peak_small + 1_000_000, (peak_small, peak_big)


CHILD = """
import os, signal, sys
from runner.journal import Journal
from runner.tasks.base import Item
j = Journal(sys.argv[1], commit_every_s=3600)
j.add(Item(f"i{k}", 1.0, "") for k in range(4))
for k in range(4):
    j.mark_running(f"i{k}", 0, "cpu:0", 1.0)
j.mark_done("i0", "o0", "m", 1, 1.0, 2.0)
j.commit()                                   # i0 done is durable
j.mark_done("i1", "o1", "m", 1, 1.0, 2.0)    # not committed when the controller dies
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(60)
def test_sigkilled_controller_leaves_a_consistent_journal(tmp_path):
    path = tmp_path / "journal.sqlite"
    res = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                         text=True, timeout=50)
    assert res.returncode == -signal.SIGKILL, res.stderr
    j = Journal(path)
    st_ = dict(j._db.execute("SELECT id, status FROM items").fetchall())
    assert st_ == {"i0": "done", "i1": "running", "i2": "running", "i3": "running"}
    j.add(Item(f"i{k}", 1.0, "") for k in range(4))
    assert j.recover(False)["running_to_pending"] == 3
    assert j.counts() == {"pending": 3, "running": 0, "done": 1, "failed": 0}
    j.close()
    assert os.path.getsize(path) > 0
