"""Layer: unit (schemas, readers, discovery in a child process); the test_cli_* cases are cli.

Bounds on settings and on items (issue 16).

* Every int/float field of every config schema declares a range (a future field cannot
  escape: the schemas are enumerated, not listed), every default lies in it, and a value just
  outside each declared end is one ConfigError line naming the key, the value and the range.
* The real CLI refuses out-of-range settings -- in a dry run too -- with exit 1 and one
  ``runner: error:`` line; more worker slots than the machine takes, unless devices.force.
* A FIFO or a device is never opened: as ``task.input`` it is one line (exit 1); inside an
  input folder it is a bad item naming what it is. Every such case runs under a hang guard
  (a subprocess with a timeout): opening a FIFO blocks until a writer comes.
* An item over ``task.max_item_bytes`` (a 30 MB line in .txt and .jsonl, a 30 MB .csv and
  .parquet cell) fails alone at discovery with the one line in logs/errors/<name>.json, the
  other items are done, exit 3, and the controller's peak RSS stays far below what the line
  would cost to hold (bench/bench_giant_line.py has the figures).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import os
import pkgutil
import random
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import runner.tasks
from runner import app, config, devices as devices_mod
from runner.errors import ConfigError
from runner.tasks import embed_input
from runner.ranges import check_ranges, numeric_fields, show_number
from runner.tasks.base import TaskConfig
from tests.conftest import ROOT, cli, journal_statuses, only_run_dir, run_cli, vm_hwm_kb
from tests.test_config import composed

GIANT = 30_000_000  # bytes of one giant item (the case was 52 MB)
RSS_LIMIT_KB = 1_500_000  # a sanity bound only; holding the line used to take gigabytes


# ---- every numeric field declares its range ---------------------------------------------------
def _schemas() -> dict[str, type]:
    """prefix -> dataclass: every schema runner registers in Hydra's ConfigStore, the groups
    nested in them, and every TaskConfig subclass in runner.tasks, registered or not (task
    configs are keyed ``task:<class>``: their keys are typed ``task.<field>``)."""
    app.setup()
    found: dict[str, type] = {}

    def add(prefix: str, cls: type) -> None:
        if issubclass(cls, TaskConfig):
            found[f"task:{cls.__qualname__}"] = cls
            return
        found[prefix] = cls
        for name, tp in typing.get_type_hints(cls).items():
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                add(f"{prefix}{name}.", tp)

    def walk(node: dict, group: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{group}{key}.")
                continue
            cls = OmegaConf.get_type(value.node)
            if dataclasses.is_dataclass(cls) and cls.__module__.startswith("runner"):
                add(group, cls)

    walk(ConfigStore.instance().repo, "")
    for mod in pkgutil.iter_modules(runner.tasks.__path__):
        importlib.import_module(f"runner.tasks.{mod.name}")
    todo = [TaskConfig]
    while todo:
        cls = todo.pop()
        add("", cls)
        todo.extend(cls.__subclasses__())
    return found


def _numeric_keys() -> list[tuple[str, type, object]]:
    """(key as typed, schema, NumericField) for every numeric field of every schema."""
    out = []
    for prefix, cls in _schemas().items():
        shown = "task." if prefix.startswith("task:") else prefix
        out.extend((shown + nf.name, cls, nf) for nf in numeric_fields(cls))
    return out


def test_every_numeric_field_of_every_schema_declares_a_range():
    keys = _numeric_keys()
    names = {k for k, _, _ in keys}
    # the enumeration reaches the groups, the top level and the tasks (not vacuous)
    for must in ("devices.workers_per_device", "executor.item_timeout_s", "seed",
                 "task.default_batch_size", "task.beam_size", "task.max_item_bytes"):
        assert must in names, sorted(names)
    missing = [f"{cls.__qualname__}.{nf.name}" for _, cls, nf in keys if nf.range is None]
    assert not missing, f"numeric fields without a declared range (use ranged()): {missing}"


def test_every_default_lies_in_its_range():
    for prefix, cls in _schemas().items():
        check_ranges(cls, cls(), "task." if prefix.startswith("task:") else prefix)


def _bad_values(nf) -> list:
    """A value just outside each declared end of ``nf``'s range."""
    r, step = nf.range, (1 if nf.integer else 0.5)
    bad = [v for v in (None if r.ge is None else r.ge - step, r.gt,
                       None if r.le is None else r.le + step, r.lt) if v is not None]
    return [[b] for b in bad] if nf.is_list else bad


