"""Shared fixtures: the installed console scripts, run on tiny synthetic data in a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests run two at a time (pytest-xdist, pyproject's addopts), most of them starting sam-run processes: one
# thread each, or idle-spinning OpenMP threads of one process slow the other's down several-fold on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
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


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory with its own data/ and outputs/ (runs write relative to it)."""
    (tmp_path / "data").mkdir()
    return tmp_path
