"""sam-report's sharpness over training and learning curves, on synthetic run directories written by the tests
(summary.json with measurement records, metrics.jsonl), against means and sample standard deviations computed here
with numpy from the values the test wrote. The figures are read back as data: what `_finish` was handed to save.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from sam_runner.report import plots as report_plots
from sam_runner.report.writer import Report, write_report

PROTOCOL = "continue 50 steps"
STEPS = [10, 20, 30, 40, 50]  # measurements and epoch ends (an epoch is ten steps)
EVALUATED = (20, 40, 50)  # eval.every=2, and the last epoch
GROUPS = (("sgd", None), ("sam", 0.05))
COLUMNS = ("lambda_max", "trace", "worst@0.05", "alignment")
LABELS = {"sgd": "sgd", "sam": "sam ρ=0.05"}
Values = dict[int, Optional[float]]


@dataclass
class Written:
    """What the test wrote for one run: the truth the report is checked against."""

    optimizer: str
    seed: int
    path: Path
    measures: dict[str, Values] = field(default_factory=dict)
    metrics: dict[str, Values] = field(default_factory=dict)


def write_run(path: Path, optimizer: str, rho: float | None, seed: int, status: str, records: list[dict[str, Any]],
              metric_lines: list[dict[str, Any]], protocol: str = PROTOCOL) -> None:
    path.mkdir(parents=True)
    summary = {"protocol": protocol, "dataset": "mnist1d", "model": "mlp", "optimizer": optimizer,
               "base_optimizer": "sgd", "rho": rho, "lr": 0.1, "batch_size": 64, "seed": seed, "status": status,
               "train_acc": 0.99, "test_acc": 0.8, "gap_acc": 0.19, "train_loss": 0.01, "gap_loss": 0.5,
               "measurements": records}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in metric_lines))


def record(step: int, values: dict[str, Any], rho: float = 0.05, source: str = "sam-run") -> dict[str, Any]:
    return {"rho": rho, "num_samples": 256, "epoch": -(-step // 10), "step": step, "source": source, "values": values}


def make_run(rng: np.random.Generator, root: Path, job: int, optimizer: str, rho: float | None, seed: int,
             status: str = "completed") -> Written:
    """Measured at STEPS (one seed of SAM at other steps), lambda_max falling over two decades, the others within a
    factor of a few; an alignment of exactly 0 or null and a negative trace at the first measurement of one run
    each; a sam-measure record (another radius, an absurd lambda_max) that is not part of the trajectory;
    metrics.jsonl with epoch lines (test metrics on evaluated epochs only), measurement lines between epochs and
    one null loss."""
    run = Written(optimizer, seed, root / f"{job}_optimizer={optimizer},seed={seed}")
    steps = [10, 20, 35, 40, 50] if (optimizer, seed) == ("sam", 2) else STEPS
    run.measures = {"lambda_max": {step: rng.uniform(50, 100) * 0.1 ** (step / 20) for step in steps},
                    "trace": {step: rng.uniform(10, 12) for step in steps},
                    "worst@0.05": {step: rng.uniform(0.01, 0.05) for step in steps},
                    "alignment": {step: rng.uniform(0.1, 1.0) for step in steps}}
    if (optimizer, seed) == ("sgd", 0):
        run.measures["alignment"][10] = 0.0  # its relative change is undefined
    if (optimizer, seed) == ("sam", 1):
        run.measures["alignment"][10] = None  # NaN, written as null: its first value is at step 20
    if (optimizer, seed) == ("sgd", 2):
        run.measures["trace"][10] = -2.0  # Hutchinson's estimate can be negative: the change is relative to |first|
    records = [record(step, {"lambda_max": run.measures["lambda_max"][step], "lambda_max_iterations": 7,
                             "trace": run.measures["trace"][step], "trace_stderr": 0.5,
                             "worst": run.measures["worst@0.05"][step], "alignment": run.measures["alignment"][step]})
               for step in steps]
    records.append(record(50, {"worst": 9.0, "lambda_max": 1e6}, rho=0.1, source="sam-measure"))
    run.metrics = {key: {} for key in ("train/loss", "test/loss", "train/acc", "test/acc")}
    lines: list[dict[str, Any]] = []
    for step in STEPS:
        lines.append({"epoch": step // 10, "step": step - 5, "sharpness/lambda_max": rng.uniform(1, 2)})
        line = {"epoch": step // 10, "step": step, "train/loss_seen": rng.uniform(0, 3)}
        for split in ("train", "test") if step in EVALUATED else ("train",):
            loss = 2.3 * 0.1 ** (step / 20) * rng.uniform(0.8, 1.2)  # over two decades: a log axis
            line[f"{split}/loss"] = run.metrics[f"{split}/loss"][step] = loss
            line[f"{split}/acc"] = run.metrics[f"{split}/acc"][step] = rng.uniform(0.5, 1.0) * step / 50
        if (optimizer, seed, step) == ("sgd", 1, 30):
            line["train/loss"] = run.metrics["train/loss"][30] = None
        lines.append(line)
    write_run(run.path, optimizer, rho, seed, status, records, lines)
    return run


def make_sweep(root: Path) -> list[Written]:
    """Two groups of three completed seeds, and a failed SGD run whose numbers must not count."""
    rng = np.random.default_rng(18)
    runs = [make_run(rng, root, 3 * index + seed, optimizer, rho, seed)
            for index, (optimizer, rho) in enumerate(GROUPS) for seed in range(3)]
    make_run(rng, root, 6, "sgd", None, 3, status="failed")
    return runs


def figure_data(figure: Any) -> list[dict[str, Any]]:
    """Per axes: its y scale, its lines (label, x, y, line style) and its bands' polygons."""
    return [{"yscale": axis.get_yscale(),
             "lines": [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
                       for line in axis.get_lines()],
             "bands": [collection.get_paths()[0].vertices for collection in axis.collections]}
            for axis in figure.axes]


