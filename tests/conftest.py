"""Shared fixtures: the installed console scripts, run on tiny synthetic data in a temporary directory, and the
same runs in process, through the run's entry function, for scenarios that need no process of their own."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

# Tests run two at a time (pytest-xdist, pyproject's addopts), most of them starting sam-run processes: one
# thread each, or idle-spinning OpenMP threads of one process slow the other's down several-fold on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402  (after the thread count: its BLAS reads it too)
import torch  # noqa: E402  (after the thread count it reads)

BIN = Path(sys.executable).parent
# Tiny and fast: 256 synthetic samples, an MLP, two epochs, one cheap sharpness measure.
TINY = ["dataset=synthetic", "dataset.source.num_train=256", "dataset.source.num_test=128", "model=mlp",
        "epochs=2", "batch_size=64", "sharpness.measures=[ascent,lambda_max]", "sharpness.num_samples=128"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(program: str, *args: str, cwd: Path, extra_env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (sam-run, sam-measure) as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([str(BIN / program), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def composed(workdir: Path, monkeypatch: pytest.MonkeyPatch, overrides: Sequence[str]
             ) -> tuple[DictConfig, dict[str, str]]:
    """What Hydra hands the job of `sam-run OVERRIDES` run in `workdir` (made the working directory): the config
    without its `hydra` node, and the config groups' choices (model=custom, ...) that summary.json names the run by."""
    from hydra import compose, initialize_config_dir

    from sam_runner.cli.preflight import CONFIG_DIR

    monkeypatch.chdir(workdir)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):  # as Hydra's run_job does before it calls the job
        del cfg["hydra"]
    return cfg, choices


def run_in_process(workdir: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str, run_dir: str = "run") -> Path:
    """`sam-run OVERRIDES hydra.run.dir=RUN_DIR` in `workdir`, in this process: the run's entry function as sam-run's
    Hydra job calls it, without a process start (seconds of imports). Returns the run directory, once the run has
    finished as sam-run's exit status 0 says.

    The run seeds Python's, NumPy's and torch's (CPU) global generators; they are put back as they were, so that
    what the tests after it draw does not depend on which runs came before them."""
    from sam_runner.run.experiment import run_experiment
    from sam_runner.run.status import FINISHED

    _in_a_later_second(workdir / run_dir)
    cfg, choices = composed(workdir, monkeypatch, overrides)
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            summary = run_experiment(cfg, workdir / run_dir, choices=choices)
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        _ENDED[(workdir / run_dir).resolve()] = int(time.time())
    assert summary["status"] in FINISHED, summary.get("error")
    return workdir / run_dir


_ENDED: dict[Path, int] = {}  # run directory -> the second the last in-process run there ended in (or was killed)


def _in_a_later_second(run_dir: Path) -> None:
    """Wait, if need be, until a second later than the one the last in-process run in `run_dir` ended in, as a real
    re-run (a new process) starts: TensorBoard orders a run's event files by name — the second the writer was made,
    then a per-process counter compared as text (…pid.9 sorts after …pid.10) — so a killed run's and its re-run's
    files from one second and one process can sort the wrong way round, and the re-run's purge of the killed run's
    later steps fails. (The killed run's writer is made after it starts, so the wait counts from its end.)"""
    key = run_dir.resolve()
    while int(time.time()) == _ENDED.get(key):
        time.sleep(0.05)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory with its own data/ and outputs/ (runs write relative to it)."""
    (tmp_path / "data").mkdir()
    return tmp_path
