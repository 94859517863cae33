"""How the command line says what went wrong: the exit codes and the one-line messages every entry point prints.

Code raises `SamRunnerError`s where it detects a problem; the entry points (cli/run.py, cli/tools.py) turn them,
and whatever no check foresaw, into these lines."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from sam_runner.errors import SamRunnerError, describe_unforeseen
from sam_runner.run.stopping import EXIT_INTERRUPTED, EXIT_PREEMPTED, ToolStopped, stops_end_at_once, stops_raised

# Exit codes (README "Exit codes"): 0 every run completed; 1 a run failed on an unforeseen error or diverged, or some
# job of a sweep did not complete; 2 bad input (config, data, checkpoint), nothing trained; 75 pre-empted (SIGTERM,
# SIGUSR1, SIGUSR2: checkpointed, re-run to continue); 130 interrupted (Ctrl-C).
EXIT_NOT_COMPLETED = 1
EXIT_USAGE = 2


def fail(error: Exception | str, program: str = "sam-run", code: int = EXIT_USAGE) -> None:
    print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(code)


def fail_unforeseen(error: Exception, program: str) -> None:
    """An error no check foresaw, in one line and exit 1; HYDRA_FULL_ERROR=1 (as for sam-run) re-raises it."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    fail(f"{describe_unforeseen(error)} (HYDRA_FULL_ERROR=1 shows where)", program, EXIT_NOT_COMPLETED)


def warnings_in_one_line(program: str) -> None:
    """Warnings as `program: warning: ...` lines, without Python's file and source line."""
    import warnings

    warnings.formatwarning = lambda message, *_: f"{program}: warning: {message}\n"


@contextmanager
def one_line_errors(program: str, interrupted: str) -> Iterator[Callable[[], AbstractContextManager[None]]]:
    """The tools' error policy: a problem the user can fix is one line and exit 2, Ctrl-C one line (`interrupted`:
    what it left) and exit 130, SIGTERM/SIGUSR1/SIGUSR2 one line and exit 75 (as a pre-empted sam-run), anything
    unforeseen one line and exit 1 — never a traceback.

    It yields `importing`: the tool's imports (seconds of torch, matplotlib) go in `with importing():`, where a stop
    ends the process at once with the same line (stopping.stops_end_at_once says why)."""

    def line(received: signal.Signals) -> tuple[str, int]:
        message, code = _stopped(received, interrupted)
        return f"{program}: error: {message}", code

    try:
        with stops_raised():
            yield lambda: stops_end_at_once(line)
    except SamRunnerError as error:
        fail(error, program)
    except (KeyboardInterrupt, ToolStopped) as stopped:
        message, code = _stopped(stopped.signal if isinstance(stopped, ToolStopped) else signal.SIGINT, interrupted)
        fail(message, program, code)
    except Exception as error:  # a plug-in dataset or model that raises, a full disk
        fail_unforeseen(error, program)


def _stopped(received: signal.Signals, interrupted: str) -> tuple[str, int]:
    """A tool's message and exit code when `received` stopped it; `interrupted`: what it left."""
    if received == signal.SIGINT:
        return f"interrupted (Ctrl-C): {interrupted}", EXIT_INTERRUPTED
    return f"preempted ({received.name}): {interrupted}", EXIT_PREEMPTED
