"""One run over several processes, as the trainer sees it: who writes, what every process must decide alike,
and how an epoch's statistics and a checkpoint combine the processes (distributed.py has the DDP math).

Rank 0 alone writes the run directory; the others hold a `SilentLogbook`. Whatever decides the course of the run
(the lock, what the run directory holds, a stop request) is decided once and shared, so that no process waits
forever in a collective the others never reach. With one process every method runs its argument or returns
what it was given, so a single-process run is unchanged bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sam_runner.errors import SamRunnerError, describe_unforeseen
from sam_runner.run import rundir
from sam_runner.run.logbook import Logbook
from sam_runner.run.progress import StepTotals
from sam_runner.run.stopping import StopRequests
from sam_runner.scale import distributed
from sam_runner.scale.distributed import World
from sam_runner.steps import STATISTICS

Result = TypeVar("Result")


class Team:
    """The processes of one run (a single one without torchrun): `world` says which this is."""

    def __init__(self, world: World) -> None:
        self.world = world

    @property
    def device(self) -> torch.device:
        return self.world.device

    def by_main(self, decide: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
        """`decide(...)` run by rank 0 alone; every rank returns its result, or raises its error."""
        if not self.world.is_distributed:
            return decide(*args, **kwargs)
        outcome: list[Any] = [None]
        if self.world.is_main:
            try:
                outcome[0] = ("result", decide(*args, **kwargs))
            except BaseException as error:
                outcome[0] = ("error", error if isinstance(error, SamRunnerError) else
                              SamRunnerError(f"rank 0 failed: {describe_unforeseen(error)}"))
                dist.broadcast_object_list(outcome, src=0, group=self.world.control)
                raise
        dist.broadcast_object_list(outcome, src=0, group=self.world.control)
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

    def main_first(self, make: Callable[..., Result], *args: Any) -> Result:
        """`make(...)` in every process, rank 0's first: it downloads or caches what the others then read."""
        made: list[Result] = []
        self.by_main(lambda: made.append(make(*args)))  # the others learn only whether it worked
        return made[0] if made else make(*args)

    @contextmanager
    def claimed(self, run_dir: Path) -> Iterator[None]:
        """The run directory's lock (rundir.claim), held by rank 0 for the run; a refusal reaches every rank."""
        with ExitStack() as held:
            self.by_main(held.enter_context, rundir.claim(run_dir))
            yield

    def stop_requested(self, stop: StopRequests) -> bool:
        """Whether any process was asked to stop (SIGTERM reaches every rank at its own moment): decided together
        after every step, so that all stop after the same one. A rank that got no signal takes the others'."""
        if not self.world.is_distributed:
            return stop.requested
        received = torch.tensor([stop.signal or 0])
        dist.all_reduce(received, op=dist.ReduceOp.MAX, group=self.world.control)
        agreed = int(received.item())
        if agreed and not stop.requested:
            stop.take(agreed)
        # what the ranks agreed, not this rank's flag: a signal landing after the all-reduce would make this rank
        # alone stop here (its checkpoint's collectives against the others' next step: a hang, or a lost rank);
        # it is taken at the next step, by all
        return bool(agreed)

    def share(self, batch_size: int) -> int:
        """Samples of a global batch this rank trains on."""
        start, stop = distributed.shard_bounds(batch_size, self.world)
        return stop - start

    def combined(self, totals: StepTotals) -> StepTotals:
        """An epoch's statistics over all ranks: per-sample sums and sample counts added up, per-step values
        (the same on every rank, but for ‖ε‖ in local mode) averaged."""
        if not self.world.is_distributed:
            return totals
        names = sorted(totals.sums)
        samples = [float(totals.samples)] + [float(totals.counts[name][0]) for name in names]
        flat = torch.stack([totals.sums[name].double() for name in names] +
                           [torch.tensor(n, dtype=torch.float64, device=self.device) for n in samples])
        summed = distributed.all_reduce_sum(flat, self.world)
        size, counted = self.world.world_size, [round(n) for n in summed[len(names):].tolist()]
        sums = {name: (value if STATISTICS[name].per == "sample" else value / size).float()
                for name, value in zip(names, summed)}
        # each statistic's steps are the same on every rank (SAM's: sam_start's switch is a function of the step)
        counts = {name: (count, totals.counts[name][1]) for name, count in zip(names, counted[1:])}
        return StepTotals(sums, samples=counted[0], steps=totals.steps, counts=counts)

    def gather(self, part: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every rank's `part`, in rank order, on rank 0 (None elsewhere, and for one process)."""
        if not self.world.is_distributed:
            return None
        parts: list[Any] | None = [None] * self.world.world_size if self.world.is_main else None
        dist.gather_object(part, parts, dst=0, group=self.world.control)
        return parts

    def logbook(self, run_dir: Path, hparams: dict[str, Any], **options: Any) -> Logbook | SilentLogbook:
        """Rank 0 writes the run's records; the others write nothing."""
        return (Logbook if self.world.is_main else SilentLogbook)(run_dir, hparams, **options)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics on every rank, before evaluating, measuring or saving."""
        distributed.broadcast_buffers(model, self.world)


@contextmanager
def team(device: torch.device) -> Iterator[Team]:
    """The processes torchrun started for this run, joined for the body (distributed.process_group)."""
    with distributed.process_group(device) as world:
        yield Team(world)


class SilentLogbook:
    """What a rank other than 0 holds in place of the Logbook: the same calls, nothing written."""

    def __init__(self, run_dir: Path, *args: Any, **kwargs: Any) -> None:
        self.run_dir = run_dir

    def log_metrics(self, *args: Any) -> int:
        return 0

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self, summary: dict[str, Any]) -> None:
        pass
