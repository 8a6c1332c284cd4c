"""Imported by a lease's fork server before it forks anything: the app's script, loaded as
``__mp_main__`` the way a job process would load it (_child.TaskRef), so every job forked
from the server has the script's imports done.

multiprocessing's own ``__main__`` preload never happens in 3.11 (its server is given
``main_path`` but the preparation data names it ``init_main_from_path``), so the launcher
names the script in ``RUNNER_LAUNCHER_PRELOAD_MAIN`` for the server's start only; it is
removed here, before any job is forked, so no job sees it. An exception in the script
ends the server; the launcher then spawns job processes instead (_servers.py).
"""
import os

from hydra_plugins.runner_launcher._child import TaskRef

PRELOAD_VARIABLE = "RUNNER_LAUNCHER_PRELOAD_MAIN"

_path = os.environ.pop(PRELOAD_VARIABLE, None)
if _path:
    TaskRef(path=_path).load()
