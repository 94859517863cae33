"""How a run stands or ended: the one vocabulary of summary.json's `status`, the resume rules and the reports."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """A run's status, in the order reports count them. Summaries hold its value, a plain string (checkpoints
    carry the summary, and torch's weights-only loading knows no enum); a member equals its value."""

    COMPLETED = "completed"  # trained its budget (or reached its target) and took its final measurements
    RUNNING = "running"  # training, or killed without a chance to say otherwise (kill -9, power loss)
    INTERRUPTED = "interrupted"  # stopped by Ctrl-C: the same command continues it from the last checkpoint
    PREEMPTED = "preempted"  # stopped by SIGTERM/SIGUSR1/SIGUSR2 after a checkpoint: the same command continues it
    FAILED = "failed"  # an error ended it (the summary's `error` says which)
    DIVERGED = "diverged"  # the training loss became non-finite; the last finite checkpoint is kept
    DUPLICATE = "duplicate"  # a plain optimizer's run at a rho other than the sweep's first: not trained

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)



# Tuples, not sets: a status read from summary.json is a plain string, equal to its member but hashed apart.
ENDED = (Status.COMPLETED, Status.DIVERGED)  # nothing left to train: a re-run leaves it; its HParams are written
FINISHED = (Status.COMPLETED, Status.DUPLICATE)  # nothing more needed: a sweep whose runs all finished exits 0
