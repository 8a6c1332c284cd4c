"""runner's process-per-device launcher for Hydra multiruns (``hydra/launcher=runner``).

Each sweep job runs in its own spawned process that owns one device of the job's
``devices`` group; a job starts as soon as a device frees up. Layout, per Hydra's plugin
rules (``hydra_plugins`` itself has no ``__init__.py``; Hydra imports every module here
whose name does not start with ``_`` while it scans for plugins, so those stay light):

    config.py    the launcher's config dataclass, stored as hydra/launcher=runner
    launcher.py  the Launcher class Hydra instantiates (imports _core only in launch())
    _core.py     the scheduling loop in the parent: leases, job processes, failures
    _child.py    the job process's entry point (Hydra's run_job after Singleton.set_state)
    _pool.py     the device pool: leases, their environment, the pins each job gets
    _resume.py   resuming a sweep (``-m ... resume=latest``): which jobs rerun and where
    _live.py     the live view, one line per job

See ``runner/sweep.py`` for sweep.md / sweep.json.
"""
