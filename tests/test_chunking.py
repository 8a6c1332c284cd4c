"""Layer: unit (no processes: a scripted fake executor).

Chunking strategies and the supervisor's bookkeeping, without processes (issue 2).

* ``runner.scheduler.assign`` on skewed costs, each strategy checked against its definition
  (computed here independently, not copied from the implementation);
* the same through ``Scheduler`` over a real in-memory SQLite ``Journal``: what each slot is
  actually handed, batch by batch;
* a scripted-fake executor driving ``Scheduler`` + ``Ledger`` with the events a real one
  reports (items done, item failed, a worker's death, an exhausted slot) and checking the
  journal's states and the requeue of suspects.
"""
from __future__ import annotations

import json
import math
import random
import time

import pytest

from runner.devices import Inventory, make_slots
from runner.config import DevicesConfig
from runner.journal import Journal
from runner.messages import BatchDone, Call, ItemDone, ItemFailed
from runner.progress import Progress
from runner.rundir import RunDir
from runner.scheduler import SHARED, Scheduler, assign
from runner.ledger import Ledger
from runner.tasks.base import BadItem, Item

N_SLOTS = 4


def skewed(n: int = 60, seed: int = 7) -> list[tuple[str, float]]:
    """Lognormal costs (sigma 1.5) plus two giants: a few items dominate the total."""
    rng = random.Random(seed)
    costs = [round(rng.lognormvariate(0.0, 1.5), 3) for _ in range(n)]
    for k, giant in ((5, 60.0), (40, 45.0)):
        if k < n:
            costs[k] = giant
    return [(f"it-{i:03d}", c) for i, c in enumerate(costs)]


def longest_first(items):
    return sorted(items, key=lambda t: (-t[1], t[0]))


def loads(pairs, costs, n):
    out = [0.0] * n
    for slot, item_id in pairs:
        out[slot] += costs[item_id]
    return out


# ---- assign() -------------------------------------------------------------------------------
def test_size_balanced_is_lpt_on_skewed_costs():
    items = longest_first(skewed())
    costs = dict(items)
    pairs = assign("size_balanced", N_SLOTS, items)
    assert [i for _, i in pairs] == [i for i, _ in items]  # every item once, in the given order
    # LPT: each item, longest first, goes onto a least-loaded slot at that moment.
    load = [0.0] * N_SLOTS
    for slot, item_id in pairs:
        assert load[slot] == min(load), (item_id, load)
        load[slot] += costs[item_id]
    # the N longest items land on N different (empty) slots
    assert sorted(s for s, _ in pairs[:N_SLOTS]) == list(range(N_SLOTS))
    # list-scheduling bound: makespan <= sum/n + (1 - 1/n) * longest; and never below the
    # lower bound max(sum/n, longest)
    total, longest = sum(costs.values()), max(costs.values())
    makespan = max(load)
    assert max(total / N_SLOTS, longest) <= makespan <= total / N_SLOTS + (1 - 1 / N_SLOTS) * longest
    # on these skewed costs it beats the static strategies that ignore cost
    for other in ("contiguous", "round_robin"):
        assert makespan < max(loads(assign(other, N_SLOTS, skewed()), costs, N_SLOTS))


def test_size_balanced_small_case_by_hand():
    # 2 slots, costs 5,4,3,3,3: 5->s0, 4->s1, 3->s1 (4<5), 3->s0 (5<7), 3->s1 (7<8)
    items = [("a", 5), ("b", 4), ("c", 3), ("d", 3), ("e", 3)]
    pairs = assign("size_balanced", 2, items)
    assert pairs == [(0, "a"), (1, "b"), (1, "c"), (0, "d"), (1, "e")]
    # the optimum is 9 (a+b | c+d+e); LPT stays within Graham's 4/3 - 1/(3n) of it
    makespan = max(loads(pairs, dict(items), 2))
    assert makespan == 10 and makespan <= (4 / 3 - 1 / 6) * 9


