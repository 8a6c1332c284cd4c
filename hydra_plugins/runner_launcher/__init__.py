"""runner's process-per-device launcher for Hydra multiruns (``hydra/launcher=runner``).

Each sweep job runs in a fresh process of its own that owns one device of the pool; a job
starts as soon as a device frees up. Layout, per Hydra's plugin
rules (``hydra_plugins`` itself has no ``__init__.py``; Hydra imports every module here
whose name does not start with ``_`` while it scans for plugins, so those stay light):

    config.py    the launcher's config dataclass, stored as hydra/launcher=runner
    launcher.py  the Launcher class Hydra instantiates (imports _core only in launch())
    _core.py     launch(): the pool, the jobs, sweep.json; the data-flow diagram
    _loop.py     the scheduling loop in the parent: leases, job processes, failures
    _spares.py   job processes started ahead, jobs staged on them (SpareState)
    _servers.py  where job processes come from: a fork server per lease, or spawn
    _messages.py what crosses between the launcher and a job process
    _child.py    the job process's entry point (Hydra's run_job after Singleton.set_state)
    _pool.py     the device pool: leases, their environment, the pins each job gets
    _resume.py   resuming a sweep (``-m ... resume=latest``): which jobs rerun and where
    _live.py     the live view, one line per job

See ``runner/sweep.py`` for sweep.md / sweep.json.
"""
