"""The training loop, top to bottom: for each epoch, train steps -> evaluate -> measure when due -> log ->
checkpoint.

The hot loop keeps its statistics on the device and reads them back once per `progress_every` steps and once
per epoch, so a GPU is never stalled by a per-step host sync.
"""

from __future__ import annotations

import logging
import math
from itertools import islice
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sam_runner.run import resume, rundir
from sam_runner.run.build import Training
from sam_runner.run.checkpoint import save_atomic
from sam_runner.run.evaluation import generalization
from sam_runner.run.logbook import HPARAM_METRICS, SHOW_PROGRESS, Logbook
from sam_runner.run.measurement import add_measurement, take_measurement
from sam_runner.run.plan import RunPlan, at_chance
from sam_runner.run.progress import Progress
from sam_runner.run.status import Status
from sam_runner.scale import distributed
from sam_runner.sharpness import MeasurementStopped, NotFinite

log = logging.getLogger("sam_runner")


def fit(run: Training, logbook: Logbook, summary: dict[str, Any], progress: Progress) -> None:
    """The epoch loop: train, evaluate, check the target, measure when due, log (into `logbook`), checkpoint.

    Follows `run.plan` (plan.py): how many batches each epoch trains, when it evaluates and checkpoints, and
    when a target ends the run early. Starts where `progress` stands (a continued run) and keeps it current,
    and updates `summary` after every epoch, so whoever holds it knows how far the run got if it fails.
    """
    plan, clock = run.plan, run.clock
    if progress.ended:  # stopped after its final checkpoint, before its summary said so
        return
    epochs = tqdm(range(progress.epoch, plan.epochs), initial=progress.epoch, total=plan.epochs, desc="epochs",
                  disable=not SHOW_PROGRESS, leave=False)
    with logging_redirect_tqdm():
        for epoch in epochs:
            with clock("train"):
                seen = train_epoch(run, logbook, progress, summary)
            train_time = clock.total("train") - progress.epoch_train_start_s
            step = progress.step
            # the samples the epoch trained on: its last batch is partial, and a batch may exceed the data set
            trained = min(plan.batches_in(epoch) * run.settings.batch_size, run.data.train.num_samples)
            metrics = {**seen, "opt/lr": run.scheduler.get_last_lr()[0], "opt/epoch_time_s": train_time,
                       "opt/images_per_s": trained / train_time}
            summary.update(epochs_completed=epoch + 1, steps_completed=step)
            diverged = not math.isfinite(seen["train/loss_seen"])
            ending = plan.is_last(epoch) or diverged
            if plan.evaluates_after(epoch) or ending:
                with clock("eval"):
                    summary.update(generalization(run.network, run.data, run.autocast_dtype, run.team.world))
                metrics.update({tag: summary[key] for key, tag in HPARAM_METRICS.items() if key in summary})
                progress.best_train_acc = max(progress.best_train_acc, summary["train_acc"])
                summary["at_chance"] = at_chance(progress.best_train_acc, run.data.majority_fraction)
                if plan.target_met(summary["train_acc"], summary["train_loss"]):
                    summary.update(target_reached=True, target_epoch=epoch + 1, target_step=step)
                    ending = True
            if diverged:
                summary.update(status=Status.DIVERGED.value, error=f"non-finite training loss in epoch {epoch + 1} "
                                                        f"(steps {step - plan.batches_in(epoch) + 1}-{step})")
            every, every_steps = run.settings.sharpness.every, run.settings.sharpness.every_steps
            if run.measures and not diverged and (ending or (every and (epoch + 1) % every == 0)
                                                  or (every_steps and step % every_steps == 0)):
                save_checkpoint(run, progress, summary)  # the epoch is safe before the (possibly long) measurement
                record = _measure_unless_stopped(run, epoch + 1, step)
                add_measurement(summary, record)
                metrics.update({f"sharpness/{name}": value for name, value in record["values"].items()})
            progress.metrics_offset, progress.logged_step = logbook.log_metrics(epoch + 1, step, metrics), step
            progress.next_epoch(clock.total("train"), ended=ending)
            if not diverged and (ending or plan.checkpoints_after(epoch)):  # never overwrite the last finite weights
                save_checkpoint(run, progress, summary)
            summary.update(clock.times())
            logbook.write_summary(summary)
            _log_epoch(epoch, plan, summary, metrics, evaluated="test/acc" in metrics)
            if diverged:
                log.warning("diverged: %s", summary["error"])
            if ending:
                break


