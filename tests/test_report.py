"""Sweep table and `sam-report` on synthetic summary.json files written by the tests.

Statistics are checked against independent references: numpy (mean, std with ddof=1), scipy.stats.kendalltau
called here on arrays the test builds itself, and a brute-force count of concordant pairs.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf
from scipy import stats
from test_trajectories import report_drawn

from sam_runner import sharpness
from sam_runner.report.plots import _lines
from sam_runner.report.runs import (
    MEASURE_ORDER,
    RADIUS_FREE_MEASURES,
    RADIUS_MEASURES,
    ReportError,
    SweepTable,
    collect,
    find_runs,
    format_table,
    optimizer_label,
    sharpness_columns,
)
from sam_runner.report.stats import correlations, group_runs
from sam_runner.report.writer import write_report

PROTOCOL = "same lr, 30 epochs, stop at train acc 0.99"


def write_run(root: Path, name: str, **summary: object) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(summary))


def measured(rho: float, source: str = "sam-run", **values: float) -> dict[str, Any]:
    return {"rho": rho, "num_samples": 256, "options": {}, "model_mode": "eval", "epoch": 3, "step": 30,
            "source": source, "values": values}


# -- the sweep table ----------------------------------------------------------------------------------------------

def test_sweep_table_always_shows_lr_batch_base_and_rho_then_every_measured_column(tmp_path: Path) -> None:
    common = {"dataset": "mnist1d", "lr": 0.1, "batch_size": 64, "train_acc": 1.0, "train_loss": 0.01,
              "gap_loss": 0.1, "protocol": PROTOCOL}
    write_run(tmp_path, "10_optimizer=sam,seed=1", optimizer="sam", base_optimizer="adamw", rho=0.1, seed=1,
              test_acc=0.91, gap_acc=0.09, status="completed", target_reached=True, target_epoch=7,
              measurements=[measured(0.1, lambda_max=1.5, worst=0.25, keskar=12.0)], **common)
    write_run(tmp_path, "2_optimizer=sgd,seed=0", optimizer="sgd", base_optimizer="sgd", rho=None, seed=0,
              status="duplicate", error="sgd ignores rho; see the run with rho=0.02", **common)
    write_run(tmp_path, "1_optimizer=sgd,seed=0", optimizer="sgd", base_optimizer="sgd", rho=None, seed=0,
              test_acc=0.1, gap_acc=0.9, status="completed", at_chance=True, target_reached=False,
              sharpness={"lambda_max": 3.25}, **common)
    (tmp_path / "3_crashed_before_writing").mkdir()

    table, measures = format_table(collect(tmp_path)).split("\n\n")  # too wide for one table of 120 columns
    lines = table.splitlines()

    assert lines[0] == f"protocol: {PROTOCOL}"
    assert lines[1].split() == ["run", "lr", "batch_size", "optimizer", "rho", "seed", "train_loss", "train_acc",
                                "test_acc", "gap_acc", "gap_loss", "target", "status"]  # dataset equal: not shown
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "10"]
    assert lines[2].split() == ["1", "0.1", "64", "sgd", "-", "0", "0.0100", "1.0000", "0.1000", "0.9000", "0.1000",
                                "no", "completed", "(at", "chance)"]
    assert lines[3].split()[11:] == ["-", "duplicate"]
    assert lines[4].split()[3:5] == ["sam(adamw)", "0.1"] and lines[4].split()[11:] == ["7", "completed"]
    assert [line.split() for line in measures.splitlines()] == [
        ["run", "lambda_max", "worst@0.1", "keskar"], ["1", "3.25", "-", "-"], ["2", "-", "-", "-"],
        ["10", "1.5", "0.25", "12"], ["run", "2:", "sgd", "ignores", "rho;", "see", "the", "run", "with", "rho=0.02"]]


def test_a_narrow_sweep_table_is_one_table(tmp_path: Path) -> None:
    write_run(tmp_path, "0_x", optimizer="sgd", lr=0.1, batch_size=32, status="completed", test_acc=0.5,
              sharpness={"lambda_max": 2.0})
    lines = format_table(collect(tmp_path)).splitlines()
    assert len(lines) == 2 and lines[0].split()[-2:] == ["status", "lambda_max"]


def test_a_wide_sweep_table_prints_its_sharpness_columns_as_a_second_table(tmp_path: Path) -> None:
    values = {name: 1234.5678 for name in MEASURE_ORDER}
    for job in range(2):
        write_run(tmp_path, f"{job}_seed={job}", optimizer="sam", rho=0.05, lr=0.1, batch_size=32, seed=job,
                  train_acc=0.99, test_acc=0.8, val_acc=0.81, status="completed",
                  measurements=[measured(0.05, **values), measured(0.1, "sam-measure", worst=2.0)])

    text = format_table(collect(tmp_path))
    first, second = text.split("\n\n")

    assert "val_acc" in first.splitlines()[0] and "lambda_max" not in first
    assert second.splitlines()[0].split() == ["run", "lambda_max", "trace", "worst@0.05", "worst@0.1", "ascent@0.05",
                                              "average@0.05", "keskar", "alignment"]
    assert second.splitlines()[2].split()[1] == "1235" and second.splitlines()[2].split()[4] == "2"
    assert max(len(line) for line in text.splitlines()) <= 120


def test_the_sweep_callback_prints_the_table_and_the_sam_report_hint(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, "0_optimizer=sgd", optimizer="sgd", lr=0.1, batch_size=32, status="completed")
    SweepTable().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"sweep {tmp_path} (1 runs)" and lines[1].startswith("run  lr")
    assert lines[-1].endswith(f"sam-report {tmp_path}")


# -- sharpness columns --------------------------------------------------------------------------------------------

def test_the_report_knows_every_sharpness_measure() -> None:
    assert set(RADIUS_FREE_MEASURES) | set(RADIUS_MEASURES) == set(sharpness.MEASURES)
    assert MEASURE_ORDER == sharpness.MEASURES


def test_radius_dependent_columns_are_keyed_by_radius_and_the_later_measurement_wins() -> None:
    summary = {"sharpness": {"lambda_max": 9.0, "worst": 0.5, "trace": 40.0, "trace_stderr": 1.0},
               "measurements": [measured(0.05, lambda_max=9.0, worst=0.5),
                                measured(0.1, "sam-measure", worst=1.5, ascent=1.25, lambda_max=10.0),
                                measured(0.05, "sam-measure", worst=0.75)]}
    assert sharpness_columns(summary) == {"lambda_max": 10.0, "worst@0.05": 0.75, "worst@0.1": 1.5,
                                          "ascent@0.1": 1.25, "trace": 40.0}  # trace: from the sharpness dict


def test_an_older_summary_without_measurements_keeps_plain_names() -> None:
    assert sharpness_columns({"sharpness": {"worst": 0.5, "keskar": 3.0}}) == {"worst": 0.5, "keskar": 3.0}
    assert sharpness_columns({"status": "failed"}) == {}


# -- groups, means, standard deviations and Kendall's tau ---------------------------------------------------------

SETTINGS = [("sgd", None, 32), ("sam", 0.05, 32), ("sgd", None, 256), ("sam", 0.05, 256)]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """4 settings x 3 seeds with random outcomes; plus a failed and a running run (with numbers that must not
    count) and a completed run that lacks val_acc and lambda_max."""
    rng = np.random.default_rng(0)
    root = tmp_path / "sweep"
    job = 0
    for optimizer, rho, batch_size in SETTINGS:
        for seed in range(3):
            train, test = rng.uniform(0.95, 1.0), rng.uniform(0.6, 0.8)
            summary: dict[str, Any] = {
                "protocol": PROTOCOL, "dataset": "mnist1d", "model": "mlp", "optimizer": optimizer,
                "base_optimizer": "sgd", "rho": rho, "lr": 0.1, "batch_size": batch_size, "seed": seed,
                "status": "completed", "train_acc": train, "test_acc": test, "gap_acc": train - test,
                "train_loss": rng.uniform(0.01, 0.1), "gap_loss": rng.uniform(0.5, 2.0), "val_acc": rng.uniform(0.6, 0.8),
                "target_reached": True, "target_epoch": int(rng.integers(5, 30)), "target_step": int(rng.integers(50, 900)),
                "wall_time_s": rng.uniform(10, 20),
                "measurements": [measured(0.05, lambda_max=rng.uniform(1, 100), worst=rng.uniform(0, 1))]}
            if (optimizer, batch_size, seed) == ("sam", 256, 2):
                del summary["val_acc"]
                summary["measurements"] = [measured(0.05, worst=rng.uniform(0, 1))]
            write_run(root, f"{job}_optimizer={optimizer},batch_size={batch_size},seed={seed}", **summary)
            job += 1
    write_run(root, f"{job}_failed", protocol=PROTOCOL, dataset="mnist1d", model="mlp", optimizer="sgd",
              base_optimizer="sgd", rho=None, lr=0.1, batch_size=256, seed=3, status="failed", train_acc=0.5,
              test_acc=0.0, gap_acc=0.5, error="out of memory")
    write_run(root, f"{job + 1}_running", protocol=PROTOCOL, dataset="mnist1d", model="mlp", optimizer="sam",
              base_optimizer="sgd", rho=0.05, lr=0.1, batch_size=32, seed=3, status="running", train_acc=0.2,
              test_acc=0.2, gap_acc=0.0, measurements=[measured(0.05, lambda_max=1e6, worst=1e6)])
    return root


def completed_summaries(root: Path) -> list[dict[str, Any]]:
    summaries = [json.loads(path.read_text()) for path in sorted(root.rglob("summary.json"))]
    return [summary for summary in summaries if summary["status"] == "completed"]


def column_values(summary: dict[str, Any], column: str) -> float | None:
    if column == "lambda_max":
        return summary["measurements"][-1]["values"].get("lambda_max")
    if column == "worst@0.05":
        return summary["measurements"][-1]["values"].get("worst")
    return summary.get(column)


def test_groups_count_every_run_and_average_only_the_completed_ones(sweep: Path) -> None:
    groups = group_runs(find_runs([sweep]))
    assert [(group.settings["optimizer"], group.settings["batch_size"]) for group in groups] == \
        [(optimizer, batch_size) for optimizer, _, batch_size in SETTINGS]
    assert [group.status_counts() for group in groups] == ["3 completed", "3 completed, 1 running",
                                                           "3 completed, 1 failed", "3 completed"]
    completed = completed_summaries(sweep)
    for group, (optimizer, _, batch_size) in zip(groups, SETTINGS):
        mine = [summary for summary in completed
                if summary["optimizer"] == optimizer and summary["batch_size"] == batch_size]
        result = group.statistics(["lambda_max", "worst@0.05"])
        for key in ("train_acc", "test_acc", "train_loss", "gap_acc", "gap_loss", "val_acc", "lambda_max",
                    "worst@0.05", "target_epoch", "target_step", "wall_time_s"):
            values = np.array([value for summary in mine if (value := column_values(summary, key)) is not None])
            assert result[key].n == len(values), key
            assert result[key].mean == pytest.approx(values.mean(), rel=1e-12), key
            assert result[key].std == pytest.approx(values.std(ddof=1), rel=1e-12), key
    assert groups[3].statistics(["lambda_max"])["lambda_max"].n == 2  # the run that lacks it is not a zero


COST_GROUPS = [("sgd", None, {}), ("sam", 0.05, {}), ("gsam", 0.04, {"gsam_alpha": 0.01})]


def cost_sweep(root: Path, batch_sizes: tuple[int, ...] = (128, 128, 128)) -> list[dict[str, Any]]:
    """3 optimizers x 3 seeds, each run with its training time and steps; returns the summaries written."""
    rng = np.random.default_rng(1)
    written = []
    for index, ((optimizer, rho, extra), batch_size) in enumerate(zip(COST_GROUPS, batch_sizes)):
        for seed in range(3):
            summary = {"protocol": PROTOCOL, "optimizer": optimizer, "base_optimizer": "sgd", "rho": rho,
                       "batch_size": batch_size, "seed": seed, "status": "completed", "test_acc": rng.uniform(0.6, 0.9),
                       "gap_acc": rng.uniform(0, 0.2), "gap_loss": rng.uniform(0, 1), "train_time_s": rng.uniform(10, 30) * (1 + index),
                       "steps_completed": 1000, **extra}
            write_run(root, f"{3 * index + seed}_{optimizer}", **summary)
            written.append(summary)
    return written


def test_accuracy_and_gap_are_drawn_against_the_time_per_step_relative_to_the_plain_optimizer(tmp_path: Path) -> None:
    written = cost_sweep(tmp_path / "sweep")
    report, figures = report_drawn([tmp_path / "sweep"], tmp_path / "out")
    sgd_cost = np.mean([run["train_time_s"] / 1000 for run in written if run["optimizer"] == "sgd"])
    for axis, metric in zip(figures["accuracy_and_gap_vs_cost.png"], ("test_acc", "gap_acc")):
        points = [(x, y) for _, x, y, _ in axis["lines"]]  # each group's point, and its error bars' caps
        for optimizer, _, _ in COST_GROUPS:
            mine = [run for run in written if run["optimizer"] == optimizer]
            cost = np.mean([run["train_time_s"] / 1000 / sgd_cost for run in mine])
            assert ([pytest.approx(cost, rel=1e-12)], [pytest.approx(np.mean([run[metric] for run in mine]),
                                                                     rel=1e-12)]) in points, optimizer
    groups = read_csv(tmp_path / "out" / "groups.csv")
    assert [float(row["train_s_per_step_mean"]) for row in groups] == pytest.approx(
        [np.mean([run["train_time_s"] / 1000 for run in written if run["optimizer"] == optimizer])
         for optimizer, _, _ in COST_GROUPS], rel=1e-12)
    assert "train_s_per_step" in report.markdown


def test_no_cost_plot_across_batch_sizes_whose_steps_are_not_comparable(tmp_path: Path) -> None:
    cost_sweep(tmp_path / "sweep", batch_sizes=(128, 128, 512))
    report = write_report([tmp_path / "sweep"], tmp_path / "out")
    assert "accuracy_and_gap_vs_cost.png" not in {path.name for path in report.files}


def test_a_single_run_has_a_mean_and_no_standard_deviation(tmp_path: Path) -> None:
    write_run(tmp_path, "0_x", optimizer="sgd", status="completed", test_acc=0.75)
    stat = group_runs(find_runs([tmp_path]))[0].statistics([])["test_acc"]
    assert (stat.mean, stat.std, stat.n) == (0.75, None, 1)


def brute_force_tau(x: list[float], y: list[float]) -> float:
    """Kendall's τ-a by counting pairs (equal to τ-b when there are no ties)."""
    signs = [np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in itertools.combinations(range(len(x)), 2)]
    return float(sum(signs) / len(signs))


