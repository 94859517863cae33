"""One run, top to bottom: build -> for each epoch (train steps, evaluate, checkpoint, log) -> sharpness -> summary.

The hot loop keeps its statistics on the device and reads them back once per `progress_every` steps and once
per epoch, so a GPU is never stalled by a per-step host sync.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sam_runner import checkpoint, distributed, ranks, resume, saved_run, sharpness, stopping
from sam_runner.build import (AUTOCAST_DTYPES, Data, build_data, build_model, build_optimizer, build_scheduler,
                              compile_model, resolve_device, resolve_precision, target_name)
from sam_runner.config import sharpness_measures, sharpness_options, validate
from sam_runner.errors import ConfigError, SamRunnerError, describe_unforeseen
from sam_runner.logbook import HPARAM_METRICS, Logbook, Stopwatch, read_summary
from sam_runner.plan import RunPlan, at_chance, effective_lr, make_plan, protocol_name
from sam_runner.progress import Progress
from sam_runner.ranks import Team

log = logging.getLogger("sam_runner")
SHOW_PROGRESS = sys.stderr.isatty()  # bars only for a person at a terminal, never in logs or CI


@dataclass
class Run:
    """Everything one run needs, built once from its config, so `fit` reads as a loop rather than a switchboard."""

    settings: DictConfig
    plan: RunPlan
    data: Data
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    autocast_dtype: torch.dtype | None
    micro_batch_size: int | None  # SAM's m-sharpness chunk; None: the whole batch
    measures: list[str]  # sharpness measures taken during and at the end of the run
    logbook: Logbook
    clock: Stopwatch
    stop: stopping.StopRequests  # SIGTERM/SIGUSR1/SIGUSR2/Ctrl-C requests, honoured between steps
    team: Team  # the processes of the run (one without torchrun): model is DDP-wrapped when there are several

    @property
    def network(self) -> nn.Module:
        """The model outside DDP's wrapper: evaluation, sharpness and checkpoints use it (no collectives inside,
        no 'module.' prefix in the state)."""
        return distributed.unwrap(self.model)


def run_experiment(cfg: DictConfig, run_dir: Path, *, choices: dict[str, str] | None = None,
                   plain_rho: str | None = None) -> dict[str, Any]:
    """Train one configuration and write everything into `run_dir`, continuing the run already there if it
    stopped early (resume.py). Returns the final summary.

    Under torchrun every process runs this; rank 0 decides what the run directory holds and writes it (ranks.py).
    """
    settings = validate(cfg)
    device = resolve_device(settings.device.value)
    precision = resolve_precision(settings.precision.value, device)
    hparams = describe(cfg, settings, choices or {}, precision, device)
    if cfg.optimizer.sam is None and plain_rho is not None and float(plain_rho) != settings.rho:
        return _skip_duplicate(run_dir, hparams, plain_rho)
    config = OmegaConf.to_container(cfg, resolve=True)
    with ranks.team(device) as team, team.claimed(run_dir), stopping.stop_requests() as stop:
        hparams.update(distributed.describe_world(team.world, sam_mode=settings.ddp.sam_mode.value,
                                                  sync_batchnorm=settings.ddp.sync_batchnorm,
                                                  is_sam=cfg.optimizer.sam is not None))
        prior = team.by_main(resume.inspect, run_dir, config, resume=settings.resume)
        if prior.ended:
            log.info("%s has %s already: not trained again (add resume=false to train it from scratch)", run_dir,
                     prior.summary["status"])
            return prior.summary
        state = resume.own_share(prior.checkpoint, team.world) if prior.checkpoint else None
        return _train(cfg, config, settings, precision, team, hparams, run_dir, state, stop)


def _train(cfg: DictConfig, config: dict[str, Any], settings: DictConfig, precision: str, team: Team,
           hparams: dict[str, Any], run_dir: Path, state: dict[str, Any] | None, stop: stopping.StopRequests
           ) -> dict[str, Any]:
    """Build the run (from `state`, a checkpoint, when continuing), train it and record how it ended. `config`
    is `cfg` resolved, as run.json records it."""
    device = team.device
    clock = Stopwatch(state["clock"] if state else None)
    progress = Progress.from_state(state["progress"], device) if state else Progress()
    logbook = team.logbook(run_dir, hparams, metrics_offset=progress.metrics_offset,
                           purge_step=progress.logged_step + 1 if state else None)
    logbook.write_run_info(sys.argv, config, device, resumed_at_step=progress.step if state else None)
    summary: dict[str, Any] = {**(state["summary"] if state else {"epochs_completed": 0}), "status": "running"}
    summary.pop("error", None)
    logbook.write_summary(summary)
    try:
        run = build_run(cfg, settings, precision, team, logbook, clock, stop)
        if state:
            resume.restore(run, state)
            log.info("continuing %s from epoch %d, batch %d (step %d)", run_dir, progress.epoch + 1, progress.batch,
                     progress.step)
        else:
            summary.update(steps_budget=run.plan.total_steps, target_reached=False if run.plan.has_target else None)
        log.info("%s | %s | %s on %s (%s) | %d parameters | %d steps/epoch | %s -> %s", hparams["dataset"],
                 hparams["model"], _optimizer_label(hparams), device, precision,
                 sum(p.numel() for p in run.network.parameters()), run.plan.steps_per_epoch, run.plan.protocol,
                 run_dir)
        fit(run, summary, progress)
        if summary["status"] == "running":
            summary["status"] = "completed"  # training and the final measurements are done
    except SamRunnerError as error:
        summary.update(status="failed", error=str(error))
        raise
    except stopping.RunStopped as stopped:
        summary.update(status=stopped.status, error=str(stopped))
        raise
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="interrupted by the user (Ctrl-C): re-run the same command to "
                                                   "continue from the last checkpoint")
        raise
    except Exception as error:  # whatever raised (a plug-in's bug, a full disk), the record must not say running
        summary.update(status="failed", error=describe_unforeseen(error))
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


def build_run(cfg: DictConfig, settings: DictConfig, precision: str, team: Team, logbook: Logbook,
              clock: Stopwatch, stop: stopping.StopRequests) -> Run:
    """Data, model, optimizer and schedule, and the run's plan (lr scaling, budget, targets)."""
    saved_run.seed_everything(settings.seed)
    data = team.main_first(build_data, cfg, settings, team.device)  # rank 0 downloads, the others read
    sam = cfg.optimizer.sam
    micro_batch_size = sam.micro_batch_size if sam is not None else None
    distributed.check_setup(team.world, batch_size=settings.batch_size, num_samples=data.train.num_samples,
                            sam_mode=settings.ddp.sam_mode.value, sync_batchnorm=settings.ddp.sync_batchnorm,
                            compile=settings.compile, micro_batch_size=micro_batch_size)
    plan = make_plan(settings, len(data.train))
    model = build_model(cfg.model, data.num_classes, data.input_shape).to(team.device)
    if settings.compile:  # every graph compiled before the first step, timed apart as compile_time_s (build.py)
        compile_model(model, data, AUTOCAST_DTYPES[precision], cfg.optimizer.sam, clock)
    optimizer = build_optimizer(cfg.optimizer, settings.rho, plan.lr, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, plan.steps_per_epoch, plan.total_steps)
    model = distributed.wrap_model(model, team.world, sync_batchnorm=settings.ddp.sync_batchnorm)
    return Run(settings=settings, plan=plan, data=data, model=model, optimizer=optimizer, scheduler=scheduler,
               scaler=torch.amp.GradScaler(team.device.type) if precision == "fp16" else None,
               criterion=nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing),
               autocast_dtype=AUTOCAST_DTYPES[precision],
               micro_batch_size=micro_batch_size, measures=_measures_for(model, settings), logbook=logbook,
               clock=clock, stop=stop, team=team)


