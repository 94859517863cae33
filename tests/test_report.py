"""The sweep table: varying hyper-parameters, final metrics, sharpness, status, in job order."""

from __future__ import annotations

import json
from pathlib import Path

from sam_runner.report import collect, format_table


def write_run(sweep: Path, name: str, **summary: object) -> None:
    (sweep / name).mkdir(parents=True)
    (sweep / name / "summary.json").write_text(json.dumps(summary))


def test_table_lists_runs_in_job_order_with_varying_settings_metrics_and_sharpness(tmp_path: Path) -> None:
    common = {"dataset": "mnist1d", "lr": 0.1, "seed": 0, "train_acc": 1.0, "gap_loss": 0.1}
    write_run(tmp_path, "10_optimizer=sam,rho=0.1", optimizer="sam", rho=0.1, test_acc=0.91, gap_acc=0.09,
              status="completed", sharpness={"lambda_max": 1.5}, **common)
    write_run(tmp_path, "2_optimizer=sgd,rho=0.05", optimizer="sgd", rho=None, status="duplicate",
              error="sgd ignores rho; see the run with rho=0.02", **common)
    write_run(tmp_path, "1_optimizer=sgd,rho=0.02", optimizer="sgd", rho=None, test_acc=0.9, gap_acc=0.1,
              status="completed", sharpness={"lambda_max": 3.25}, **common)
    (tmp_path / "3_crashed_before_writing").mkdir()

    lines = format_table(collect(tmp_path)).splitlines()

    assert lines[0].split() == ["run", "optimizer", "rho", "train_acc", "test_acc", "gap_acc", "gap_loss",
                                "lambda_max", "status"]  # lr, seed, dataset are equal everywhere: not shown
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "10"]
    assert lines[1].split() == ["1", "sgd", "-", "1.0000", "0.9000", "0.1000", "0.1000", "3.2500", "completed"]
    assert lines[3].split()[2] == "0.1" and lines[3].split()[-2] == "1.5000"
    assert lines[2].split()[-1] == "duplicate"
    assert lines[4] == "run 2: sgd ignores rho; see the run with rho=0.02"
