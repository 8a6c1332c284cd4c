"""Model chains per backend: the ``models`` group (conf/models/) beside ``task.models``.

A models group names a fallback chain per device backend, so that one run loads on each
device what it can hold (``python -m runner task=subtitles devices=mixed models=whisper_ladder``)::

    # conf/models/whisper_ladder.yaml
    cuda: [large-v3, medium, small]
    xpu: [medium, small]
    cpu: [base, tiny.en]

Which wins: for a backend the group names, the group's chain; for every other backend,
``task.models`` (the one-chain-for-all shorthand, which stays the default). A backend set to
null in the group (``models.xpu=null``) is not named. Each chain is resolved by the task
itself (``Task.model_chain`` of a task built with ``models`` set to that chain), so a rung
that cannot be had on this machine is skipped with a warning, as in ``task.models``.

Refused, one line each, before anything runs: a group that is not a mapping of cpu/cuda/xpu
to non-empty lists of names; a group for a task without ``task.models``; a name the task
cannot load at all (``Task.model_problem``: e.g. a Whisper size that does not exist), in
any backend's chain, not only the backends of this plan; a backend of the plan whose chain
has no model that can be had here. A resume must keep the group's chains
(:func:`check_resume`), as it must keep ``task.models``: a different chain changes what the
outputs are.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from runner.errors import ConfigError
from runner.tasks.base import ModelRung, Task, instantiate_task

log = logging.getLogger("runner")

BACKENDS = ("cpu", "cuda", "xpu")  # the keys a models group may have


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def group_chains(value: Any) -> dict[str, list[str]]:
    """The composed ``models`` value as {backend: [names]} ({} for null), checked."""
    value = _plain(value)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"models={value!r} is not a chain per backend: choose a group "
                          f"(models=whisper_ladder, conf/models/) or give a mapping of "
                          f"{', '.join(BACKENDS)} to lists of names")
    out = {}
    for backend, names in value.items():
        if backend not in BACKENDS:
            raise ConfigError(f"models.{backend}: not a backend; a models group names chains "
                              f"for {', '.join(BACKENDS)}")
        if names is None:
            continue
        if (not isinstance(names, list) or not names
                or not all(isinstance(n, str) and n.strip() for n in names)):
            raise ConfigError(f"models.{backend}={names!r} is not a non-empty list of model "
                              f"names (e.g. [base, tiny.en]), or null (task.models)")
        out[backend] = list(names)
    return out


def group_name() -> str | None:
    """The models group chosen on the command line or in the defaults (``whisper_ladder``),
    or None: no group, or ``models`` given as keys (``+models.cpu=[tiny.en]``)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get("models")
    except ValueError:  # outside a Hydra job
        return None


def label(backend: str, group: dict[str, list[str]], group_name: str | None) -> str:
    """Where ``backend``'s chain comes from: ``models.cuda (models=whisper_ladder)`` or
    ``task.models``."""
    if backend not in group:
        return "task.models"
    return f"models.{backend}" + (f" (models={group_name})" if group_name else "")


def _what(backend: str, names: list[str], group: dict[str, list[str]],
          group_name: str | None) -> str:
    if backend not in group:
        return f"task.models={names}"
    return f"models.{backend}={names}" + (f" (models={group_name})" if group_name else "")


def resolve(task: Task, task_cfg: dict, backends: Sequence[str], group: dict[str, list[str]],
            group_name: str | None = None
            ) -> tuple[dict[str, list[ModelRung]], tuple[str, ...]]:
    """backend -> the chain as resolved there, and a warning per skipped model."""
    if group and "models" not in task_cfg:
        raise ConfigError(f"models={group_name or group}: task={task_cfg.get('name', task.name)} "
                          f"has no model chain (no task.models); drop the models group")
    for backend, names in group.items():
        for name in names:
            why = task.model_problem(name, backend)
            if why:
                raise ConfigError(f"{_what(backend, names, group, group_name)}: "
                                  f"task={task_cfg.get('name', task.name)} cannot load "
                                  f"{name}: {why}")
    chains = {}
    for backend in backends:
        if backend in group:
            chains[backend] = instantiate_task({**task_cfg, "models": list(group[backend])}
                                               ).model_chain(backend)
        else:
            chains[backend] = task.model_chain(backend)
    warnings = tuple(f"model {r.name} skipped on {b}: {r.reason}"
                     for b, rungs in chains.items() for r in rungs if not r.available)
    for w in warnings:
        log.warning(w)
    for b, rungs in chains.items():
        if not any(r.available for r in rungs):
            raise ConfigError(f"{_what(b, [r.name for r in rungs], group, group_name)}: none "
                              f"can be had on this machine for {b} "
                              f"({'; '.join(r.reason for r in rungs)})")
    return chains, warnings


def shadowed(overrides: Sequence[str], backends: Sequence[str],
             group: dict[str, list[str]], group_name: str | None) -> tuple[str, ...]:
    """A warning when ``task.models`` was typed but the group names every backend of the
    plan (the group wins there, so the typed chain is not used anywhere)."""
    typed = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "task.models"]
    if not typed or not group or any(b not in group for b in backends):
        return ()
    return (f"{typed[-1]} is not used: models={group_name or group} names the chain of "
            f"every backend of this plan ({', '.join(backends)}), and the models group wins "
            f"for the backends it names",)


def check_resume(first_config: Path, group: dict[str, list[str]]) -> None:
    """Refuse a resume whose models group differs from the first run's (recorded by Hydra
    in ``<run dir>/.hydra/config.yaml``; a run without one had none)."""
    from omegaconf import OmegaConf

    try:
        old = group_chains(OmegaConf.load(first_config).get("models"))
    except FileNotFoundError:
        old = {}
    if old == group:
        return
    changes = "; ".join(f"models.{b}: {old.get(b, '<task.models>')!r} -> "
                        f"{group.get(b, '<task.models>')!r}"
                        for b in BACKENDS if old.get(b) != group.get(b))
    raise ConfigError(f"resume refused: the models group changes what outputs mean ({changes}); "
                      f"start a new run, or resume with the original models group")
