"""The SAM-family study (experiment=sam_variants) end to end, shrunk to seconds: its grid holds SGD and every SAM
variant, every one trains on the BatchNorm CNN, and `sam-report` draws accuracy and gap against the cost per step."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_json, run_cli
from hydra import compose, initialize_config_dir

from sam_runner.cli.preflight import CONFIG_DIR
from sam_runner.report.writer import write_report
from sam_runner.run.spec import SAM_VARIANTS

SMALL = ["dataset.source.num_samples=400", "epochs=1", "seed=0", "sharpness.measures=[]"]


def test_the_grid_holds_sgd_and_every_sam_variant() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=sam_variants"], return_hydra_config=True)
    grid = cfg.hydra.sweeper.params
    assert grid.optimizer.split(",") == ["sgd", *SAM_VARIANTS]  # a new variant joins the study, in one place
    assert grid.seed == "0,1,2" and cfg.model.norm == "batch"


@pytest.mark.slow
def test_the_study_trains_each_optimizer_and_reports_accuracy_against_cost(workdir: Path) -> None:
    optimizers = ["sgd", "sam_on", "looksam", "esam"]  # the plain one, and the variants with steps of their own
    swept = run_cli("sam-run", "-m", "experiment=sam_variants", f"optimizer={','.join(optimizers)}", *SMALL,
                    cwd=workdir)
    assert swept.returncode == 0, swept.stderr
    study = workdir / "outputs" / "sam_variants"
    summaries = {name: read_json(study / name / "seed_0" / "summary.json") for name in optimizers}
    for name, summary in summaries.items():
        assert summary["status"] == "completed" and summary["train_time_s"] > 0, name
        assert summary["sam_variant"] == (None if name == "sgd" else name)
    report = write_report([study])  # sam-report's own work, in this process
    assert (study / "report" / "accuracy_and_gap_vs_cost.png") in report.files
    assert (study / "report" / "accuracy_and_gap_vs_cost.png").stat().st_size > 1000
    assert "train_s_per_step" in report.markdown