CASES = [(key, cls, nf, bad) for key, cls, nf in _numeric_keys() for bad in _bad_values(nf)]


@pytest.mark.parametrize("key,cls,nf,bad", CASES,
                         ids=[f"{c[0]}={c[3]}" for c in CASES])
def test_a_value_outside_each_declared_end_is_one_line(key, cls, nf, bad):
    """Runner settings through Hydra and config.validate; task fields through the task's
    own config dataclass (what instantiating the task does)."""
    with pytest.raises(ConfigError) as err:
        if issubclass(cls, TaskConfig):
            cls(**{nf.name: bad})
        else:
            base = "devices=cuda2" if key == "devices.ids" else "devices=cpu2"
            shown = "[" + ", ".join(map(show_number, bad)) + "]" if nf.is_list else show_number(bad)
            config.validate(composed("task=embed", base, f"{key}={shown}"))
    msg = str(err.value)
    allowed = nf.range.describe(nf.integer, nf.nullable)
    if nf.is_list:
        allowed = allowed.replace("an integer", "integers").replace("a number", "numbers")
    assert "\n" not in msg
    assert msg.startswith(f"{key}=") and show_number(bad if not nf.is_list else bad[0]) in msg, msg
    assert allowed in msg, msg


def test_a_value_of_the_wrong_kind_is_named_too():
    from runner.tasks.embed import EmbedConfig

    with pytest.raises(ConfigError, match=r"^task.default_batch_size=True is not an integer: "
                                          r"allowed an integer >= 1$"):
        EmbedConfig(default_batch_size=True)
    with pytest.raises(ConfigError, match=r"^task.max_item_bytes=nan is not an integer"):
        EmbedConfig(max_item_bytes=float("nan"))