def test_kendall_tau_overall_within_each_batch_size_and_granulated(sweep: Path) -> None:
    found = {(item.column, item.gap): item for item in correlations(find_runs([sweep]))}
    assert set(found) == {(column, gap) for column in ("lambda_max", "worst@0.05") for gap in ("gap_acc", "gap_loss")}
    completed = completed_summaries(sweep)
    for (column, gap), item in found.items():
        pairs = [(column_values(summary, column), summary[gap]) for summary in completed
                 if column_values(summary, column) is not None]
        reference = stats.kendalltau([x for x, _ in pairs], [y for _, y in pairs])
        assert item.overall.n == len(pairs) == (11 if column == "lambda_max" else 12)
        assert item.overall.tau == pytest.approx(reference.statistic, abs=1e-12)
        assert item.overall.p == pytest.approx(reference.pvalue, rel=1e-9)
        assert item.overall.tau == pytest.approx(brute_force_tau([x for x, _ in pairs], [y for _, y in pairs]))
        within = []
        for batch_size in (32, 256):
            mine = [(column_values(summary, column), summary[gap]) for summary in completed
                    if summary["batch_size"] == batch_size and column_values(summary, column) is not None]
            expected = stats.kendalltau([x for x, _ in mine], [y for _, y in mine]).statistic
            assert item.by_batch_size[batch_size].tau == pytest.approx(expected, abs=1e-12)
            within.append(expected)
        assert item.granulated == pytest.approx(np.mean(within)) and item.granulated_groups == 2


