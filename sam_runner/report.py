"""Sweep results -> a table: printed when a `-m` sweep ends (a Hydra callback), read from each run's summary.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sam_runner.logbook import read_summary

METRIC_COLUMNS = ("train_acc", "test_acc", "gap_acc", "gap_loss")
# Sharpness measures shown when at least one run has them (summary.json's "sharpness" dict).
SHARPNESS_COLUMNS = ("lambda_max", "trace", "worst")
# Hyper-parameters shown when they differ between the runs of a sweep (optimizer is always shown).
HPARAM_COLUMNS = ("optimizer", "base_optimizer", "rho", "lr", "batch_size", "micro_batch_size", "dataset", "model",
                  "scheduler", "epochs", "label_smoothing", "seed")


def collect(sweep_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(run directory name, summary) for every run under a sweep directory, in job order."""
    def job_number(path: Path) -> tuple[int, str]:
        head = path.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else math.inf, path.name)  # type: ignore[return-value]

    runs = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=job_number):
        summary = read_summary(run_dir)
        if summary is not None:
            runs.append((run_dir.name.split("_", 1)[0], summary))
    return runs


def _metric(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _setting(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def format_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table: the hyper-parameters that vary, the final metrics, and each run's status."""
    varying = [key for key in HPARAM_COLUMNS
               if key == "optimizer" or len({repr(summary.get(key)) for _, summary in runs}) > 1]
    measured = [key for key in SHARPNESS_COLUMNS if any(key in summary.get("sharpness", {}) for _, summary in runs)]
    header = ["run", *varying, *METRIC_COLUMNS, *measured, "status"]
    rows = [[name, *(_setting(summary.get(key)) for key in varying),
             *(_metric(summary.get(key)) for key in METRIC_COLUMNS),
             *(_metric(summary.get("sharpness", {}).get(key)) for key in measured),
             summary.get("status", "?")] for name, summary in runs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    notes = [f"run {name}: {summary['error']}" for name, summary in runs if summary.get("error")]
    return "\n".join([*lines, *notes])


class SweepTable(Callback):
    """Prints the table of a sweep's runs once every job has finished, whichever launcher ran them."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect(sweep_dir) if sweep_dir.is_dir() else []
        if runs:
            print(f"\nsweep {sweep_dir} ({len(runs)} runs)\n{format_table(runs)}", flush=True)
