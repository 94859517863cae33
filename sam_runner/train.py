"""One run, top to bottom: build -> for each epoch (train steps, evaluate, checkpoint, log) -> sharpness -> summary.

The hot loop keeps its statistics on the device and reads them back once per `progress_every` steps and once
per epoch, so a GPU is never stalled by a per-step host sync.
"""

from __future__ import annotations

import logging
import math
import random
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

from sam_runner import checkpoint, saved_run, sharpness
from sam_runner.build import (AUTOCAST_DTYPES, Data, build_data, build_model, build_optimizer, build_scheduler,
                              compile_model, resolve_device, resolve_precision, target_name)
from sam_runner.config import sharpness_measures, sharpness_options, validate
from sam_runner.errors import ConfigError, SamRunnerError
from sam_runner.logbook import HPARAM_METRICS, Logbook, Stopwatch, read_summary
from sam_runner.plan import RunPlan, at_chance, effective_lr, make_plan, protocol_name
from sam_runner.steps import StepResult, train_step

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


def run_experiment(cfg: DictConfig, run_dir: Path, *, choices: dict[str, str] | None = None,
                   plain_rho: str | None = None) -> dict[str, Any]:
    """Train one configuration and write everything into `run_dir`. Returns the final summary."""
    clock = Stopwatch()
    settings = validate(cfg)
    device = resolve_device(settings.device.value)
    precision = resolve_precision(settings.precision.value, device)
    hparams = describe(cfg, settings, choices or {}, precision, device)
    if cfg.optimizer.sam is None and plain_rho is not None and float(plain_rho) != settings.rho:
        return _skip_duplicate(run_dir, hparams, plain_rho)

    logbook = Logbook(run_dir, hparams)
    logbook.write_run_info(sys.argv, OmegaConf.to_container(cfg, resolve=True), device)
    summary: dict[str, Any] = {"status": "running", "epochs_completed": 0}
    logbook.write_summary(summary)
    try:
        run = build_run(cfg, settings, precision, device, logbook, clock)
        summary.update(steps_budget=run.plan.total_steps, target_reached=False if run.plan.has_target else None)
        log.info("%s | %s | %s on %s (%s) | %d parameters | %d steps/epoch | %s -> %s", hparams["dataset"],
                 hparams["model"], _optimizer_label(hparams), device, precision,
                 sum(p.numel() for p in run.model.parameters()), run.plan.steps_per_epoch, run.plan.protocol,
                 run_dir)
        fit(run, summary)
        if summary["status"] == "running":
            summary["status"] = "completed"  # training and the final measurements are done
    except SamRunnerError as error:
        summary.update(status="failed", error=str(error))
        raise
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="interrupted by the user (Ctrl-C / SIGINT)")
        raise
    except Exception as error:  # whatever raised (a plug-in's bug, a full disk), the record must not say running
        summary.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        summary.update(clock.times())
        logbook.write_summary(summary)
        logbook.close(summary)
    log.info("done (%s): train acc %.4f | test acc %.4f | gap %.4f | %.1fs -> %s", summary["status"],
             summary.get("train_acc", math.nan), summary.get("test_acc", math.nan),
             summary.get("gap_acc", math.nan), summary["wall_time_s"], run_dir)
    return summary


def build_run(cfg: DictConfig, settings: DictConfig, precision: str, device: torch.device, logbook: Logbook,
              clock: Stopwatch) -> Run:
    """Data, model, optimizer and schedule, and the run's plan (lr scaling, budget, targets)."""
    saved_run.seed_everything(settings.seed)
    data = build_data(cfg, settings, device)
    plan = make_plan(settings, len(data.train))
    model = build_model(cfg.model, data.num_classes, data.input_shape).to(device)
    if settings.compile:  # every graph compiled before the first step, timed apart as compile_time_s (build.py)
        compile_model(model, data, AUTOCAST_DTYPES[precision], cfg.optimizer.sam, clock)
    optimizer = build_optimizer(cfg.optimizer, settings.rho, plan.lr, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, plan.steps_per_epoch, plan.total_steps)
    sam = cfg.optimizer.sam
    return Run(settings=settings, plan=plan, data=data, model=model, optimizer=optimizer, scheduler=scheduler,
               scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
               criterion=nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing),
               autocast_dtype=AUTOCAST_DTYPES[precision],
               micro_batch_size=sam.micro_batch_size if sam is not None else None,
               measures=_measures_for(model, settings), logbook=logbook, clock=clock)