def fit(run: Run, summary: dict[str, Any], progress: Progress) -> None:
    """The epoch loop: train, evaluate, check the target, measure when due, log, checkpoint.

    Follows `run.plan` (plan.py): how many batches each epoch trains, when it evaluates and checkpoints, and
    when a target ends the run early. Starts where `progress` stands (a continued run) and keeps it current,
    and updates `summary` after every epoch, so whoever holds it knows how far the run got if it fails.
    """
    plan, clock, logbook = run.plan, run.clock, run.logbook
    if progress.ended:  # stopped after its final checkpoint, before its summary said so
        return
    epochs = tqdm(range(progress.epoch, plan.epochs), initial=progress.epoch, total=plan.epochs, desc="epochs",
                  disable=not SHOW_PROGRESS, leave=False)
    with logging_redirect_tqdm():
        for epoch in epochs:
            with clock("train"):
                seen = train_epoch(run, progress, summary)
            train_time = clock.total("train") - progress.epoch_train_start_s
            step = progress.step
            metrics = {**seen, "opt/lr": run.scheduler.get_last_lr()[0], "opt/epoch_time_s": train_time,
                       "opt/images_per_s": plan.batches_in(epoch) * run.settings.batch_size / train_time}
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
                summary.update(status="diverged", error=f"non-finite training loss in epoch {epoch + 1} "
                                                        f"(steps {step - plan.batches_in(epoch) + 1}-{step})")
            every = run.settings.sharpness.every
            if run.measures and not diverged and (ending or (every and (epoch + 1) % every == 0)):
                save_checkpoint(run, progress, summary)  # the epoch is safe before the (possibly long) measurement
                with clock("sharpness"):
                    record = measure(run.network, run.data.sharpness, run.measures, run.settings, epoch=epoch + 1,
                                     step=step, source="sam-run")
                add_measurement(summary, record)
                metrics.update({f"sharpness/{name}": value for name, value in record["values"].items()})
            progress.metrics_offset, progress.logged_step = logbook.log_epoch(epoch + 1, step, metrics), step
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