def test_tau_is_blank_below_three_runs_and_without_varying_batch_size(tmp_path: Path) -> None:
    for job in range(2):
        write_run(tmp_path, f"{job}_x", status="completed", batch_size=32, gap_acc=0.1 * job, gap_loss=0.0,
                  sharpness={"lambda_max": float(job)})
    (item, _) = correlations(find_runs([tmp_path]))
    assert (item.overall.tau, item.overall.p, item.overall.n) == (None, None, 2) and item.overall.text() == ""
    assert item.by_batch_size == {} and item.granulated is None


# -- the report's files and the command ---------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_writes_markdown_csvs_and_plots(sweep: Path) -> None:
    report = write_report([sweep])
    out = sweep / "report"
    names = {path.name for path in report.files}
    assert {"report.md", "runs.csv", "groups.csv", "test_acc_vs_batch_size.png", "gap_vs_batch_size.png",
            "lambda_max_vs_gap_acc.png", "worst_at_0.05_vs_gap_acc.png"} == names
    assert all(path.parent == out and path.stat().st_size > 1000 for path in report.files if path.suffix == ".png")
    assert not (out / "test_acc_vs_rho.png").exists()  # rho does not vary among completed runs (0.05 or none)

    markdown = (out / "report.md").read_text()
    assert markdown == report.markdown and f"## Protocol: {PROTOCOL}" in markdown
    assert "| 0.1 | 256 | sgd | - | 3 completed, 1 failed | 3 |" in markdown
    assert "![lambda_max_vs_gap_acc](lambda_max_vs_gap_acc.png)" in markdown
    assert "- run 12: out of memory" in markdown

    runs = read_csv(out / "runs.csv")
    assert len(runs) == 14 and [row["run"] for row in runs[:3]] == ["0", "1", "2"]
    assert [row["status"] for row in runs[-2:]] == ["failed", "running"] and runs[-2]["error"] == "out of memory"
    assert runs[11]["lambda_max"] == "" and float(runs[11]["worst@0.05"]) > 0  # the run that lacks lambda_max
    assert runs[0]["optimizer_label"] == "sgd" and runs[3]["optimizer_label"] == "sam ρ=0.05"

    groups = read_csv(out / "groups.csv")
    assert [row["runs"] for row in groups] == ["3 completed", "3 completed, 1 running", "3 completed, 1 failed",
                                               "3 completed"]
    assert groups[2]["seeds"] == "0 1 2 3" and groups[2]["n_completed"] == "3"
    expected = np.mean([summary["test_acc"] for summary in completed_summaries(sweep)
                        if summary["optimizer"] == "sgd" and summary["batch_size"] == 256])
    assert float(groups[2]["test_acc_mean"]) == pytest.approx(expected)
    assert groups[3]["val_acc_n"] == "2" and groups[3]["lambda_max_n"] == "2"


