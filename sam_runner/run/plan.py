"""How long a run trains, at which learning rate and when it stops: the comparison protocol of a batch-size study.

Pure functions of the validated settings and the number of batches per epoch, so `train.fit` stays a loop and
the rules are tested on their own. Keskar et al. (2017) compare batch sizes at the same lr for the same number
of epochs (a large batch then takes fewer updates); Hoffer et al. (2017) scale the lr with the batch size and
give every batch size the same number of updates. Both are one override away (shared/REFERENCE.md §4):
`lr_scaling=none|linear|sqrt` and `budget=epochs|steps`. A target (`stop.train_acc`, `stop.train_loss`) ends a
run once it fits the training set that well, so runs are compared (and their sharpness measured) at matched fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sam_runner.errors import ConfigError
from sam_runner.run.spec import Settings

# A run "never left chance level" when its best eval-mode training accuracy stayed below this multiple of the
# majority-class fraction (0.15 for 10 balanced classes): a loss stuck at ln K trains no better than guessing.
CHANCE_MULTIPLE = 1.5

def scaled_lr(lr: float, batch_size: int, reference_batch_size: int, rule: str) -> float:
    """lr at `batch_size`: unchanged, × B/B_ref (Goyal et al. 2017) or × √(B/B_ref) (Hoffer et al. 2017)."""
    ratio = batch_size / reference_batch_size
    factors = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}
    return lr * factors[rule]


def effective_lr(settings: Settings) -> float:
    """The peak lr the run trains with: `lr` scaled for `batch_size` by `lr_scaling` (recorded as `lr`)."""
    return scaled_lr(settings.lr, settings.batch_size, settings.lr_reference_batch_size, settings.lr_scaling)


@dataclass(frozen=True)
class RunPlan:
    """The numbers `fit` follows. Steps are optimizer updates; epochs are passes (the last one may be partial)."""

    lr: float
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    stop_train_acc: float | None
    stop_train_loss: float | None
    protocol: str
    sam_start_step: int = 0  # SAM optimizers: the steps before this one are the base optimizer's alone (sam_start)

    def sam_on(self, step: int) -> bool:
        """Whether the step after `step` steps taken is a SAM step (a SAM optimizer's run), not a base-optimizer
        one: a function of the step counter alone, so every DDP rank and a continued run switch at the same step."""
        return step >= self.sam_start_step

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def batches_in(self, epoch: int) -> int:
        """Batches epoch `epoch` (0-based) trains on: all of them, except in the last epoch of a step budget."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def is_last(self, epoch: int) -> bool:
        return epoch + 1 == self.epochs

    def evaluates_after(self, epoch: int) -> bool:
        """Eval-mode passes every `eval_every` epochs and always after the last one."""
        return self.is_last(epoch) or (epoch + 1) % self.eval_every == 0

    def checkpoints_after(self, epoch: int) -> bool:
        return self.is_last(epoch) or (epoch + 1) % self.checkpoint_every == 0

    @property
    def has_target(self) -> bool:
        return self.stop_train_acc is not None or self.stop_train_loss is not None

    def target_met(self, train_acc: float, train_loss: float) -> bool:
        """Every set target holds (eval-mode training accuracy at least, training loss at most its target)."""
        return self.has_target and \
            (self.stop_train_acc is None or train_acc >= self.stop_train_acc) and \
            (self.stop_train_loss is None or train_loss <= self.stop_train_loss)


def make_plan(settings: Settings, steps_per_epoch: int) -> RunPlan:
    """The run's plan from its validated top-level settings (config.validate) and its batches per epoch."""
    steps_budget = settings.budget == "steps"
    total_steps = settings.steps if steps_budget else settings.epochs * steps_per_epoch
    return RunPlan(lr=effective_lr(settings), steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   eval_every=settings.eval.every, checkpoint_every=settings.checkpoint.every,
                   stop_train_acc=settings.stop.train_acc, stop_train_loss=settings.stop.train_loss,
                   protocol=protocol_name(settings), sam_start_step=sam_start_step(settings.sam_start, total_steps))


def sam_start_step(sam_start: float, total_steps: int) -> int:
    """The first SAM step of a run with `sam_start` (a fraction of the budget): round(sam_start x total_steps) steps
    of the base optimizer come before it. Refused when that leaves no SAM step in the budget."""
    start = round(sam_start * total_steps)
    if sam_start > 0 and start >= total_steps:
        raise ConfigError(f"sam_start={sam_start} of a {total_steps}-step budget switches SAM on at step {start}, "
                          f"after the last: lower sam_start or train longer")
    return start


def protocol_name(settings: Settings) -> str:
    """A short name for the comparison protocol, the same for every batch size of one study.

    e.g. "same lr, 100 epochs, until train acc >= 0.99" (Keskar) or "lr x sqrt(B/32), 3000 steps" (Hoffer).
    """
    rule, reference = settings.lr_scaling, settings.lr_reference_batch_size
    lr = {"none": "same lr", "linear": f"lr x B/{reference}", "sqrt": f"lr x sqrt(B/{reference})"}[rule]
    budget = f"{settings.steps} steps" if settings.budget == "steps" else f"{settings.epochs} epochs"
    targets = [f"train acc >= {settings.stop.train_acc:g}" if settings.stop.train_acc is not None else None,
               f"train loss <= {settings.stop.train_loss:g}" if settings.stop.train_loss is not None else None]
    until = " and ".join(target for target in targets if target)
    return f"{lr}, {budget}" + (f", until {until}" if until else "")


def at_chance(best_train_acc: float, majority_fraction: float) -> bool:
    """True when the run never trained beyond chance level (see CHANCE_MULTIPLE)."""
    return best_train_acc < CHANCE_MULTIPLE * majority_fraction
