"""The batch-size protocol: lr scaling, epoch/step budgets, evaluation and checkpoint intervals, stop targets,
the chance-level flag and the validation split — as rules, and end to end through the run's entry function."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_json, run_in_process
from hydra import compose, initialize_config_dir

from sam_runner.cli.preflight import CONFIG_DIR
from sam_runner.cli.run import objective
from sam_runner.errors import ConfigError
from sam_runner.run.build import build_data
from sam_runner.run.plan import at_chance, make_plan, protocol_name, scaled_lr
from sam_runner.run.spec import make_spec, validate


def settings(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return cfg, validate(cfg)


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 8.0), ("sqrt", math.sqrt(8.0))])
def test_lr_scaling_rules(rule: str, factor: float) -> None:
    assert scaled_lr(0.1, 256, 32, rule) == pytest.approx(0.1 * factor)
    assert scaled_lr(0.1, 32, 32, rule) == pytest.approx(0.1)  # at the reference batch size: unchanged


def test_epoch_budget_trains_whole_epochs_and_the_lr_is_scaled_from_the_config() -> None:
    _, top = settings("epochs=3", "batch_size=512", "lr=0.1", "lr_scaling=linear", "lr_reference_batch_size=128")
    plan = make_plan(top, steps_per_epoch=8)
    assert plan.lr == pytest.approx(0.4) and plan.total_steps == 24 and plan.epochs == 3
    assert [plan.batches_in(e) for e in range(3)] == [8, 8, 8]


def test_step_budget_gives_every_batch_size_the_same_updates_and_a_partial_last_epoch() -> None:
    for steps_per_epoch in (125, 4):  # batch 32 and batch 1000 on 4000 samples
        _, top = settings("budget=steps", "steps=300")
        plan = make_plan(top, steps_per_epoch)
        assert sum(plan.batches_in(e) for e in range(plan.epochs)) == 300 == plan.total_steps
    assert make_plan(top, 125).epochs == 3 and make_plan(top, 125).batches_in(2) == 50


def test_evaluation_and_checkpoint_intervals_always_include_the_last_epoch() -> None:
    _, top = settings("epochs=7", "eval.every=3", "checkpoint.every=2")
    plan = make_plan(top, steps_per_epoch=1)
    assert [e + 1 for e in range(7) if plan.evaluates_after(e)] == [3, 6, 7]
    assert [e + 1 for e in range(7) if plan.checkpoints_after(e)] == [2, 4, 6, 7]


def test_a_run_stops_when_every_set_target_holds() -> None:
    _, top = settings("stop.train_acc=0.99", "stop.train_loss=0.05")
    plan = make_plan(top, 10)
    assert plan.target_met(0.995, 0.04) and not plan.target_met(0.995, 0.06) and not plan.target_met(0.98, 0.01)
    _, top = settings("stop.train_acc=0.99")
    assert make_plan(top, 10).target_met(1.0, 5.0)
    _, top = settings()
    assert not make_plan(top, 10).has_target and not make_plan(top, 10).target_met(1.0, 0.0)


def test_protocol_names_the_comparison_and_not_the_batch_size() -> None:
    keskar = [protocol_name(settings(f"batch_size={b}", "epochs=100", "stop.train_acc=0.99")[1]) for b in (32, 1000)]
    assert keskar == ["same lr, 100 epochs, until train acc >= 0.99"] * 2
    hoffer = protocol_name(settings("lr_scaling=sqrt", "lr_reference_batch_size=32", "budget=steps", "steps=3000")[1])
    assert hoffer == "lr x sqrt(B/32), 3000 steps"


def test_chance_level_is_relative_to_the_majority_class() -> None:
    assert at_chance(0.12, 0.1) and not at_chance(0.2, 0.1)
    assert at_chance(0.6, 0.5) and not at_chance(0.8, 0.5)


@pytest.mark.parametrize("override, key", [("budget=steps", "steps"), ("stop.train_acc=1.5", "stop.train_acc"),
                                           ("stop.train_loss=0", "stop.train_loss"), ("eval.every=0", "eval.every"),
                                           ("checkpoint.every=0", "checkpoint.every"),
                                           ("lr_scaling=cube", "lr_scaling"),
                                           ("dataset.val_fraction=1.0", "dataset.val_fraction")])
def test_bad_protocol_values_are_config_errors(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        settings(override)


def test_validation_split_is_seeded_disjoint_from_training_and_the_same_for_every_run_seed() -> None:
    overrides = ["dataset=synthetic", "dataset.source.num_train=200", "dataset.val_fraction=0.25", "batch_size=16"]
    splits = []
    for seed in (0, 1):
        cfg, top = settings(*overrides, f"seed={seed}")
        data = build_data(make_spec(cfg), torch.device("cpu"))
        assert data.val.num_samples == 50 and data.train.num_samples == data.train_eval.num_samples == 150
        val_rows = {tuple(row.tolist()) for row in data.val.inputs.flatten(1)}
        trained = {tuple(row.tolist()) for x, _ in data.train.epoch(0) for row in x.flatten(1)}
        sharpness_rows = {tuple(row.tolist()) for x, _ in data.sharpness for row in x.flatten(1)}
        assert len(trained) == 150 and not val_rows & trained and not val_rows & sharpness_rows
        splits.append(val_rows)
    assert splits[0] == splits[1]  # held out by dataset.val_seed, not by the run's seed


def test_the_sweeper_objective_is_validation_accuracy_when_there_is_a_split() -> None:
    assert objective({"test_acc": 0.9, "val_acc": 0.8}) == 0.8
    assert objective({"test_acc": 0.9}) == 0.9
    assert objective({"status": "failed"}) is None


def test_step_budget_sqrt_lr_and_sparse_evaluation_end_to_end(workdir: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """256 samples / batch 64 = 4 steps per epoch; 10 steps = epochs of 4, 4 and 2 batches."""
    run_dir = run_in_process(workdir, monkeypatch, *TINY, "budget=steps", "steps=10", "lr=0.1", "lr_scaling=sqrt",
                             "lr_reference_batch_size=16", "eval.every=2", "checkpoint.every=5", "scheduler=constant")
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["steps_completed"] == 10 == summary["steps_budget"]
    assert summary["epochs_completed"] == 3 and summary["lr"] == pytest.approx(0.2) and summary["lr_base"] == 0.1
    assert summary["protocol"] == "lr x sqrt(B/16), 10 steps" and summary["target_reached"] is None
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line["step"], "test/acc" in line) for line in lines] == \
        [(1, 4, False), (2, 8, True), (3, 10, True)]
    assert [line["opt/lr"] for line in lines] == pytest.approx([0.2] * 3)  # the scaled lr reached the optimizer
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 10  # checkpoint.every=5 > epochs: only the last epoch wrote one
    times = [summary[f"{phase}_time_s"] for phase in ("train", "eval", "checkpoint", "sharpness")]
    assert all(t > 0 for t in times) and summary["wall_time_s"] >= sum(times)
    assert summary["at_chance"] is False


def test_a_target_ends_the_run_and_sharpness_is_measured_there(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sam_runner")
    run_dir = run_in_process(workdir, monkeypatch, *TINY, "epochs=30", "stop.train_acc=0.6",
                             "dataset.val_fraction=0.25")
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["target_reached"] is True
    assert summary["target_epoch"] == summary["epochs_completed"] < 30 and summary["train_acc"] >= 0.6
    assert summary["target_step"] == 3 * summary["target_epoch"]  # 192 training samples / 64: 3 steps per epoch
    (record,) = summary["measurements"]
    assert (record["epoch"], record["step"]) == (summary["target_epoch"], summary["target_step"])
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == summary["target_epoch"]
    assert 0 <= summary["val_acc"] <= 1 and summary["val_fraction"] == 0.25
    assert "val/acc" in json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"target reached at step {summary['target_step']}" in caplog.text  # the epoch's line on the console
