"""Errors that the command line turns into one clear line and a non-zero exit (see cli/messages.py)."""

import errno


class SamRunnerError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(SamRunnerError):
    """A config value has the wrong type, is out of range or contradicts another value."""


class DataError(SamRunnerError):
    """A dataset is missing, unreadable or not of the expected form."""


class CheckpointError(SamRunnerError):
    """A checkpoint is missing, corrupt or does not match the run it is loaded into."""


class JobNotStarted(BaseException):
    """A sweep's job that did not start: refused for its directory or data (exit code 2), or its run failed to build
    (1), before it wrote a record. It ends the sweep as a stop does (the table of the other jobs, one line naming
    this one): a BaseException, so that no launcher swallows it, and every later job would most likely be refused
    alike. Its directory holds no record of this sweep's job, so the table leaves it out."""

    def __init__(self, message: str, run_dir: str, exit_code: int) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[type, tuple[str, str, int]]:  # a SLURM job hands it back to the sweep pickled
        return JobNotStarted, (str(self), self.run_dir, self.exit_code)


def one_line(error: BaseException) -> str:
    """An error's message on one line: its lines joined, without the diagnostics OmegaConf and Hydra append
    (`full_key: ...`, `object_type=...`); the key an OmegaConf error names goes in front instead."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key", "object_type", "reference_type", "Set the env"))]
    key = getattr(error, "full_key", None)
    return f"{key}: {'; '.join(kept)}" if key else "; ".join(kept)


def describe_unforeseen(error: BaseException) -> str:
    """One line for an error no check foresaw (a plug-in's bug, a full disk): what it is, and the fix if known."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" while writing {error.filename}" if error.filename else ""
        return (f"out of disk space{where} ({error.strerror}): free some space (or raise the quota), then re-run the same "
                f"command to continue from the last checkpoint")
    return f"{type(error).__name__}: {error}"