def test_each_protocol_gets_its_own_section_groups_and_plots(tmp_path: Path) -> None:
    for protocol, offset in (("same lr", 0), ("sqrt-scaled lr", 10)):
        for job, (batch_size, seed) in enumerate(itertools.product((32, 512), range(2))):
            write_run(tmp_path, f"{offset + job}_x", protocol=protocol, optimizer="sgd", batch_size=batch_size,
                      seed=seed, status="completed", test_acc=0.7, gap_acc=0.2 + 0.01 * job, gap_loss=1.0,
                      sharpness={"lambda_max": 10.0 + job})
    report = write_report([tmp_path], tmp_path / "elsewhere")
    assert "## Protocol: same lr" in report.markdown and "## Protocol: sqrt-scaled lr" in report.markdown
    names = {path.name for path in report.files}
    assert {"p1_test_acc_vs_batch_size.png", "p2_test_acc_vs_batch_size.png", "p1_lambda_max_vs_gap_acc.png"} <= names
    assert len(read_csv(tmp_path / "elsewhere" / "groups.csv")) == 4  # 2 protocols x 2 batch sizes


def test_an_unreadable_summary_is_listed_not_lost(tmp_path: Path) -> None:
    write_run(tmp_path, "0_ok", optimizer="sgd", status="completed")
    (tmp_path / "1_torn").mkdir()
    (tmp_path / "1_torn" / "summary.json").write_text('{"status": "comp')
    runs = find_runs([tmp_path])
    assert [(run.name, run.status) for run in runs] == [("0", "completed"), ("1", "unreadable")]
    assert "summary.json cannot be read" in runs[1].get("error")


