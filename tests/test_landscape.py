"""sam-landscape: filter-normalized directions and Keskar's interpolation, on tiny runs made by the installed sam-run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_json, run_cli
from torch import nn

from sam_runner.data import BatchStream
from sam_runner.report import landscape, saved_run
from sam_runner.run.evaluation import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """Four tiny runs from one seed on 3x4x4 inputs: an MLP and Keskar's C1 (conv, BatchNorm, linear), each at
    batch 32 and 128; keyed by (model, batch_size) as their summary.json says."""
    workdir = tmp_path_factory.mktemp("landscape")
    result = run_cli("sam-run", "-m", *TINY, "sharpness.measures=[]", "dataset.source.input_shape=[3,4,4]",
                     "model=mlp,keskar_c1", "batch_size=32,128", "hydra.sweep.dir=sweep",
                     "hydra.sweep.subdir=${hydra.job.num}", cwd=workdir)
    assert result.returncode == 0, result.stderr
    found = {}
    for run_dir in sorted((workdir / "sweep").iterdir()):
        if (run_dir / "summary.json").is_file():
            summary = read_json(run_dir / "summary.json")
            found[summary["model"], summary["batch_size"]] = run_dir
    assert len(found) == 4
    return found


def own_metrics(run_dir: Path) -> dict[str, float]:
    """The run's own losses and accuracies, computed apart from landscape: its checkpoint, run/evaluation.evaluate."""
    run = saved_run.load(run_dir)
    train_loss, train_acc = evaluate(run.model, run.data.train_eval, None)
    test_loss, test_acc = evaluate(run.model, run.data.test, None)
    return {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc}


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def metrics_of(row: dict[str, str]) -> dict[str, float]:
    return {key: float(row[key]) for key in landscape.METRICS}