@pytest.mark.parametrize("n_items,n_slots", [(60, 4), (10, 4), (8, 3), (3, 4), (1, 1)])
def test_contiguous_is_ceil_div_slices(n_items, n_slots):
    items = skewed(n_items)
    pairs = assign("contiguous", n_slots, items)
    per = math.ceil(n_items / n_slots)
    assert [s for s, _ in pairs] == [i // per for i in range(n_items)]
    assert [i for _, i in pairs] == [i for i, _ in items]
    # each slot gets one unbroken slice, in order, no slice longer than ceil(N/n)
    for slot in range(n_slots):
        idx = [k for k, (s, _) in enumerate(pairs) if s == slot]
        assert idx == list(range(idx[0], idx[0] + len(idx))) if idx else True
        assert len(idx) <= per


@pytest.mark.parametrize("n_slots", [1, 3, 4])
def test_round_robin_is_i_mod_n(n_slots):
    items = skewed(23)
    pairs = assign("round_robin", n_slots, items)
    assert pairs == [(k % n_slots, item_id) for k, (item_id, _) in enumerate(items)]


def test_dynamic_is_one_shared_queue():
    items = skewed(20)
    assert assign("dynamic", N_SLOTS, items) == [(SHARED, i) for i, _ in items]


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="striped"):
        assign("striped", 2, [("a", 1.0)])


# ---- Scheduler over a real journal --------------------------------------------------------------
def journal_with(items) -> Journal:
    j = Journal(None)
    j.add(Item(i, c, f"payload {i}") for i, c in items)
    return j


def drain_one_slot_at_a_time(sched: Scheduler, n_slots: int) -> dict[int, list[list[str]]]:
    """Every slot pulls batches until the scheduler has nothing more for it."""
    got: dict[int, list[list[str]]] = {s: [] for s in range(n_slots)}
    progress = True
    while progress:
        progress = False
        for s in range(n_slots):
            batch = sched.next_batch(s)
            if batch:
                got[s].append([it.id for it in batch])
                progress = True
    return got


@pytest.mark.parametrize("strategy", ["size_balanced", "contiguous", "round_robin"])
def test_scheduler_hands_each_slot_its_static_assignment(strategy):
    items = skewed()
    costs = dict(items)
    j = journal_with(items)
    sched = Scheduler(j, strategy, N_SLOTS, batch_size=5)
    load = sched.plan()
    ordered = longest_first(items) if strategy == "size_balanced" else items
    expect: dict[int, list[str]] = {s: [] for s in range(N_SLOTS)}
    for slot, item_id in assign(strategy, N_SLOTS, ordered):
        expect[slot].append(item_id)
    # planned_slot in the journal is the assignment
    rows = dict(j._db.execute("SELECT id, planned_slot FROM items").fetchall())
    assert all(rows[i] == s for s, ids in expect.items() for i in ids)
    # plan() reports (count, cost) per slot
    for s, ids in expect.items():
        n, c = load[s]
        assert n == len(ids) and c == pytest.approx(sum(costs[i] for i in ids))
    got = drain_one_slot_at_a_time(sched, N_SLOTS)
    seq = {i: k for k, (i, _) in enumerate(items)}
    for s in range(N_SLOTS):
        flat = [i for b in got[s] for i in b]
        assert sorted(flat) == sorted(expect[s])  # its own list, nothing stolen
        assert flat == sorted(flat, key=seq.get)  # worked through in discovery order
        assert all(len(b) <= 5 for b in got[s])
    assert not sched.has_work()


def test_scheduler_dynamic_shares_one_queue():
    items = skewed(23)
    j = journal_with(items)
    sched = Scheduler(j, "dynamic", N_SLOTS, batch_size=4)
    assert sched.plan() == {}
    assert set(j._db.execute("SELECT planned_slot FROM items").fetchall()) == {(None,)}
    # whoever asks gets the next batch of the one queue, in discovery order
    order = [0, 0, 3, 1, 0, 2, 2]
    batches = [[it.id for it in sched.next_batch(s)] for s in order]
    assert [i for b in batches for i in b] == [i for i, _ in items]
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3, 0]
    assert not sched.has_work()


def test_guided_tail_shrinks_the_last_batches():
    """chunking.guided_tail: under 2 x live slots x batch_size items left, a batch is
    ceil(left / (2 x live slots)); before that, full batches; every item once, in order."""
    items = [(f"g-{i:03d}", 1.0) for i in range(100)]
    j = journal_with(items)
    sched = Scheduler(j, "dynamic", 2, batch_size=8, guided_tail=True)
    sched.plan()
    sizes, got, left = [], [], 100
    while batch := sched.next_batch(len(sizes) % 2):
        expect = 8 if left >= 2 * 2 * 8 else math.ceil(left / 4)
        assert len(batch) == expect, (left, len(batch))
        sizes.append(len(batch))
        got += [it.id for it in batch]
        left -= len(batch)
    assert got == [i for i, _ in items]
    assert sizes == [8] * 9 + [7, 6, 4, 3, 2, 2, 1, 1, 1, 1]
    # a slot lost for good: the rest is shared among fewer, so batches shrink later
    j2 = journal_with(items)
    sched2 = Scheduler(j2, "dynamic", 3, batch_size=8, guided_tail=True)
    sched2.plan()
    sched2.slot_lost(2)
    assert [len(sched2.next_batch(0)) for _ in range(10)] == [8] * 9 + [7]
    # one live slot: nothing to balance, batches stay whole
    j4 = journal_with(items)
    sched4 = Scheduler(j4, "dynamic", 1, batch_size=8, guided_tail=True)
    sched4.plan()
    assert [len(sched4.next_batch(0)) for _ in range(14)] == [8] * 12 + [4, 0]
    # off (the default of Scheduler, which the other cases here use): full batches
    j3 = journal_with(items)
    sched3 = Scheduler(j3, "dynamic", 2, batch_size=8)
    sched3.plan()
    assert [len(sched3.next_batch(0)) for _ in range(14)] == [8] * 12 + [4, 0]


