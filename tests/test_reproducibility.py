"""A run's digits: the same seed gives the same metrics; they depend on the CPU's kernels, and run.json records
what picks them, so two runs can be compared."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, read_json, run_cli, run_in_process


def test_run_json_records_the_thread_count_and_the_cpu_instruction_set(workdir: Path) -> None:
    """Measured with the main job (README): 1 and 2 threads, or oneDNN's AVX-512 and AVX2 kernels, give other
    digits, each bitwise repeatable; ATEN_CPU_CAPABILITY stands in here for a CPU with another instruction set."""
    env = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}
    result = run_cli("sam-run", *TINY, "epochs=1", "sharpness.measures=[]", "hydra.run.dir=outputs/run",
                     cwd=workdir, extra_env=env)
    assert result.returncode == 0, result.stderr
    info = read_json(workdir / "outputs" / "run" / "run.json")
    assert info["torch_threads"] == 1 and info["cpu_capability"] == "DEFAULT"


def test_same_seed_gives_the_same_metrics(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs in this process, the second from other states of the global generators (as a second process would
    start from): only the run's own seeding makes them agree."""
    def metrics(name: str) -> list[dict]:
        run_dir = run_in_process(workdir, monkeypatch, *TINY, "optimizer=sam", "seed=3", run_dir=name)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if not k.startswith(("opt/epoch_time", "opt/images"))} for line in lines]

    first = metrics("a")
    random.random(), np.random.random(), torch.rand(1)
    assert metrics("b") == first
