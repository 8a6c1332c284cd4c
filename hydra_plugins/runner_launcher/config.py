"""The launcher's config, stored in Hydra's ConfigStore as ``hydra/launcher=runner``.

``python -m runner -m ... --cfg hydra -p hydra.launcher`` shows these fields; set them on
the command line as ``hydra.launcher.fail_fast=true`` and so on. The device pool: in runner
(or an app with runner's ``devices`` group) it is the job's own ``devices`` group
(``devices=cuda4`` -> four cards, one job on each at a time; ``devices=cpu2`` -> two CPU
slots); in any other Hydra app it is ``devices`` / ``ids`` / ``jobs_per_device`` here.
"""

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

LIVE_MODES = ("auto", "plain", "off")
BEST_MODES = ("auto", "max", "min", "none")


@dataclass
class RunnerLauncherConf:
    _target_: str = "hydra_plugins.runner_launcher.launcher.RunnerLauncher"
    # Jobs at once. The pool is one lease per device of the job's `devices` group (cpu2: two
    # CPU slots, cuda4: four cards); max_parallel caps it. An app without a `devices` group
    # runs max_parallel jobs at once (null there means 1).
    max_parallel: Optional[int] = None
    # Seconds between two job starts (spreads model loading / downloads); 0 = no stagger.
    stagger_s: float = 0.0
    # true: after the first failed job (exception, killed, nonzero exit code) hand out no
    # more jobs; the running ones finish. false: every job runs whatever the others do.
    fail_fast: bool = False
    # How long the launcher waits on job processes (their pipes and sentinels) before it
    # looks again; it never blocks longer than this.
    poll_s: float = 0.2
    # Live view, one line per job (device, status, elapsed, items done), on stderr:
    # auto = redrawn in place on a terminal, printed on every change otherwise | plain | off.
    live: str = "auto"
    # Plain live view: reprint at least this often while jobs run (and on every change).
    live_every_s: float = 10.0
    # true: a job's stdout/stderr go to <job dir>/console.log (its traceback lands there and
    # in its own log the moment it fails), so the live view stays readable.
    console_log: bool = True
    # The device pool. null: the app's own `devices` group when it is runner's (runner, or
    # an app with runner's devices schema), else auto. auto | cuda | xpu | cpu: the
    # launcher's own pool: auto = every CUDA card, else every Intel GPU, else the CPU. Each
    # job gets one card, as CUDA_VISIBLE_DEVICES / ZE_AFFINITY_MASK (CUDA_VISIBLE_DEVICES=
    # on CPU) plus RUNNER_SWEEP_DEVICE=<label>; the job's config is not changed.
    devices: Optional[str] = None
    # Cards of the launcher's own pool (machine ids, as nvidia-smi numbers them); null: all.
    ids: Optional[Any] = None
    # Jobs sharing one card at a time (launcher's own pool); on CPU: CPU slots when
    # max_parallel is null.
    jobs_per_device: int = 1
    # Launcher's own pool: OMP_NUM_THREADS / MKL_NUM_THREADS for each job; null: not set.
    threads_per_job: Optional[int] = None
    # The best row of sweep.md / sweep.json: max | min = the job's return value (a number, or
    # best_key of a flat dict of numbers); none = no best row; auto = runner's key figure for
    # runner jobs (items/s, RTF), none for other apps.
    best: str = "auto"
    best_key: Optional[str] = None
    # Job processes started ahead for each busy device (each job still gets a fresh process
    # of its own): they import, load the task, then take the next job staged (Hydra's job
    # set-up done, the task function waiting for the device). null: one, two once jobs on
    # that device end sooner than a process starts; 0: none (a job's process starts when
    # its device frees). No staging when the app has Hydra callbacks.
    spares: Optional[int] = None
    # Where job processes come from. forkserver: per device, a server started once with the
    # device's environment, Hydra and the task's module imported, forks each job's process
    # (~10 ms instead of a new interpreter); spawn: a new interpreter per job. null:
    # forkserver where the OS has it. Use spawn if the task's module touches a GPU at import.
    start_method: Optional[str] = None
    # A job that has returned but whose process has not exited after this many seconds is
    # killed (its result is kept): a GPU is free again only once the process has ended.
    exit_wait_s: float = 30.0


ConfigStore.instance().store(group="hydra/launcher", name="runner", node=RunnerLauncherConf,
                             provider="runner")
