"""sam-report's PNG plots (matplotlib, Agg: no display needed): accuracy and gap against batch size, against
rho and against the training time per step, with error bars over seeds, each sharpness column against the accuracy
gap with its Kendall τ, and the groups' courses over training (learning curves, each measure against the step) with
± std bands."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, also on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from sam_runner.report.runs import Run, finite, format_setting, optimizer_label, varying_keys  # noqa: E402
from sam_runner.report.stats import Correlation, Group, summarize  # noqa: E402
from sam_runner.report.trajectories import Band  # noqa: E402
from sam_runner.run.hyperparameters import GROUP_KEYS  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LOG_RANGE = 20  # a positive axis spanning at least this ratio (max / min) is drawn on a log scale
# In the optimizer label already: not repeated in a legend.
LABELLED = ("optimizer", "base_optimizer", "rho")


def _hidden(settings: dict[str, Any], x_key: str | None) -> set[str | None]:
    """The x variable, and for batch size what follows from it under the run's own rules (so a line across batch
    sizes holds together): the effective lr when the configured one is recorded, and the budget that is not
    binding."""
    if x_key != "batch_size":
        return {x_key}
    hidden = {"batch_size"}
    if settings.get("lr_base") is not None:
        hidden.add("lr")
    if settings.get("budget") in ("steps", "epochs"):
        hidden.add("epochs" if settings["budget"] == "steps" else "steps_budget")
    return hidden


def _lines(groups: list[Group], x_key: str | None) -> list[tuple[str, list[Group]]]:
    """Groups joined into lines that differ only in `x_key` (None: a line per group), each labelled by its
    optimizer and, where lines share that label, by the settings that tell them apart (`sgd · lr_scaling=sqrt`)."""
    lines: dict[str, list[Group]] = {}
    for group in groups:
        hidden = _hidden(group.settings, x_key)
        identity = json.dumps({key: value for key, value in group.settings.items() if key not in hidden},
                              sort_keys=True)
        lines.setdefault(identity, []).append(group)
    firsts = [members[0].settings for members in lines.values()]
    labels = [optimizer_label(settings, with_rho=x_key != "rho") for settings in firsts]
    ignore = set(LABELLED).union(*(_hidden(settings, x_key) for settings in firsts))
    candidates = tuple(key for key in GROUP_KEYS if key not in ignore)
    labelled = []
    for settings, label, members in zip(firsts, labels, lines.values()):
        namesakes = [other for other, other_label in zip(firsts, labels) if other_label == label]
        extra = ", ".join(f"{key}={format_setting(settings.get(key))}" for key in varying_keys(namesakes, candidates))
        labelled.append((f"{label} · {extra}" if extra else label, members))
    return labelled


def group_labels(groups: list[Group]) -> list[str]:
    """Each group's label in legends and tables over training: its optimizer with ρ, and what tells it apart."""
    return [label for label, _ in _lines(groups, None)]


def _legend_beside(axis: Any, handles: list[Line2D] | None = None) -> None:
    """The legend right of the axes, so long labels never cover data (savefig's tight box keeps it)."""
    kwargs = {"handles": handles} if handles is not None else {}
    axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5), **kwargs)


def _log_if_wide(set_scale: Callable[[str], Any], values: list[float]) -> None:
    """A log scale (`set_scale`: the axes' set_xscale or set_yscale) for positive values spanning LOG_RANGE."""
    positive = [value for value in values if value > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) >= LOG_RANGE:
        set_scale("log")


def _ticks_at(axis: Any, values: list[float]) -> None:
    """Ticks at the values swept (batch sizes, radii), not at powers of ten."""
    ticks = sorted(set(values))
    axis.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
    axis.minorticks_off()


def _errorbar_lines(axis: Any, lines: list[tuple[str, list[Group]]], x_key: str, metric: str,
                    dodge: float = 1.0) -> list[float]:
    """One line per label: mean ± sample std over the completed seeds of each group; line i is drawn at
    x · dodge^(i − centre), so error bars at one x do not hide each other on a log axis. Returns the x values."""
    xs = []
    for index, (label, members) in enumerate(lines):
        shift = dodge ** (index - (len(lines) - 1) / 2)
        points = [(x, stat) for group in members
                  if (x := finite(group.settings[x_key])) is not None
                  and (stat := summarize([run.get(metric) for run in group.completed])).mean is not None]
        points.sort(key=lambda point: point[0])
        if points:
            axis.errorbar([x * shift for x, _ in points], [stat.mean for _, stat in points],
                          yerr=[stat.std or 0.0 for _, stat in points], marker="o", capsize=3, label=label)
            xs += [x for x, _ in points]
    return xs


