"""Runs on disk -> rows: every summary.json under some directories, read into `Run`s, and the table of them.

Hydra prints that table when a `-m` sweep ends (`SweepTable`); `sam-report` (report_files.py) adds seed
statistics, rank correlations and plots on top. This module imports neither scipy nor matplotlib, so the
callback stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sam_runner.errors import SamRunnerError
from sam_runner.run.hyperparameters import HPARAM_KEYS, SAM_ONLY_KEYS
from sam_runner.run.rundir import SUMMARY, UnreadableRecord, read_record
from sam_runner.run.status import Status

# What a run produced (besides sharpness, status and error).
OUTCOME_KEYS = ("train_acc", "test_acc", "train_loss", "test_loss", "gap_acc", "gap_loss", "val_acc", "val_loss",
                "epochs_completed", "steps_completed", "target_reached", "target_epoch", "target_step", "at_chance",
                "wall_time_s", "train_time_s", "eval_time_s", "checkpoint_time_s", "sharpness_time_s")
# Sharpness measures (sharpness.MEASURES, in its order) split by whether their value depends on the radius rho:
# those that do become one column per radius (`worst@0.05`), so measurements at different radii stay apart.
RADIUS_FREE_MEASURES = ("lambda_max", "trace", "keskar", "alignment")
RADIUS_MEASURES = ("worst", "ascent", "average")
MEASURE_ORDER = ("lambda_max", "trace", "worst", "ascent", "average", "keskar", "alignment")
# Order of the status counts ("3 completed, 1 failed"); a status not listed here follows them.
STATUS_ORDER = (*Status, "unreadable", "unknown")  # and what a report says of a run without a readable status
SWEEP_TABLE_WIDTH = 120  # characters; a wider sweep table prints its sharpness columns as a second table


class ReportError(SamRunnerError):
    """Some paths given to sam-report hold no run; `problems` has one line per path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Run:
    """One run directory: its summary.json as written, and its sharpness columns."""

    name: str  # short and unique among the runs read together: job numbers instead of override lists
    path: Path
    summary: dict[str, Any]
    sharpness: dict[str, float | None] = field(init=False)

    def __post_init__(self) -> None:
        self.sharpness = sharpness_columns(self.summary)

    def get(self, key: str) -> Any:
        """A summary value; a key an older run or a run that failed early does not have reads as None."""
        return self.summary.get(key)

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or "unknown")

    @property
    def completed(self) -> bool:
        """Only completed runs enter means and correlations; the others are listed and counted."""
        return self.status == Status.COMPLETED

    @property
    def seconds_per_step(self) -> float | None:
        """Training seconds per optimizer step (train_time_s / steps_completed: no evaluation, measurement or
        checkpoint in it): what an optimizer costs, comparable between runs of one batch size on one machine."""
        seconds, steps = finite(self.get("train_time_s")), finite(self.get("steps_completed"))
        return seconds / steps if seconds is not None and steps else None


def finite(value: Any) -> float | None:
    """A number usable in statistics: None for missing, non-numeric, boolean, NaN and infinite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def radius_column(measure: str, rho: Any) -> str:
    """`worst@0.05` for a radius-dependent measure at a known radius, the bare name otherwise."""
    if measure in RADIUS_MEASURES and finite(rho) is not None:
        return f"{measure}@{rho:g}"
    return measure


def measurements(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """summary.json's measurement records, in the order they were taken."""
    return [entry for entry in summary.get("measurements") or [] if isinstance(entry, dict)]


