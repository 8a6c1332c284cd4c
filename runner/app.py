"""The Hydra app: compose -> plan -> execute -> report, and the exit code.

A new local run spawns its workers before discovery (they boot and load their models while
the controller journals the items and plans); a resume or a Ray run spawns after planning.

``python -m runner`` and the ``runner`` console script (via runner/cli.py) both call :func:`main`.
Exit codes: 0 all done · 1 could not start (one line) · 3 finished with failed items (or
items left because every worker slot was lost) · 130 interrupted (resumable).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from runner import config as config_mod
from runner import devices as devices_mod
from runner import intake, provenance, report, resume as resume_mod
from runner.journal import Journal
from runner.plan import Plan, chain_dict, inventory_notes, slot_plans
from runner.progress import make_progress
from runner.rundir import RunDir, atomic_write_json, atomic_write_text, remove_stale_temps
from runner.scheduler import Scheduler, page_size
from runner.supervisor import Supervisor
from runner.tasks.base import ConfigError, FinalizeContext

log = logging.getLogger("runner")
CONF = str(Path(__file__).resolve().parents[1] / "conf")
EXIT_OK, EXIT_START, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 3, 130


def setup() -> None:
    """Register schemas and resolvers (idempotent); tests call it before compose()."""
    config_mod.register()
    OmegaConf.register_new_resolver("runner_run_dir", resume_mod.RunDirResolver(), replace=True)
    OmegaConf.register_new_resolver("runner_output_subdir", resume_mod.output_subdir, replace=True)


def _backends_to_probe(backend: str) -> tuple[str, ...]:
    return {"auto": ("cuda", "xpu"), "cuda": ("cuda",), "xpu": ("xpu",)}.get(backend, ())


def _limited(it, limit):
    return it if limit is None else itertools.islice(it, limit)


def run(cfg: DictConfig, argv: list[str] | None = None) -> int:
    """One job, start to finish. Returns the exit code."""
    try:
        return _run(cfg, argv or sys.argv)
    except ConfigError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        _to_log_files(logging.ERROR, f"could not start: {exc}")
        return EXIT_START
    except _InterruptedOutsideRun as exc:
        print(f"runner: {exc}", file=sys.stderr)
        _to_log_files(logging.WARNING, str(exc))
        return EXIT_INTERRUPTED


class _InterruptedOutsideRun(Exception):
    """Ctrl-C before the executor takes over SIGINT (discovery) or after it gives it back
    (finalize, report): its message is the one line to print."""


def _to_log_files(level: int, msg: str) -> None:
    """Record ``msg`` in runner.log without repeating on the console the line just printed."""
    record = log.makeRecord(log.name, level, __file__, 0, msg, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _instantiate_task(task_cfg: DictConfig) -> Any:
    """The task object; a ConfigError its constructor raises stays the one line it is."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(task_cfg, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise


def _run(cfg: DictConfig, argv: list[str]) -> int:
    config_mod.validate(cfg)
    if cfg.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor=ray needs Ray: pip install 'runner[ray]' (or pip install ray), "
                          "or use executor=local")
    rundir = RunDir(Path(HydraConfig.get().runtime.output_dir)).make()
    provenance.write_run_files(rundir.root, cfg)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task = _instantiate_task(cfg.task)
    if cfg.dry_run:
        inventory = None
    elif cfg.executor.kind == "ray" and cfg.executor.address:
        from runner.executor_ray import cluster_inventory  # slots from the cluster's resources

        inventory = cluster_inventory(cfg.executor.address)
    else:
        inventory = devices_mod.discover(_backends_to_probe(cfg.devices.backend))
    if cfg.dry_run and cfg.devices.backend == "auto" and cfg.devices.ids is None:
        # auto must plan what a real run would get: nvidia-smi looks without importing
        # torch; the XPU probe needs torch (in a subprocess), so a dry run skips it.
        found = devices_mod.discover(("cuda",))
        inventory = dataclasses.replace(found, notes=found.notes + (
            "xpu: not probed in a dry run (the probe imports torch in a subprocess)",))
    slots = devices_mod.make_slots(cfg.devices, inventory)
    backends = sorted({s.backend for s in slots})
    task.check(frozenset(backends))

    # ---- resume or new -------------------------------------------------------------------
    plain_task = {k: v for k, v in task_cfg.items()}
    resume_info: dict[str, Any] = {}
    if cfg.resume.run:
        old = json.loads(rundir.task_config.read_text())
        resume_mod.check_compatible(old, plain_task, tuple(task.resume_safe_keys))
        resume_info = {"resumed": str(rundir.root), "time": time.time(),
                       "overrides": list(HydraConfig.get().overrides.task),
                       "retry_failed": cfg.resume.retry_failed}
    elif not cfg.dry_run:
        atomic_write_json(rundir.task_config, plain_task)

    keep = cfg.checkpoint.policy == "resume" and not cfg.dry_run
    journal = Journal(rundir.journal if keep else None, cfg.checkpoint.commit_every_s,
                      shared_outputs=bool(getattr(task, "shared_outputs", False)))
    try:
        return _execute(cfg, argv, rundir, task, task_cfg, journal, inventory, slots, backends,
                        resume_info)
    finally:
        journal.close()