def _file_safe(column: str) -> str:
    """A sharpness column in a file name: `worst@0.05` -> `worst_at_0.05`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", column.replace("@", "_at_"))


def _finish(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")  # "tight": keeps a legend placed beside the axes
    plt.close(figure)
    return path


METRIC_TITLES = {"test_acc": "test accuracy", "gap_acc": "accuracy gap (train − test)",
                 "gap_loss": "loss gap (test − train)"}


def versus_batch_size(groups: list[Group], out_dir: Path, prefix: str, title: str) -> list[Path]:
    """Test accuracy, and both gaps, against batch size (log x) — one line per optimizer and other setting."""
    lines = _lines(groups, "batch_size")
    written = []
    for name, metrics in (("test_acc_vs_batch_size", ("test_acc",)), ("gap_vs_batch_size", ("gap_acc", "gap_loss"))):
        figure, axes = plt.subplots(1, len(metrics), figsize=(1.5 + 5 * len(metrics), 4.2), squeeze=False)
        for axis, metric in zip(axes[0], metrics):
            xs = _errorbar_lines(axis, lines, "batch_size", metric, dodge=1.04)
            axis.set_xscale("log")
            _ticks_at(axis, xs)
            axis.set(xlabel="batch size", ylabel=METRIC_TITLES[metric])
            axis.grid(alpha=0.3)
        _legend_beside(axes[0][-1])  # one legend for the panels
        figure.suptitle(f"{title}\nmean ± std over seeds", fontsize="medium")
        written.append(_finish(figure, out_dir / f"{prefix}{name}.png"))
    return written


def versus_rho(groups: list[Group], out_dir: Path, prefix: str, title: str) -> Path:
    """Test accuracy against rho, one line per other setting; plain optimizers (no rho) as dashed levels with
    their ± std band."""
    figure, axis = plt.subplots(figsize=(8.5, 4.4))
    sam_lines = _lines([group for group in groups if finite(group.settings["rho"]) is not None], "rho")
    xs = _errorbar_lines(axis, sam_lines, "rho", "test_acc")
    plain_lines = _lines([group for group in groups if finite(group.settings["rho"]) is None], "rho")
    for index, (label, members) in enumerate(plain_lines, start=len(sam_lines)):
        level = summarize([run.get("test_acc") for group in members for run in group.completed])
        if level.mean is not None:
            axis.axhline(level.mean, linestyle="--", color=f"C{index % 10}", linewidth=1.2, label=f"{label} (no ρ)")
            if level.std is not None:
                axis.axhspan(level.mean - level.std, level.mean + level.std, color=f"C{index % 10}", alpha=0.12)
    _log_if_wide(axis.set_xscale, xs)
    _ticks_at(axis, xs)
    axis.set(xlabel="ρ (SAM radius)", ylabel="test accuracy")
    axis.grid(alpha=0.3)
    _legend_beside(axis)
    figure.suptitle(f"{title}\nmean ± std over seeds", fontsize="medium")
    return _finish(figure, out_dir / f"{prefix}test_acc_vs_rho.png")


def versus_cost(groups: list[Group], out_dir: Path, prefix: str, title: str) -> Path:
    """Test accuracy and the accuracy gap against training time per optimizer step, one point per group (mean ±
    std over seeds both ways): the cost each optimizer pays for what it gives. Time is relative to the plain
    optimizer's (no ρ) when the groups hold exactly one, in seconds otherwise."""
    timed = [group for group in groups if group.seconds_per_step().mean]
    plain = [group for group in timed if finite(group.settings["rho"]) is None]
    unit = plain[0].seconds_per_step().mean if len(plain) == 1 else 1.0
    xlabel = (f"training time per step / {optimizer_label(plain[0].settings)}'s ({unit * 1e3:.3g} ms)"
              if len(plain) == 1 else "training seconds per optimizer step")
    labels = group_labels(timed)
    colours = palette(labels)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for axis, metric in zip(axes, ("test_acc", "gap_acc")):
        for index, (label, group) in enumerate(zip(labels, timed)):
            cost = group.seconds_per_step()  # runs that lack their time are left out, not a TypeError
            value = summarize([run.get(metric) for run in group.completed])
            if value.mean is not None:
                axis.errorbar(cost.mean / unit, value.mean, xerr=(cost.std or 0.0) / unit, yerr=value.std or 0.0,
                              capsize=3, marker=MARKERS[index % len(MARKERS)], linestyle="none", color=colours[label],
                              label=label)
        axis.set(xlabel=xlabel, ylabel=METRIC_TITLES[metric])
        axis.grid(alpha=0.3)
    _legend_beside(axes[-1])
    figure.suptitle(f"{title}\nmean ± std over seeds", fontsize="medium")
    return _finish(figure, out_dir / f"{prefix}accuracy_and_gap_vs_cost.png")


def palette(labels: list[str]) -> dict[str, Any]:
    """Distinct colours: tab10 for up to ten labels, tab20 beyond (cycling past twenty)."""
    colormap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: colormap(index % colormap.N) for index, label in enumerate(labels)}


