"""Sharpness measurements of a run's weights, as records: the values with everything needed to compare them.

The loop measures during and at the end of training; `sam-measure` (report/remeasure.py) measures a saved
checkpoint again. Both write the same record into summary.json's `measurements`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from sam_runner import sharpness
from sam_runner.run.logbook import SHOW_PROGRESS
from sam_runner.run.spec import Settings, sharpness_measures, sharpness_options

log = logging.getLogger("sam_runner")


def measures_for(model: nn.Module, settings: Settings, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
                 training_passes: float | None = None) -> sharpness.MeasureChoice:
    """The configured measures, or for `auto` those worth their cost on this model, device and training budget
    (sharpness.default_measures; `training_passes`: the run's forward and backward passes over single samples per
    measurement)."""
    chosen = sharpness_measures(settings.sharpness.measures)
    if chosen != "auto":
        return sharpness.MeasureChoice(chosen, "sharpness.measures")
    choice = sharpness.default_measures(model, num_batches=len(batches), num_samples=_samples(batches),
                                        training_passes=training_passes,
                                        **sharpness_options(settings.sharpness.options))
    log.info("sharpness.measures auto: %s (%s)", ", ".join(choice.measures), choice.reason)
    return choice


def training_passes(epochs: float, num_train: int, *, sam: float, every: int, every_steps: int | None = None,
                    total_steps: int = 0) -> float:
    """Forward and backward passes over single samples a run's budget trains (two a sample, four with SAM; `sam`:
    the share of the steps that are SAM's two-pass ones, 1 or True for all, less with sam_start or LookSAM) per
    measurement it takes: one every `every` epochs (sharpness.every), one every `every_steps` of its `total_steps`
    (sharpness.every_steps), then one at step 0 too, and one at the end, so `auto` weighs each measurement against
    its share of the training."""
    during = (math.ceil(epochs / every) - 1 if every else 0) + (total_steps // every_steps if every_steps else 0)
    measurements = 1 + during + (1 if every or every_steps else 0)
    return epochs * num_train * (2 + 2 * float(sam)) / measurements


def take_measurement(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     measures: sharpness.MeasureChoice, settings: Settings, *, epoch: int, step: int, source: str,
                     should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Sharpness of the current weights on the fixed training subset (eval mode), of the loss the run trains: the
    cross-entropy with the run's label smoothing (SAM's objective; label smoothing gives it finite minimizers).

    Returns a measurement record: the values with everything needed to compare them (radius, samples, every
    option with its default filled in, the model mode, where in training and by what it was taken, and what
    chose the measures). Raises sharpness.MeasurementStopped as soon as `should_stop` says so (a stop request
    while a run measures).
    """
    options = sharpness_options(settings.sharpness.options)
    cost = sharpness.estimate_cost(measures.measures, len(batches), sharpness.parameter_count(model), **options)
    log.info("sharpness at epoch %d, step %d: measuring %s on %d samples; estimate: at most %d forward and %d "
             "backward batch passes (%d batches of <= %d)", epoch, step, ", ".join(measures.measures),
             _samples(batches), cost.forward, cost.backward, len(batches), settings.sharpness.batch_size)
    started = time.perf_counter()
    values = sharpness.measure(model, nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing), batches, rho=settings.sharpness.rho,
                               measures=measures.measures, seed=settings.seed, should_stop=should_stop,
                               progress=SHOW_PROGRESS, **options)
    seconds = time.perf_counter() - started
    log.info("sharpness at epoch %d, step %d (%.1fs): %s", epoch, step, seconds,
             ", ".join(f"{name} {value:.4g}" for name, value in values.items()))
    resolved = {key: value for key, value in asdict(sharpness.Options(**options)).items() if key != "progress"}
    return {"rho": settings.sharpness.rho, "label_smoothing": settings.label_smoothing, "num_samples": _samples(batches),
            "batch_size": settings.sharpness.batch_size, "measures": measures.measures,
            "chosen_by": measures.reason, "estimated_passes": {"forward": cost.forward, "backward": cost.backward},
            "options": resolved, "model_mode": "eval", "seed": settings.seed, "epoch": epoch, "step": step,
            "source": source, "time_s": seconds, "values": values}


def _samples(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(len(targets) for _, targets in batches)


def add_measurement(summary: dict[str, Any], record: dict[str, Any]) -> None:
    """Keep every measurement; `sharpness` holds the run's own latest values (sam-measure never replaces them)."""
    summary["measurements"] = [*summary.get("measurements", []), record]
    if record["source"] == "sam-run" or "sharpness" not in summary:
        summary["sharpness"] = record["values"]


def keep_remeasurements(summary: dict[str, Any], on_disk: dict[str, Any]) -> None:
    """Add to a checkpoint's `summary`, which a continued run goes on from, the sam-measure records that
    summary.json holds and it lacks: taken after the checkpoint was written, they would be lost when the continued
    run rewrites summary.json."""
    for record in on_disk.get("measurements", []):
        if record.get("source") == "sam-measure" and record not in summary.get("measurements", []):
            add_measurement(summary, record)
