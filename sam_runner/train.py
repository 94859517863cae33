"""One run, top to bottom: build -> for each epoch (train steps, evaluate, log, checkpoint) -> sharpness -> summary.

The hot loop keeps its statistics on the device and reads them back once per `progress_every` steps and once
per epoch, so a GPU is never stalled by a per-step host sync.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
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
                              resolve_device, resolve_precision, target_name)
from sam_runner.config import sharpness_measures, sharpness_options, validate
from sam_runner.errors import SamRunnerError
from sam_runner.logbook import HPARAM_METRICS, Logbook, read_summary
from sam_runner.steps import StepResult, train_step

log = logging.getLogger("sam_runner")
SHOW_PROGRESS = sys.stderr.isatty()  # bars only for a person at a terminal, never in logs or CI


def run_experiment(cfg: DictConfig, run_dir: Path, *, choices: dict[str, str] | None = None,
                   plain_rho: str | None = None) -> dict[str, Any]:
    """Train one configuration and write everything into `run_dir`. Returns the final summary."""
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
        saved_run.seed_everything(settings.seed)
        data = build_data(cfg, settings, device)
        model = build_model(cfg.model, data.num_classes, data.input_shape).to(device)
        optimizer = build_optimizer(cfg.optimizer, settings.rho, model)
        scheduler = build_scheduler(cfg.scheduler, optimizer, len(data.train), settings.epochs)
        log.info("%s | %s | %s on %s (%s) | %d parameters | %d steps/epoch -> %s", hparams["dataset"],
                 hparams["model"], _optimizer_label(hparams), device, precision,
                 sum(p.numel() for p in model.parameters()), len(data.train), run_dir)
        fit(model, optimizer, scheduler, data, cfg, settings, precision, logbook, summary)
    except SamRunnerError as error:
        summary.update(status="failed", error=str(error))
        logbook.write_summary(summary)
        raise
    finally:
        logbook.close(summary)
    log.info("done (%s): train acc %.4f | test acc %.4f | gap %.4f -> %s", summary["status"],
             summary.get("train_acc", math.nan), summary.get("test_acc", math.nan),
             summary.get("gap_acc", math.nan), run_dir)
    return summary


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: Data, cfg: DictConfig,
        settings: DictConfig, precision: str, logbook: Logbook, summary: dict[str, Any]) -> None:
    """The epoch loop: train, evaluate, log, checkpoint; sharpness every `sharpness.every` epochs and at the end.

    Updates `summary` in place after every epoch, so whoever holds it knows how far the run got if it fails.
    """
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    autocast_dtype = AUTOCAST_DTYPES[precision]
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    measures = _measures_for(model, settings)
    started = time.perf_counter()
    step = 0
    epochs = tqdm(range(settings.epochs), desc="epochs", disable=not SHOW_PROGRESS, leave=False)
    with logging_redirect_tqdm():
        for epoch in epochs:
            epoch_start = time.perf_counter()
            seen = train_epoch(model, optimizer, scheduler, data, epoch, criterion, autocast_dtype, scaler,
                               cfg.optimizer, settings)
            step += len(data.train)
            train_time = time.perf_counter() - epoch_start
            summary.update(generalization(model, data, autocast_dtype), epochs_completed=epoch + 1)
            metrics = {**seen, **{tag: summary[key] for key, tag in HPARAM_METRICS.items()},
                       "opt/lr": scheduler.get_last_lr()[0], "opt/epoch_time_s": train_time,
                       "opt/images_per_s": data.train.num_samples / train_time}
            diverged = not math.isfinite(seen["train/loss_seen"])
            last = epoch + 1 == settings.epochs or diverged
            if diverged:
                summary.update(status="diverged", error=f"non-finite training loss in epoch {epoch + 1} "
                                                        f"(steps {step - len(data.train) + 1}-{step})")
            elif last:
                summary["status"] = "completed"
            checkpoint.save_atomic(_checkpoint_state(model, optimizer, scheduler, scaler, epoch, step, settings),
                                   logbook.run_dir / "checkpoints" / "last.pt")
            summary["wall_time_s"] = time.perf_counter() - started
            logbook.write_summary(summary)  # the epoch is safe on disk before the (possibly long) measurement
            every = settings.sharpness.every
            if measures and not diverged and (last or (every and (epoch + 1) % every == 0)):
                summary["sharpness"] = measure(model, data.sharpness, measures, settings, epoch)
                metrics.update({f"sharpness/{name}": value for name, value in summary["sharpness"].items()})
                logbook.write_summary(summary)
            logbook.log_epoch(epoch + 1, step, metrics)
            log.info("epoch %3d/%d | train loss %.4f acc %.4f | test loss %.4f acc %.4f | gap %+.4f | lr %.3g | "
                     "%.1fs %.0f img/s", epoch + 1, settings.epochs, summary["train_loss"], summary["train_acc"],
                     summary["test_loss"], summary["test_acc"], summary["gap_acc"], metrics["opt/lr"], train_time,
                     metrics["opt/images_per_s"])
            if diverged:
                log.warning("diverged: %s", summary["error"])
                break


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: Data, epoch: int,
                criterion: nn.Module, autocast_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None,
                optimizer_cfg: DictConfig, settings: DictConfig) -> dict[str, float]:
    """One pass over the shuffled, augmented training set. Returns the statistics seen while training."""
    model.train()
    micro_batch_size = optimizer_cfg.sam.micro_batch_size if optimizer_cfg.sam is not None else None
    totals = _StepTotals()
    bar = tqdm(data.train.epoch(epoch), total=len(data.train), desc=f"epoch {epoch + 1}",
               disable=not SHOW_PROGRESS, leave=False)
    for index, (inputs, targets) in enumerate(bar):
        result = train_step(model, inputs, targets, optimizer, criterion, autocast_dtype=autocast_dtype,
                            scaler=scaler, max_grad_norm=settings.max_grad_norm, micro_batch_size=micro_batch_size)
        scheduler.step()
        totals.add(result, targets.shape[0])
        if SHOW_PROGRESS and (index + 1) % settings.progress_every == 0:
            bar.set_postfix(loss=f"{result.loss.item():.4f}")  # host sync, once every progress_every steps
    return totals.means()


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
    """Eval-mode loss and accuracy on the training set (or its fixed subset) and the test set, and their gaps."""
    train_loss, train_acc = evaluate(model, data.train_eval, autocast_dtype)
    test_loss, test_acc = evaluate(model, data.test, autocast_dtype)
    return {"train_acc": train_acc, "test_acc": test_acc, "train_loss": train_loss, "test_loss": test_loss,
            "gap_acc": train_acc - test_acc, "gap_loss": test_loss - train_loss}


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
            settings: DictConfig, epoch: int | None = None) -> dict[str, float]:
    """Sharpness of the current weights on the fixed training subset (plain cross-entropy, eval mode)."""
    started = time.perf_counter()
    options = {"progress": SHOW_PROGRESS, **sharpness_options(settings.sharpness.options)}
    result = sharpness.measure(model, nn.CrossEntropyLoss(), batches, rho=settings.sharpness.rho,
                               measures=measures, seed=settings.seed, **options)
    where = f"after epoch {epoch + 1}" if epoch is not None else "of the checkpoint"
    log.info("sharpness %s (%.1fs): %s", where, time.perf_counter() - started,
             ", ".join(f"{name} {value:.4g}" for name, value in result.items()))
    return result


def measure_checkpoint(run_dir: Path, *, checkpoint_path: Path | None = None, measures: str | None = None,
                       rho: float | None = None, num_samples: int | None = None, device: str | None = None
                       ) -> dict[str, float]:
    """Rebuild a finished (or interrupted) run from run.json, load its weights and measure them."""
    run = saved_run.load(run_dir, checkpoint_path=checkpoint_path,
                         overrides={"sharpness.measures": measures, "sharpness.rho": rho,
                                    "sharpness.num_samples": num_samples, "device": device})
    result = measure(run.model, run.data.sharpness, _measures_for(run.model, run.settings), run.settings)
    summary = read_summary(run_dir) or {}
    summary["sharpness"] = result
    checkpoint.write_json_atomic(summary, run_dir / "summary.json")
    return result


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
        "micro_batch_size": sam.micro_batch_size if sam is not None else None,
        "weight_decay": weight_decay,
        "weight_decay_in_perturbation": bool(sam.perturb_weight_decay) if sam is not None else None,
        "lr": settings.lr, "batch_size": settings.batch_size, "epochs": settings.epochs, "seed": settings.seed,
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


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                      scaler: torch.amp.GradScaler | None, epoch: int, step: int, settings: DictConfig
                      ) -> dict[str, Any]:
    """Everything an exact resume needs. The data order is not stored: it is a function of (seed, epoch)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch + 1, "step": step, "seed": settings.seed,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
