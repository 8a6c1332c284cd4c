"""The Hydra app: the README's "How a run flows", one step per function.

    Hydra composes conf/ + overrides        main() -> _hydra_main()
      -> prepare: the RunContext            runner/context.py (run dir, task, slots, chains)
      -> discover: items into the journal   runner/intake.py (names, repeats, changed inputs)
      -> plan: plan.yaml (dry_run stops)    runner/plan.py
      -> execute: a process per slot        runner/executor.py + the ledger (ledger.py)
      -> report: summary, timeline, code    runner/report.py

A new local run spawns its workers before discovery (they boot and load their models while
the controller journals the items and plans); a resume or a Ray run spawns after planning.
``python -m runner`` and the ``runner`` console script (via runner/cli.py) call :func:`main`.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from runner import config as config_mod
from runner import intake, provenance, resume as resume_mod, reuse as reuse_mod
from runner.context import RunContext, prepare
from runner.errors import ConfigError, ExitCode, StorageError, storage_problem
from runner.journal import Journal
from runner.plan import build as build_plan
from runner.progress import make_progress
from runner.processes import StopSignal, stop_signals_raise
from runner.report import EarlyStop, outcome
from runner.rundir import remove_stale_temps
from runner.scheduler import Scheduler
from runner.sweep import ExitStatus
from runner.watch import Watcher
from runner.ledger import Ledger

log = logging.getLogger("runner")
CONF = str(Path(__file__).resolve().parents[1] / "conf")


def setup() -> None:
    """Register schemas and resolvers (idempotent); tests call it before compose()."""
    config_mod.register()
    OmegaConf.register_new_resolver("runner_run_dir", resume_mod.RunDirResolver(), replace=True)
    OmegaConf.register_new_resolver("runner_output_subdir", resume_mod.output_subdir, replace=True)


class _InterruptedOutsideRun(Exception):
    """Ctrl-C, SIGTERM or SIGHUP before the executor takes over the signals (discovery) or
    after it gives them back (finalize, report): its message is the one line to print."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.code = code


def _signal_code(exc: BaseException) -> ExitCode:
    """The exit code of a stop signal caught as an exception."""
    return ExitCode.for_signal(exc.signame) if isinstance(exc, StopSignal) else ExitCode.INTERRUPTED


def run(cfg: DictConfig, argv: list[str] | None = None) -> int:
    """One job, start to finish. Returns the exit code."""
    stop_signals_raise()  # (again: a sweep's job process does not pass through main())
    try:
        return _run(cfg, argv or sys.argv)
    except ConfigError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        _to_log_files(logging.ERROR, f"could not start: {exc}")
        return ExitCode.START
    except _InterruptedOutsideRun as exc:
        print(f"runner: {exc}", file=sys.stderr)
        _to_log_files(logging.WARNING, str(exc))
        return exc.code
    except StopSignal as exc:  # before the run dir and journal exist
        print(f"runner: stopped by {exc.signame} while starting; nothing ran: start the "
              f"command again", file=sys.stderr)
        return ExitCode.for_signal(exc.signame)
    except Exception as exc:
        problem = exc.args[0] if isinstance(exc, StorageError) else storage_problem(exc)
        if problem is None:
            raise
        then = (f"resume with: {exc.args[1]}" if isinstance(exc, StorageError)
                and len(exc.args) > 1 else "start the command again")
        line = (f"stopped: could not write: {problem}; no item was charged and the journal "
                f"keeps what it had. Free space or fix the folder, then {then}")
        print(f"runner: {line}", file=sys.stderr)
        with contextlib.suppress(Exception):
            _to_log_files(logging.ERROR, line)
        return ExitCode.STORAGE