@dataclass
class Reported:
    runs: list[Written]
    report: Report
    figures: dict[str, list[dict[str, Any]]]


def report_drawn(paths: list[Path], out_dir: Path) -> tuple[Report, dict[str, list[dict[str, Any]]]]:
    """write_report, keeping every figure's data as it is saved."""
    figures: dict[str, list[dict[str, Any]]] = {}
    finish = report_plots._finish

    def keep(figure: Any, path: Path) -> Path:
        figures[path.name] = figure_data(figure)
        return finish(figure, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_plots, "_finish", keep)
        return write_report(paths, out_dir), figures


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reported]:
    root = tmp_path_factory.mktemp("trajectories") / "sweep"
    runs = make_sweep(root)
    report, figures = report_drawn([root], root / "report")
    yield Reported(runs, report, figures)


def mine(runs: list[Written], optimizer: str) -> list[Written]:
    return [run for run in runs if run.optimizer == optimizer]


def seed_mean_std(values: list[float | None]) -> tuple[float, float, int]:
    present = np.array([value for value in values if value is not None])
    return float(present.mean()), float(present.std(ddof=1)) if len(present) > 1 else 0.0, len(present)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# -- the start/end table ----------------------------------------------------------------------------------------

def test_the_start_end_table_is_the_seed_mean_of_each_runs_first_last_and_relative_change(reported: Reported
                                                                                          ) -> None:
    out = reported.report.files[0].parent
    rows = {(row["optimizer"], row["measure"]): row for row in read_csv(out / "trajectories.csv")}
    assert set(rows) == {(optimizer, column) for optimizer, _ in GROUPS for column in COLUMNS}  # no worst@0.1
    for (optimizer, column), row in rows.items():
        ends = []
        for run in mine(reported.runs, optimizer):
            known = sorted((step, value) for step, value in run.measures[column].items() if value is not None)
            ends.append((known[0], known[-1]))
        firsts = np.array([value for (_, value), _ in ends])
        lasts = np.array([value for _, (_, value) in ends])
        changes = np.array([(last - first) / abs(first) for first, last in zip(firsts, lasts) if first != 0])
        for key, values in (("first", firsts), ("last", lasts), ("change", changes)):
            assert float(row[f"{key}_mean"]) == pytest.approx(values.mean(), rel=1e-12), (optimizer, column, key)
            assert float(row[f"{key}_std"]) == pytest.approx(values.std(ddof=1), rel=1e-12), (optimizer, column, key)
            assert int(row[f"{key}_n"]) == len(values)
        assert row["first_steps"] == " ".join(map(str, sorted({step for (step, _), _ in ends})))
        assert row["last_steps"] == "50" and row["optimizer_label"] == LABELS[optimizer]
    assert rows["sgd", "alignment"]["change_n"] == "2"  # the run that starts from 0 has no relative change
    assert rows["sam", "alignment"]["first_steps"] == "10 20"  # one run's first alignment is null

    markdown = reported.report.markdown
    assert "### Sharpness over training" in markdown
    assert "| group | measure | n | steps | first | last | change |" in markdown
    sgd = rows["sgd", "lambda_max"]
    change = f"{100 * float(sgd['change_mean']):.4g}% ± {100 * float(sgd['change_std']):.4g}%"
    assert f"| sgd | lambda_max | 3 | 10 → 50 | {float(sgd['first_mean']):.4g} ± {float(sgd['first_std']):.4g} |" \
           f" {float(sgd['last_mean']):.4g} ± {float(sgd['last_std']):.4g} | {change} |" in markdown
    assert [line for line in markdown.splitlines() if line.startswith("| sgd | alignment |")][0].endswith("(n=2) |")


