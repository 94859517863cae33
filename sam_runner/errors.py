"""Errors that the command line turns into one clear line and a non-zero exit (see cli.py)."""


class SamRunnerError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(SamRunnerError):
    """A config value has the wrong type, is out of range or contradicts another value."""


class DataError(SamRunnerError):
    """A dataset is missing, unreadable or not of the expected form."""


class CheckpointError(SamRunnerError):
    """A checkpoint is missing, corrupt or does not match the run it is loaded into."""