def own_measurements(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's own measurements (source `sam-run`), taken while it trained: its sharpness over training.
    `sam-measure`'s records are later looks at a saved checkpoint."""
    return [entry for entry in measurements(summary) if entry.get("source") == "sam-run"]


def record_columns(entry: dict[str, Any]) -> dict[str, Any]:
    """Column -> value of one measurement record: the measures only (no `trace_stderr`), named by their radius."""
    return {radius_column(measure, entry.get("rho")): value for measure, value in (entry.get("values") or {}).items()
            if measure in MEASURE_ORDER}


def sharpness_columns(summary: dict[str, Any]) -> dict[str, float | None]:
    """Column -> value from `measurements` (the later entry wins a column), else from the `sharpness` dict.

    An older summary has only `sharpness`; its radius is that of the run's own measurement when one is listed,
    otherwise unknown (bare names).
    """
    columns: dict[str, float | None] = {}
    for entry in measurements(summary):
        columns.update(record_columns(entry))
    own = own_measurements(summary)
    own_rho = own[-1].get("rho") if own else None
    for measure, value in (summary.get("sharpness") or {}).items():
        column = radius_column(measure, own_rho)
        if measure in MEASURE_ORDER and column not in columns:
            columns[column] = value
    return columns


def column_order(column: str) -> tuple[int, float]:
    """Measures in sharpness.MEASURES order; a measure's radii ascending, the unknown radius first."""
    measure, _, rho = column.partition("@")
    return MEASURE_ORDER.index(measure), float(rho) if rho else -math.inf


def measured_columns(runs: list[Run]) -> list[str]:
    return sorted({column for run in runs for column in run.sharpness}, key=column_order)


# A SAM variant's own hyper-parameters in its label, in this order, each where summary.json records it (a number).
VARIANT_LABELS = (("gsam_alpha", "α"), ("fsam_sigma", "σ"), ("fsam_lambda", "λ"), ("looksam_k", "k"),
                  ("looksam_alpha", "α"), ("esam_beta", "β"), ("esam_gamma", "γ"))


def optimizer_label(summary: dict[str, Any], with_rho: bool = False) -> str:
    """What ran: `sam`, `sam(adamw)`, with `with_rho` `sam ρ=0.05` (SGD is SAM's default base, so it is not spelt
    out); a plain optimizer (no rho) is its base optimizer, which is what steps (`optimizer=sgd
    optimizer/base=adamw` is `adamw`). A SAM variant adds its own hyper-parameters: GSAM's α (`gsam(adamw) α=0.4`),
    F-SAM's σ and λ (`fsam σ=1 λ=0.6`), LookSAM's k and α (`looksam k=5 α=0.7`), ESAM's β and γ (`esam β=0.5
    γ=0.5`) and, when ρ follows the lr schedule, `ρ∝lr` (with ρ_min when it is not 0)."""
    name = str(summary.get("optimizer") or "?")
    base = summary.get("base_optimizer")
    rho = finite(summary.get("rho"))
    if summary.get("rho") is None:
        return str(base or name)
    label = f"{name}({base})" if base not in (None, name, "sgd") else name
    if with_rho and rho is not None:
        label = f"{label} ρ={rho:g}"
    for key, symbol in VARIANT_LABELS:
        value = finite(summary.get(key))
        if value is not None:
            label = f"{label} {symbol}={value:g}"
    if summary.get("rho_schedule") == "lr":  # ρ follows the lr: ρ_min at lr 0 when it is not 0
        rho_min = finite(summary.get("rho_min"))
        label = f"{label} ρ∝lr" + (f" ρ_min={rho_min:g}" if rho_min else "")
    return label


def _short_name(relative: Path) -> str:
    """Hydra names a sweep's runs `<job number>_<overrides>`: the job number alone tells them apart."""
    return "/".join(re.sub(r"^(\d+)_.*$", r"\1", part) for part in relative.parts)


def _job_order(relative: Path) -> list[tuple[int, int, str]]:
    """Sort key: job 2 before job 10, at every level of nesting."""
    return [(0, int(match.group(1)), part) if (match := re.match(r"^(\d+)(_|$)", part)) else (1, 0, part)
            for part in relative.parts]


def _read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json; an unreadable one reads as status `unreadable`, so its run is listed, not lost."""
    try:
        return read_record(run_dir, SUMMARY)
    except UnreadableRecord as error:
        return {"status": "unreadable", "error": str(error)}


def _run_dirs(path: Path, skip: Path | None) -> list[Path]:
    """Directories holding a summary.json at or below `path` (a run's own subdirectories are not searched)."""
    found = []
    for directory, subdirectories, files in os.walk(path):
        here = Path(directory)
        if SUMMARY in files:
            found.append(here.resolve())
            subdirectories.clear()
        subdirectories[:] = [name for name in subdirectories if skip is None or (here / name).resolve() != skip]
    return found


def _names(relatives: list[Path]) -> list[str]:
    """Short run names (job numbers) when they are unique, the relative paths otherwise."""
    short = [_short_name(relative) for relative in relatives]
    return short if len(set(short)) == len(short) else [str(relative) for relative in relatives]


def find_runs(paths: list[Path], skip: Path | None = None) -> list[Run]:
    """Every run under the given sweep or run directories, in job order; `skip` (the report's own folder) is not read.

    Raises ReportError naming every path that is missing or holds no summary.json.
    """
    skip = skip.resolve() if skip is not None else None
    problems, run_dirs = [], set()
    for path in paths:
        if not path.is_dir():
            problems.append(f"{path}: {'not a directory' if path.exists() else 'no such directory'} (give a sweep or "
                            "run directory written by sam-run)")
            continue
        found = _run_dirs(path, skip)
        if not found:
            problems.append(f"{path}: no summary.json in it or below it (give a sweep or run directory written "
                            "by sam-run)")
        run_dirs.update(found)
    if problems:
        raise ReportError(problems)
    # Names are relative to the directories the user named; a run directory named itself is called by its name.
    root = Path(os.path.commonpath([path.resolve() for path in paths]))
    entries = sorted(((run_dir, run_dir.relative_to(root) if run_dir != root else Path(run_dir.name))
                      for run_dir in run_dirs), key=lambda entry: _job_order(entry[1]))
    names = _names([relative for _, relative in entries])
    return [Run(name, run_dir, _read_summary(run_dir)) for name, (run_dir, _) in zip(names, entries)]


def collect(sweep_dir: Path) -> list[Run]:
    """The runs of one sweep directory, in job order (none when no job got as far as writing its summary)."""
    try:
        return find_runs([sweep_dir])
    except ReportError:
        return []


# -- the run table -------------------------------------------------------------------------------------------------

# Shown for every run, varying or not: what a reader needs to place a number. `optimizer` is the label with its base.
ALWAYS_SHOWN = ("lr", "batch_size", "optimizer", "rho")
# Shown when they differ between runs: the other hyper-parameters (base_optimizer is in the optimizer label; the
# protocol is a sentence, printed above the table).
SOMETIMES_SHOWN = tuple(key for key in HPARAM_KEYS if key not in (*ALWAYS_SHOWN, "base_optimizer", "protocol"))
METRIC_COLUMNS = ("train_loss", "train_acc", "test_acc", "gap_acc", "gap_loss")


def format_setting(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def format_metric(value: Any) -> str:
    """Accuracies, losses and gaps: four decimals (a tenth of a test sample on a 1000-sample test set)."""
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def format_measure(value: Any) -> str:
    """Sharpness values span orders of magnitude: four significant digits, whole numbers from 1000 up (no
    exponent for step counts and large traces)."""
    if not isinstance(value, float):
        return "-" if value is None else str(value)
    return f"{value:.0f}" if math.isfinite(value) and abs(value) >= 1000 else f"{value:.4g}"


def status_label(run: Run) -> str:
    return f"{run.status} (at chance)" if run.get("at_chance") else run.status


def target_label(run: Run) -> str:
    """The epoch where the stopping target was reached, `no` when it never was, `-` when there was none."""
    reached = run.get("target_reached")
    if reached is None:
        return "-"
    return format_setting(run.get("target_epoch")) if reached else "no"


def varying_keys(summaries: list[dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
    """The keys whose values differ; a SAM-only option varies only when it differs between SAM runs (plain
    optimizers record it as null)."""
    sam_runs = [summary for summary in summaries if summary.get("rho") is not None]

    def differs(key: str) -> bool:
        among = sam_runs if key in SAM_ONLY_KEYS else summaries
        return len({json.dumps(summary.get(key), sort_keys=True) for summary in among}) > 1

    return [key for key in keys if differs(key)]


def setting_columns(summaries: list[dict[str, Any]]) -> list[str]:
    """The settings a table shows: those in ALWAYS_SHOWN, then the other hyper-parameters that vary."""
    return [*ALWAYS_SHOWN, *varying_keys(summaries, SOMETIMES_SHOWN)]


def setting_cell(summary: dict[str, Any], key: str) -> str:
    return optimizer_label(summary) if key == "optimizer" else format_setting(summary.get(key))


def has_target(runs: list[Run]) -> bool:
    return any(run.get("target_reached") is not None for run in runs)


def run_table(runs: list[Run]) -> tuple[list[str], list[list[str]], int]:
    """Header and rows of the per-run table, and the index of its first sharpness column."""
    settings = setting_columns([run.summary for run in runs])
    metrics = [*METRIC_COLUMNS, *(["val_acc"] if any(run.get("val_acc") is not None for run in runs) else [])]
    measures = measured_columns(runs)
    tail = [*(["target"] if has_target(runs) else []), "status"]
    header = ["run", *settings, *metrics, *tail, *measures]
    rows = [[run.name, *(setting_cell(run.summary, key) for key in settings),
             *(format_metric(run.get(key)) for key in metrics),
             *([target_label(run)] if has_target(runs) else []), status_label(run),
             *(format_measure(run.sharpness.get(column)) for column in measures)] for run in runs]
    return header, rows, len(header) - len(measures)


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def protocols(runs: list[Run]) -> list[str | None]:
    """The comparison protocols of the runs, in order of first appearance (None: not recorded)."""
    return list(dict.fromkeys(run.get("protocol") for run in runs))


def error_notes(runs: list[Run]) -> list[str]:
    return [f"run {run.name}: {run.get('error')}" for run in runs if run.get("error")]


def format_table(runs: list[Run]) -> str:
    """The per-run table as plain text; when it is wider than SWEEP_TABLE_WIDTH the sharpness columns follow
    as a second table keyed by run."""
    header, rows, first_measure = run_table(runs)
    lines = text_table(header, rows)
    if max(map(len, lines)) > SWEEP_TABLE_WIDTH and first_measure < len(header):
        lines = [*text_table(header[:first_measure], [row[:first_measure] for row in rows]), "",
                 *text_table([header[0], *header[first_measure:]], [[row[0], *row[first_measure:]] for row in rows])]
    named = [f"protocol: {protocol}" for protocol in protocols(runs) if protocol is not None]
    return "\n".join([*named, *lines, *error_notes(runs)])




class SweepTable(Callback):
    """Prints the table of a sweep's runs once every job has finished, whichever launcher ran them (Hydra calls it
    in the launching process)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        show_sweep_table(Path(config.hydra.sweep.dir))


def show_sweep_table(sweep_dir: Path, leaving_out: Path | None = None) -> None:
    """Print the table of the runs under `sweep_dir` (also when a stop request ends a sweep early), without the
    directory `leaving_out` (a job that did not start there: what it holds is not that job's)."""
    runs = collect(sweep_dir) if sweep_dir.is_dir() else []
    runs = [run for run in runs if leaving_out is None or run.path != leaving_out.resolve()]
    if runs:
        print(f"\nsweep {sweep_dir} ({len(runs)} runs)\n{format_table(runs)}\n"
              f"seeds aggregated (mean ± std), Kendall's τ and plots: sam-report {sweep_dir}", flush=True)
