"""Every ending of a run is recorded honestly: an exception of any class, divergence; sweeps survive a crashing job;
every file a run writes is strict JSON."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from conftest import TINY, read_json, run_cli

EXPLODING_MODEL = textwrap.dedent("""
    import torch

    class Net(torch.nn.Module):
        '''An MLP whose forward raises a plain RuntimeError (not a sam-runner error) when explode is set; its
        construction, when explode_at_build is.'''

        def __init__(self, num_classes, input_shape, explode=False, explode_at_build=False):
            super().__init__()
            if explode_at_build:
                raise RuntimeError("boom while building the plug-in")
            self.explode = explode
            self.layer = torch.nn.Linear(40, num_classes)

        def forward(self, x):
            if self.explode:
                raise RuntimeError("boom in the plug-in")
            return self.layer(x.flatten(1))
""")


def strict_json(text: str) -> object:
    """json.loads that refuses NaN and Infinity, as JavaScript, jq and most dashboards do."""
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_an_exception_inside_a_plugin_fails_its_job_and_the_sweep_goes_on_to_its_table(workdir: Path) -> None:
    (workdir / "boom_plugin.py").write_text(EXPLODING_MODEL)
    result = run_cli("sam-run", "-m", *TINY, "model=custom", "model._target_=boom_plugin.Net",
                     "+model.explode=true,false", "sharpness.measures=[]", "hydra.sweep.dir=outputs/sweep",
                     cwd=workdir, extra_env={"PYTHONPATH": str(workdir)})
    assert result.returncode == 1, "a sweep in which a job failed exits non-zero"
    assert "Traceback" not in result.stderr
    assert "sam-run: run 0 failed: RuntimeError: boom in the plug-in" in result.stderr
    statuses = {path.parent.name.split("_")[0]: read_json(path) for path in (workdir / "outputs" / "sweep").glob(
        "*/summary.json")}
    assert statuses["0"]["status"] == "failed" and statuses["0"]["error"] == "RuntimeError: boom in the plug-in"
    assert statuses["1"]["status"] == "completed"
    table = result.stdout[result.stdout.index("\nsweep "):]
    assert "failed" in table and "completed" in table  # the table prints, with every job in it


def test_an_unforeseen_error_in_a_single_run_is_one_line_exit_1_and_recorded(workdir: Path) -> None:
    (workdir / "boom_plugin.py").write_text(EXPLODING_MODEL)
    result = run_cli("sam-run", *TINY, "model=custom", "model._target_=boom_plugin.Net", "+model.explode=true",
                     "hydra.run.dir=outputs/run", cwd=workdir, extra_env={"PYTHONPATH": str(workdir)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "sam-run: error: RuntimeError: boom in the plug-in (HYDRA_FULL_ERROR=1 shows where)"]
    assert read_json(workdir / "outputs" / "run" / "summary.json")["status"] == "failed"


def test_a_plugin_that_raises_while_the_run_is_built_is_one_line_exit_1_and_leaves_no_directory(workdir: Path
                                                                                                  ) -> None:
    """The run never started (nothing recorded): like a refused one, it leaves nothing the command created."""
    (workdir / "boom_plugin.py").write_text(EXPLODING_MODEL)
    result = run_cli("sam-run", *TINY, "model=custom", "model._target_=boom_plugin.Net",
                     "+model.explode_at_build=true", "hydra.run.dir=outputs/run", cwd=workdir,
                     extra_env={"PYTHONPATH": str(workdir)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "sam-run: error: RuntimeError: boom while building the plug-in (HYDRA_FULL_ERROR=1 shows where)"]
    assert not (workdir / "outputs").exists()


def test_divergence_exits_1_keeps_the_last_finite_checkpoint_and_writes_strict_json(workdir: Path) -> None:
    # lr 3 with momentum 0.9 on this data: finite for two epochs, non-finite in the third.
    result = run_cli("sam-run", *TINY, "epochs=6", "lr=3", "scheduler=constant", "hydra.run.dir=outputs/nan",
                     cwd=workdir)
    run_dir = workdir / "outputs" / "nan"
    summary = strict_json((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and result.returncode == 1
    assert "sam-run: error: the run diverged: non-finite training loss in epoch" in result.stderr
    lines = [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train/loss_seen"] is None  # NaN is written as null
    strict_json((run_dir / "run.json").read_text())
    assert summary["epochs_completed"] >= 2
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == summary["epochs_completed"] - 1  # the last finite epoch's weights stay
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
