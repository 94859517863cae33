"""Statistics over runs: seeds aggregated into groups (mean ± sample std) and Kendall's τ between sharpness and
the generalization gap, overall and within each batch size (Jiang et al. 2020's granulated τ, REFERENCE.md §3).

Only completed runs enter a mean or a τ; the others are counted per group so that none is dropped silently.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from scipy import stats

from sam_runner.report.runs import STATUS_ORDER, Run, finite, measured_columns
from sam_runner.run.hyperparameters import GROUP_KEYS

# Per-group statistics, in table order; sharpness columns go between the metrics and the target columns.
GROUP_METRICS = ("train_acc", "test_acc", "train_loss", "gap_acc", "gap_loss", "val_acc")
TARGET_METRICS = ("target_epoch", "target_step")
GAPS = ("gap_acc", "gap_loss")
MIN_TAU_RUNS = 3  # fewer pairs than this give no τ (blank), as with two points every τ is ±1


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1) of the n values present; std is None for n < 2."""

    mean: float | None
    std: float | None
    n: int


def summarize(values: list[Any]) -> Stat:
    present = [number for number in map(finite, values) if number is not None]
    if not present:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None, len(present))


@dataclass
class Group:
    """Runs that agree on every hyper-parameter but the seed."""

    runs: list[Run]

    @property
    def settings(self) -> dict[str, Any]:
        return {key: self.runs[0].get(key) for key in GROUP_KEYS}

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.completed]

    def status_counts(self) -> str:
        """`3 completed, 1 failed, 1 at chance`: every run is accounted for."""
        counts = Counter(run.status for run in self.runs)
        order = sorted(counts, key=lambda status: (STATUS_ORDER.index(status) if status in STATUS_ORDER
                                                   else len(STATUS_ORDER), status))
        parts = [f"{counts[status]} {status}" for status in order]
        at_chance = sum(1 for run in self.runs if run.get("at_chance"))
        return ", ".join([*parts, *([f"{at_chance} at chance"] if at_chance else [])])

    def seeds(self) -> list[Any]:
        return [run.get("seed") for run in self.runs]

    def targets(self) -> tuple[int, int]:
        """(completed runs that reached their stopping target, completed runs that had one)."""
        flags = [run.get("target_reached") for run in self.completed if run.get("target_reached") is not None]
        return sum(1 for flag in flags if flag), len(flags)

    def statistics(self, sharpness_columns: list[str]) -> dict[str, Stat]:
        """Metric -> Stat over the completed runs; target epoch and step over those that reached the target."""
        completed = self.completed
        result = {key: summarize([run.get(key) for run in completed]) for key in GROUP_METRICS}
        result |= {column: summarize([run.sharpness.get(column) for run in completed]) for column in sharpness_columns}
        reached = [run for run in completed if run.get("target_reached") is True]
        result |= {key: summarize([run.get(key) for run in reached]) for key in TARGET_METRICS}
        result["wall_time_s"] = summarize([run.get("wall_time_s") for run in completed])
        result["train_s_per_step"] = self.seconds_per_step()
        return result

    def seconds_per_step(self) -> Stat:
        """Training seconds per optimizer step (`Run.seconds_per_step`) over the completed runs: the group's cost."""
        return summarize([run.seconds_per_step for run in self.completed])


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in order of their first run; values compare as JSON, so 0.1 and 0.10 are one setting."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps([run.get(key) for key in GROUP_KEYS], sort_keys=True)
        groups.setdefault(key, Group([])).runs.append(run)
    return list(groups.values())


@dataclass(frozen=True)
class Tau:
    """Kendall's τ-b of a sharpness column against a gap over n runs; None below MIN_TAU_RUNS pairs."""

    tau: float | None
    p: float | None
    n: int

    def text(self) -> str:
        """`+0.47 (p=0.012, n=12)`; empty below MIN_TAU_RUNS; NaN (one side constant) reads `undefined`."""
        if self.tau is None or self.p is None:
            return ""
        if math.isnan(self.tau):
            return f"undefined: a constant (n={self.n})"
        return f"{self.tau:+.2f} (p={self.p:.2g}, n={self.n})"


def kendall(runs: list[Run], column: str, gap: str) -> Tau:
    """τ over the runs that have both values (finite)."""
    pairs = [(x, y) for run in runs
             if (x := finite(run.sharpness.get(column))) is not None and (y := finite(run.get(gap))) is not None]
    if len(pairs) < MIN_TAU_RUNS:
        return Tau(None, None, len(pairs))
    result = stats.kendalltau([x for x, _ in pairs], [y for _, y in pairs])
    return Tau(float(result.statistic), float(result.pvalue), len(pairs))


@dataclass(frozen=True)
class Correlation:
    """One sharpness column against one gap: over all completed runs, within each batch size, and the mean of
    the within-batch-size τ (granulated; None when batch size does not vary or no group has a τ)."""

    column: str
    gap: str
    overall: Tau
    by_batch_size: dict[Any, Tau]
    granulated: float | None
    granulated_groups: int


def batch_sizes(runs: list[Run]) -> list[Any]:
    return sorted({run.get("batch_size") for run in runs if finite(run.get("batch_size")) is not None})


def correlations(runs: list[Run]) -> list[Correlation]:
    """τ of every sharpness column against gap_acc and gap_loss over the completed runs given."""
    completed = [run for run in runs if run.completed]
    sizes = batch_sizes(completed)
    result = []
    for column in measured_columns(completed):
        for gap in GAPS:
            by_size = {size: kendall([run for run in completed if run.get("batch_size") == size], column, gap)
                       for size in sizes} if len(sizes) > 1 else {}
            taus = [tau.tau for tau in by_size.values() if tau.tau is not None and math.isfinite(tau.tau)]
            result.append(Correlation(column, gap, kendall(completed, column, gap), by_size,
                                      statistics.fmean(taus) if taus else None, len(taus)))
    return result