def train_epoch(run: Run, progress: Progress, summary: dict[str, Any]) -> dict[str, float]:
    """Train epoch `progress.epoch` from batch `progress.batch` on (a continued run skips what it trained): the
    shuffled, augmented training set, or the plan's share of it in the last epoch of a step budget.

    Between steps it writes the checkpoints due every `checkpoint.every_steps`, and honours a stop request
    (SIGTERM, SIGUSR1, SIGUSR2, Ctrl-C) with a checkpoint and `RunStopped`. Returns the statistics seen while
    training.
    """
    run.model.train()
    total = run.plan.batches_in(progress.epoch)
    batches = islice(run.data.train.epoch(progress.epoch, start_batch=progress.batch), total - progress.batch)
    bar = tqdm(batches, initial=progress.batch, total=total, desc=f"epoch {progress.epoch + 1}",
               disable=not SHOW_PROGRESS, leave=False)
    every_steps = run.settings.checkpoint.every_steps
    for inputs, targets in bar:
        result = distributed.distributed_step(
            run.model, inputs, targets, run.optimizer, run.criterion, run.team.world,
            sam_mode=run.settings.ddp.sam_mode.value, autocast_dtype=run.autocast_dtype, scaler=run.scaler,
            max_grad_norm=run.settings.max_grad_norm, micro_batch_size=run.micro_batch_size)
        run.scheduler.step()
        progress.totals.add(result, run.team.share(targets.shape[0]))  # this rank's shard of the global batch
        progress.batch, progress.step = progress.batch + 1, progress.step + 1
        if SHOW_PROGRESS and progress.batch % run.settings.progress_every == 0:
            bar.set_postfix(loss=f"{result.loss.item():.4f}")  # host sync, once every progress_every steps
        if run.team.stop_requested(run.stop):
            save_checkpoint(run, progress, summary)
            raise run.stop.stopped(progress.step)
        if every_steps and progress.step % every_steps == 0 and progress.batch < total:
            save_checkpoint(run, progress, summary)
    run.team.sync_buffers(run.model)  # rank 0's BatchNorm statistics everywhere, for evaluation and measures
    return run.team.combined(progress.totals).means()


