"""`sam-report`: the runs under some directories -> report.md, runs.csv, groups.csv and PNG plots.

Everything is split by comparison protocol (summary.json's `protocol`): a number is only ever compared, averaged
or correlated with numbers from the same protocol, and every table sits under its protocol's heading.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam_runner.errors import SamRunnerError
from sam_runner.report import plots as report_plots
from sam_runner.report import trajectories
from sam_runner.report.runs import (
    OUTCOME_KEYS,
    ReportError,
    Run,
    column_order,
    error_notes,
    find_runs,
    finite,
    format_measure,
    format_metric,
    has_target,
    markdown_table,
    measured_columns,
    optimizer_label,
    protocols,
    run_table,
    setting_cell,
    setting_columns,
)
from sam_runner.report.stats import (
    GROUP_METRICS,
    TARGET_METRICS,
    Correlation,
    Group,
    Stat,
    batch_sizes,
    correlations,
    group_runs,
)
from sam_runner.run.hyperparameters import GROUP_KEYS, HPARAM_KEYS
from sam_runner.run.rundir import CHECKPOINT, UnreadableRecord

ACCURACY_LIKE = (*GROUP_METRICS, "test_loss", "val_loss")  # formatted with four decimals, the rest with 4 digits
NESTED_KEYS = ("sharpness", "measurements")  # their values are in the sharpness columns


@dataclass
class Report:
    """What `sam-report` produced: the markdown (also printed) and every file written."""

    markdown: str
    files: list[Path]


def _stat_cell(stat: Stat, key: str, n_completed: int, number: Callable[[float], str] | None = None) -> str:
    """`0.9123 ± 0.0130`; the std is left out for one value; `(n=2)` when some completed runs lack the value.
    `number` formats mean and std (default: by `key`, accuracies and losses with four decimals)."""
    if stat.mean is None:
        return ""
    number = number or (format_metric if key in ACCURACY_LIKE else format_measure)
    text = number(stat.mean) + (f" ± {number(stat.std)}" if stat.std is not None else "")
    return text + (f" (n={stat.n})" if stat.n < n_completed else "")


def _group_table(groups: list[Group], columns: list[str]) -> tuple[list[str], list[list[str]]]:
    """Settings, run counts and mean ± std of every statistic some group has a value for (val_acc only with a
    validation split, target columns only with a stopping target)."""
    settings = setting_columns([group.settings for group in groups])
    targets = has_target([run for group in groups for run in group.runs])
    values = [group.statistics(columns) for group in groups]
    statistics = [key for key in values[0] if any(stats[key].n for stats in values)]
    header = [*settings, "runs", "n", *statistics, *(["reached"] if targets else [])]
    rows = []
    for group, stats in zip(groups, values):
        n = len(group.completed)
        reached, with_target = group.targets()
        rows.append([*(setting_cell(group.settings, key) for key in settings), group.status_counts(), str(n),
                     *(_stat_cell(stats[key], key, n) for key in statistics),
                     *([f"{reached}/{with_target}"] if targets else [])])
    return header, rows


def _tau_table(found: list[Correlation]) -> tuple[list[str], list[list[str]]]:
    sizes = list(found[0].by_batch_size) if found else []
    header = ["measure", "gap", "all runs", *(f"batch {size}" for size in sizes),
              *(["mean over batch sizes"] if sizes else [])]
    rows = [[item.column, item.gap, item.overall.text(), *(item.by_batch_size[size].text() for size in sizes),
             *([f"{item.granulated:+.2f} ({item.granulated_groups} of {len(sizes)} sizes)"
                if item.granulated is not None else ""]
               if sizes else [])] for item in found]
    return header, rows


def _plots(runs: list[Run], groups: list[Group], found: list[Correlation], out_dir: Path, prefix: str,
           title: str) -> list[Path]:
    completed = [run for run in runs if run.completed]
    written = []
    if len(batch_sizes(completed)) > 1:
        written += report_plots.versus_batch_size(groups, out_dir, prefix, title)
    if len({finite(run.get("rho")) for run in completed} - {None}) > 1:
        written.append(report_plots.versus_rho(groups, out_dir, prefix, title))
    written += [report_plots.sharpness_versus_gap(runs, item, out_dir, prefix, title)
                for item in found if item.gap == "gap_acc" and item.overall.n > 0]
    if _compares_cost(groups):
        written.append(report_plots.versus_cost(groups, out_dir, prefix, title))
    return written


def _compares_cost(groups: list[Group]) -> bool:
    """Whether the groups compare optimizers at one batch size, each with its training seconds per step: then
    accuracy and gap against that cost is the plot to choose an optimizer by."""
    timed = [group for group in groups if group.seconds_per_step().mean is not None]
    return (len({optimizer_label(group.settings, with_rho=True) for group in timed}) > 1
            and len({group.settings["batch_size"] for group in timed}) == 1)


# differ between the two runs of a pair (accumulate: a large batch may need micro-batches where a small one does not)
BATCH_DEPENDENT_KEYS = ("batch_size", "accumulate", "lr", "steps_budget", "epochs")


def flatness_pair(runs: list[Run]) -> tuple[Run, Run] | None:
    """The small- and large-batch runs to picture: the smallest and largest batch size of one setting and seed —
    a plain optimizer first, then the largest batch-size ratio, then the lowest seed — both completed with a
    checkpoint; None without such a pair."""
    same_setting: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.completed and run.get("batch_size") is not None and (run.path / CHECKPOINT).is_file():
            setting = [run.get(key) for key in (*GROUP_KEYS, "seed") if key not in BATCH_DEPENDENT_KEYS]
            same_setting[json.dumps(setting, default=str)].append(run)
    pairs = [(min(group, key=lambda run: run.get("batch_size")), max(group, key=lambda run: run.get("batch_size")))
             for group in same_setting.values()]
    pairs = [(small, large) for small, large in pairs if large.get("batch_size") > small.get("batch_size")]
    if not pairs:
        return None
    return min(pairs, key=lambda pair: (pair[0].get("rho") is not None,
                                        -pair[1].get("batch_size") / pair[0].get("batch_size"), pair[0].get("seed")))


def _flatness_section(runs: list[Run], out_dir: Path) -> tuple[list[str], list[Path]]:
    """Keskar's interpolation between one small/large-batch pair, and both along a filter-normalized direction."""
    from sam_runner.report import landscape  # loads torch: only when a report pictures checkpoints

    pair = flatness_pair(runs)
    if pair is None:
        return [], []
    small, large = pair
    drawings = {"interpolation": lambda: landscape.interpolation(small.path, large.path, out_dir),
                "direction": lambda: landscape.directions([small.path, large.path], out_dir)}
    written, skipped = [], []
    for name, draw in drawings.items():
        try:
            written += draw()
        except SamRunnerError as error:  # a corrupt checkpoint costs this picture, not the report
            skipped.append(f"The {name} picture was skipped: {error}")
            warnings.warn(skipped[-1], RuntimeWarning, stacklevel=2)
    pictures = [path for path in written if path.suffix == ".png"]
    lines = ["### Pictures of flatness", "",
             f"Runs `{small.name}` (batch {small.get('batch_size')}, α = 0) and `{large.name}` "
             f"(batch {large.get('batch_size')}, α = 1), {optimizer_label(small.summary, with_rho=True)}, seed "
             f"{small.get('seed')}: Keskar's interpolation w(α) = α·w_large + (1 − α)·w_small, and the loss along one "
             "filter-normalized random direction (docs/landscape.md).", "",
             *(f"![{path.stem}]({path.relative_to(out_dir.parent).as_posix()})" for path in pictures),
             *(f"- {note}" for note in skipped), ""]
    return lines, written