@pytest.mark.parametrize(("model", "bn_stats"), [("mlp", "recompute"), ("keskar_c1", "interpolate")])
def test_interpolation_ends_are_each_runs_own_losses(runs: dict, tmp_path: Path, model: str, bn_stats: str) -> None:
    run_a, run_b = runs[model, 32], runs[model, 128]
    png, table = landscape.interpolation(run_a, run_b, tmp_path, span=(0.0, 1.0), points=3, bn_stats=bn_stats)
    rows = {float(row["alpha"]): metrics_of(row) for row in read_rows(table)}
    assert sorted(rows) == [0.0, 0.5, 1.0]
    assert rows[0.0] == pytest.approx(own_metrics(run_a), rel=1e-6)
    assert rows[1.0] == pytest.approx(own_metrics(run_b), rel=1e-6)
    halfway = rows[0.5]["train_loss"]
    assert all(halfway != pytest.approx(rows[end]["train_loss"], rel=1e-3) for end in (0.0, 1.0)), "a path, not a point"
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_interpolation_warns_when_the_runs_did_not_share_an_initialization(runs: dict, tmp_path: Path) -> None:
    other_seed = tmp_path / "other_seed"
    shutil.copytree(runs["mlp", 128], other_seed)
    info = read_json(other_seed / "run.json")
    info["config"]["seed"] = 1
    (other_seed / "run.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="has seed 0 and .* seed 1"):
        landscape.interpolation(runs["mlp", 32], other_seed, tmp_path / "out", points=3)


def test_filter_normalized_direction_has_each_filters_norm_and_zero_biases(runs: dict) -> None:
    models = [saved_run.load(runs["keskar_c1", batch]).model for batch in (32, 128)]
    kinds = {type(module) for module in models[0].modules()}
    assert {nn.Conv2d, nn.Linear, nn.BatchNorm2d} <= kinds, "the test needs conv, linear and BatchNorm layers"
    directions = [landscape.filter_normalized_direction(model, seed=0) for model in models]
    for name, weight in models[0].named_parameters():
        step = directions[0][name]
        if weight.dim() < 2:
            assert not step.any(), f"{name}: biases and BatchNorm parameters must get d = 0"
            continue
        filters, weight_filters = step.double().flatten(1), weight.detach().double().flatten(1)
        torch.testing.assert_close(filters.norm(dim=1), weight_filters.norm(dim=1), rtol=1e-5, atol=0)
        assert not torch.allclose(filters, weight_filters), f"{name}: d must be random, not w itself"
        # the other run: the same raw draw (same seed), scaled by its own weights
        other_weight = dict(models[1].named_parameters())[name].detach().double().flatten(1)
        other_filters = directions[1][name].double().flatten(1)
        torch.testing.assert_close(other_filters.norm(dim=1), other_weight.norm(dim=1), rtol=1e-5, atol=0)
        torch.testing.assert_close(nn.functional.normalize(filters, dim=1),
                                   nn.functional.normalize(other_filters, dim=1), rtol=1e-5, atol=1e-7)
    again = landscape.filter_normalized_direction(models[0], seed=0)
    other_seed = landscape.filter_normalized_direction(models[0], seed=1)
    name = next(name for name, weight in models[0].named_parameters() if weight.dim() >= 2)
    assert torch.equal(again[name], directions[0][name]) and not torch.equal(other_seed[name], directions[0][name])


def test_direction_curve_passes_through_each_run_at_t0_and_repeats_with_its_seed(runs: dict, tmp_path: Path) -> None:
    pair = [runs["keskar_c1", 32], runs["keskar_c1", 128]]
    ts = [-1.0, -0.5, 0.0, 0.5, 1.0]
    _, table = landscape.directions(pair, tmp_path / "seed0", points=5)
    rows = read_rows(table)
    assert [(row["run"], float(row["t"])) for row in rows] == [(str(run), t) for run in pair for t in ts]
    for run_dir in pair:
        at_zero = next(row for row in rows if row["run"] == str(run_dir) and float(row["t"]) == 0.0)
        assert metrics_of(at_zero) == pytest.approx(own_metrics(run_dir), rel=1e-6)
    _, same = landscape.directions(pair, tmp_path / "again", points=5)
    assert same.read_text() == table.read_text()
    _, other = landscape.directions(pair, tmp_path / "seed1", points=5, seed=1)
    changed = [metrics_of(a) != metrics_of(b) for a, b in zip(rows, read_rows(other))]
    assert changed == [t != 0.0 for _ in pair for t in ts]


def test_recompute_batchnorm_gives_the_statistics_of_the_evaluated_network() -> None:
    """One batch holding all samples: the statistics are the data's, with dropout off, checked against float64
    references to float32 precision (stream and model compute in float32; the summation order varies with threads)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Linear(3, 2), nn.BatchNorm1d(2))
    inputs = torch.randn(50, 3) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([2.0, -1.0, 0.0])
    stream = BatchStream(inputs, torch.zeros(50, dtype=torch.long), batch_size=50, shuffle=False, seed=0,
                         device="cpu")
    landscape.recompute_batchnorm(model, stream)
    x = inputs.double()
    torch.testing.assert_close(model[0].running_mean, x.mean(0).float())
    torch.testing.assert_close(model[0].running_var, x.var(0, unbiased=True).float())
    normalized = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + model[0].eps)  # training-mode BatchNorm
    hidden = normalized @ model[2].weight.double().T + model[2].bias.double()  # no dropout on the way
    torch.testing.assert_close(model[3].running_mean, hidden.mean(0).float())
    torch.testing.assert_close(model[3].running_var, hidden.var(0, unbiased=True).float())
    assert not model.training and model[0].momentum == 0.1 and model[3].momentum == 0.1


def test_bad_range_or_point_count_is_one_clear_error(runs: dict, tmp_path: Path) -> None:
    with pytest.raises(landscape.LandscapeError, match="at least 2 points"):
        landscape.directions([runs["mlp", 32]], tmp_path, points=1)
    with pytest.raises(landscape.LandscapeError, match="LOW < HIGH"):
        landscape.interpolation(runs["mlp", 32], runs["mlp", 128], tmp_path, span=(2.0, -1.0))


def test_cli_writes_png_and_csv_for_both_pictures(runs: dict, tmp_path: Path) -> None:
    small, large = runs["mlp", 32], runs["mlp", 128]
    result = run_cli("sam-landscape", str(small), str(large), "--num-samples", "64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = small / "landscape"
    assert result.stdout.split() == [str(out / "direction.png"), str(out / "direction.csv")]
    rows = read_rows(out / "direction.csv")
    assert [row["label"] for row in rows] == ["batch_size=32"] * 41 + ["batch_size=128"] * 41  # named by summary.json
    ts = [float(row["t"]) for row in rows[:41]]
    assert ts == pytest.approx([-1 + i / 20 for i in range(41)], abs=1e-12)
    assert ts[20] == 0.0, "t = 0 (the run itself) must lie exactly on the default grid"
    assert (out / "direction.png").read_bytes().startswith(PNG_MAGIC)

    result = run_cli("sam-landscape", "--interpolate", str(small), str(large), "--points", "7", "--range", "0", "1",
                     "--out", "pictures", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "pictures" / "interpolation.csv")
    assert [float(row["alpha"]) for row in rows] == pytest.approx([i / 6 for i in range(7)])
    assert set(rows[0]) == {"alpha", *landscape.METRICS}
    assert (tmp_path / "pictures" / "interpolation.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(("which", "expected"), [
    ("mismatched", "sam-landscape: error: cannot interpolate between different networks"),
    ("missing", "sam-landscape: error: "),
])
def test_cli_bad_runs_are_one_error_line_and_exit_2(runs: dict, tmp_path: Path, which: str, expected: str) -> None:
    pair = [runs["mlp", 32], runs["keskar_c1", 32]] if which == "mismatched" else [runs["mlp", 32], tmp_path / "nope"]
    result = run_cli("sam-landscape", "--interpolate", *map(str, pair), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(expected) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    if which == "missing":
        assert "nope/run.json is missing" in result.stderr


def copied_run(run_dir: Path, to: Path, **config_changes: str) -> Path:
    """A copy of `run_dir` whose run.json holds other dataset.source values (dotted key under the config)."""
    shutil.copytree(run_dir, to)
    info = read_json(to / "run.json")
    for key, value in config_changes.items():
        info["config"]["dataset"]["source"][key] = value
    (to / "run.json").write_text(json.dumps(info))
    return to


def test_cli_refuses_to_interpolate_between_runs_on_different_data(runs: dict, tmp_path: Path) -> None:
    other_data = copied_run(runs["mlp", 32], tmp_path / "other", seed=1)  # the same network on other samples
    result = run_cli("sam-landscape", "--interpolate", str(runs["mlp", 32]), str(other_data), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("sam-landscape: error: cannot interpolate between runs on different data")
    assert not (runs["mlp", 32] / "landscape" / "interpolation.csv").exists()


@pytest.mark.parametrize("out", ["a_file", "a_file/pictures"])
def test_cli_out_that_cannot_be_a_folder_is_one_line_before_any_evaluation(runs: dict, tmp_path: Path,
                                                                            out: str) -> None:
    (tmp_path / "a_file").write_text("mine")
    result = run_cli("sam-landscape", str(runs["mlp", 32]), "--out", out, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"sam-landscape: error: cannot write the pictures under {out}: a_file is not a folder; choose another --out"]
    assert (tmp_path / "a_file").read_text() == "mine"


def test_cli_plugin_that_raises_is_one_line_and_exit_1(runs: dict, tmp_path: Path) -> None:
    (tmp_path / "broken_plugin.py").write_text("def make_data(**_):\n    raise RuntimeError('the plug-in broke')\n")
    broken = copied_run(runs["mlp", 32], tmp_path / "broken", _target_="broken_plugin.make_data")
    result = run_cli("sam-landscape", str(broken), "--out", "pictures", cwd=tmp_path,
                     extra_env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "sam-landscape: error: RuntimeError: the plug-in broke (HYDRA_FULL_ERROR=1 shows where)"]
    assert not (tmp_path / "pictures").exists()


def test_sam_report_skips_a_picture_over_a_corrupt_checkpoint_and_says_so(runs: dict, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    small, large = (shutil.copytree(runs["mlp", size], sweep / str(size)) for size in (32, 128))
    (large / "checkpoints" / "last.pt").write_bytes(b"torn")
    result = run_cli("sam-report", str(sweep), "--out", "report", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    for picture in ("interpolation", "direction"):
        note = f"The {picture} picture was skipped: checkpoint {large / 'checkpoints' / 'last.pt'} is corrupt"
        assert f"- {note}" in report and f"sam-report: warning: {note}" in result.stderr
    assert "### Runs" in report and (tmp_path / "report" / "runs.csv").is_file()  # the rest of the report is there
