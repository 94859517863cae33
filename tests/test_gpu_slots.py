"""Parallel sweeps on a multi-GPU box: every job holds its own GPU slot (CPU-only tests with a pretend GPU count)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from sam_runner.scale import gpu_slots


def test_the_first_jobs_get_distinct_gpus_then_share_them_up_to_jobs_per_gpu(tmp_path: Path) -> None:
    with gpu_slots.gpu_slot(tmp_path, gpus=2, jobs_per_gpu=2) as first, \
            gpu_slots.gpu_slot(tmp_path, gpus=2, jobs_per_gpu=2) as second, \
            gpu_slots.gpu_slot(tmp_path, gpus=2, jobs_per_gpu=2) as third:
        assert (first, second, third) == (0, 1, 0)


def test_a_job_waits_for_a_free_slot_and_takes_the_one_released(tmp_path: Path) -> None:
    got: list[int] = []

    def late_job() -> None:
        with gpu_slots.gpu_slot(tmp_path, gpus=2, jobs_per_gpu=1, poll_s=0.01) as gpu:
            got.append(gpu)

    with gpu_slots.gpu_slot(tmp_path, gpus=2, jobs_per_gpu=1):
        with gpu_slots.gpu_slot(tmp_path, gpus=2, jobs_per_gpu=1):
            waiting = threading.Thread(target=late_job)
            waiting.start()
            time.sleep(0.1)
            assert not got, "both GPUs are held: the third job must wait"
        waiting.join(timeout=10)
    assert got == [1], "it takes the GPU that the second job released"


def test_only_a_parallel_sweep_on_cuda_is_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    parallel = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    with gpu_slots.pinned_gpu(parallel, tmp_path, jobs_per_gpu=1, device="auto"):
        with gpu_slots.pinned_gpu(parallel, tmp_path, jobs_per_gpu=1, device="cuda"):
            assert chosen == [0, 1]
    for launcher, device in [("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "auto"),
                             ("", "auto"), (parallel, "cpu")]:
        with gpu_slots.pinned_gpu(launcher, tmp_path, jobs_per_gpu=1, device=device):
            pass
    assert chosen == [0, 1], "SLURM allocates GPUs itself; basic sweeps, single runs and CPU runs are left alone"