def _images(paths: list[Path]) -> list[str]:
    return [f"![{path.stem}]({path.name})" for path in paths]


def _percent(value: float) -> str:
    return f"{format_measure(100 * value)}%"


class _Bands:
    """The groups' lines of each quantity drawn over training, and what to say of groups whose runs were recorded
    at different steps (one note per group and count, naming the quantities)."""

    def __init__(self) -> None:
        self.lines: dict[str, list[tuple[str, trajectories.Band]]] = defaultdict(list)
        self._unshared: dict[tuple[str, int, int, int], list[str]] = defaultdict(list)

    def add(self, quantity: str, label: str, series: list[trajectories.Series]) -> None:
        band = trajectories.band(series)
        if band.steps:  # no step that all the runs have: no line, and the note says so
            self.lines[quantity].append((label, band))
        if band.unshared:
            self._unshared[label, band.runs, len(band.steps), band.unshared].append(quantity)

    def notes(self) -> list[str]:
        return [f"- {label} ({', '.join(quantities)}): its {runs} runs were not recorded at the same steps; the line "
                f"uses the {shared} steps all of them have ({unshared} left out)."
                for (label, runs, shared, unshared), quantities in self._unshared.items()]


def _learning_curves(groups: list[Group], labels: list[str], colours: dict[str, Any], out_dir: Path, prefix: str,
                     title: str) -> tuple[list[str], list[Path]]:
    """Loss and accuracy against the step from the completed runs' metrics.jsonl; a run whose file is missing or
    unreadable is left out and named (it costs its curves, not the report)."""
    bands, unreadable = _Bands(), []
    for group, label in zip(groups, labels):
        readable = []
        for run in group.completed:
            try:
                readable.append(trajectories.read_metrics(run))
            except UnreadableRecord as error:
                unreadable.append(f"- run {run.name}: {error}; left out of the learning curves.")
        for key in trajectories.LEARNING_METRICS:
            if series := [points[key] for points in readable if points[key]]:
                bands.add(key, label, series)
    plots = [report_plots.learning_curves(bands.lines, colours, out_dir, prefix, title)] if bands.lines else []
    text = ["### Learning curves", "",
            "Train and test loss and accuracy (eval-mode passes, metrics.jsonl) against the optimizer step: a colour "
            "per group, train solid and test dashed; the mean over the group's completed runs with a ± one sample "
            "std band; a log scale where the values span a factor of 20.", "",
            *_images(plots), *unreadable, *bands.notes(), ""]
    return text, plots