def test_lost_slot_hands_its_list_to_the_others():
    items = skewed(12)
    j = journal_with(items)
    sched = Scheduler(j, "round_robin", 3, batch_size=2)
    sched.plan()
    first = [it.id for it in sched.next_batch(2)]
    sched.slot_lost(2)
    got = drain_one_slot_at_a_time(sched, 2)
    flat = sorted(first + [i for s in got for b in got[s] for i in b])
    assert flat == sorted(i for i, _ in items)  # nothing lost, nothing twice


# ---- scripted fake executor: Scheduler + Ledger, no processes --------------------------------
class FakeExecutor:
    """Plays an executor's part: hands out batches and reports what 'workers' did."""

    def __init__(self, tmp_path, n_items=20, batch_size=4, max_attempts=2, strategy="dynamic"):
        self.journal = Journal(None)
        self.journal.add([Item(f"it-{i:02d}", 1.0 + i, str(i)) for i in range(n_items)]
                         + [BadItem("bad-00", "item bad-00 (x.txt line 9): empty text")])
        self.scheduler = Scheduler(self.journal, strategy, 2, batch_size)
        self.scheduler.plan()
        self.rundir = RunDir(tmp_path).make()
        cfg = DevicesConfig(name="cpu2", backend="cpu", count=2)
        self.slots = make_slots(cfg, Inventory(cpu_cores=2))
        progress = Progress()
        progress.start({s.index: s.label for s in self.slots}, n_items, {})
        self.sup = Ledger(self.journal, self.scheduler, self.rundir, self.slots,
                              max_attempts, progress)
        self.batch_no = 0

    def dispatch(self, slot: int) -> Call:
        batch = self.sup.next_batch(self.slots[slot], 1000 + slot)
        call = Call(self.batch_no, tuple(batch))
        self.batch_no += 1
        self.sup.sent(self.slots[slot], call)
        return call

    def done(self, slot: int, call: Call, ids=None, model="m", batch_size=None):
        now = time.time()
        for it in call.items:
            if ids is None or it.id in ids:
                self.sup.item_done(ItemDone(slot, call.batch_no, it.id, f"out/{it.id}", model,
                                            batch_size or len(call.items), now, now + 0.01))

    def failed(self, slot: int, call: Call, item_id: str, permanent: bool):
        now = time.time()
        self.sup.item_failed(ItemFailed(slot, call.batch_no, item_id, f"RuntimeError: boom {item_id}",
                                        "Traceback ...", permanent, "m", now, now), 1000 + slot)

    def row(self, item_id):
        return self.journal._db.execute(
            "SELECT status, attempts, slot, device, model, batch_size, error FROM items WHERE id=?",
            (item_id,)).fetchone()

    def statuses(self):
        return dict(self.journal._db.execute("SELECT id, status FROM items").fetchall())


