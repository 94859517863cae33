"""Errors that the command line turns into one clear line and a non-zero exit (see cli.py)."""

import errno


class SamRunnerError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(SamRunnerError):
    """A config value has the wrong type, is out of range or contradicts another value."""


class DataError(SamRunnerError):
    """A dataset is missing, unreadable or not of the expected form."""


class CheckpointError(SamRunnerError):
    """A checkpoint is missing, corrupt or does not match the run it is loaded into."""


def describe_unforeseen(error: BaseException) -> str:
    """One line for an error no check foresaw (a plug-in's bug, a full disk): what it is, and the fix if known."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" while writing {error.filename}" if error.filename else ""
        return (f"out of disk space{where} ({error.strerror}): free some space (or raise the quota), then re-run the same "
                f"command to continue from the last checkpoint")
    return f"{type(error).__name__}: {error}"
