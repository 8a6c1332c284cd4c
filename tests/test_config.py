"""Layer: unit (Hydra's compose in-process); the test_cli_* cases are cli (subprocesses).

Config composition and validation (issue 2).

Composition goes through Hydra's own ``compose`` over conf/ after ``runner.app.setup()``,
so the ConfigStore schemas and the YAML groups are checked together. Every value that
``runner.config.validate`` checks has a case here, and each error must name the key, the
bad value and what is allowed. The CLI cases run ``python -m runner`` in a subprocess.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from runner import app, config
from runner.tasks.base import ConfigError
from tests.conftest import ROOT, run_cli

CONF = str(ROOT / "conf")
DEVICE_GROUPS = {  # option -> (backend, count)
    "auto": ("auto", None), "cpu": ("cpu", 1), "cpu2": ("cpu", 2), "cpu4": ("cpu", 4),
    "cuda1": ("cuda", 1), "cuda2": ("cuda", 2), "cuda4": ("cuda", 4), "cuda8": ("cuda", 8),
    "arc1": ("xpu", 1), "arc2": ("xpu", 2),
}


def composed(*overrides: str):
    app.setup()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---- composition ----------------------------------------------------------------------------
def test_defaults_compose_and_validate():
    cfg = composed()
    config.validate(cfg)
    assert cfg.devices.name == "auto" and cfg.devices.backend == "auto"
    assert cfg.chunking.strategy == "dynamic"
    assert cfg.checkpoint.policy == "resume"
    assert cfg.executor.kind == "local"
    assert cfg.task.name == "subtitles"
    assert cfg.dry_run is False and cfg.limit is None and cfg.batch_size is None


@pytest.mark.parametrize("option", sorted(DEVICE_GROUPS))
def test_every_devices_group_composes(option):
    cfg = composed(f"devices={option}", "task=embed")
    config.validate(cfg)
    backend, count = DEVICE_GROUPS[option]
    assert (cfg.devices.name, cfg.devices.backend, cfg.devices.count) == (option, backend, count)
    assert cfg.devices.workers_per_device == 1 and cfg.devices.ids is None


@pytest.mark.parametrize("strategy", ["dynamic", "size_balanced", "contiguous", "round_robin"])
def test_every_chunking_group_composes(strategy):
    cfg = composed(f"chunking={strategy}", "task=embed")
    config.validate(cfg)
    assert cfg.chunking.strategy == strategy


def test_groups_and_top_level_keys_compose_together():
    cfg = composed("task=embed", "devices=cuda4", "devices.ids=[1,3]", "chunking=round_robin",
                   "checkpoint=off", "limit=7", "batch_size=16", "seed=3", "dry_run=true",
                   "task.models=[a,b]", "task.text_field=body")
    config.validate(cfg)
    assert list(cfg.devices.ids) == [1, 3]
    assert cfg.checkpoint.policy == "off"
    assert (cfg.limit, cfg.batch_size, cfg.seed, cfg.dry_run) == (7, 16, 3, True)
    assert cfg.task._target_ == "runner.tasks.embed.EmbedTask"
    assert list(cfg.task.models) == ["a", "b"] and cfg.task.text_field == "body"


def test_schema_rejects_unknown_key_and_wrong_type():
    with pytest.raises(Exception, match="devices.colour|colour"):
        composed("devices=cpu", "devices.colour=red")
    with pytest.raises(Exception, match="batch_size='lots' is not allowed"):
        config.validate(composed("batch_size=lots"))  # (an int, auto or null: checked here)


def test_rewrite_argv_moves_resume_under_resume_run():
    assert config.rewrite_argv(["runner", "resume=latest", "+resume=x", "limit=3"]) == [
        "runner", "resume.run=latest", "resume.run=x", "limit=3"]


# ---- validation: one case per validated field ---------------------------------------------
# (override, key named in the error, value shown, words that say what is allowed)
BAD = [
    ("devices.backend=tpu", "devices.backend", "'tpu'", "auto, cpu, cuda, xpu"),
    ("devices.count=0", "devices.count", "0", "an integer in 1..4096, or null"),
    ("devices.workers_per_device=0", "devices.workers_per_device", "0", "an integer in 1..4096"),
    ("devices.threads_per_worker=-2", "devices.threads_per_worker", "-2",
     "an integer in 1..4096, or null"),
    ("devices.ids=[]", "devices.ids", "[]", "non-empty list of ids >= 0"),
    ("devices.ids=[-1]", "devices.ids", "[-1]", "a list of integers >= 0"),
    ("devices.ids=[1,1]", "devices.ids", "[1, 1]", "names a device twice"),
    ("chunking.strategy=striped", "chunking.strategy", "'striped'",
     "dynamic, size_balanced, contiguous, round_robin"),
    ("chunking.prefetch=0", "chunking.prefetch", "0", "an integer in 1..64"),
    ("checkpoint.policy=sometimes", "checkpoint.policy", "'sometimes'", "resume, off"),
    ("checkpoint.max_attempts=0", "checkpoint.max_attempts", "0", "an integer in 1..100"),
    ("executor.kind=slurm", "executor.kind", "'slurm'", "local, ray"),
    ("executor.max_restarts=-1", "executor.max_restarts", "-1", "an integer in 0..1000"),
    ("batch_size=0", "batch_size", "0", "an integer in 1..1048576, auto"),
    ("limit=-5", "limit", "-5", "an integer >= 0, or null"),
    ("progress=fancy", "progress", "'fancy'", "auto, rich, plain, off"),
]


@pytest.mark.parametrize("override,key,value,allowed", BAD, ids=[b[0] for b in BAD])
def test_validate_names_key_value_and_allowed(override, key, value, allowed):
    base = "devices=cuda2" if override.startswith("devices.ids") else "devices=cpu2"
    cfg = composed("task=embed", base, override)
    with pytest.raises(ConfigError) as err:
        config.validate(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{key}=" in msg and value in msg and allowed in msg, msg


def test_validate_ids_on_cpu_backend_says_what_to_use():
    cfg = composed("task=embed", "devices=cpu2", "devices.ids=[1]")
    with pytest.raises(ConfigError, match=r"devices\.ids is for cuda/xpu.*devices\.count"):
        config.validate(cfg)


def test_validate_resume_without_journal():
    cfg = composed("task=embed", "checkpoint=off", "resume.run=latest")
    with pytest.raises(ConfigError, match=r"resume needs a journal.*checkpoint=resume"):
        config.validate(cfg)


def test_validate_task_without_target():
    cfg = composed("task=sleep", "~task._target_")
    assert "_target_" not in cfg.task
    with pytest.raises(ConfigError, match=r"task has no _target_.*task=embed\|subtitles"):
        config.validate(cfg)


def test_every_bad_value_case_differs_from_a_good_config():
    """Guard for the table above: without its override each case validates."""
    for base in ("devices=cpu2", "devices=cuda2"):
        config.validate(composed("task=embed", base))


# ---- the CLI ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_cli_cfg_job_prints_the_composed_config(tmp_path):
    r = run_cli(["--cfg", "job", "task=embed", "devices=cuda4", "chunking=size_balanced",
                 f"outputs={tmp_path}"], timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["devices"] == {"name": "cuda4", "backend": "cuda", "count": 4, "ids": None,
                              "workers_per_device": 1, "threads_per_worker": None,
                              "force": False, "slots": None, "cpu_workers": 0, "speed": 1.0}
    assert cfg["chunking"]["strategy"] == "size_balanced"
    assert cfg["task"]["_target_"] == "runner.tasks.embed.EmbedTask"
    assert cfg["task"]["models"] == ["all-MiniLM-L6-v2"]
    # the same thing compose() gives (printing the config must not run anything)
    expect = OmegaConf.to_container(composed("task=embed", "devices=cuda4",
                                             "chunking=size_balanced", f"outputs={tmp_path}"))
    assert cfg == expect
    assert not any(tmp_path.iterdir()), "--cfg job must not create a run dir"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override,key,value,allowed", [
    ("chunking.strategy=striped", "chunking.strategy", "'striped'", "round_robin"),
    ("batch_size=0", "batch_size", "0", "integer in 1..1048576, auto"),
    ("devices.backend=tpu", "devices.backend", "'tpu'", "auto, cpu, cuda, xpu"),
    # raised by the task's constructor, through Hydra's instantiate: still one line
    ("task.cost=bytes", "task.cost", "'bytes'", "tokens, chars"),
])
def test_cli_bad_value_is_exit_1_and_one_line(tmp_path, override, key, value, allowed):
    r = run_cli(["task=embed", "devices=cpu2", override, f"outputs={tmp_path}", "progress=off"],
                timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("runner: error: ")
    assert f"{key}=" in lines[0] and value in lines[0] and allowed in lines[0]
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,key,value", [
    (("task=embed", "devices=cuda3"), "devices", "'cuda3'"),
    (("-m", "task=embed,embedd", "devices=cpu"), "task", "'embedd'"),  # one value of a sweep
])
def test_cli_unknown_group_option_is_exit_1_and_one_line(tmp_path, args, key, value):
    """An option that is not in conf/<group>/: one line naming the key, the value and every
    option of the group (Hydra's own report spans several lines), before any run dir."""
    r = run_cli([*args, f"outputs={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                timeout=60)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("runner: error: "), r.stderr
    assert f"{key}={value}" in lines[0]
    options = sorted(p.stem for p in (ROOT / "conf" / key).glob("*.yaml"))
    assert len(options) >= 3 and f"choose one of {', '.join(options)}" in lines[0]
    assert not any(tmp_path.iterdir()), "nothing may run"


@pytest.mark.parametrize("argv", [
    ["runner", "task=embed", "devices=cpu2,cuda4", "chunking=size_balanced", "checkpoint=off"],
    ["runner", "-m", "task=glob(*)", "devices=range(1,3)"],  # Hydra expands these itself
    ["runner", "--config-dir", "/somewhere/else", "devices=mine"],  # more options may exist there
    ["runner", "hydra/launcher=runner_devices", "task.models=[a,b]", "~checkpoint"],
    ["runner", "task=embed_schema"],  # a schema in the ConfigStore is an option too
    ["runner", "devices='cpu2'", 'chunking="dynamic"'],  # Hydra's quoted strings
])
def test_group_option_check_leaves_valid_and_hydra_expanded_values_alone(argv):
    config.register()  # as main() does first: the ConfigStore's schemas
    config.check_group_options(argv, Path(CONF))  # does not raise


def test_group_option_check_names_key_value_and_options():
    with pytest.raises(ConfigError, match=r"^chunking='striped' is not an option of chunking: "
                                          r"choose one of contiguous, dynamic, round_robin, "
                                          r"size_balanced \(conf/chunking/\)$"):
        config.check_group_options(["runner", "chunking=dynamic,striped"], Path(CONF))