def test_paths_without_runs_are_named_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError) as raised:
        find_runs([tmp_path / "empty", tmp_path / "missing"])
    assert [problem.split(":")[0] for problem in raised.value.problems] == [str(tmp_path / "empty"),
                                                                            str(tmp_path / "missing")]


def test_sam_report_end_to_end(sweep: Path, tmp_path: Path) -> None:
    result = run_cli("sam-report", str(sweep), "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"## Protocol: {PROTOCOL}" in result.stdout and "| lambda_max | gap_acc |" in result.stdout
    assert result.stdout.rstrip().endswith(str(Path("out") / "worst_at_0.05_vs_gap_acc.png"))
    assert len(read_csv(tmp_path / "out" / "runs.csv")) == 14 and (tmp_path / "out" / "report.md").is_file()
    run_dir = sweep / "0_optimizer=sgd,batch_size=32,seed=0"
    single = run_cli("sam-report", str(run_dir), cwd=tmp_path)  # a run directory works too
    assert single.returncode == 0, single.stderr
    assert read_csv(run_dir / "report" / "runs.csv")[0]["run"] == run_dir.name.split("_")[0]


def test_sam_report_without_runs_is_one_line_per_path_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("sam-report", "empty", "missing", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("sam-report: error: ") for line in lines)
    assert "empty: no summary.json" in lines[0] and "missing: no such directory" in lines[1]
    assert not (tmp_path / "empty" / "report").exists()


def test_optimizer_labels_say_what_ran() -> None:
    assert optimizer_label({"optimizer": "sam", "base_optimizer": "adamw", "rho": 0.05}) == "sam(adamw)"
    assert optimizer_label({"optimizer": "sam", "base_optimizer": "sgd", "rho": 0.05}, with_rho=True) == "sam ρ=0.05"
    assert optimizer_label({"optimizer": "sgd", "base_optimizer": "adamw", "rho": None}) == "adamw"  # plain AdamW


def test_a_line_across_batch_sizes_holds_together_when_lr_and_epochs_follow_the_batch_size(tmp_path: Path) -> None:
    """sqrt lr scaling and a step budget change lr and epochs with the batch size: still one line per optimizer."""
    for job, (optimizer, batch_size) in enumerate(itertools.product(("sgd", "sam"), (32, 512))):
        write_run(tmp_path, f"{job}_x", optimizer=optimizer, base_optimizer="sgd",
                  rho=0.05 if optimizer == "sam" else None, lr_base=0.1, lr_scaling="sqrt",
                  lr=0.1 * math.sqrt(batch_size / 32), batch_size=batch_size, budget="steps", steps_budget=1000,
                  epochs=math.ceil(1000 * batch_size / 4000), status="completed", test_acc=0.7)
    lines = _lines(group_runs(find_runs([tmp_path])), "batch_size")
    assert [(label, len(members)) for label, members in lines] == [("sgd", 2), ("sam ρ=0.05", 2)]


def test_a_sam_only_option_is_a_column_only_when_it_differs_between_sam_runs(tmp_path: Path) -> None:
    write_run(tmp_path, "0_x", optimizer="sgd", rho=None, adaptive=None, status="completed")
    write_run(tmp_path, "1_x", optimizer="sam", rho=0.05, adaptive=False, status="completed")
    assert "adaptive" not in format_table(collect(tmp_path)).splitlines()[0].split()
    write_run(tmp_path, "2_x", optimizer="asam", rho=1.0, adaptive=True, status="completed")
    assert "adaptive" in format_table(collect(tmp_path)).splitlines()[0].split()


def test_an_output_directory_that_cannot_be_written_is_one_line(sweep: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ReportError, match=r"cannot write the report into .*a_file.*; choose another --out"):
        write_report([sweep], tmp_path / "a_file")