def test_scripted_done_failed_and_death(tmp_path):
    fx = FakeExecutor(tmp_path, max_attempts=3)
    sup, sched = fx.sup, fx.scheduler
    assert fx.row("bad-00")[0] == "failed"  # bad at discovery: failed, never dispatched

    # slot 0: a batch; two items done, one retryable failure, one permanent failure
    a = fx.dispatch(0)
    ids_a = [it.id for it in a.items]
    assert ids_a == ["it-00", "it-01", "it-02", "it-03"]
    assert all(fx.row(i)[:4] == ("running", 1, 0, "cpu:0") for i in ids_a)
    fx.done(0, a, ids={"it-00", "it-01"}, model="big", batch_size=4)
    fx.failed(0, a, "it-02", permanent=False)
    fx.failed(0, a, "it-03", permanent=True)
    sup.batch_done(BatchDone(0, a.batch_no))
    assert fx.row("it-00")[:6] == ("done", 1, 0, "cpu:0", "big", 4)
    assert fx.row("it-02")[0:2] == ("pending", 1) and "boom it-02" in fx.row("it-02")[6]
    assert fx.row("it-03")[0:2] == ("failed", 1)
    err = json.loads(fx.rundir.error_file("it-03").read_text())
    assert err["item"] == "it-03" and err["device"] == "cpu:0" and "boom" in err["error"]
    assert not fx.rundir.error_file("it-02").exists()  # will be retried: no error file yet
    assert sup.in_flight() == 0

    # slot 1 gets two batches (prefetch), then its worker is SIGKILLed
    b = fx.dispatch(1)  # the retry queue is served first
    assert [it.id for it in b.items] == ["it-02"]
    c = fx.dispatch(1)
    in_flight = [it.id for it in b.items + c.items]
    assert sup.in_flight() == len(in_flight)
    sup.worker_gone(fx.slots[1], 1001, "SIGKILL", restartable=True, quiet=False, exit_code=-9)
    assert sup.in_flight() == 0 and sup.stats[1].deaths == 1
    assert all(fx.row(i)[0] == "pending" for i in in_flight)  # nothing lost
    started = [it.id for it in b.items]
    assert all("worker died (SIGKILL)" in fx.row(i)[6] for i in started)

    # suspects come back one per batch, so a poison item is pinned down alone
    for expect in started:
        call = fx.dispatch(0)
        assert [it.id for it in call.items] == [expect]
        fx.done(0, call)
    # after the suspects, the rest of the queue, batched again
    rest = fx.dispatch(0)
    assert len(rest.items) > 1
    fx.done(0, rest)
    while sched.has_work():
        fx.done(0, fx.dispatch(0))
    st = fx.statuses()
    assert st["it-03"] == "failed" and st["bad-00"] == "failed"
    assert all(s == "done" for i, s in st.items() if i not in ("it-03", "bad-00"))
    counts = fx.journal.counts()
    assert counts == {"pending": 0, "running": 0, "done": 19, "failed": 2}
    assert sup.stats[0].items + sup.stats[1].items == 19
    assert sup.stats[0].models.get("big") == 2


def test_scripted_poison_item_is_quarantined_after_max_attempts(tmp_path):
    fx = FakeExecutor(tmp_path, n_items=6, batch_size=3, max_attempts=2)
    sup = fx.sup
    first = fx.dispatch(0)
    sup.worker_gone(fx.slots[0], 1000, "SIGSEGV", restartable=True, quiet=False, exit_code=-11)
    # every item of the started batch is a suspect: each comes back alone; it-01 kills again
    for k in range(3):
        call = fx.dispatch(1)
        assert len(call.items) == 1 and call.items[0].id == first.items[k].id
        if call.items[0].id == "it-01":
            sup.worker_gone(fx.slots[1], 1001, "SIGSEGV", restartable=True, quiet=False,
                            exit_code=-11)
        else:
            fx.done(1, call)
    row = fx.row("it-01")
    assert row[0:2] == ("failed", 2) and "quarantined" in row[6]
    err = json.loads(fx.rundir.error_file("it-01").read_text())
    assert err["exit_code"] == -11 and err["attempt"] == 2
    while fx.scheduler.has_work():
        fx.done(0, fx.dispatch(0))
    assert fx.journal.counts() == {"pending": 0, "running": 0, "done": 5, "failed": 2}


def test_scripted_exhausted_slot_returns_its_items_and_lets_others_continue(tmp_path):
    fx = FakeExecutor(tmp_path, n_items=8, batch_size=2, strategy="round_robin")
    sup = fx.sup
    a = fx.dispatch(0)
    b = fx.dispatch(0)  # prefetched behind a
    fx.failed(0, a, a.items[0].id, permanent=False)  # the item that exhausted the chain
    # the worker exits in order (quiet): everything it still held goes back, no attempt charged
    sup.worker_gone(fx.slots[0], 1000, "exit 0", restartable=False, quiet=True, exit_code=0)
    fx.scheduler.slot_lost(0)
    assert sup.stats[0].deaths == 0
    for it in a.items[1:] + b.items:
        assert fx.row(it.id)[0:2] == ("pending", 0)
    while fx.scheduler.has_work():
        fx.done(1, fx.dispatch(1))
    assert fx.journal.counts() == {"pending": 0, "running": 0, "done": 8, "failed": 1}
    assert sup.stats[1].items == 8
