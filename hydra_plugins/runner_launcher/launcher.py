"""The Launcher class Hydra instantiates for ``hydra/launcher=runner``.

Kept light (Hydra imports this module while scanning for plugins); the work is in
``_core.py``, imported when a sweep is launched.
"""

from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.runner_launcher.config import LIVE_MODES


class RunnerLauncher(Launcher):
    """Process-per-device launcher: one spawned process per job, one device per process."""

    def __init__(self, max_parallel: Optional[int] = None, stagger_s: float = 0.0,
                 fail_fast: bool = False, poll_s: float = 0.2, live: str = "auto",
                 live_every_s: float = 10.0, console_log: bool = True, **_: Any) -> None:
        if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
            raise ValueError(f"hydra.launcher.max_parallel={max_parallel!r} must be an integer "
                             f">= 1 or null (one job per device)")
        if live not in LIVE_MODES:
            raise ValueError(f"hydra.launcher.live={live!r} is not one of {', '.join(LIVE_MODES)}")
        if stagger_s < 0 or poll_s <= 0:
            raise ValueError(f"hydra.launcher.stagger_s={stagger_s} must be >= 0 and "
                             f"hydra.launcher.poll_s={poll_s} > 0")
        self.max_parallel = max_parallel
        self.stagger_s = float(stagger_s)
        self.fail_fast = bool(fail_fast)
        self.poll_s = float(poll_s)
        self.live = live
        self.live_every_s = float(live_every_s)
        self.console_log = bool(console_log)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.runner_launcher import _core

        return _core.launch(self, job_overrides, initial_job_idx)