# -- the lines and their bands ----------------------------------------------------------------------------------

def assert_band(line: tuple[str, list[Any], list[Any], str], band: np.ndarray, series: list[Values],
                steps: list[int]) -> None:
    """The line is the seed mean at `steps`, its band mean ± sample std there."""
    _, xs, ys, _ = line
    assert xs == steps
    for step, y in zip(steps, ys):
        mean, std, _ = seed_mean_std([values[step] for values in series])
        assert y == pytest.approx(mean, rel=1e-12), step
        edge = [vertex_y for vertex_x, vertex_y in band if vertex_x == step]
        assert (min(edge), max(edge)) == (pytest.approx(mean - std, rel=1e-9), pytest.approx(mean + std, rel=1e-9))


def test_a_groups_line_is_the_seed_mean_at_the_steps_all_its_seeds_share(reported: Reported) -> None:
    names = {path.name for path in reported.report.files}
    assert {f"{column.replace('@', '_at_')}_over_training.png" for column in COLUMNS} <= names
    assert "worst_at_0.1_over_training.png" not in names  # a sam-measure record is no point of the training
    for column in COLUMNS:
        (axis,) = reported.figures[f"{column.replace('@', '_at_')}_over_training.png"]
        assert [label for label, *_ in axis["lines"]] == ["sgd", "sam ρ=0.05"]
        for line, band, (optimizer, _) in zip(axis["lines"], axis["bands"], GROUPS):
            steps = [10, 20, 40, 50] if optimizer == "sam" else STEPS  # one SAM seed measured at 35, not 30
            assert_band(line, band, [run.measures[column] for run in mine(reported.runs, optimizer)], steps)
    assert ("- sam ρ=0.05 (lambda_max, trace, worst@0.05, alignment): its 3 runs were not recorded at the same "
            "steps; the line uses the 4 steps all of them have (2 left out).") in reported.report.markdown


def test_learning_curves_are_the_seed_means_of_metrics_jsonl(reported: Reported) -> None:
    loss, accuracy = reported.figures["learning_curves.png"]
    assert "![learning_curves](learning_curves.png)" in reported.report.markdown
    for axis, quantity in ((loss, "loss"), (accuracy, "acc")):
        drawn = iter(zip(axis["lines"], axis["bands"]))
        for split, style in (("train", "-"), ("test", "--")):
            for optimizer, _ in GROUPS:
                line, band = next(drawn)
                assert line[3] == style
                steps = STEPS if split == "train" else list(EVALUATED)  # measurement lines hold no metrics
                assert_band(line, band, [run.metrics[f"{split}/{quantity}"] for run in mine(reported.runs, optimizer)],
                            steps)
    sgd_train_loss = loss["lines"][0]
    assert sgd_train_loss[2][2] == pytest.approx(np.mean([run.metrics["train/loss"][30]
                                                         for run in mine(reported.runs, "sgd")[::2]]))  # null: left out