def train_epoch(run: Training, logbook: Logbook, progress: Progress, summary: dict[str, Any]) -> dict[str, float]:
    """Train epoch `progress.epoch` from batch `progress.batch` on (a continued run skips what it trained): the
    shuffled, augmented training set, or the plan's share of it in the last epoch of a step budget.

    Between steps it writes the checkpoints due every `checkpoint.every_steps`, measures sharpness every
    `sharpness.every_steps`, and honours a stop request (SIGTERM, SIGUSR1, SIGUSR2, Ctrl-C) with a checkpoint and
    `RunStopped`. Returns the statistics seen while training.
    """
    total = run.plan.batches_in(progress.epoch)
    if _measurement_due_within(run, progress, total):  # the first point, or one a continued run stopped in
        if progress.step == 0:
            save_checkpoint(run, progress, summary)  # so that a stop in it is one "after step 0", as any other
        _measure_within(run, logbook, progress, summary)
    run.model.train()
    batches = islice(run.data.train.epoch(progress.epoch, start_batch=progress.batch), total - progress.batch)
    bar = tqdm(batches, initial=progress.batch, total=total, desc=f"epoch {progress.epoch + 1}",
               disable=not SHOW_PROGRESS, leave=False)
    every_steps = run.settings.checkpoint.every_steps
    for inputs, targets in bar:
        optimizer = run.step_optimizer(progress.step)  # a SAM optimizer's base optimizer alone before sam_start
        sam_step = optimizer is run.optimizer
        if sam_step and progress.step == run.plan.sam_start_step > 0:
            log.info("step %d: SAM switched on (sam_start=%g) after %d steps of the base optimizer alone",
                     progress.step, run.settings.sam_start, progress.step)
        result = distributed.distributed_step(
            run.model, inputs, targets, optimizer, run.criterion, run.team.world,
            sam_mode=run.settings.ddp.sam_mode, autocast_dtype=run.autocast_dtype, scaler=run.scaler,
            max_grad_norm=run.settings.max_grad_norm, micro_batch_size=run.micro_batch_size if sam_step else None,
            accumulate=run.settings.accumulate)
        run.scheduler.step()
        progress.totals.add(result, run.team.share(targets.shape[0]))  # this rank's shard of the global batch
        progress.batch, progress.step = progress.batch + 1, progress.step + 1
        if SHOW_PROGRESS and progress.batch % run.settings.progress_every == 0:
            bar.set_postfix(loss=f"{result.loss.item():.4f}")  # host sync, once every progress_every steps
        if run.team.stop_requested(run.stop):
            save_checkpoint(run, progress, summary)
            raise run.stop.stopped(progress.step)
        checkpoint_due = bool(every_steps) and progress.step % every_steps == 0 and progress.batch < total
        measurement_due = _measurement_due_within(run, progress, total)
        if checkpoint_due or measurement_due:  # the position is safe before a (possibly long) measurement
            save_checkpoint(run, progress, summary)
        if measurement_due:
            _measure_within(run, logbook, progress, summary)  # leaves the modules' train/eval modes as they were
    run.team.sync_buffers(run.model)  # rank 0's BatchNorm statistics everywhere, for evaluation and measures
    return run.team.combined(progress.totals).means()


def _measurement_due_within(run: Training, progress: Progress, total: int) -> bool:
    """Whether a measurement is due before the next step of an epoch: at step 0 when the run measures during
    training (`sharpness.every` or `every_steps`: a trajectory's first point, the weights it started from), and
    every `sharpness.every_steps` within the epoch (one at the epoch's end is the epoch loop's)."""
    every, every_steps = run.settings.sharpness.every, run.settings.sharpness.every_steps
    if not run.measures or not (every or every_steps):
        return False
    return progress.step == 0 or (bool(every_steps) and 0 < progress.batch < total
                                  and progress.step % every_steps == 0)