def sharpness_versus_gap(runs: list[Run], correlation: Correlation, out_dir: Path, prefix: str, title: str) -> Path:
    """One completed run per point: colour = optimizer (with rho), marker = batch size; runs at chance ringed."""
    completed = [run for run in runs if run.completed and finite(run.sharpness.get(correlation.column)) is not None
                 and finite(run.get(correlation.gap)) is not None]
    colours = palette(list(dict.fromkeys(optimizer_label(run.summary, with_rho=True) for run in completed)))
    sizes = sorted({run.get("batch_size") for run in completed}, key=lambda size: (size is None, size))
    markers = {size: MARKERS[index % len(MARKERS)] for index, size in enumerate(sizes)}
    figure, axis = plt.subplots(figsize=(7.5, 4.4))
    for run in completed:
        point = (run.sharpness[correlation.column], run.get(correlation.gap))
        axis.scatter(*point, s=36, alpha=0.85, color=colours[optimizer_label(run.summary, with_rho=True)],
                     marker=markers[run.get("batch_size")])
        if run.get("at_chance"):
            axis.scatter(*point, s=160, facecolors="none", edgecolors="red", linewidths=1.2)
    handles = [Line2D([], [], color=colour, marker="o", linestyle="", label=label) for label, colour in colours.items()]
    if len(sizes) > 1:
        handles += [Line2D([], [], color="black", markerfacecolor="none", marker=marker, linestyle="",
                           label=f"batch {size}") for size, marker in markers.items()]
    if any(run.get("at_chance") for run in completed):
        handles.append(Line2D([], [], color="red", markerfacecolor="none", marker="o", markersize=11, linestyle="",
                              label="at chance"))
    _log_if_wide(axis.set_xscale, [run.sharpness[correlation.column] for run in completed])
    axis.set(xlabel=correlation.column, ylabel=METRIC_TITLES[correlation.gap])
    axis.grid(alpha=0.3)
    _legend_beside(axis, handles)
    tau = correlation.overall.text() or f"needs 3 runs (n={correlation.overall.n})"
    axis.set_title(f"{title}\n{correlation.column} vs gap: Kendall τ = {tau}", fontsize="medium")
    return _finish(figure, out_dir / f"{prefix}{_file_safe(correlation.column)}_vs_{correlation.gap}.png")


def _band(axis: Any, band: Band, colour: Any, label: str | None = None, linestyle: str = "-") -> list[float]:
    """The mean over the seeds with a ± one sample std band (none for one seed); a step where no seed has a value is
    a gap in the line. Returns the means drawn."""
    means = [stat.mean if stat.mean is not None else math.nan for stat in band.stats]
    spread = [stat.std or 0.0 for stat in band.stats]
    axis.plot(band.steps, means, color=colour, linestyle=linestyle, label=label,
              marker="o" if len(band.steps) <= 30 else None, markersize=3)
    axis.fill_between(band.steps, [mean - std for mean, std in zip(means, spread)],
                      [mean + std for mean, std in zip(means, spread)], color=colour, alpha=0.15, linewidth=0)
    return [mean for mean in means if not math.isnan(mean)]


def over_training(lines: list[tuple[str, Band]], colours: dict[str, Any], column: str, out_dir: Path, prefix: str,
                  title: str) -> Path:
    """One sharpness column against the optimizer step, a line per group (log y where the values span decades)."""
    figure, axis = plt.subplots(figsize=(8.5, 4.4))
    means = [mean for label, band in lines for mean in _band(axis, band, colours[label], label)]
    _log_if_wide(axis.set_yscale, means)
    axis.set(xlabel="optimizer step", ylabel=column)
    axis.grid(alpha=0.3)
    _legend_beside(axis)
    figure.suptitle(f"{title}\n{column} over training: mean ± std over seeds", fontsize="medium")
    return _finish(figure, out_dir / f"{prefix}{_file_safe(column)}_over_training.png")


def learning_curves(lines: dict[str, list[tuple[str, Band]]], colours: dict[str, Any], out_dir: Path, prefix: str,
                    title: str) -> Path:
    """Loss and accuracy (`lines`: metrics.jsonl's train/loss, test/loss, train/acc, test/acc) against the step: a
    colour per group, train solid and test dashed."""
    figure, axes = plt.subplots(1, 2, figsize=(11.5, 4.2))
    drawn: set[str] = set()
    for axis, (quantity, name) in zip(axes, (("loss", "loss"), ("acc", "accuracy"))):
        values = []
        for split, linestyle in (("train", "-"), ("test", "--")):
            for label, band in lines.get(f"{split}/{quantity}", []):
                values += _band(axis, band, colours[label], linestyle=linestyle)
                drawn.add(label)
        _log_if_wide(axis.set_yscale, values)
        axis.set(xlabel="optimizer step", ylabel=name)
        axis.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour, label=label) for label, colour in colours.items() if label in drawn]
    handles += [Line2D([], [], color="black", linestyle=linestyle, label=split)
                for split, linestyle in (("train", "-"), ("test", "--"))]
    _legend_beside(axes[-1], handles)
    figure.suptitle(f"{title}\nlearning curves (eval mode): mean ± std over seeds", fontsize="medium")
    return _finish(figure, out_dir / f"{prefix}learning_curves.png")
