"""Where a run stands, in a form a checkpoint can hold: the epoch and batch it is at, the statistics of the
epoch so far, and how much of its records are written. Restoring a `Progress` continues a run exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from sam_runner.steps import STATISTICS, StepResult


class StepTotals:
    """Sums of per-step statistics (steps.STATISTICS says how each is summed and averaged), kept on the device
    until the epoch ends (one host sync per epoch).

    Each statistic is averaged over the steps that reported it (`counts`: their samples and steps): SAM's
    (perturbed loss, ‖ε‖) over the SAM steps alone in an epoch where sam_start switches SAM on.
    """

    def __init__(self, sums: dict[str, torch.Tensor] | None = None, samples: int = 0, steps: int = 0,
                 counts: dict[str, tuple[int, int]] | None = None) -> None:
        self.sums: dict[str, torch.Tensor] = dict(sums or {})
        self.samples = samples
        self.steps = steps
        # (samples, steps) of the steps that reported each statistic; without them (a checkpoint written before
        # they were kept), every statistic was reported by every step
        self.counts: dict[str, tuple[int, int]] = dict(counts) if counts is not None else \
            {name: (samples, steps) for name in self.sums}

    def add(self, result: StepResult, batch_size: int) -> None:
        for name, statistic in STATISTICS.items():
            value = getattr(result, name)
            if value is not None:
                contribution = value.detach().float() * (batch_size if statistic.batch_mean else 1)
                self.sums[name] = self.sums[name] + contribution if name in self.sums else contribution
                samples, steps = self.counts.get(name, (0, 0))
                self.counts[name] = (samples + batch_size, steps + 1)
        self.samples += batch_size
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Metric -> the epoch's mean over the steps that reported it, for every statistic reported (SAM's and
        fp16's only with them)."""
        def divisor(name: str) -> int:
            samples, steps = self.counts[name]
            return {"sample": samples, "step": steps, "epoch": 1}[STATISTICS[name].per]

        return {STATISTICS[name].metric: float(self.sums[name]) / divisor(name)  # host sync
                for name in STATISTICS if name in self.sums}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {name: value.cpu() for name, value in self.sums.items()}, "samples": self.samples,
                "steps": self.steps, "counts": {name: list(count) for name, count in self.counts.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> StepTotals:
        counts = state.get("counts")
        return cls({name: value.to(device) for name, value in state["sums"].items()}, state["samples"],
                   state["steps"], None if counts is None else {name: tuple(c) for name, c in counts.items()})


@dataclass
class Progress:
    """A run's position and what has been written of it.

    `batch` counts the batches of `epoch` already trained: a checkpoint taken mid-epoch (every N steps, or when
    a pre-emption signal arrives) continues from the next batch, with the epoch's statistics so far in `totals`.
    `metrics_offset` and `logged_step` say how far metrics.jsonl and TensorBoard were written, so a resumed run
    cuts away what its killed predecessor wrote after the checkpoint and logs every epoch exactly once.
    """

    epoch: int = 0  # the epoch being trained (0-based)
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimizer steps taken since the start of the run
    best_train_acc: float = -math.inf  # best eval-mode training accuracy so far (for at_chance)
    epoch_train_start_s: float = 0.0  # the train clock when `epoch` began (its time survives a resume)
    metrics_offset: int = 0  # bytes of metrics.jsonl that belong to epochs already logged
    logged_step: int = 0  # step of the last logged epoch (0: none yet)
    ended: bool = False  # the last epoch (or the one that met the target) is done and logged
    totals: StepTotals = field(default_factory=StepTotals)

    def state_dict(self) -> dict[str, Any]:
        position = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "totals"}
        return {**position, "totals": self.totals.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Progress:
        position = {key: value for key, value in state.items() if key != "totals"}
        return cls(**position, totals=StepTotals.from_state(state["totals"], device))

    def next_epoch(self, train_clock_s: float, *, ended: bool) -> None:
        """Move to the start of the next epoch once this one is logged; `ended`: there is none to train."""
        self.epoch, self.batch, self.totals, self.epoch_train_start_s = self.epoch + 1, 0, StepTotals(), train_clock_s
        self.ended = ended