def _execute(cfg, argv, rundir, task, task_cfg, journal, inventory, slots, backends, resume_info):
    chains = {b: task.model_chain(b) for b in backends}
    warnings = [f"model {r.name} skipped on {b}: {r.reason}"
                for b, rungs in chains.items() for r in rungs if not r.available]
    for w in warnings:
        log.warning(w)
    for b, rungs in chains.items():
        if not any(r.available for r in rungs):
            raise ConfigError(f"task.models={[r.name for r in rungs]}: none can be had on this "
                              f"machine for {b} ({'; '.join(r.reason for r in rungs)})")
    batch_size = cfg.batch_size or getattr(task, "default_batch_size", 1)
    make_spec = _spec_maker(cfg, rundir, task_cfg, chains, batch_size)
    early = None
    if not cfg.dry_run and not resume_info and cfg.executor.kind == "local":
        # A new run always has work (bar an empty input): its workers boot -- interpreter,
        # task import, model load -- while discovery and planning run here, and are ready
        # together when the first batch goes out. A resume may have nothing left to do, so
        # it starts no worker before it knows.
        early = _new_executor(cfg, rundir, None, make_spec)
        early.start(_worker_slots(slots, task))
    try:
        return _plan_and_run(cfg, argv, rundir, task, task_cfg, journal, inventory, slots,
                             resume_info, chains, warnings, batch_size, make_spec, early)
    finally:
        if early is not None:
            early.close()  # stops the workers if the run never reached them (no-op after)


def _new_executor(cfg, rundir, sup, make_spec):
    e = cfg.executor
    args = (sup, make_spec, e.max_restarts, e.grace_s, e.stop_timeout_s, e.start_timeout_s,
            cfg.chunking.prefetch)
    if e.kind == "ray":
        from runner.executor_ray import RayExecutor  # optional extra

        return RayExecutor(*args, address=e.address, run_dir=rundir.root)
    from runner.executor import LocalExecutor

    return LocalExecutor(*args)


def _spec_maker(cfg, rundir, task_cfg, chains, batch_size):
    from runner.messages import WorkerSpec

    def make_spec(slot, incarnation):
        return WorkerSpec(slot, incarnation, task_cfg, tuple(chains[slot.backend]), batch_size,
                          str(rundir.root), str(rundir.worker_log(slot.index)), cfg.seed)
    return make_spec


def _worker_slots(slots, task):
    """The slots as workers get them: the task's own variables added to each environment."""
    extra_env = task.worker_env()
    return [type(s)(s.index, s.backend, s.device_id, s.threads, {**s.env, **extra_env})
            for s in slots]


def _say_intake(found: intake.Intake) -> None:
    if found.repeated:
        log.warning("%d repeated id(s) (task.on_duplicate_id): first, %s", found.repeated,
                    found.first_repeated)
    if found.renamed_count:
        log.warning("%d item(s) named apart from another whose name meets theirs on a "
                    "case-insensitive or normalising file system (first: %s -> %s)",
                    found.renamed_count, *found.renamed[0])
    if found.changed:
        log.warning("%d item(s) changed since they were done or failed: made again (first: %s)",
                    found.changed, ", ".join(found.first_changed))


