"""The Launcher class Hydra instantiates for ``hydra/launcher=runner``.

Kept light (Hydra imports this module while scanning for plugins); the work is in
``_core.py``, imported when a sweep is launched.
"""

from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.runner_launcher.config import BEST_MODES, LIVE_MODES


class RunnerLauncher(Launcher):
    """Process-per-device launcher: one spawned process per job, one device per process."""

    def __init__(self, max_parallel: Optional[int] = None, stagger_s: float = 0.0,
                 fail_fast: bool = False, poll_s: float = 0.2, live: str = "auto",
                 live_every_s: float = 10.0, console_log: bool = True,
                 devices: Optional[str] = None, ids: Any = None, jobs_per_device: int = 1,
                 threads_per_job: Optional[int] = None, best: str = "auto",
                 best_key: Optional[str] = None, spares: Optional[int] = None,
                 start_method: Optional[str] = None, exit_wait_s: float = 30.0,
                 **_: Any) -> None:
        # checked in launch() (check_settings), where a bad one is a one-line error
        self.max_parallel = max_parallel
        self.devices = devices
        self.ids = ids
        self.jobs_per_device = jobs_per_device
        self.threads_per_job = threads_per_job
        self.best = best
        self.best_key = best_key
        self.spares = spares
        self.start_method = start_method
        self.exit_wait_s = exit_wait_s
        self.stagger_s = stagger_s
        self.fail_fast = bool(fail_fast)
        self.poll_s = poll_s
        self.live = live
        self.live_every_s = live_every_s
        self.console_log = bool(console_log)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def check_settings(self) -> Optional[str]:
        """What is wrong with the settings, as one line; None when nothing is."""
        from hydra_plugins.runner_launcher._pool import POOL_KINDS

        def whole(x: Any, low: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= low

        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if self.max_parallel is not None and not whole(self.max_parallel, 1):
            return (f"hydra.launcher.max_parallel={self.max_parallel!r} must be an integer "
                    f">= 1 or null (one job per device)")
        if self.live not in LIVE_MODES:
            return f"hydra.launcher.live={self.live!r} is not one of {', '.join(LIVE_MODES)}"
        if not (number(self.stagger_s) and self.stagger_s >= 0 and number(self.poll_s)
                and self.poll_s > 0 and number(self.live_every_s)):
            return (f"hydra.launcher.stagger_s={self.stagger_s!r} must be >= 0 and "
                    f"hydra.launcher.poll_s={self.poll_s!r} > 0")
        if self.devices is not None and self.devices not in POOL_KINDS:
            return (f"hydra.launcher.devices={self.devices!r} is not one of "
                    f"{', '.join(POOL_KINDS)} (or null: the app's own devices group)")
        if not whole(self.jobs_per_device, 1):
            return f"hydra.launcher.jobs_per_device={self.jobs_per_device!r} must be an integer >= 1"
        if self.threads_per_job is not None and not whole(self.threads_per_job, 1):
            return (f"hydra.launcher.threads_per_job={self.threads_per_job!r} must be an "
                    f"integer >= 1 or null")
        ids = self.ids
        if ids is not None and (isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__")
                                or not all(whole(i, 0) for i in ids)):
            return (f"hydra.launcher.ids={ids!r} must be a list of card ids like [0,2] "
                    f"or null (every card)")
        if self.spares is not None and not (whole(self.spares, 0) and self.spares <= 8):
            return (f"hydra.launcher.spares={self.spares!r} must be an integer from 0 to 8 "
                    f"or null (one ahead per busy device, two for short jobs)")
        if not (number(self.exit_wait_s) and self.exit_wait_s > 0):
            return f"hydra.launcher.exit_wait_s={self.exit_wait_s!r} must be a number > 0"
        if self.start_method not in (None, "forkserver", "spawn"):
            return (f"hydra.launcher.start_method={self.start_method!r} is not one of "
                    f"forkserver, spawn (or null: forkserver where the OS has it)")
        if self.best not in BEST_MODES:
            return f"hydra.launcher.best={self.best!r} is not one of {', '.join(BEST_MODES)}"
        return None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.runner_launcher import _core

        return _core.launch(self, job_overrides, initial_job_idx)
