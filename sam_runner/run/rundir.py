"""One run directory, one run: the names of its files, the readers of its JSON records, a lock that a second run
started on the same directory reports, the cleanup of what a killed run left half-written, and starting over when
asked, which removes only what a sam-run wrote."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from sam_runner.errors import ConfigError, SamRunnerError

log = logging.getLogger("sam_runner")

LOCK_NAME = ".lock"
SUMMARY = "summary.json"  # how the run stands or ended, its results and hyper-parameters (rewritten every epoch)
RUN_INFO = "run.json"  # written first by every sam-run: the mark of a directory whose records are a sam-run's
METRICS = "metrics.jsonl"  # one line per logged epoch
HYDRA_DIR = ".hydra"  # the job's config as Hydra records it (written when the run starts or continues)
# What sam-run writes into a run directory besides .hydra/ and Hydra's log file (those are rewritten, appended to).
RECORD_FILES = (SUMMARY, RUN_INFO, METRICS)
RECORD_GLOBS = ("events.out.tfevents.*",)
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT = Path(CHECKPOINT_DIR) / "last.pt"


class UnreadableRecord(SamRunnerError):
    """A JSON record of a run directory is missing, unreadable or not a JSON object."""


def read_record(run_dir: Path, name: str) -> dict[str, Any]:
    """A JSON object sam-run wrote into `run_dir` (SUMMARY, RUN_INFO); `UnreadableRecord` says why it is not one."""
    path = run_dir / name
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnreadableRecord(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableRecord(f"{path} cannot be read: {error}") from None
    if not isinstance(record, dict):
        raise UnreadableRecord(f"{path} does not hold a JSON object")
    return record


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json, or None where there is none to read (a run that never wrote one, or a broken file)."""
    try:
        return read_record(run_dir, SUMMARY)
    except UnreadableRecord:
        return None


def run_config(run_dir: Path) -> dict[str, Any]:
    """The config run.json records; `UnreadableRecord` where there is none."""
    config = read_record(run_dir, RUN_INFO).get("config")
    if not isinstance(config, dict):
        raise UnreadableRecord(f"{run_dir / RUN_INFO} holds no run config")
    return config


@contextmanager
def claim(run_dir: Path, *, tidy: bool = True, by: str = "sam-run") -> Iterator[None]:
    """Hold `run_dir` for the duration of a run; refuse it while another process holds it. `tidy=False` (sam-measure,
    which only adds to a run's summary) leaves what a killed run left half-written to the run's own next start. `by`
    names the tool in the lock file, so that whoever is refused is told which tool holds the directory.

    An advisory `flock` on run_dir/.lock: the kernel releases it when its holder exits, even on `kill -9`, so a
    dead run never blocks the next one. (Some network file systems do not support flock; the runs of one sweep
    never share a directory anyway.)
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_NAME).open("a+")
    try:
        _lock(handle, run_dir)
        handle.truncate(0)
        handle.write(f"{by} pid {os.getpid()} on {socket.gethostname()}\n")
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
        raise ConfigError(f"{run_dir} is in use by {_holder(handle.read().strip())}: wait for it to end (or, for a "
                          f"new run, choose another hydra.run.dir)") from None


def _holder(written: str) -> str:
    """Who holds a lock, from what `claim` wrote into it (`sam-measure pid 12 on host`); a lock written before the
    tools named themselves (`pid 12 on host`), or not written yet, names no tool."""
    tool, found, process = written.partition(" pid ")
    if not found or not tool or " " in tool:
        return f"another sam-runner process ({written or 'starting'})"
    return f"another {tool} (pid {process})"


def remove_leftovers(run_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed run never renamed (`.last.pt.<random>.tmp`)."""
    for directory in (run_dir, run_dir / CHECKPOINT_DIR):
        for leftover in directory.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
            log.info("removed %s, left half-written by a run that was killed", leftover)


def has_records(run_dir: Path) -> bool:
    return bool(_records_found(run_dir)) or (run_dir / CHECKPOINT_DIR).exists()


def _records_found(run_dir: Path) -> list[str]:
    """The names of sam-run's records present in `run_dir`, relative to it."""
    found = [name for name in (*RECORD_FILES, str(CHECKPOINT)) if (run_dir / name).is_file()]
    return found + sorted(path.name for pattern in RECORD_GLOBS for path in run_dir.glob(pattern))


def written_by_sam_run(run_dir: Path) -> bool:
    """Whether `run_dir`'s run.json is a sam-run's: a JSON object with the run's config and the versions it ran with
    (every sam-run has written both); another tool's run.json, or a broken one, is not."""
    try:
        info = read_record(run_dir, RUN_INFO)
    except UnreadableRecord:
        return False
    return isinstance(info.get("config"), dict) and "sam-runner" in (info.get("versions") or {})


def refuse_foreign(run_dir: Path) -> None:
    """Refuse a directory holding files by sam-run's names (or a checkpoints/ folder) but no run.json of a sam-run:
    whatever wrote them, it was not a sam-run, so they are neither continued nor removed, resume=false or not."""
    if has_records(run_dir) and not written_by_sam_run(run_dir):
        found = _records_found(run_dir) or [f"{CHECKPOINT_DIR}/"]
        raise ConfigError(f"{run_dir} holds files that no sam-run wrote ({', '.join(found)}; no {RUN_INFO} of a "
                          f"sam-run): choose another hydra.run.dir")


def start_over(run_dir: Path) -> list[str]:
    """Remove an earlier sam-run's records (summary, metrics, TensorBoard events, its checkpoint) from `run_dir`,
    and nothing else: a user's own files there stay. run.json stays until the new run replaces it (its first
    write), so that a start that fails before then leaves a directory still marked as a sam-run's. Returns the
    names removed."""
    removed = [name for name in _records_found(run_dir) if name != RUN_INFO]
    for name in removed:
        (run_dir / name).unlink()
    return removed
