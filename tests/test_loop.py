"""The training loop (run/loop.py), in process: sharpness measured every `sharpness.every_steps` optimizer steps, within
epochs and at their ends, without changing the training, and continued exactly after a stop or a kill inside such a
measurement; every `sharpness.every` epochs; images/s counts the samples trained."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, composed, read_json, run_in_process
from test_resume import assert_same_run, metric_lines
from test_rundir import strict_lines
from torch import nn

from sam_runner.run import experiment, loop
from sam_runner.run.measurement import take_measurement
from sam_runner.run.spec import Settings, SharpnessSettings
from sam_runner.run.stopping import RunStopped
from sam_runner.sharpness import MeasureChoice

# TINY is 2 epochs of 4 steps; lambda_max alone keeps each measurement short.
EVERY_3_STEPS = [*TINY, "epochs=3", "sharpness.measures=[lambda_max]", "sharpness.every_steps=3"]


def test_every_steps_measures_within_and_at_the_end_of_epochs_without_changing_the_training(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 0 (the weights the run starts from) and steps 3, 6 and 9 fall within epochs (a line of their own), 12 is
    the last epoch's end (in its line)."""
    run_in_process(workdir, monkeypatch, *EVERY_3_STEPS, run_dir="measured")
    run_in_process(workdir, monkeypatch, *EVERY_3_STEPS, "sharpness.every_steps=null", run_dir="plain")
    summary = read_json(workdir / "measured" / "summary.json")
    assert [(record["epoch"], record["step"]) for record in summary["measurements"]] == [(1, 0), (1, 3), (2, 6),
                                                                                          (3, 9), (3, 12)]
    lines = strict_lines(workdir / "measured" / "metrics.jsonl")
    assert [(line["epoch"], line["step"]) for line in lines] == [(1, 0), (1, 3), (1, 4), (2, 6), (2, 8), (3, 9),
                                                                 (3, 12)]
    within = [line for line in lines if line["step"] in (0, 3, 6, 9)]
    assert all(set(line) == {"epoch", "step", "sharpness/lambda_max", "sharpness/lambda_max_iterations"}
               for line in within)
    assert [line["sharpness/lambda_max"] for line in within] == [record["values"]["lambda_max"]
                                                                  for record in summary["measurements"][:4]]
    epochs = [line for line in metric_lines(workdir / "measured") if "train/loss_seen" in line]
    plain = metric_lines(workdir / "plain")
    assert [{key: value for key, value in line.items() if not key.startswith("sharpness/")} for line in epochs] == [
        {key: value for key, value in line.items() if not key.startswith("sharpness/")} for line in plain]


@pytest.mark.parametrize("ending", ["stopped", "killed"])
def test_a_run_stopped_or_killed_inside_a_measurement_within_an_epoch_continues_exactly(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    """SIGTERM (a pre-empted job) or a kill -9 while step 6 is measured, in epoch 2: the checkpoint before the
    measurement is written, the continued run measures step 6 again and ends as the run that was never stopped."""
    run_in_process(workdir, monkeypatch, *EVERY_3_STEPS, run_dir="reference")
    measure = loop.take_measurement

    def interrupted(*args: Any, step: int, **kwargs: Any) -> dict[str, Any]:
        if step == 6:
            if ending == "killed":
                raise SystemExit(137)  # as `kill -9`: nothing of the run's own handling runs
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run: it stops at the measurement's next pass
        return measure(*args, step=step, **kwargs)

    monkeypatch.setattr(loop, "take_measurement", interrupted)
    with pytest.raises(RunStopped if ending == "stopped" else SystemExit):
        run_in_process(workdir, monkeypatch, *EVERY_3_STEPS)
    summary = read_json(workdir / "run" / "summary.json")
    assert summary["status"] == ("preempted" if ending == "stopped" else "running")
    assert [record["step"] for record in summary.get("measurements", [])] == [0, 3]
    monkeypatch.setattr(loop, "take_measurement", measure)
    run_in_process(workdir, monkeypatch, *EVERY_3_STEPS)
    assert_same_run(workdir / "run", workdir / "reference")
    assert [line["step"] for line in strict_lines(workdir / "run" / "metrics.jsonl")] == [0, 3, 4, 6, 8, 9, 12]


def test_a_run_that_diverges_within_an_epoch_is_recorded_diverged_not_failed_by_its_measurement(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharpness is undefined at non-finite weights: the measurements due within the epoch are skipped, and the
    epoch's end records the divergence."""
    cfg, choices = composed(workdir, monkeypatch, [*EVERY_3_STEPS, "lr=1e12", "sharpness.every_steps=1"])
    summary = experiment.run_experiment(cfg, workdir / "run", choices=choices)
    assert summary["status"] == "diverged", summary.get("error")
    assert read_json(workdir / "run" / "summary.json")["status"] == "diverged"


def test_sharpness_every_epoch_is_logged_for_each_epoch(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = run_in_process(workdir, monkeypatch, *TINY, "epochs=3", "sharpness.every=1",
                             "sharpness.measures=[ascent]")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line["step"]) for line in lines] == [(1, 0), (1, 4), (2, 8), (3, 12)]  # step 0: the start
    assert all("sharpness/ascent" in line for line in lines)
    summary = read_json(run_dir / "summary.json")
    assert summary["sharpness"]["ascent"] == lines[-1]["sharpness/ascent"]


def test_images_per_second_counts_the_samples_trained_not_the_batch_size(workdir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = run_in_process(workdir, monkeypatch, *TINY, "batch_size=1000", "epochs=1", "sharpness.measures=[]")
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["opt/images_per_s"] * metrics["opt/epoch_time_s"] == pytest.approx(256)  # TINY's training set


def test_a_measurement_reads_the_loss_the_run_trains_label_smoothing_included() -> None:
    """SAM minimizes the sharpness of its training loss: with label smoothing, λ_max is that loss's, against the
    explicit float64 Hessian of a small tanh network (plain cross-entropy's differs, so the test tells them apart)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs, targets = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    names, shapes = zip(*((name, p.shape) for name, p in model.named_parameters()))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def top_eigenvalue(label_smoothing: float) -> float:
        def loss(weights: torch.Tensor) -> torch.Tensor:
            params = dict(zip(names, (piece.reshape(shape) for piece, shape in
                                      zip(weights.split([shape.numel() for shape in shapes]), shapes))))
            logits = torch.func.functional_call(model, params, (inputs,))
            return nn.functional.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])

    settings = Settings(rho=0.05, lr=0.1, label_smoothing=0.3,
                        sharpness=SharpnessSettings(options={"tolerance": 1e-10}))
    record = take_measurement(model, [(inputs, targets)], MeasureChoice(["lambda_max"], "test"), settings,
                              epoch=1, step=0, source="sam-run")
    assert record["label_smoothing"] == 0.3
    assert abs(record["values"]["lambda_max"] - top_eigenvalue(0.3)) < 1e-8
    assert abs(top_eigenvalue(0.3) - top_eigenvalue(0.0)) > 1e-3
