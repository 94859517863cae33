"""What torchrun's environment means for the command line, before any process group exists (and without
loading torch, so `sam-run --help` stays fast): which process this is, and what Hydra may write in it."""

from __future__ import annotations

import os

from sam_runner.errors import ConfigError

# Hydra in a process other than rank 0: no .hydra/ copy, no log file, only warnings on the console.
QUIET_HYDRA = ("hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING")
PER_PROCESS = ("${now:", "${pid:")  # interpolations that differ between the processes of one torchrun


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK") or 0)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def hydra_overrides() -> list[str]:
    """Overrides that keep Hydra from writing anything in a process other than rank 0 (none for rank 0)."""
    return list(QUIET_HYDRA) if launched_rank() > 0 else []


def refuse_per_process_directory(key: str, raw: str) -> None:
    """Under torchrun every process composes the config itself: a run directory named from the clock or the
    process id (the default) would differ between them, so the command must name one."""
    if launched_world_size() > 1 and any(part in raw for part in PER_PROCESS):
        raise ConfigError(f"under torchrun every process must name the same run directory, and {key}={raw} "
                          f"differs between them: add {key}=outputs/runs/<name> to the command")