def test_a_log_scale_where_the_values_span_a_factor_of_twenty(reported: Reported) -> None:
    scales = {name: [axis["yscale"] for axis in axes] for name, axes in reported.figures.items()}
    assert scales["lambda_max_over_training.png"] == ["log"]  # falls over two decades
    assert scales["trace_over_training.png"] == ["linear"]  # within 10 to 12
    assert scales["learning_curves.png"] == ["log", "linear"]  # the loss falls over two decades, accuracy does not
    for values, expected in (([1.0, 20.0], "log"), ([1.0, 19.9], "linear"), ([0.0, 1.0, 100.0], "linear")):
        chosen = []
        report_plots._log_if_wide(chosen.append, values)
        assert chosen == (["log"] if expected == "log" else []), values


# -- when there is nothing to follow, and when a file is broken -------------------------------------------------

def test_runs_measured_once_add_nothing_to_their_protocols_report(tmp_path: Path) -> None:
    """Measured once by sam-run (and once more by sam-measure): no new heading, file or plot for that protocol;
    a second protocol with a traced run gets its own."""
    for seed in range(2):
        write_run(tmp_path / f"{seed}_once", "sgd", None, seed, "completed",
                  [record(50, {"lambda_max": 2.0 + seed}), record(50, {"worst": 0.1}, rho=0.1, source="sam-measure")],
                  [{"epoch": 5, "step": 50, "train/loss": 0.1, "train/acc": 0.9}], protocol="once")
    report = write_report([tmp_path], tmp_path / "report")
    assert {path.name for path in report.files} == {"report.md", "runs.csv", "groups.csv",
                                                    "lambda_max_vs_gap_acc.png", "worst_at_0.1_vs_gap_acc.png"}
    assert "over training" not in report.markdown and "Learning curves" not in report.markdown

    write_run(tmp_path / "2_twice", "sgd", None, 0, "completed",
              [record(10, {"trace": 3.0}), record(20, {"trace": 2.0})], [{"epoch": 2, "step": 20, "train/loss": 0.1}],
              protocol="twice")
    both = write_report([tmp_path], tmp_path / "both")
    once, twice = both.markdown.split("## Protocol: twice")
    assert "over training" not in once and "### Sharpness over training" in twice and "### Learning curves" in twice
    names = {path.name for path in both.files}
    assert {"p2_trace_over_training.png", "p2_learning_curves.png", "trajectories.csv"} <= names
    assert [row["measure"] for row in read_csv(tmp_path / "both" / "trajectories.csv")] == ["trace"]


def test_a_missing_or_unreadable_metrics_jsonl_costs_that_runs_curves_not_the_report(tmp_path: Path) -> None:
    runs = make_sweep(tmp_path / "sweep")
    sgd = mine(runs, "sgd")
    torn = (sgd[0].path / "metrics.jsonl").read_text().splitlines()
    (sgd[0].path / "metrics.jsonl").write_text("\n".join([torn[0], torn[1][:20], *torn[2:]]) + "\n")
    (sgd[1].path / "metrics.jsonl").unlink()
    sam = mine(runs, "sam")[0].path / "metrics.jsonl"
    sam.unlink()
    sam.mkdir()

    report, figures = report_drawn([tmp_path / "sweep"], tmp_path / "report")
    notes = [line for line in report.markdown.splitlines() if line.endswith("left out of the learning curves.")]
    assert [note.split(":")[0] for note in notes] == ["- run 0", "- run 1", "- run 3"]
    assert "line 2" in notes[0] and "is missing" in notes[1] and "cannot be read" in notes[2]
    assert {"learning_curves.png", "lambda_max_over_training.png", "trajectories.csv"} <= {path.name
                                                                                          for path in report.files}
    (loss, _) = figures["learning_curves.png"]
    _, steps, means, _ = loss["lines"][0]  # SGD's training loss: its one readable run
    assert steps == STEPS and means == pytest.approx([sgd[2].metrics["train/loss"][step] for step in STEPS])