def fit(run: Run, summary: dict[str, Any]) -> None:
    """The epoch loop: train, evaluate, check the target, checkpoint, log; sharpness when due and at the end.

    Follows `run.plan` (plan.py): how many batches each epoch trains, when it evaluates and checkpoints, and
    when a target ends the run early. Updates `summary` in place after every epoch, so whoever holds it knows
    how far the run got if it fails.
    """
    plan, clock, logbook = run.plan, run.clock, run.logbook
    step, best_train_acc = 0, -math.inf
    epochs = tqdm(range(plan.epochs), desc="epochs", disable=not SHOW_PROGRESS, leave=False)
    with logging_redirect_tqdm():
        for epoch in epochs:
            with clock("train"):
                epoch_start = time.perf_counter()
                seen = train_epoch(run, epoch)
                train_time = time.perf_counter() - epoch_start
            step += plan.batches_in(epoch)
            metrics = {**seen, "opt/lr": run.scheduler.get_last_lr()[0], "opt/epoch_time_s": train_time,
                       "opt/images_per_s": plan.batches_in(epoch) * run.settings.batch_size / train_time}
            summary.update(epochs_completed=epoch + 1, steps_completed=step)
            diverged = not math.isfinite(seen["train/loss_seen"])
            ending = plan.is_last(epoch) or diverged
            if plan.evaluates_after(epoch) or ending:
                with clock("eval"):
                    summary.update(generalization(run.model, run.data, run.autocast_dtype))
                metrics.update({tag: summary[key] for key, tag in HPARAM_METRICS.items() if key in summary})
                best_train_acc = max(best_train_acc, summary["train_acc"])
                summary["at_chance"] = at_chance(best_train_acc, run.data.majority_fraction)
                if plan.target_met(summary["train_acc"], summary["train_loss"]):
                    summary.update(target_reached=True, target_epoch=epoch + 1, target_step=step)
                    ending = True
            if diverged:
                summary.update(status="diverged", error=f"non-finite training loss in epoch {epoch + 1} "
                                                        f"(steps {step - plan.batches_in(epoch) + 1}-{step})")
            elif ending or plan.checkpoints_after(epoch):  # never overwrite the last finite weights
                with clock("checkpoint"):
                    checkpoint.save_atomic(_checkpoint_state(run, epoch, step),
                                           logbook.run_dir / "checkpoints" / "last.pt")
            summary.update(clock.times())
            logbook.write_summary(summary)  # the epoch is safe on disk before the (possibly long) measurement
            every = run.settings.sharpness.every
            if run.measures and not diverged and (ending or (every and (epoch + 1) % every == 0)):
                with clock("sharpness"):
                    record = measure(run.model, run.data.sharpness, run.measures, run.settings, epoch=epoch + 1,
                                     step=step, source="sam-run")
                add_measurement(summary, record)
                metrics.update({f"sharpness/{name}": value for name, value in record["values"].items()})
                summary.update(clock.times())
                logbook.write_summary(summary)
            logbook.log_epoch(epoch + 1, step, metrics)
            _log_epoch(epoch, plan, summary, metrics, evaluated="test/acc" in metrics)
            if diverged:
                log.warning("diverged: %s", summary["error"])
            if ending:
                break


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the shuffled, augmented training set (or the plan's share of it in the last epoch of a
    step budget). Returns the statistics seen while training."""
    run.model.train()
    totals = _StepTotals()
    batches = islice(run.data.train.epoch(epoch), run.plan.batches_in(epoch))
    bar = tqdm(batches, total=run.plan.batches_in(epoch), desc=f"epoch {epoch + 1}", disable=not SHOW_PROGRESS,
               leave=False)
    for index, (inputs, targets) in enumerate(bar):
        result = train_step(run.model, inputs, targets, run.optimizer, run.criterion,
                            autocast_dtype=run.autocast_dtype, scaler=run.scaler,
                            max_grad_norm=run.settings.max_grad_norm, micro_batch_size=run.micro_batch_size)
        run.scheduler.step()
        totals.add(result, targets.shape[0])
        if SHOW_PROGRESS and (index + 1) % run.settings.progress_every == 0:
            bar.set_postfix(loss=f"{result.loss.item():.4f}")  # host sync, once every progress_every steps
    return totals.means()


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


class _StepTotals:
    """Sums of per-step statistics, kept on the device until the epoch ends (one host sync per epoch)."""

    NAMES = ("loss", "correct", "grad_norm", "perturbed_loss", "perturbed_correct", "perturbation_norm", "skipped")
    PER_SAMPLE = ("loss", "perturbed_loss")  # batch means: weighted by batch size; the others are summed as they are

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.samples = 0
        self.steps = 0

    def add(self, result: StepResult, batch_size: int) -> None:
        for name in self.NAMES:
            value = getattr(result, name)
            if value is not None:
                contribution = value.detach().float() * (batch_size if name in self.PER_SAMPLE else 1)
                self.sums[name] = self.sums[name] + contribution if name in self.sums else contribution
        self.samples += batch_size
        self.steps += 1

    def means(self) -> dict[str, float]:
        sums = {name: float(value) for name, value in self.sums.items()}  # the epoch's one host sync
        metrics = {"train/loss_seen": sums["loss"] / self.samples, "train/acc_seen": sums["correct"] / self.samples,
                   "opt/grad_norm": sums["grad_norm"] / self.steps}
        if "perturbed_loss" in sums:
            metrics.update({"train/loss_perturbed": sums["perturbed_loss"] / self.samples,
                            "train/acc_perturbed": sums["perturbed_correct"] / self.samples,
                            "opt/perturbation_norm": sums["perturbation_norm"] / self.steps})
        if "skipped" in sums:  # fp16: steps the GradScaler skipped for non-finite gradients
            metrics["opt/skipped_steps"] = sums["skipped"]
        return metrics


def generalization(model: nn.Module, data: Data, autocast_dtype: torch.dtype | None) -> dict[str, float]:
    """Eval-mode loss and accuracy on the training set (or its fixed subset), the validation split when there is
    one, and the test set; and the generalization gaps (train vs test)."""
    train_loss, train_acc = evaluate(model, data.train_eval, autocast_dtype)
    test_loss, test_acc = evaluate(model, data.test, autocast_dtype)
    result = {"train_acc": train_acc, "test_acc": test_acc, "train_loss": train_loss, "test_loss": test_loss,
              "gap_acc": train_acc - test_acc, "gap_loss": test_loss - train_loss}
    if data.val is not None:
        result["val_loss"], result["val_acc"] = evaluate(model, data.val, autocast_dtype)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, stream: Any, autocast_dtype: torch.dtype | None) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy in eval mode, without augmentation."""
    model.eval()
    loss_sum = correct = None
    for inputs, targets in stream.epoch(0):
        with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)
        batch_loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        batch_correct = (logits.argmax(dim=1) == targets).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
    return float(loss_sum) / stream.num_samples, float(correct) / stream.num_samples


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


def _checkpoint_state(run: Run, epoch: int, step: int) -> dict[str, Any]:
    """Everything an exact resume needs. The data order is not stored: it is a function of (seed, epoch)."""
    return {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": epoch + 1, "step": step, "seed": run.settings.seed,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