def _sharpness_over_training(groups: list[Group], labels: list[str], colours: dict[str, Any], out_dir: Path,
                             prefix: str, title: str) -> tuple[list[str], list[Path]]:
    """Each measure against the step, a line per group over its runs measured more than once, and the table of
    each measure at the first and last measurement with its relative change."""
    series = [[trajectories.sharpness_series(run) for run in trajectories.traced_runs(group)] for group in groups]
    columns = sorted({column for runs in series for points in runs for column in points}, key=column_order)
    bands = _Bands()
    for column in columns:
        for label, runs in zip(labels, series):
            if having := [points[column] for points in runs if column in points]:
                bands.add(column, label, having)
    plots = [report_plots.over_training(bands.lines[column], colours, column, out_dir, prefix, title)
             for column in columns if bands.lines[column]]
    rows = [[label, column, str(row.first.n),
             f"{', '.join(map(str, row.first_steps))} → {', '.join(map(str, row.last_steps))}",
             _stat_cell(row.first, column, row.first.n), _stat_cell(row.last, column, row.first.n),
             _stat_cell(row.change, column, row.first.n, _percent)]
            for group, label in zip(groups, labels) for column, row in trajectories.start_end_table(group)]
    text = ["### Sharpness over training", "",
            "Each measure at the runs' own measurements during training (`sharpness.every`, "
            "`sharpness.every_steps`, and at the end) against the optimizer step: a line per group, the mean over its "
            "completed runs measured more than once with a ± one sample std band; a log scale where the values span "
            "a factor of 20.", "", *_images(plots), *bands.notes(), "",
            "Each measure at a run's first and last measurement (`steps`) and its relative change (last − first) / "
            "|first|: mean ± sample std over the `n` runs, the change averaged over each run's own (trajectories.csv "
            "has the same).", "", *markdown_table(["group", "measure", "n", "steps", "first", "last", "change"], rows),
            ""]
    return text, plots