def _to_log_files(level: int, msg: str) -> None:
    """Record ``msg`` in runner.log without repeating on the console the line just printed."""
    record = log.makeRecord(log.name, level, __file__, 0, msg, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _run(cfg: DictConfig, argv: list[str]) -> int:
    ctx = prepare(cfg, argv)
    try:
        return _run_in(ctx, cfg)
    except Exception as exc:  # the controller's own write refused: the journal, a report
        problem = str(exc) if isinstance(exc, StorageError) else storage_problem(exc)
        if problem is None or cfg.checkpoint.policy != "resume":
            raise
        raise StorageError(problem, ctx.resume_command) from None


def _run_in(ctx: RunContext, cfg: DictConfig) -> int:
    keep = cfg.checkpoint.policy == "resume" and not cfg.dry_run
    journal = Journal(ctx.rundir.journal if keep else None, cfg.checkpoint.commit_every_s,
                      shared_outputs=bool(getattr(ctx.task, "shared_outputs", False)))
    early = None
    try:
        if not cfg.dry_run and not ctx.resume and cfg.executor.kind == "local":
            # A new run always has work (bar an empty input): its workers boot --
            # interpreter, task import, model load -- while discovery and planning run here.
            # A resume may have nothing left to do: it starts no worker before it knows.
            early = _executor(ctx)
            early.start(list(ctx.slots))
        found = _discover(ctx, journal)
        reused = _reuse(ctx, journal) if cfg.reuse.run and not ctx.resume else None
        scheduler, load, plan = build_plan(ctx, journal, found.as_dict())
        if cfg.dry_run:
            print(plan.render())
            if reused is not None:
                print(reused.line().replace("reused", "would be reused", 1))
            return ExitCode.OK
        provenance.record_start(ctx)
        count = plan.items["count"]
        log.info("run dir %s: %d item(s) to do on %d slot(s)", ctx.rundir.root, count,
                 len(ctx.slots))
        ledger, stop, wall, t0 = _execute(ctx, journal, scheduler, load, count, early)
        try:
            return outcome(ctx, journal, ledger, stop, wall, t0)
        except (KeyboardInterrupt, StopSignal) as exc:
            again = (f"finish it with: {ctx.resume_command}" if journal.path else
                     "checkpoint=off: nothing to resume")
            raise _InterruptedOutsideRun(
                f"interrupted while finishing the run (finalize, summary, timeline); the "
                f"journal holds every item's state; {again}", _signal_code(exc)) from None
    finally:
        try:
            if early is not None:
                early.close()  # stops the workers if the run never reached them (no-op after)
        finally:
            journal.close()
            ctx.lock.release()


def _discover(ctx: RunContext, journal: Journal) -> intake.Intake:
    """Every item into the journal, identity checked; an error file per bad item."""
    items = ctx.task.discover()
    if ctx.cfg.limit is not None:
        items = itertools.islice(items, ctx.cfg.limit)
    try:
        found = intake.take(journal, items,
                            on_duplicate=getattr(ctx.task, "on_duplicate_id", "error"),
                            on_changed=ctx.cfg.resume.on_changed)
    except (KeyboardInterrupt, StopSignal) as exc:
        raise _InterruptedOutsideRun(
            f"interrupted while discovering items ({journal.counts()['pending']} found so "
            f"far); no item has run: start the command again", _signal_code(exc)) from None
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
    if not ctx.cfg.dry_run:  # logs/errors/<name>.json: one per failure, bad input included
        intake.record_bad(ctx.rundir, journal, found.bad)
    return found


def _reuse(ctx: RunContext, journal: Journal) -> "reuse_mod.ReuseReport":
    """reuse=: items an earlier run already made are done here too, their files linked."""
    source = reuse_mod.find_source(ctx.cfg.outputs, ctx.task.name, str(ctx.cfg.reuse.run),
                                   ctx.rundir.root)
    first = {next((r.name for r in chain if r.available), "") for chain in ctx.chains.values()}
    report = reuse_mod.apply(journal, ctx.rundir, source, ctx.task, ctx.task_cfg, first,
                             ctx.cfg.reuse.accept_fallback, link=not ctx.cfg.dry_run)
    log.info(report.line())
    journal.set_meta("reuse", report.as_dict())
    return report


def _executor(ctx: RunContext):
    e = ctx.cfg.executor
    args = (ctx.spec, e.max_restarts, e.grace_s, e.stop_timeout_s, e.start_timeout_s,
            ctx.cfg.chunking.prefetch)
    if e.kind == "ray":
        from runner.executor_ray import RayExecutor  # optional extra

        return RayExecutor(*args, address=e.address, run_dir=ctx.rundir.root,
                           item_timeout_s=e.item_timeout_s)
    from runner.executor import LocalExecutor

    return LocalExecutor(*args, item_timeout_s=e.item_timeout_s)


def _execute(ctx: RunContext, journal: Journal, scheduler: Scheduler, load: dict, count: int,
             early) -> tuple[Ledger, EarlyStop | None, float, float]:
    """The executor runs the slots; the ledger writes the journal. (ledger, why it stopped
    early or None, wall seconds, start time)."""
    progress = make_progress(ctx.cfg.progress)
    progress.start({s.index: s.label for s in ctx.slots}, count,
                   {i: n for i, (n, _) in load.items()})
    speculate = ctx.cfg.chunking.speculate
    if speculate is None:
        speculate = ctx.cfg.chunking.strategy == "dynamic"
    ledger = Ledger(journal, scheduler, ctx.rundir, list(ctx.slots),
                    ctx.cfg.checkpoint.max_attempts, progress, speculate=speculate)
    shutil.rmtree(ctx.rundir.claims, ignore_errors=True)  # (a crashed run's batch numbers recur)
    ex = early if early is not None else _executor(ctx)
    t0 = early.spawned_at if early is not None else time.time()
    try:
        # A resume with nothing left to do starts no worker (and loads no model); a new run
        # with an empty input stops the workers it started early (_run's finally).
        if ctx.cfg.watch.enabled:
            refill = Watcher(ctx, journal, ledger,
                             lambda: build_plan(ctx, journal, {})[0])
            ex.run(list(ctx.slots), ledger, refill)
        elif count:
            ex.run(list(ctx.slots), ledger)
    finally:
        progress.close()
        journal.commit()
        # every worker has stopped: a temp file is what a write killed half-way left behind
        stale = remove_stale_temps(ctx.rundir.output(ctx.task.output_dir))
        shutil.rmtree(ctx.rundir.claims, ignore_errors=True)
        if stale:
            log.info("removed %d temp file(s) of writes cut short (%s ...)", len(stale),
                     ctx.rundir.relative(stale[0]))
    stop = None
    if ex.interrupts.count:
        sig = ex.interrupts.signals[0]
        stop = EarlyStop(ExitCode.for_signal(sig), sig)
    elif ex.halt is not None:
        stop = EarlyStop(ExitCode.STORAGE, ex.halt)
    return ledger, stop, time.time() - t0, t0


class _Worst:
    """The worst exit code of the jobs this process ran (one, or a sweep's in-process jobs)."""

    code = ExitCode.OK


def note_exit_code(code: int) -> None:
    """Count a job's exit code towards this process's own: main() exits with the worst one
    (the sweep launcher calls it for the jobs it ran in other processes)."""
    _Worst.code = max(_Worst.code, code)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def _hydra_main(cfg: DictConfig) -> ExitStatus:
    code = run(cfg)
    note_exit_code(code)
    return ExitStatus(int(code))  # typed: a sweep reads it as runner's exit code


def main() -> None:
    setup()
    logging.raiseExceptions = False  # a log file on a full disk: no traceback per record
    stop_signals_raise()  # SIGTERM/SIGHUP: a stop request from here on, never a silent death
    sys.argv = config_mod.rewrite_argv(sys.argv)
    try:
        config_mod.check_group_options(sys.argv, Path(CONF))
        # the run dir's lock, held until this process ends (runner.runlock)
        lock = resume_mod.check_resume(sys.argv, CONF)
        sys.argv, new_lock = resume_mod.claim_for(sys.argv, CONF)
        lock = lock or new_lock
    except ConfigError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        sys.exit(ExitCode.START)
    except StopSignal as exc:
        print(f"runner: stopped by {exc.signame} while starting; nothing ran", file=sys.stderr)
        sys.exit(ExitCode.for_signal(exc.signame))
    try:
        _hydra_main()
    except StopSignal as exc:  # during Hydra's own set-up or tear-down
        print(f"runner: stopped by {exc.signame}", file=sys.stderr)
        sys.exit(max(_Worst.code, ExitCode.for_signal(exc.signame)))
    del lock  # (held to here)
    sys.exit(int(_Worst.code))
