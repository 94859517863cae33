"""Runs over training: each sharpness measure and the learning curves against the optimizer step, as mean ± sample
std over a group's seeds, and each measure at a run's first and last measurement with its relative change — the
one-line answer to "which notion of sharpness did this algorithm reduce".

A run's trajectory is its own measurements (source `sam-run`); `sam-measure`'s records look at a saved checkpoint
later and have no place on the training's time axis. Data only: plots.py draws it, writer.py writes it down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sam_runner.report.runs import Run, column_order, finite, own_measurements, record_columns
from sam_runner.report.stats import Group, Stat, summarize
from sam_runner.run.rundir import METRICS, UnreadableRecord

Series = dict[int, float | None]  # optimizer step -> value there (None: not recorded as a finite number)
LEARNING_METRICS = ("train/loss", "test/loss", "train/acc", "test/acc")  # eval-mode, on the epochs that evaluate


def measured_more_than_once(run: Run) -> bool:
    return len(own_measurements(run.summary)) > 1


def traced_runs(group: Group) -> list[Run]:
    """The group's completed runs measured more than once: the runs whose sharpness has a course to follow."""
    return [run for run in group.completed if measured_more_than_once(run)]


def sharpness_series(run: Run) -> dict[str, Series]:
    """Column (`lambda_max`, `worst@0.05`) -> its values by step over the run's own measurements; a later record at
    the same step wins, as it does for the sharpness columns."""
    series: dict[str, Series] = {}
    for entry in own_measurements(run.summary):
        if isinstance(entry.get("step"), int):
            for column, value in record_columns(entry).items():
                series.setdefault(column, {})[entry["step"]] = finite(value)
    return {column: series[column] for column in sorted(series, key=column_order)}


def read_metrics(run: Run) -> dict[str, Series]:
    """LEARNING_METRICS -> their values by step from the run's metrics.jsonl; a line without a key (a measurement
    between epoch ends, an epoch that did not evaluate) does not count for it.

    Raises UnreadableRecord when the file is missing or unreadable, or a line is not a JSON object with a step.
    """
    path = run.path / METRICS
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UnreadableRecord(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableRecord(f"{path} cannot be read: {error}") from None
    series: dict[str, Series] = {key: {} for key in LEARNING_METRICS}
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise UnreadableRecord(f"{path} cannot be read: line {number}: {error}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            raise UnreadableRecord(f"{path} cannot be read: line {number} is not a metrics record with a step")
        for key in LEARNING_METRICS:
            if key in entry:
                series[key][entry["step"]] = finite(entry[key])
    return series


@dataclass(frozen=True)
class Band:
    """A group's line: mean ± sample std over its runs at each step that every one of them has."""

    steps: list[int]
    stats: list[Stat]
    runs: int
    unshared: int  # steps some runs have and others lack: left out, so that every point averages the same seeds


def band(series: list[Series]) -> Band:
    """`series`: one per run, at least one. A step some run lacks is left out rather than averaged over fewer seeds,
    which would move the line where the seeds change, not where the measure does."""
    shared = sorted(set(series[0]).intersection(*series[1:]))
    unshared = len(set().union(*series)) - len(shared)
    return Band(shared, [summarize([points[step] for points in series]) for step in shared], len(series), unshared)


def relative_change(first: float, last: float) -> float | None:
    """(last − first) / |first|: −0.4 is a 40% reduction; undefined from zero."""
    return (last - first) / abs(first) if first != 0 else None


@dataclass(frozen=True)
class StartEnd:
    """A measure at each run's first and last measurement with a value of it, over the runs that have two such
    values, and the mean ± std of the runs' own relative changes (not the change of the means)."""

    first: Stat
    last: Stat
    change: Stat
    first_steps: list[int]
    last_steps: list[int]


def start_end(series: list[Series]) -> StartEnd:
    ends = []
    for points in series:
        known = [(step, value) for step, value in sorted(points.items()) if value is not None]
        if len(known) > 1:
            ends.append((known[0], known[-1]))
    return StartEnd(summarize([first for (_, first), _ in ends]), summarize([last for _, (_, last) in ends]),
                    summarize([relative_change(first, last) for (_, first), (_, last) in ends]),
                    sorted({step for (step, _), _ in ends}), sorted({step for _, (step, _) in ends}))


def start_end_table(group: Group) -> list[tuple[str, StartEnd]]:
    """(column, StartEnd) for every measure some traced run of the group has twice, in the measures' order."""
    series = [sharpness_series(run) for run in traced_runs(group)]
    columns = sorted({column for points in series for column in points}, key=column_order)
    rows = [(column, start_end([points[column] for points in series if column in points])) for column in columns]
    return [(column, row) for column, row in rows if row.first.n]