def save_checkpoint(run: Run, progress: Progress, summary: dict[str, Any]) -> None:
    """checkpoints/last.pt, replaced atomically: the run as it stands, to be continued exactly (resume.py)."""
    with run.clock("checkpoint"):
        run.team.sync_buffers(run.model)
        state = resume.checkpoint_state(run, progress, summary)  # under DDP, with every rank's own part
        run.team.by_main(checkpoint.save_atomic, state, run.logbook.run_dir / resume.CHECKPOINT)


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


def generalization(model: nn.Module, data: Data, autocast_dtype: torch.dtype | None,
                   world: distributed.World = distributed.World()) -> dict[str, float]:
    """Eval-mode loss and accuracy on the training set (or its fixed subset), the validation split when there is
    one, and the test set; and the generalization gaps (train vs test). Sharded over the processes of `world`."""
    train_loss, train_acc = evaluate(model, data.train_eval, autocast_dtype, world)
    test_loss, test_acc = evaluate(model, data.test, autocast_dtype, world)
    result = {"train_acc": train_acc, "test_acc": test_acc, "train_loss": train_loss, "test_loss": test_loss,
              "gap_acc": train_acc - test_acc, "gap_loss": test_loss - train_loss}
    if data.val is not None:
        result["val_loss"], result["val_acc"] = evaluate(model, data.val, autocast_dtype, world)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, stream: Any, autocast_dtype: torch.dtype | None,
             world: distributed.World = distributed.World()) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy in eval mode, without augmentation; each process of
    `world` takes its share of every batch, and all get the same totals."""
    model.eval()
    device = stream.targets.device
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    for inputs, targets in distributed.RankShare(stream, world).epoch(0):  # a rank may get no share of a batch
        with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)
        loss_sum = loss_sum + F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = correct + (logits.argmax(dim=1) == targets).sum()
    totals = distributed.all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]), world)
    return float(totals[0]) / stream.num_samples, float(totals[1]) / stream.num_samples


def _measures_for(model: nn.Module, settings: DictConfig) -> list[str]:
    chosen = sharpness_measures(settings.sharpness.measures)
    return sharpness.default_measures(model) if chosen == "auto" else chosen


def measure(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], measures: list[str],
            settings: DictConfig, *, epoch: int, step: int, source: str) -> dict[str, Any]:
    """Sharpness of the current weights on the fixed training subset (plain cross-entropy, eval mode).

    Returns a measurement record: the values with everything needed to compare them (radius, samples, every
    option with its default filled in, the model mode, where in training and by what it was taken).
    """
    started = time.perf_counter()
    options = sharpness_options(settings.sharpness.options)
    values = sharpness.measure(model, nn.CrossEntropyLoss(), batches, rho=settings.sharpness.rho,
                               measures=measures, seed=settings.seed, progress=SHOW_PROGRESS, **options)
    seconds = time.perf_counter() - started
    log.info("sharpness at epoch %d, step %d (%.1fs): %s", epoch, step, seconds,
             ", ".join(f"{name} {value:.4g}" for name, value in values.items()))
    resolved = {key: value for key, value in asdict(sharpness.Options(**options)).items() if key != "progress"}
    return {"rho": settings.sharpness.rho, "num_samples": sum(len(targets) for _, targets in batches),
            "batch_size": settings.sharpness.batch_size, "measures": measures, "options": resolved,
            "model_mode": "eval", "seed": settings.seed, "epoch": epoch, "step": step, "source": source,
            "time_s": seconds, "values": values}


def add_measurement(summary: dict[str, Any], record: dict[str, Any]) -> None:
    """Keep every measurement; `sharpness` holds the run's own latest values (sam-measure never replaces them)."""
    summary["measurements"] = [*summary.get("measurements", []), record]
    if record["source"] == "sam-run" or "sharpness" not in summary:
        summary["sharpness"] = record["values"]