def _over_training_section(groups: list[Group], out_dir: Path, prefix: str, title: str
                           ) -> tuple[list[str], list[Path]]:
    """Learning curves and sharpness over training, when some completed run was measured more than once; nothing
    otherwise, so a report of runs measured once stays as it was."""
    if not any(trajectories.traced_runs(group) for group in groups):
        return [], []
    groups = [group for group in groups if group.completed]  # not a sweep's duplicates: they would label the rest
    labels = report_plots.group_labels(groups)
    colours = report_plots.palette(labels)
    curves, curve_plots = _learning_curves(groups, labels, colours, out_dir, prefix, title)
    sharpness, sharpness_plots = _sharpness_over_training(groups, labels, colours, out_dir, prefix, title)
    return [*curves, *sharpness], [*curve_plots, *sharpness_plots]


def _protocol_section(runs: list[Run], protocol: str | None, prefix: str, out_dir: Path, pictures: bool
                      ) -> tuple[list[str], list[Path]]:
    groups = group_runs(runs)
    columns = measured_columns([run for run in runs if run.completed])
    found = correlations(runs)
    title = f"protocol: {protocol}" if protocol is not None else "protocol not recorded"
    plots = _plots(runs, groups, found, out_dir, prefix, title)
    lines = [f"## {title[0].upper()}{title[1:]}", "", "### Groups (runs that differ only by seed)", "",
             "Mean ± sample standard deviation over the completed runs of a group; `n` counts them, `(n=k)` marks a "
             "value that fewer runs recorded.", "", *markdown_table(*_group_table(groups, columns)), ""]
    lines += ["### Kendall's τ between sharpness and the generalization gap", ""]
    if found:
        lines += ["τ-b over completed runs (positive: sharper runs have larger gaps); blank below 3 runs.", "",
                  *markdown_table(*_tau_table(found)), ""]
    else:
        lines += ["No completed run has a sharpness measurement.", ""]
    if plots:
        lines += ["### Plots", "", *_images(plots), ""]
    over_training, written = _over_training_section(groups, out_dir, prefix, title)
    lines += over_training
    plots += written
    if pictures:
        flatness, written = _flatness_section(runs, out_dir / f"{prefix}flatness")
        lines += flatness
        plots += written
    header, rows, _ = run_table(runs)
    lines += ["### Runs", "", *markdown_table(header, rows), ""]
    notes = error_notes(runs)
    lines += [*(f"- {note}" for note in notes), *([""] if notes else [])]
    return lines, plots


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else repr(value)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[_csv_cell(value) for value in row] for row in rows])
    return path


def _runs_csv(runs: list[Run], path: Path) -> Path:
    """One row per run: every hyper-parameter, outcome and sharpness column, status and error; keys this
    version does not know follow at the end rather than being dropped."""
    known = {*HPARAM_KEYS, *OUTCOME_KEYS, *NESTED_KEYS, "status", "error"}
    extra = sorted({key for run in runs for key in run.summary} - known)
    columns = measured_columns(runs)
    header = ["run", "path", "status", *HPARAM_KEYS, "optimizer_label", *OUTCOME_KEYS, *columns, *extra, "error"]
    rows = [[run.name, str(run.path), run.status, *(run.get(key) for key in HPARAM_KEYS),
             optimizer_label(run.summary, with_rho=True), *(run.get(key) for key in OUTCOME_KEYS),
             *(run.sharpness.get(column) for column in columns), *(run.get(key) for key in extra), run.get("error")]
            for run in runs]
    return _write_csv(path, header, rows)


