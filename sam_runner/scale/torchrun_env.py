"""What torchrun's environment means for the command line, before any process group exists (and without
loading torch, so `sam-run --help` stays fast): which process this is, and what Hydra may write in it."""

from __future__ import annotations

import os
from collections.abc import Mapping

from sam_runner.errors import ConfigError

# Hydra in a process other than rank 0: no log file, only warnings on the console (rank 0 alone writes .hydra/).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
QUIET_HYDRA = ("hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING")
PER_PROCESS = ("${now:", "${pid:")  # interpolations that differ between the processes of one torchrun


def launched(env: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun set them, checked; (0, 1, 0) outside torchrun (no WORLD_SIZE)."""
    if "WORLD_SIZE" not in env:
        return 0, 1, 0
    missing = [name for name in TORCHRUN_VARIABLES if not env.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but torchrun's {', '.join(missing)} is not: launch with "
                          f"`torchrun --nproc_per_node=N --no-python sam-run ...`, or unset WORLD_SIZE")
    try:
        rank, world_size, local_rank = (int(env[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError(f"torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be integers; got "
                          f"{env['RANK']!r}, {env['WORLD_SIZE']!r}, {env['LOCAL_RANK']!r}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"torchrun variables out of range: RANK={rank}, WORLD_SIZE={world_size}, "
                          f"LOCAL_RANK={local_rank}; launch through torchrun rather than setting them by hand")
    return rank, world_size, local_rank


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return launched()[0]


def launched_world_size() -> int:
    return launched()[1]


def hydra_overrides() -> list[str]:
    """Overrides that keep Hydra from writing anything in a process other than rank 0 (none for rank 0)."""
    return list(QUIET_HYDRA) if launched_rank() > 0 else []


def refuse_per_process_directory(key: str, raw: str) -> None:
    """Under torchrun every process composes the config itself: a run directory named from the clock or the
    process id (the default) would differ between them, so the command must name one."""
    if launched_world_size() > 1 and any(part in raw for part in PER_PROCESS):
        raise ConfigError(f"under torchrun every process must name the same run directory, and {key}={raw} "
                          f"differs between them: add {key}=outputs/runs/<name> to the command")
