"""Sweep jobs sharing a multi-GPU box: each job of a parallel sweep holds a GPU slot while it runs, so N jobs spread
over N GPUs — or `jobs_per_gpu` jobs share each GPU — and never pile onto one.

A slot is an flock on `<sweep dir>/.gpu_slots/slot_<i>.lock`; slot i is GPU i mod (visible GPUs). Locks rather
than the job number modulo the GPUs: a launcher's worker processes take jobs in whatever order they finish, and
the kernel releases a lock when its holder exits, even on `kill -9`.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("sam_runner")

SLOT_DIR = ".gpu_slots"
PARALLEL_LAUNCHER = "hydra_plugins.hydra_joblib_launcher"  # the `parallel` preset's launcher


@contextmanager
def gpu_slot(sweep_dir: Path, gpus: int, jobs_per_gpu: int, poll_s: float = 1.0) -> Iterator[int]:
    """Hold one of the `gpus * jobs_per_gpu` slots, waiting until one is free; yield its GPU index."""
    directory = sweep_dir / SLOT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for slot in range(gpus * jobs_per_gpu):
            handle = (directory / f"slot_{slot}.lock").open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield slot % gpus
            finally:
                handle.close()  # releases the slot
            return
        if not waiting:
            log.info("all %d GPU slots (%d GPUs x jobs_per_gpu=%d) are busy: waiting for one", gpus * jobs_per_gpu,
                     gpus, jobs_per_gpu)
            waiting = True
        time.sleep(poll_s)


@contextmanager
def pinned_gpu(launcher_target: str, sweep_dir: Path, jobs_per_gpu: int, device: str) -> Iterator[None]:
    """In a parallel sweep on CUDA, make a free GPU this job's current device for as long as it runs."""
    import torch

    if not launcher_target.startswith(PARALLEL_LAUNCHER) or device == "cpu" or not torch.cuda.is_available():
        yield
        return
    with gpu_slot(sweep_dir, torch.cuda.device_count(), jobs_per_gpu) as index:
        torch.cuda.set_device(index)
        log.info("on GPU %d of %d (parallel sweep, jobs_per_gpu=%d)", index, torch.cuda.device_count(), jobs_per_gpu)
        yield
