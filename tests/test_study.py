"""The batch-size study end to end, shrunk to seconds: the preset's sweep, then `sam-report` on it."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from conftest import read_json, run_cli

# The preset with tiny data and model; the command line narrows its grid (hydra.sweeper.params) to 2 x 2 x 2.
TINY_STUDY = ["-m", "experiment=batch_size_gap", "dataset=synthetic", "dataset.source.num_train=256",
              "dataset.source.num_test=128", "model.hidden=[32]", "epochs=6", "eval.every=1",
              "batch_size=16,128", "seed=0,1", "sharpness.measures=[lambda_max,ascent,keskar]",
              "sharpness.num_samples=128", "sharpness.batch_size=128"]


@pytest.mark.slow
def test_the_study_preset_runs_end_to_end_and_sam_report_writes_its_files(workdir: Path) -> None:
    result = run_cli("sam-run", *TINY_STUDY, "hydra.sweep.dir=outputs/study", cwd=workdir)
    assert result.returncode == 0, result.stderr
    sweep = workdir / "outputs" / "study"
    summaries = [read_json(path) for path in sweep.glob("*/summary.json")]
    assert len(summaries) == 8  # batch 16/128 x sgd/sam x seeds 0/1
    assert {(s["batch_size"], s["optimizer"], s["seed"]) for s in summaries} == \
        {(b, o, seed) for b in (16, 128) for o in ("sgd", "sam") for seed in (0, 1)}
    for summary in summaries:
        assert summary["status"] == "completed"
        assert summary["protocol"] == "same lr, 6 epochs, until train acc >= 0.99 and train loss <= 0.05"
        assert summary["lr"] == 0.1
        fitted = summary["train_acc"] >= 0.99 and summary["train_loss"] <= 0.05  # eval-mode, every epoch here
        if summary["target_reached"] is True:  # stopped at the first epoch that fitted
            assert fitted and summary["target_epoch"] == summary["epochs_completed"] <= 6
        else:
            assert summary["target_reached"] is False and summary["epochs_completed"] == 6 and not fitted
        (record,) = summary["measurements"]  # measured once, where the run stopped
        assert record["epoch"] == summary["epochs_completed"]
    assert "sam-report" in result.stdout  # the sweep table names the next command

    report = run_cli("sam-report", str(sweep), cwd=workdir)
    assert report.returncode == 0, report.stderr
    out = sweep / "report"
    for name in ("report.md", "runs.csv", "groups.csv"):
        assert (out / name).stat().st_size > 0
    with (out / "runs.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 8
    with (out / "groups.csv").open() as handle:
        groups = list(csv.DictReader(handle))
    assert len(groups) == 4 and {group["n_completed"] for group in groups} == {"2"}
    pngs = sorted(path.name for path in out.glob("*.png"))
    assert any("batch" in name for name in pngs) and any("keskar" in name for name in pngs)
    markdown = (out / "report.md").read_text()
    # τ of each sharpness column against the accuracy gap over the 8 completed runs: a value, not an empty cell
    taus = [line for line in markdown.splitlines()
            if re.match(r"\| (lambda_max|ascent@0\.05|keskar) \| gap_acc \| ", line)]
    assert len(taus) == 3 and all(re.search(r"\| [+-]\d\.\d\d \(p=[^,]+, n=8\)", line) for line in taus), taus
    # Flatness pictures of one pair: plain SGD (before SAM), batch 16 vs 128, the lowest seed.
    for name in ("interpolation.png", "interpolation.csv", "direction.png", "direction.csv"):
        assert (out / "flatness" / name).stat().st_size > 0
    assert "![interpolation](flatness/interpolation.png)" in markdown
    pair = markdown[markdown.index("### Pictures of flatness"):].split("\n")[2]
    assert "(batch 16, α = 0)" in pair and "(batch 128, α = 1)" in pair and "sgd" in pair and "seed 0" in pair