def _groups_csv(groups: list[Group], path: Path) -> Path:
    columns = measured_columns([run for group in groups for run in group.completed])
    statistics = [*GROUP_METRICS, *columns, *TARGET_METRICS, "wall_time_s", "train_s_per_step"]
    header = [*GROUP_KEYS, "optimizer_label", "runs", "seeds", "n_completed", "n_at_chance", "target_reached",
              "target_set", *(f"{key}_{part}" for key in statistics for part in ("mean", "std", "n"))]
    rows = []
    for group in groups:
        values = group.statistics(columns)
        reached, with_target = group.targets()
        rows.append([*(group.settings[key] for key in GROUP_KEYS), optimizer_label(group.settings, with_rho=True),
                     group.status_counts(), " ".join(map(_csv_cell, group.seeds())), len(group.completed),
                     sum(1 for run in group.runs if run.get("at_chance")), reached, with_target,
                     *(getattr(values[key], part) for key in statistics for part in ("mean", "std", "n"))])
    return _write_csv(path, header, rows)


TRAJECTORY_STATISTICS = ("first", "last", "change")


def _trajectories_csv(groups: list[Group], path: Path) -> Path | None:
    """One row per group and measure of the start/end table (None: no run was measured more than once)."""
    header = [*GROUP_KEYS, "optimizer_label", "measure", "first_steps", "last_steps",
              *(f"{key}_{part}" for key in TRAJECTORY_STATISTICS for part in ("mean", "std", "n"))]
    rows = [[*(group.settings[key] for key in GROUP_KEYS), optimizer_label(group.settings, with_rho=True), column,
             " ".join(map(str, row.first_steps)), " ".join(map(str, row.last_steps)),
             *(getattr(getattr(row, key), part) for key in TRAJECTORY_STATISTICS for part in ("mean", "std", "n"))]
            for group in groups for column, row in trajectories.start_end_table(group)]
    return _write_csv(path, header, rows) if rows else None


def _write(runs: list[Run], paths: list[Path], out_dir: Path, pictures: bool) -> Report:
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = Counter(run.status for run in runs)
    found = protocols(runs)
    lines = ["# sam-report", "", f"{len(runs)} runs read from {', '.join(f'`{path}`' for path in paths)} "
             f"({', '.join(f'{n} {status}' for status, n in counts.most_common())}). Only completed runs enter means, "
             "standard deviations and τ; every other run is listed and counted.", ""]
    if len(found) > 1:
        lines += ["Protocols (numbers are compared only within one):", "",
                  *(f"- {protocol if protocol is not None else 'not recorded'}" for protocol in found), ""]
    plots = []
    for index, protocol in enumerate(found, start=1):
        section, written = _protocol_section([run for run in runs if run.get("protocol") == protocol], protocol,
                                             f"p{index}_" if len(found) > 1 else "", out_dir, pictures)
        lines += section
        plots += written
    markdown = "\n".join(lines)
    (out_dir / "report.md").write_text(markdown)
    groups = group_runs(runs)
    over_training = _trajectories_csv(groups, out_dir / "trajectories.csv")
    return Report(markdown, [out_dir / "report.md", _runs_csv(runs, out_dir / "runs.csv"),
                             _groups_csv(groups, out_dir / "groups.csv"), *([over_training] if over_training else []),
                             *plots])


def write_report(paths: list[Path], out_dir: Path | None = None, *, pictures: bool = True) -> Report:
    """Read every run under `paths` and write the report into `out_dir` (default: `<first path>/report`).

    `pictures`: also draw the flatness pictures of one small/large-batch pair from their checkpoints.

    Raises ReportError for paths without runs and for an output directory that cannot be written.
    """
    out_dir = out_dir if out_dir is not None else paths[0] / "report"
    runs = find_runs(paths, skip=out_dir)
    try:
        return _write(runs, paths, out_dir, pictures)
    except OSError as error:
        raise ReportError([f"cannot write the report into {out_dir}: {error.strerror or error}; choose another "
                           "--out"]) from None