def _plan_and_run(cfg, argv, rundir, task, task_cfg, journal, inventory, slots, resume_info,
                  chains, warnings, batch_size, make_spec, early):
    try:
        found = intake.take(journal, _limited(task.discover(), cfg.limit),
                            on_duplicate=getattr(task, "on_duplicate_id", "error"),
                            on_changed=cfg.resume.on_changed)
    except KeyboardInterrupt:
        raise _InterruptedOutsideRun(
            f"interrupted while discovering items ({journal.counts()['pending']} found so "
            f"far); no item has run: start the command again") from None
    _say_intake(found)
    if not cfg.dry_run:  # logs/errors/<name>.json: one per failure, bad input included
        for b in found.bad:
            atomic_write_json(rundir.error_file(journal.name_of(b.id)), {
                "item": b.id, "where": b.where or None, "stage": "discovery",
                "error": b.error, "time": time.time()})
    recovered = journal.recover(cfg.resume.retry_failed)
    counts_before = journal.counts()
    sort_pages = bool(getattr(task, "sort_batches_by_cost", False))
    scheduler = Scheduler(journal, cfg.chunking.strategy, len(slots), batch_size,
                          page=page_size(batch_size, sort_pages),
                          sort_pages=sort_pages, guided_tail=cfg.chunking.guided_tail)
    load = scheduler.plan()
    count, total_cost, longest = journal.todo_stats()
    journal.commit()
    plan = Plan(
        task=task_cfg.get("name", task.name), target=task_cfg["_target_"],
        input=str(task_cfg.get("input", "")), devices=cfg.devices.name,
        backend=slots[0].backend, slots=slot_plans(slots, chains, load, task.worker_env()),
        chain=chain_dict(chains), batch_size=batch_size, chunking=cfg.chunking.strategy,
        prefetch=cfg.chunking.prefetch,
        items={"count": count, "total_cost": total_cost, "longest_cost": longest,
               "failed_at_discovery": counts_before["failed"],
               "already_done": counts_before["done"], **recovered, **found.as_dict()},
        checkpoint={"policy": cfg.checkpoint.policy, "max_attempts": cfg.checkpoint.max_attempts,
                    "journal": str(rundir.journal) if journal.path else "in memory"},
        executor=OmegaConf.to_container(cfg.executor), run_dir=str(rundir.root),
        outputs=str(rundir.output(task.output_dir)), resume=resume_info,
        discovery=inventory_notes(inventory), warnings=warnings)
    atomic_write_text(rundir.plan, plan.to_yaml())
    if cfg.dry_run:
        print(plan.render())
        return EXIT_OK
    if resume_info:
        with open(rundir.resumes, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(resume_info) + "\n")
    atomic_write_json(rundir.versions, provenance.collect(
        {"cpu_cores": inventory.cpu_cores, "cuda": inventory.cuda, "xpu": inventory.xpu,
         "nodes": inventory.nodes, "notes": inventory.notes}, argv))
    log.info("run dir %s: %d item(s) to do on %d slot(s)", rundir.root, count, len(slots))
    return _supervise(cfg, rundir, task, journal, slots, scheduler, load, count, make_spec, early)


def _supervise(cfg, rundir, task, journal, slots, scheduler, load, count, make_spec, early) -> int:
    progress = make_progress(cfg.progress)
    progress.start({s.index: s.label for s in slots}, count, {i: n for i, (n, _) in load.items()})
    sup = Supervisor(journal, scheduler, rundir, slots, cfg.checkpoint.max_attempts, progress)
    slots = _worker_slots(slots, task)
    t0 = time.time()
    if early is not None:  # spawned before discovery (see _execute)
        ex, t0 = early, early.spawned_at
        ex.sup = sup
    else:
        ex = _new_executor(cfg, rundir, sup, make_spec)
    try:
        # A resume with nothing left to do starts no worker (and loads no model); a new run
        # with an empty input stops the workers it started early (_execute).
        if count:
            ex.run(slots)
    finally:
        progress.close()
        journal.commit()
        # every worker has stopped: a temp file is what a write killed half-way left behind
        stale = remove_stale_temps(rundir.output(task.output_dir))
        if stale:
            log.info("removed %d temp file(s) of writes cut short (%s ...)", len(stale),
                     rundir.relative(stale[0]))
    wall = time.time() - t0
    resume_cmd = " ".join(["python -m runner", *[shlex.quote(a) for a in
                                                 HydraConfig.get().overrides.task
                                                 if not a.startswith("resume")],
                           f"resume={shlex.quote(str(rundir.root))}"])
    try:
        return _finish(task, rundir, journal, ex, sup, slots, wall, t0, resume_cmd)
    except KeyboardInterrupt:
        again = (f"finish it with: {resume_cmd}" if journal.path else
                 "checkpoint=off: nothing to resume")
        raise _InterruptedOutsideRun(
            f"interrupted while finishing the run (finalize, summary, timeline); the journal "
            f"holds every item's state; {again}") from None


