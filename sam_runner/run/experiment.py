"""One run's life around its loop: decide what the run directory holds (continue, leave alone, start), build the
run, train it (loop.py) and record how it ended, whatever ended it.

Under torchrun every process runs this; rank 0 decides what the run directory holds and writes it (ranks.py).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sam_runner.errors import SamRunnerError, describe_unforeseen
from sam_runner.run import resume, rundir, stopping
from sam_runner.run.build import build_run
from sam_runner.run.checkpoint import initial_weights, write_json_atomic
from sam_runner.run.hyperparameters import HyperParameters
from sam_runner.run.logbook import Logbook, Stopwatch, write_run_info
from sam_runner.run.loop import fit
from sam_runner.run.progress import Progress
from sam_runner.run.spec import RunSpec, make_spec
from sam_runner.run.status import Status
from sam_runner.scale import distributed, ranks
from sam_runner.scale.ranks import Team

log = logging.getLogger("sam_runner")


def run_experiment(cfg: DictConfig, run_dir: Path, *, choices: dict[str, str] | None = None,
                   plain_rho: str | None = None, on_accepted: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train one configuration and write everything into `run_dir`, continuing the run already there if it
    stopped early (resume.py). Returns the final summary.

    `on_accepted` is called (by rank 0) once the run is built and its checkpoint restored, just before the first
    record is written: the caller's own files (the CLI's copy of Hydra's config) are written then, not for a run
    that is refused.

    Under torchrun every process runs this; rank 0 decides what the run directory holds and writes it (ranks.py).
    """
    spec = make_spec(cfg, choices)
    if spec.sam is None and plain_rho is not None and float(plain_rho) != spec.settings.rho:
        return _skip_duplicate(run_dir, HyperParameters.of(spec).record(), plain_rho, on_accepted)
    with ranks.team(spec.device) as team, team.claimed(run_dir), stopping.stop_requests() as stop:
        prior = team.by_main(resume.inspect, run_dir, spec.config, resume=spec.settings.resume)
        if prior.ended:
            log.info("%s has %s already: not trained again (add resume=false to train it from scratch)", run_dir,
                     prior.summary["status"])
            return prior.summary
        state = resume.own_share(prior.checkpoint, team.world) if prior.checkpoint else None
        return _train(spec, team, run_dir, state, stop, on_accepted)


def _train(spec: RunSpec, team: Team, run_dir: Path, state: dict[str, Any] | None, stop: stopping.StopRequests,
           on_accepted: Callable[[], None] | None) -> dict[str, Any]:
    """Build the run (from `state`, a checkpoint, when continuing), train it and record how it ended. Nothing is
    written before the run is built and restored: a refusal leaves the run directory as it was."""
    device = team.device
    clock = Stopwatch(state["clock"] if state else None)
    # Whatever can refuse (the build, a checkpoint or init_from's weights that do not fit the model) refuses before
    # a record changes.
    run = build_run(spec, team, run_dir, clock, stop)
    progress = resume.restore(run, state) if state else Progress()
    source = spec.settings.init_from
    initialized = initial_weights(Path(source), run.network) if source is not None and not state else None
    ddp = spec.settings.ddp
    hparams = {**HyperParameters.of(spec, steps_budget=run.plan.total_steps).record(),
               # sam_start's switch: the steps before this one were the base optimizer's alone (null: no SAM)
               "sam_start_step": run.plan.sam_start_step if spec.sam is not None else None,
               **distributed.describe_world(team.world, sam_mode=ddp.sam_mode, sync_batchnorm=ddp.sync_batchnorm,
                                            is_sam=spec.sam is not None)}
    if on_accepted is not None:
        team.by_main(on_accepted)
    team.by_main(write_run_info, run_dir, sys.argv, spec.config, device,
                 resumed_at_step=progress.step if state else None)
    logbook = team.logbook(run_dir, hparams, metrics_offset=progress.metrics_offset,
                           purge_step=progress.logged_step + 1 if state else None)
    summary: dict[str, Any] = {**(state["summary"] if state else {"epochs_completed": 0}),
                               "status": Status.RUNNING.value}
    summary.pop("error", None)
    try:
        if state:
            log.info("continuing %s from epoch %d, batch %d (step %d)", run_dir, progress.epoch + 1, progress.batch,
                     progress.step)
        else:
            summary.update(target_reached=False if run.plan.has_target else None)
            if initialized is not None:
                summary["init_source"] = initialized
                log.info("initialized from %s (epoch %d, step %s of its run)", initialized["path"],
                         initialized["epoch"], initialized["step"])
        logbook.write_summary(summary)
        log.info("%s | %s | %s on %s (%s) | %d parameters | %d steps/epoch | %s -> %s", hparams["dataset"],
                 hparams["model"], _optimizer_label(hparams), device, spec.precision,
                 sum(p.numel() for p in run.network.parameters()), run.plan.steps_per_epoch, run.plan.protocol,
                 run_dir)
        fit(run, logbook, summary, progress)
        if summary["status"] == Status.RUNNING:
            summary["status"] = Status.COMPLETED.value  # training and the final measurements are done
    except SamRunnerError as error:
        summary.update(status=Status.FAILED.value, error=str(error))
        raise
    except stopping.RunStopped as stopped:
        summary.update(status=stopped.status.value, error=str(stopped))
        raise
    except KeyboardInterrupt:
        summary.update(status=Status.INTERRUPTED.value, error="interrupted by the user (Ctrl-C): re-run the same "
                                                                "command to continue from the last checkpoint")
        raise
    except Exception as error:  # whatever raised (a plug-in's bug, a full disk), the record must not say running
        summary.update(status=Status.FAILED.value, error=describe_unforeseen(error))
        raise
    finally:
        summary.update(clock.times())
        _record_ending(logbook, summary)
    log.info("done (%s): train acc %.4f | test acc %.4f | gap %.4f | %.1fs -> %s", summary["status"],
             summary.get("train_acc", math.nan), summary.get("test_acc", math.nan),
             summary.get("gap_acc", math.nan), summary["wall_time_s"], run_dir)
    return summary


def _record_ending(logbook: Logbook, summary: dict[str, Any]) -> None:
    """Write the final summary; on a full disk even that can fail, which must not hide why the run stopped."""
    try:
        logbook.write_summary(summary)
        logbook.close(summary)
    except OSError as error:
        log.error("could not record the run's end (%s) in %s: %s", summary["status"], logbook.run_dir,
                  describe_unforeseen(error))


def _optimizer_label(hparams: dict[str, Any]) -> str:
    if hparams["rho"] is None:
        return hparams["optimizer"]
    late = f", from step {hparams['sam_start_step']}" if hparams.get("sam_start_step") else ""
    return f"{hparams['optimizer']}({hparams['base_optimizer']}, rho={hparams['rho']:g}{late})"


def _skip_duplicate(run_dir: Path, hparams: dict[str, Any], plain_rho: str,
                    on_accepted: Callable[[], None] | None) -> dict[str, Any]:
    """A plain optimizer ignores rho: in a rho sweep only its run at the sweep's first rho trains."""
    if on_accepted is not None:
        on_accepted()
    summary = {"status": Status.DUPLICATE.value, "epochs_completed": 0,
               "error": f"{hparams['optimizer']} ignores rho; see the run with rho={plain_rho}", **hparams}
    write_json_atomic(summary, run_dir / rundir.SUMMARY)
    log.info("skipped: %s", summary["error"])
    return summary


