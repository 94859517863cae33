"""One run directory, one run: a lock that a second run started on the same directory reports, the cleanup of
what a killed run left half-written, and starting over when asked."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from sam_runner.errors import ConfigError

log = logging.getLogger("sam_runner")

LOCK_NAME = ".lock"
# What sam-run writes into a run directory besides Hydra's .hydra/ and log file (those are appended to).
RECORD_FILES = ("summary.json", "run.json", "metrics.jsonl")
RECORD_GLOBS = ("events.out.tfevents.*",)
CHECKPOINT_DIR = "checkpoints"


@contextmanager
def claim(run_dir: Path, *, tidy: bool = True) -> Iterator[None]:
    """Hold `run_dir` for the duration of a run; refuse it while another process holds it. `tidy=False` (sam-measure,
    which only adds to a run's summary) leaves what a killed run left half-written to the run's own next start.

    An advisory `flock` on run_dir/.lock: the kernel releases it when its holder exits, even on `kill -9`, so a
    dead run never blocks the next one. (Some network file systems do not support flock; the runs of one sweep
    never share a directory anyway.)
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_NAME).open("a+")
    try:
        _lock(handle, run_dir)
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        if tidy:
            remove_leftovers(run_dir)
        yield
    finally:
        handle.close()  # releases the lock


def refuse_if_held(run_dir: Path) -> None:
    """Raise the error `claim` would, without keeping the lock."""
    if (run_dir / LOCK_NAME).exists():
        with (run_dir / LOCK_NAME).open("a+") as handle:
            _lock(handle, run_dir)


def _lock(handle: TextIO, run_dir: Path) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise ConfigError(f"{run_dir} is in use by another sam-run ({holder}): wait for it to end (or, for a "
                          f"new run, choose another hydra.run.dir)") from None


def remove_leftovers(run_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed run never renamed (`.last.pt.<random>.tmp`)."""
    for directory in (run_dir, run_dir / CHECKPOINT_DIR):
        for leftover in directory.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
            log.info("removed %s, left half-written by a run that was killed", leftover)


def has_records(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in (*RECORD_FILES, CHECKPOINT_DIR)) or \
        any(any(run_dir.glob(pattern)) for pattern in RECORD_GLOBS)


def start_over(run_dir: Path) -> None:
    """Remove a previous run's records (summary, metrics, TensorBoard events, checkpoints) from `run_dir`."""
    for name in RECORD_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for pattern in RECORD_GLOBS:
        for path in run_dir.glob(pattern):
            path.unlink()
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
