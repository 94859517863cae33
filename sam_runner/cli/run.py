"""`sam-run`: the pre-flight (cli/preflight.py), then Hydra runs each job, one run each (run/experiment.py); here
every ending of a run or a sweep becomes its exit code and one line (README "Exit codes").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sam_runner.cli.messages import EXIT_NOT_COMPLETED, EXIT_USAGE, fail
from sam_runner.cli.preflight import CONFIG_DIR, held_sweep_dir, hydra_arguments, pinned_output, preflight
from sam_runner.errors import JobNotStarted, SamRunnerError, describe_unforeseen
from sam_runner.report.runs import collect, show_sweep_table
from sam_runner.run import rundir, stopping
from sam_runner.run.status import FINISHED
from sam_runner.run.stopping import EXIT_INTERRUPTED, RunStopped, leave_stops_to_the_system, stop_at_once
from sam_runner.scale import torchrun_env
from sam_runner.scale.parent_watch import stops_handed_to_workers
from sam_runner.scale.slurm import JobLost

# The first rho of a sweep: plain optimizers ignore rho, so their runs at other rho values are duplicates.
PLAIN_RHO_ENV = "SAM_RUNNER_PLAIN_RHO"


def objective(summary: dict[str, Any]) -> float | None:
    """What a Hydra sweeper (Optuna) maximizes: validation accuracy when the run holds out a split
    (`dataset.val_fraction`), else test accuracy — tuning on the test set is only a fallback."""
    return summary.get("val_acc", summary.get("test_acc"))


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_job(cfg: DictConfig) -> float | None:
    """One Hydra job = one run. Returns its `objective` for Hydra sweepers."""
    from sam_runner.run.experiment import run_experiment
    from sam_runner.scale import gpu_slots  # imported here so `sam-run --help` stays fast
    from sam_runner.scale.parent_watch import in_worker, stopped_with_the_sweep

    hydra_config = HydraConfig.get()
    in_sweep = hydra_config.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_config.runtime.output_dir)
    started = []

    def accepted() -> None:
        _save_hydra_config(run_dir, cfg)
        started.append(run_dir)

    try:
        with _job_folder_removed_if_not_started(run_dir if in_sweep else None, f"{hydra_config.job.name}.log",
                                                 started), \
                stopped_with_the_sweep(), \
                gpu_slots.pinned_gpu(str(hydra_config.launcher.get("_target_", "")) if in_sweep else "",
                                     Path(hydra_config.sweep.dir), cfg.jobs_per_gpu, str(cfg.device)):
            summary = run_experiment(cfg, run_dir, choices=dict(hydra_config.runtime.choices),
                                     plain_rho=os.environ.get(PLAIN_RHO_ENV) if in_sweep else None,
                                     on_accepted=accepted)
    except RunStopped:
        if not in_worker():
            raise
        return None  # recorded; sam-run, which stopped the sweep, says so (raised, joblib would kill the other jobs)
    except Exception as error:  # any class: the run's summary.json says failed, and a sweep goes on
        foreseen = isinstance(error, SamRunnerError)
        if not foreseen and os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = str(error) if foreseen else f"{describe_unforeseen(error)} (HYDRA_FULL_ERROR=1 shows where)"
        code = EXIT_USAGE if foreseen else EXIT_NOT_COMPLETED
        if not in_sweep:
            fail(message, code=code)
        if not started:  # it wrote nothing: the sweep ends here, or its table would show what the directory held
            raise JobNotStarted(f"run {hydra_config.job.num} did not start: {message}", str(run_dir), code) from None
        print(f"sam-run: run {hydra_config.job.num} failed: {message}", file=sys.stderr)
        return None
    if not in_sweep and summary["status"] not in FINISHED:
        fail(f"the run {summary['status']}: {summary.get('error')}", code=EXIT_NOT_COMPLETED)
    return objective(summary)


def _save_hydra_config(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's record of the job (.hydra/config.yaml, hydra.yaml, overrides.yaml), written once the run has accepted
    its directory. configs/config.yaml turns Hydra's own early copy off (`hydra.output_subdir: null`): Hydra writes
    it before the job starts, so a run refused for its directory (another run's checkpoint) would have rewritten
    the config of the run that is there."""
    hydra_root = HydraConfig.instance().cfg
    records = {"config.yaml": cfg, "hydra.yaml": hydra_root, "overrides.yaml": hydra_root.hydra.overrides.task}
    for name, node in records.items():
        path = run_dir / rundir.HYDRA_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(OmegaConf.to_yaml(node))


def _leave_kept_thread_errors_to_the_run() -> None:
    """TensorBoard's writer thread keeps the error that ends it (a full disk) and raises it again in the run's
    next write, where it becomes the run's one-line error and its `failed` summary; Python's default hook would
    print the thread's traceback before that line. Every other thread's error is shown as usual."""
    show = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        kept = getattr(args.thread, "exception", None) is args.exc_value is not None
        if not (kept and type(args.thread).__module__.startswith("tensorboard.")):
            show(args)

    threading.excepthook = hook


