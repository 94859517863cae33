"""The sharpness-notions study end to end, shrunk to seconds: stage 1 fits, stage 2 continues from those weights
with each algorithm (configs/continuation/), `sam-report` draws sharpness over training."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import read_json, run_cli

SMALL = ["model.hidden=[16]", "seed=0", "sharpness.options={max_iterations:20,trace_probes:10}"]  # one seed, small
FIT = ["-m", "experiment=sharpness_notions_fit", *SMALL, "epochs=2"]
# gd, sam and sam_batch1 at both radii: gd at 0.5 is a duplicate of gd at 0.1 (the preset's grid gives the 0.1)
CONTINUATION = ["-m", "experiment=sharpness_notions", *SMALL, "+continuation=gd,sam,sam_batch1", "steps=4",
                "sharpness.every_steps=2"]


@pytest.mark.slow
def test_the_study_continues_every_algorithm_from_its_seeds_fit_and_reports_sharpness_over_training(
        workdir: Path) -> None:
    fit = run_cli("sam-run", *FIT, cwd=workdir)
    assert fit.returncode == 0, fit.stderr
    fitted = workdir / "outputs" / "sharpness_notions" / "fit" / "seed_0"
    assert read_json(fitted / "summary.json")["status"] == "completed"

    continued = run_cli("sam-run", *CONTINUATION, cwd=workdir)
    assert continued.returncode == 0, continued.stderr
    sweep = workdir / "outputs" / "sharpness_notions" / "continuation"
    summaries = {(s["optimizer"], s["batch_size"], s["rho"]): s
                 for s in map(read_json, sweep.glob("*/summary.json")) if s["status"] != "duplicate"}
    assert set(summaries) == {("sgd", 1000, None), ("sam", 1000, 0.1), ("sam", 1000, 0.5), ("sam", 1, 0.1),
                              ("sam", 1, 0.5)}
    duplicates = [s for s in map(read_json, sweep.glob("*/summary.json")) if s["status"] == "duplicate"]
    assert [(s["optimizer"], s["batch_size"]) for s in duplicates] == [("sgd", 1000)]
    starts = set()
    for summary in summaries.values():
        assert summary["status"] == "completed" and summary["steps_completed"] == 4
        assert summary["init_from"] == "outputs/sharpness_notions/fit/seed_${seed}"  # as written: seeds group
        assert summary["init_source"]["path"].endswith("fit/seed_0/checkpoints/last.pt")
        assert summary["lr"] == 0.02 and summary["label_smoothing"] == 0.1
        records = summary["measurements"]
        assert [record["step"] for record in records] == [0, 2, 4]
        assert {record["label_smoothing"] for record in records} == {0.1}
        starts.add(tuple(records[0]["values"][name] for name in ("lambda_max", "trace")))
    assert len(starts) == 1  # every continuation starts from the same fitted weights, measured on the same loss

    report = run_cli("sam-report", str(sweep), cwd=workdir)
    assert report.returncode == 0, report.stderr
    out = sweep / "report"
    with (out / "trajectories.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["measure"] for row in rows} >= {"lambda_max", "trace", "alignment"}
    assert len({(row["optimizer_label"], row["batch_size"]) for row in rows}) == 5
    # GD's label is its own: the duplicate GD run at rho 0.5 (no steps_budget: never built) tells nothing apart
    assert "| sgd | lambda_max | 1 | 0 → 4 |" in (out / "report.md").read_text()
    pngs = {path.name for path in out.glob("*.png")}
    assert any("lambda_max" in name for name in pngs) and any("trace" in name for name in pngs)