def measure_checkpoint(run_dir: Path, *, checkpoint_path: Path | None = None, measures: str | None = None,
                       rho: float | None = None, num_samples: int | None = None, device: str | None = None
                       ) -> dict[str, float]:
    """Rebuild a finished (or interrupted) run from run.json, load its weights, measure them and add the
    measurement to its summary.json beside the earlier ones."""
    run = saved_run.load(run_dir, checkpoint_path=checkpoint_path,
                         overrides={"sharpness.measures": measures, "sharpness.rho": rho,
                                    "sharpness.num_samples": num_samples, "device": device})
    measures = _measures_for(run.model, run.settings)
    if not measures:
        raise ConfigError("no sharpness measure selected (the run trained with sharpness.measures=[]): pass "
                          "--measures auto or a comma-separated list")
    record = measure(run.model, run.data.sharpness, measures, run.settings, epoch=run.state["epoch"],
                     step=run.state.get("step", 0), source="sam-measure")
    summary = read_summary(run_dir) or {}
    add_measurement(summary, record)
    checkpoint.write_json_atomic(summary, run_dir / "summary.json")
    return record["values"]


def describe(cfg: DictConfig, settings: DictConfig, choices: dict[str, str], precision: str, device: torch.device
             ) -> dict[str, Any]:
    """The flat, self-describing hyper-parameters summary.json carries, so a report can group runs by any of them."""
    sam = cfg.optimizer.sam
    weight_decay = cfg.optimizer.base.build.get("weight_decay", 0.0)
    return {
        "dataset": cfg.dataset.name, "model": choices.get("model", target_name(cfg.model)),
        "optimizer": cfg.optimizer.name, "base_optimizer": cfg.optimizer.base.name,
        "rho": settings.rho if sam is not None else None,
        "adaptive": bool(sam.adaptive) if sam is not None else None,
        "eta": sam.eta if sam is not None and sam.adaptive else None,
        "adaptive_params": sam.get("adaptive_params", "all") if sam is not None and sam.adaptive else None,
        "micro_batch_size": sam.micro_batch_size if sam is not None else None,
        "weight_decay": weight_decay,
        "weight_decay_in_perturbation": bool(sam.perturb_weight_decay) if sam is not None else None,
        "lr": effective_lr(settings), "lr_base": settings.lr, "lr_scaling": settings.lr_scaling.value,
        "lr_reference_batch_size": settings.lr_reference_batch_size, "batch_size": settings.batch_size,
        "budget": settings.budget.value, "epochs": settings.epochs if settings.budget.value == "epochs" else None,
        "steps": settings.steps if settings.budget.value == "steps" else None, "protocol": protocol_name(settings),
        "stop_train_acc": settings.stop.train_acc, "stop_train_loss": settings.stop.train_loss,
        "val_fraction": cfg.dataset.get("val_fraction") or 0.0, "seed": settings.seed,
        "scheduler": choices.get("scheduler", target_name(cfg.scheduler)),
        "label_smoothing": settings.label_smoothing, "max_grad_norm": settings.max_grad_norm,
        "precision": precision, "device": device.type,
    }


def _optimizer_label(hparams: dict[str, Any]) -> str:
    if hparams["rho"] is None:
        return hparams["optimizer"]
    return f"{hparams['optimizer']}({hparams['base_optimizer']}, rho={hparams['rho']:g})"


def _skip_duplicate(run_dir: Path, hparams: dict[str, Any], plain_rho: str) -> dict[str, Any]:
    """A plain optimizer ignores rho: in a rho sweep only its run at the sweep's first rho trains."""
    summary = {"status": "duplicate", "epochs_completed": 0,
               "error": f"{hparams['optimizer']} ignores rho; see the run with rho={plain_rho}", **hparams}
    checkpoint.write_json_atomic(summary, run_dir / "summary.json")
    log.info("skipped: %s", summary["error"])
    return summary