def _measure_within(run: Training, logbook: Logbook, progress: Progress, summary: dict[str, Any]) -> None:
    """A measurement between two steps of an epoch: in summary.json's `measurements`, and in a metrics.jsonl line
    of its own (the epoch in progress, the step, its sharpness/* values) and TensorBoard at that step. The
    checkpoint before it is written, so a continued run cuts that line back and measures again."""
    try:
        record = _measure_unless_stopped(run, progress.epoch + 1, progress.step)
    except NotFinite:  # diverged: the epoch's end records it
        log.warning("step %d: no sharpness measurement: the weights or the loss are not finite", progress.step)
        return
    add_measurement(summary, record)
    values = {f"sharpness/{name}": value for name, value in record["values"].items()}
    progress.metrics_offset = logbook.log_metrics(progress.epoch + 1, progress.step, values)
    progress.logged_step = progress.step
    logbook.write_summary(summary)


def _measure_unless_stopped(run: Training, epoch: int, step: int) -> dict[str, Any]:
    """The measurement at the end of `epoch`, given up as soon as the run is asked to stop: a measurement can take
    minutes, longer than a scheduler's grace period. The checkpoint before it is written, so the stop is
    recorded as one after `step`, and the continued run measures again. Each process asks its own flag, with no
    collective per pass (the ranks' passes need not line up): a stop signal reaches every rank of a job."""
    try:
        with run.clock("sharpness"):
            return take_measurement(run.network, run.data.sharpness, run.measures, run.settings, epoch=epoch, step=step,
                           source="sam-run", should_stop=lambda: run.stop.requested)
    except MeasurementStopped:
        raise run.stop.stopped(step) from None


def save_checkpoint(run: Training, progress: Progress, summary: dict[str, Any]) -> None:
    """checkpoints/last.pt, replaced atomically: the run as it stands, to be continued exactly (resume.py).

    Never with non-finite weights: a diverged model would replace the last finite one, so it is not written."""
    with run.clock("checkpoint"):
        run.team.sync_buffers(run.model)
        if not _finite(run.network):  # the same on every rank: DDP keeps the weights equal, buffers just synced
            log.warning("step %d: the weights are not finite; %s keeps the last finite ones", progress.step,
                        rundir.CHECKPOINT)
            return
        state = resume.checkpoint_state(run, progress, summary)  # under DDP, with every rank's own part
        run.team.by_main(save_atomic, state, run.run_dir / rundir.CHECKPOINT)


def _finite(model: nn.Module) -> bool:
    """Whether every floating-point weight and buffer is finite (one device sync for them all)."""
    tensors = [tensor for tensor in model.state_dict().values() if tensor.is_floating_point()]
    return not tensors or bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())


def _log_epoch(epoch: int, plan: RunPlan, summary: dict[str, Any], metrics: dict[str, float], evaluated: bool
               ) -> None:
    speed = f"{metrics['opt/epoch_time_s']:.1f}s {metrics['opt/images_per_s']:.0f} img/s"
    if not evaluated:
        log.info("epoch %3d/%d | seen loss %.4f acc %.4f | lr %.3g | %s", epoch + 1, plan.epochs,
                 metrics["train/loss_seen"], metrics["train/acc_seen"], metrics["opt/lr"], speed)
        return
    reached = f" | target reached at step {summary['target_step']}" if summary.get("target_epoch") == epoch + 1 else ""
    log.info("epoch %3d/%d | train loss %.4f acc %.4f | test loss %.4f acc %.4f | gap %+.4f | lr %.3g | %s%s",
             epoch + 1, plan.epochs, summary["train_loss"], summary["train_acc"], summary["test_loss"],
             summary["test_acc"], summary["gap_acc"], metrics["opt/lr"], speed, reached)