def _finish(task, rundir, journal, ex, sup, slots, wall, t0, resume_cmd) -> int:
    """Run-level outputs, summary, timeline and the last words; the exit code."""
    extra = task.finalize(FinalizeContext(rundir.root, journal.done_view()))
    counts = journal.counts()
    interrupted = ex.interrupts.count > 0
    left = counts["pending"] + counts["running"]
    if interrupted:
        code, status = EXIT_INTERRUPTED, "interrupted"
    elif counts["failed"] or left:
        code, status = EXIT_FAILED, "finished with failed items" if not left else "slots lost"
    else:
        code, status = EXIT_OK, "all done"
    # The controller's own CPU time: on a CPU-only box it is taken from the workers' cores.
    extra = {"task": extra, "controller_cpu_s": round(time.process_time(), 3)}
    summary = report.summarize(sup.stats, wall, counts, journal.failures(), extra,
                               code, status, sup.notes)
    report.write(summary, rundir)
    try:
        report.timeline(journal, rundir, {s.index: s.label for s in slots}, t0 - 1)
    except Exception as exc:  # a plot must never cost the run its exit code
        log.warning("timeline.png not written: %s", exc)
    print(report.print_table(summary))
    if interrupted:
        print(f"runner: interrupted; {left} item(s) not done. Resume with: {resume_cmd}",
              file=sys.stderr)
    elif left:
        print(f"runner: every worker slot was lost; {left} item(s) not done (journal intact). "
              f"See {rundir.logs}; resume with: {resume_cmd}", file=sys.stderr)
    elif counts["failed"]:
        print(f"runner: {counts['failed']} item(s) failed (errors in {rundir.logs / 'errors'}); "
              f"retry them with: {resume_cmd} resume.retry_failed=true", file=sys.stderr)
    return code


class _Worst:
    """The worst exit code of the jobs this process ran (one, or a sweep's in-process jobs)."""

    code = EXIT_OK


def note_exit_code(code: int) -> None:
    """Count a job's exit code towards this process's own: main() exits with the worst one
    (the sweep launcher calls it for the jobs it ran in other processes)."""
    _Worst.code = max(_Worst.code, code)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def _hydra_main(cfg: DictConfig) -> int:
    code = run(cfg)
    note_exit_code(code)
    return code


def check_resume(argv: list[str]) -> None:
    """Find the run ``resume.run=...`` names before Hydra does, so that a missing one is a
    one-line error (exit 1) rather than Hydra's traceback of a failed interpolation."""
    values = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("resume.run=")]
    if (not values or values[-1] in ("", "null", "None") or "," in values[-1]
            or any(a in ("-m", "--multirun") for a in argv[1:])):
        return
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv[1:] if not a.startswith(("-", "hydra.", "hydra/", "+hydra"))]
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        outputs, task = cfg.outputs, cfg.task.name
    except Exception:  # a bad override: Hydra itself reports it next
        return
    resume_mod.find_run(outputs, task, values[-1])


def main() -> None:
    setup()
    sys.argv = config_mod.rewrite_argv(sys.argv)
    try:
        config_mod.check_group_options(sys.argv, Path(CONF))
        check_resume(sys.argv)
    except ConfigError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_START)
    _hydra_main()
    sys.exit(_Worst.code)
