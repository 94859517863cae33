"""Learning-rate schedules, stepped once per optimizer step.

Each builder returns a `LambdaLR` whose state is a step counter, so a checkpoint restores the schedule
exactly. Builders share one signature, so a user's own schedule plugs in through `scheduler._target_`:
`builder(optimizer, *, steps_per_epoch, total_steps, **its own keys) -> LRScheduler`. `total_steps` is the
run's planned number of optimizer updates (its epoch or step budget, see plan.py); stopping early at a target
does not compress the schedule.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from sam_runner.errors import ConfigError


@dataclass(frozen=True)
class _Schedule:
    """Multiplier of the peak lr at a given step: linear warm-up, then a decay shape.

    A dataclass rather than a closure so `LambdaLR.state_dict()` can hold it.
    """

    total_steps: int
    warmup_steps: int
    shape: str
    min_lr_fraction: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.shape == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.shape == "step":
            return self.gamma ** bisect.bisect_right(self.milestones, step)
        return 1.0


def _warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    if warmup_epochs < 0:
        raise ConfigError(f"scheduler.warmup_epochs must be >= 0 (got {warmup_epochs})")
    return min(total_steps, round(warmup_epochs * steps_per_epoch))


def cosine(optimizer: Optimizer, *, steps_per_epoch: int, total_steps: int, warmup_epochs: float = 0.0,
           min_lr_fraction: float = 0.0) -> LambdaLR:
    """Cosine decay to `min_lr_fraction` of the peak lr, after linear warm-up."""
    if not 0.0 <= min_lr_fraction <= 1.0:
        raise ConfigError(f"scheduler.min_lr_fraction must be in [0, 1] (got {min_lr_fraction})")
    schedule = _Schedule(total_steps, _warmup_steps(warmup_epochs, steps_per_epoch, total_steps), "cosine",
                         min_lr_fraction=min_lr_fraction)
    return LambdaLR(optimizer, schedule)


def step(optimizer: Optimizer, *, steps_per_epoch: int, total_steps: int, warmup_epochs: float = 0.0,
         milestones: Sequence[float] = (0.3, 0.6, 0.8), gamma: float = 0.2) -> LambdaLR:
    """Multiply the lr by `gamma` at each milestone, given as a fraction of the run."""
    if any(not 0.0 < m < 1.0 for m in milestones) or list(milestones) != sorted(milestones):
        raise ConfigError(f"scheduler.milestones must be increasing fractions in (0, 1) (got {list(milestones)})")
    schedule = _Schedule(total_steps, _warmup_steps(warmup_epochs, steps_per_epoch, total_steps), "step",
                         milestones=tuple(round(m * total_steps) for m in milestones), gamma=gamma)
    return LambdaLR(optimizer, schedule)


def constant(optimizer: Optimizer, *, steps_per_epoch: int, total_steps: int, warmup_epochs: float = 0.0
             ) -> LambdaLR:
    """The peak lr throughout, after linear warm-up."""
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total_steps)
    return LambdaLR(optimizer, _Schedule(total_steps, warmup, "constant"))