# ---- the slot maximum ---------------------------------------------------------------------------
def test_more_worker_slots_than_the_machine_takes_need_devices_force():
    cores = 2
    most = devices_mod.slot_maximum(cores)
    inv = devices_mod.Inventory(cpu_cores=cores, cuda=("A100",) * 2)
    ok = config.DevicesConfig(name="cpu", backend="cpu", count=most)
    assert len(devices_mod.make_slots(ok, inv)) == most
    over = dataclasses.replace(ok, count=2, workers_per_device=most // 2 + 1)
    with pytest.raises(ConfigError) as err:
        devices_mod.make_slots(over, inv)
    msg = str(err.value)
    assert "devices.count=2" in msg and f"devices.workers_per_device={most // 2 + 1}" in msg
    assert f"maximum of {most}" in msg and "devices.force=true" in msg and "\n" not in msg
    forced = dataclasses.replace(over, force=True)
    assert len(devices_mod.make_slots(forced, inv)) == 2 * (most // 2 + 1)
    per = devices_mod.MAX_WORKERS_PER_CARD
    card = config.DevicesConfig(name="cuda2", backend="cuda", count=2, workers_per_device=per)
    assert len(devices_mod.make_slots(card, inv)) == 2 * per
    with pytest.raises(ConfigError, match=rf"devices.workers_per_device={per + 1} is over the "
                                          rf"maximum of {per} workers per cuda card"):
        devices_mod.make_slots(dataclasses.replace(card, workers_per_device=per + 1), inv)


# ---- the CLI: out-of-range settings ------------------------------------------------------------
def _allowed(key: str) -> str:
    """What the error must say is allowed: the range the schema declares."""
    for k, _, nf in _numeric_keys():
        if k == key:
            return nf.range.describe(nf.integer, nf.nullable)
    raise KeyError(key)


CLI_BAD = [  # (extra overrides, key, value as typed)
    ((), "task.default_batch_size", "0"),
    ((), "executor.start_timeout_s", "0"),
    ((), "executor.grace_s", "-1"),
    ((), "executor.stop_timeout_s", "-5"),
    ((), "checkpoint.commit_every_s", "-1"),
    ((), "devices.workers_per_device", "1000"),  # the slot maximum (devices=cpu here)
    ((), "seed", "-1"),
    ((), "executor.item_timeout_s", "0"),
    ((), "task.max_item_bytes", "0"),
    (("task=subtitles",), "task.beam_size", "0"),
    (("task=subtitles",), "task.no_speech_drop", "1.5"),
    (("task=subtitles",), "task.max_item_bytes", "-1"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra,key,value", CLI_BAD, ids=[f"{c[1]}={c[2]}" for c in CLI_BAD])
def test_cli_out_of_range_setting_is_exit_1_and_one_line_even_in_a_dry_run(
        tmp_path, extra, key, value):
    args = ["task=embed", *extra, "devices=cpu", f"{key}={value}", "dry_run=true",
            f"outputs={tmp_path}", "progress=off"]
    r = run_cli(args, timeout=90)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("runner: error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert f"{key}={value}" in lines[0], lines[0]
    if key == "devices.workers_per_device":
        most = devices_mod.slot_maximum(len(os.sched_getaffinity(0)))
        assert f"maximum of {most}" in lines[0] and "devices.force=true" in lines[0], lines[0]
    else:
        assert _allowed(key) in lines[0], lines[0]


# ---- non-regular files ---------------------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task,which", [("embed", "/dev/zero"), ("embed", "fifo"),
                                        ("subtitles", "fifo")])
def test_cli_fifo_or_device_as_task_input_is_one_line(tmp_path, fifo, task, which):
    path = fifo if which == "fifo" else Path(which)
    kind = "a FIFO" if which == "fifo" else "a character device"
    r = run_cli([f"task={task}", f"task.input={path}", "devices=cpu", "dry_run=true",
                 f"outputs={tmp_path / 'out'}", "progress=off"], timeout=60)  # the hang guard
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"runner: error: task.input={path} is not a regular file or folder "
                     f"({kind}); give a file or a folder"], r.stderr


_DISCOVER = """
import json, sys
from runner.tasks.base import BadItem
from runner.tasks.{module} import {cls} as Task
task = Task(**json.loads(sys.argv[1]))
print(json.dumps({{o.id: (o.error if isinstance(o, BadItem) else None) for o in task.discover()}}))
"""


def discover_in_child(module: str, cls: str, **kw) -> dict[str, str | None]:
    """id -> error (None: a good item), from the task's discover() in a child process that
    is killed after 60 s: a FIFO opened by mistake blocks forever."""
    r = subprocess.run([sys.executable, "-c", _DISCOVER.format(module=module, cls=cls),
                        json.dumps(kw)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_fifo_and_device_in_an_input_folder_are_bad_items_never_opened(tmp_path):
    embed_dir, media_dir = tmp_path / "texts", tmp_path / "media"
    embed_dir.mkdir()
    media_dir.mkdir()
    (embed_dir / "a.txt").write_text("one\ntwo\n")
    os.mkfifo(embed_dir / "pipe.txt")
    os.symlink("/dev/zero", embed_dir / "zero.jsonl")
    got = discover_in_child("embed", "EmbedTask", input=str(embed_dir), cost="chars")
    assert got == {"a.txt:1": None, "a.txt:2": None,
                   "pipe.txt": "pipe.txt: not a regular file (a FIFO); remove it or replace "
                               "it with a file",
                   "zero.jsonl": "zero.jsonl: not a regular file (a character device); "
                                 "remove it or replace it with a file"}
    (media_dir / "fox.wav").write_bytes((ROOT / "samples" / "audio" / "fox.wav").read_bytes())
    os.mkfifo(media_dir / "pipe.wav")
    os.symlink("/dev/zero", media_dir / "zero.mp3")
    got = discover_in_child("subtitles", "SubtitlesTask", input=str(media_dir))
    assert got["fox.wav"] is None
    assert "not a regular file (a FIFO)" in got["pipe.wav"]
    assert "not a regular file (a character device)" in got["zero.mp3"]


def test_subtitles_file_over_max_item_bytes_is_a_bad_item(tmp_path):
    (tmp_path / "fox.wav").write_bytes((ROOT / "samples" / "audio" / "fox.wav").read_bytes())
    size = (tmp_path / "fox.wav").stat().st_size
    got = discover_in_child("subtitles", "SubtitlesTask", input=str(tmp_path),
                            max_item_bytes=size - 1)
    assert got["fox.wav"] == (f"fox.wav: the file is {size:,} bytes, over task.max_item_bytes="
                              f"{size - 1:,}; split it or raise task.max_item_bytes")
    assert discover_in_child("subtitles", "SubtitlesTask", input=str(tmp_path),
                             max_item_bytes=size) == {"fox.wav": None}


# ---- the readers: bounded ----------------------------------------------------------------------
def test_read_lines_keeps_short_lines_and_measures_long_ones_in_chunks(monkeypatch):
    monkeypatch.setattr(embed_input, "CHUNK", 7)  # the skip crosses many chunk ends
    lines = [b"short", b"x" * 10, b"y" * 11, b"z" * 95 + b"\r", b"", b"tail" * 9, b"last"]
    data = b"\n".join(lines)  # \r\n on one line, no newline at the end
    got = list(embed_input.read_lines(io.BytesIO(data), 10))
    assert [g.n for g in got] == list(range(1, len(lines) + 1))
    for g, want in zip(got, lines):
        want = want.rstrip(b"\r")
        if len(want) <= 10:
            assert (g.data, g.size) == (want, len(want))
        else:
            assert g.data is None and g.size == len(want) and want.startswith(g.head)


def test_read_records_cuts_csv_as_the_csv_module_does(monkeypatch):
    """Random csv text (quotes, doubled quotes, commas and newlines inside quotes), read in
    chunks as small as 2 bytes: the records give the rows csv.reader gives."""
    rng = random.Random(16)
    pieces = ["a", "b", ",", '"', "\n", "\r\n", " ", 'x"y', '""']
    compared = 0
    for trial in range(1500):
        rows = [["".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
                 for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 5))]
        buf = io.StringIO()
        csv.writer(buf, quoting=rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])).writerows(rows)
        text = buf.getvalue() if trial % 3 else "".join(
            rng.choice(pieces) for _ in range(rng.randint(0, 30)))  # not always valid csv
        try:
            want = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error:
            continue
        for chunk in (2, 5, 1 << 20):
            monkeypatch.setattr(embed_input, "CHUNK", chunk)
            try:
                got = [embed_input._csv_fields(r.data)
                       for r in embed_input.read_records(io.BytesIO(text.encode()), None)]
            except csv.Error:  # a lone \r: this record's error here, csv.reader's too
                continue
            assert got == want, (text, chunk)
            compared += 1
    assert compared > 1000


def test_id_of_an_over_long_json_line_is_read_from_its_head():
    head = b'{"id": "abc", "n": [1, {"x": "}"}], "text": "aaaaaaaa'
    assert embed_input.id_from_head(head, "id") == "abc"
    assert embed_input.id_from_head(b' {"k": 1, "id": 7, "text": "aa', "id") == 7
    # the id after the text, or spelled inside the text: not recoverable
    assert embed_input.id_from_head(b'{"text": "a \\"id\\": 1, aaaa', "id") is embed_input.MISSING
    assert embed_input.id_from_head(b'[1, 2', "id") is embed_input.MISSING


def test_token_count_of_a_long_text_is_estimated_from_its_head():
    """Counting stops at COUNT_CHARS characters; the scaled count stays near the exact one."""
    from runner.tasks.embed import COUNT_CHARS, TokenCounter, _bundled_path

    folder = _bundled_path("all-MiniLM-L6-v2")
    if folder is None:
        pytest.skip("the bundled model package is not installed")
    counter = TokenCounter(folder)
    counter.cap = None
    rng = random.Random(3)
    words = "tide harbour lantern archive violin meadow circuit glacier orchard".split()
    text = " ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(60_000))
    assert len(text) > 4 * COUNT_CHARS
    exact = len(counter.tokenizer.encode(text, add_special_tokens=True).ids)
    t0 = time.perf_counter()
    (estimate,) = counter([text])
    assert abs(estimate - exact) / exact < 0.05, (estimate, exact)
    assert time.perf_counter() - t0 < 5


# ---- the CLI: giant items fail alone, memory stays flat ----------------------------------------
def _giant_corpus(root: Path) -> tuple[set[str], dict[str, int]]:
    """A folder with a ~30 MB item in each format among normal ones, a FIFO and a link to
    /dev/zero; returns (good ids, bad id -> its size in bytes, 0 for the non-regular ones)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    blob = ("lorem ipsum dolor sit amet, " * (GIANT // 28 + 1))[:GIANT]
    good, bad = set(), {}
    with open(root / "a.txt", "w", encoding="utf-8") as fh:
        fh.write("first line\n" + blob + "\nthird line\n")
    good |= {"a.txt:1", "a.txt:3"}
    bad["a.txt:2"] = len(blob.encode())
    with open(root / "b.jsonl", "w", encoding="utf-8") as fh:
        for row in ({"id": "j1", "text": "a normal text"}, {"id": "jbig", "text": blob},
                    {"id": "j3", "text": "another text"}):
            line = json.dumps(row)
            fh.write(line + "\n")
            (bad.__setitem__(f"b.jsonl:{row['id']}", len(line.encode())) if row["id"] == "jbig"
             else good.add(f"b.jsonl:{row['id']}"))
    with open(root / "c.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        w.writerows([["c1", "a cell, with a comma"], ["cbig", blob], ["c3", 'said "hi"']])
    good |= {"c.csv:c1", "c.csv:c3"}
    row = io.StringIO()
    csv.writer(row).writerow(["cbig", blob])
    bad["c.csv:cbig"] = len(row.getvalue().encode()) - 2  # the row, without its \r\n
    pq.write_table(pa.table({"id": ["p1", "pbig", "p3"], "text": ["one", blob, "three"]}),
                   root / "d.parquet")
    good |= {"d.parquet:p1", "d.parquet:p3"}
    bad["d.parquet:pbig"] = len(blob.encode())
    os.mkfifo(root / "e.txt")
    os.symlink("/dev/zero", root / "f.jsonl")
    bad["e.txt"] = bad["f.jsonl"] = 0
    return good, bad


def _run_measured(args: list[str], log: Path, timeout: float) -> tuple[int, str, int]:
    """``python -m runner`` with the controller's peak RSS (VmHWM, kB) polled every 0.1 s:
    (exit code, output, peak). Its workers are other processes and do not count."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cli(args), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        peak, deadline = 0, time.monotonic() + timeout
        while proc.poll() is None:
            peak = max(peak, vm_hwm_kb(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"no exit after {timeout} s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    return proc.returncode, log.read_text(errors="replace"), peak


@pytest.mark.timeout(300)
def test_cli_giant_items_fail_alone_and_the_controller_stays_small(tmp_path):
    from runner import names

    good, bad = _giant_corpus(tmp_path / "corpus")
    code, output, peak_kb = _run_measured(
        ["task=embed", f"task.input={tmp_path / 'corpus'}", "task.id_field=id", "devices=cpu",
         f"outputs={tmp_path / 'out'}", "progress=off"], tmp_path / "run.log", timeout=240)
    assert code == 3, output[-3000:]
    assert "Traceback" not in output
    run = only_run_dir(tmp_path / "out", "embed")
    statuses = journal_statuses(run)
    assert {i for i, s in statuses.items() if s == "done"} == good, statuses
    assert {i for i, s in statuses.items() if s == "failed"} == set(bad), statuses
    for item, size in bad.items():
        error = json.loads((run / "logs" / "errors" / f"{names.component(item)}.json")
                           .read_text())["error"]
        assert "\n" not in error and item in error, error
        if size:
            assert (f" is {size:,} bytes, over task.max_item_bytes=1,000,000; split it or "
                    f"raise task.max_item_bytes") in error, error
        else:
            assert "not a regular file" in error, error
    assert peak_kb < RSS_LIMIT_KB, f"controller peak RSS {peak_kb} kB"