def _topmost_made(output: Path) -> Path | None:
    """The topmost folder of `output`'s path that does not exist yet, which this command will make (None: `output`
    is there already, and never what was there before is removed)."""
    made = None if output.exists() else output
    while made is not None and not made.parent.exists():
        made = made.parent
    return made


def _remove_unstarted(output: Path, made: Path | None) -> None:
    """Remove `output` and its parents up to `made`, what this command made, while no run's records are in it or in
    a job's folder of it (just Hydra's log and the lock); parents only when empty."""
    if made is None or not output.is_dir():
        return
    if any(rundir.has_records(folder) for folder in (output, *output.glob("*/"))):
        return
    shutil.rmtree(output, ignore_errors=True)
    for parent in output.parents:
        if parent != made and made not in parent.parents:
            break
        with contextlib.suppress(OSError):  # another command may have made something there meanwhile
            parent.rmdir()


@contextlib.contextmanager
def _job_folder_removed_if_not_started(run_dir: Path | None, log_name: str, started: list[Path]) -> Iterator[None]:
    """A sweep's job that never started (stopped before it began — the stop reached it queued, or between two jobs —
    or refused) leaves no folder: Hydra made it with the job's log, the run its lock, and nothing else is there.
    A folder that holds anything else (a run's records, a user's file) stays as it is."""
    try:
        yield
    except BaseException:
        if run_dir is not None and not started and torchrun_env.launched_world_size() == 1:
            _remove_job_folder(run_dir, log_name)
        raise


def _remove_job_folder(run_dir: Path, log_name: str) -> None:
    leftovers = {rundir.LOCK_NAME, log_name}
    with contextlib.suppress(OSError):  # a folder that cannot be listed or removed stays
        if run_dir.is_dir() and all(path.name in leftovers and path.is_file() for path in run_dir.iterdir()):
            shutil.rmtree(run_dir)


@contextlib.contextmanager
def _removed_if_not_started(run_dir: Path | None) -> Iterator[None]:
    """A single run that never started — refused for bad input that only its data shows (labels beyond num_classes,
    a missing dataset), a plug-in that raised while it was built, or stopped before it began — leaves no directory
    behind (`_remove_unstarted`)."""
    made = _topmost_made(run_dir) if run_dir is not None else None
    try:
        yield
    except BaseException as ended:  # SystemExit with its code, RunStopped, KeyboardInterrupt
        if (not isinstance(ended, SystemExit) or ended.code) and torchrun_env.launched_world_size() == 1:
            _remove_unstarted(run_dir, made)
        raise


def main() -> None:
    """`sam-run`: validate everything up front, then hand over to Hydra (single run or `-m` sweep)."""
    stop_at_once()  # a stop during start-up (seconds of imports and pre-flight) is one line and 75/130 too
    _leave_kept_thread_errors_to_the_run()
    output = made = None
    try:
        args = hydra_arguments(sys.argv[1:])
        with contextlib.ExitStack() as held:
            try:
                checked = preflight(args)
                output = checked.output
                made = _topmost_made(output) if output is not None else None  # before the sweep's lock makes it
                if output is not None and args.multirun:
                    held.enter_context(held_sweep_dir(output))
            except SamRunnerError as error:
                fail(error)
            if output is not None:
                stopping.undo_when_stopped_at_once(lambda: _remove_unstarted(output, made))
                sys.argv.append(pinned_output(args, output))
            sys.argv += torchrun_env.hydra_overrides()  # under torchrun, Hydra writes nothing in ranks other than 0
            if checked.first_rho is not None:
                os.environ[PLAIN_RHO_ENV] = checked.first_rho
            if args.multirun:
                held.enter_context(stops_handed_to_workers())
            with _removed_if_not_started(None if args.multirun or output is None else output):
                _hydra_job()
            if (stopped := stopping.stop_handed_on()) is not None:  # the jobs recorded it; the table is printed
                _remove_unstarted(output, made)  # no job had started: the sweep leaves nothing behind
                fail(f"{stopped.status}: {stopped}", code=stopped.exit_code)
    except (RunStopped, JobLost, JobNotStarted, KeyboardInterrupt) as stopped:
        if output is not None and args.multirun:  # a stop ends the whole sweep: show where every job got to
            show_sweep_table(output, leaving_out=Path(stopped.run_dir) if isinstance(stopped, JobNotStarted) else None)
            _remove_unstarted(output, made)
        if isinstance(stopped, JobLost):
            fail(stopped, code=EXIT_NOT_COMPLETED)
        if isinstance(stopped, JobNotStarted):
            fail(stopped, code=stopped.exit_code)
        if isinstance(stopped, RunStopped):
            fail(f"{stopped.status}: {stopped}", code=stopped.exit_code)
        fail("interrupted; the run's summary.json says so, and re-running the same command continues from its "
              "last checkpoint", code=EXIT_INTERRUPTED)
    finally:
        leave_stops_to_the_system()  # every run has recorded how it ended: a stop now only ends the process
    if args.multirun and output is not None and any(run.status not in FINISHED for run in collect(output)):
        sys.exit(EXIT_NOT_COMPLETED)  # some job failed, diverged or was interrupted: the table above says which

