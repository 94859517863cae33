"""Stopping a run on request: SIGTERM, SIGUSR1 and submitit's SIGUSR2 (a cluster pre-empting the job, or its
time limit near) and SIGINT (Ctrl-C).

While a run trains, a signal only raises a flag; the trainer looks at it between optimizer steps, writes a
checkpoint there and raises `RunStopped`, so the run can be continued exactly by re-running its command. A
sharpness measurement looks at it between its batch passes and gives up (the checkpoint before it is written;
the continued run measures again). A second Ctrl-C stops at once (the last checkpoint is still there to resume
from). A handler that was installed before ours for the stopping signal (submitit's, which requeues the job) runs
once the checkpoint is written.

While no run trains (start-up: the pre-flight, Hydra, building a run; between the jobs of a sweep) there is
nothing to checkpoint, so `stop_at_once` makes a signal end the process at once, as `RunStopped`; once the command
is over, `leave_stops_to_the_system` gives the signals their default action back for the moments of its exit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from sam_runner.run.status import Status

log = logging.getLogger("sam_runner")

# Exit codes (README "Exit codes"): 75 (EX_TEMPFAIL, "try again later") tells a cluster to requeue the job.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
# submitit (Hydra's SLURM launcher) is warned of pre-emption and of the time limit by SIGUSR2, or by the signal
# named in its SUBMITIT_PREEMPT_SIGNAL.
SUBMITIT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
PREEMPTING = tuple(dict.fromkeys((signal.SIGTERM, signal.SIGUSR1, SUBMITIT_SIGNAL)))


class RunStopped(BaseException):
    """A run stopped at a step boundary on request, after writing its checkpoint.

    A BaseException, like KeyboardInterrupt, so that neither a plug-in's `except Exception` nor a Hydra
    launcher swallows it: a stop request ends the process.
    """

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = Status(status)  # preempted or interrupted
        self.exit_code = EXIT_PREEMPTED if self.status == Status.PREEMPTED else EXIT_INTERRUPTED

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # a SLURM job hands it back to the sweep pickled
        return RunStopped, (self.status.value, str(self))


class StopRequests:
    """The signal that asked the run to stop, if any."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def take(self, number: int) -> None:
        """Stop as another process of the same run was asked to (signals reach torchrun's ranks one by one)."""
        self.signal = self.signal or signal.Signals(number)

    def stopped(self, step: int) -> RunStopped:
        """The exception to raise once the checkpoint at `step` is written."""
        assert self.signal is not None
        return RunStopped(_status(self.signal), f"stopped by {self.signal.name} after step {step}; the checkpoint "
                                                f"there is written: re-run the same command to continue")

    def _handle(self, number: int, frame: FrameType | None) -> None:
        received = signal.Signals(number)
        if received == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal = self.signal or received
        hint = " (Ctrl-C again to stop at once)" if received == signal.SIGINT else ""
        log.warning("%s received: stopping after the current step (a measurement: at once), with a checkpoint%s",
                    received.name, hint)


def _status(received: signal.Signals) -> Status:
    return Status.INTERRUPTED if received == signal.SIGINT else Status.PREEMPTED


def _stop_now(number: int, frame: FrameType | None) -> None:
    received = signal.Signals(number)
    raise RunStopped(_status(received), f"stopped by {received.name} while no run was training (nothing to "
                                        f"checkpoint): re-run the same command to go on")


def stop_at_once() -> None:
    """From now on, outside `stop_requests`, SIGTERM/SIGUSR1/SIGUSR2 and Ctrl-C raise `RunStopped` at once: one
    line and exit code 75 or 130 from the entry point, instead of death by signal (143) or a KeyboardInterrupt
    traceback in the middle of start-up. From the main thread only (as every signal handler)."""
    for number in (signal.SIGINT, *PREEMPTING):  # SIGINT first: whoever sees SIGTERM handled may send either
        signal.signal(number, _stop_now)


def leave_stops_to_the_system() -> None:
    """Once the command has ended, its runs having recorded how they ended, a stop request has nothing left to
    checkpoint or report: the signals' default action ends the process at once (exit status 128 + signal), not
    `RunStopped` raised in one of Python's exit handlers, which prints a traceback and exits 0."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, *PREEMPTING):
            signal.signal(number, signal.SIG_DFL)


@contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Catch the stopping signals while a run trains; the previous handlers come back afterwards.

    When the run stopped, the handler that was there before ours for the signal that stopped it runs then, if
    it is a function: submitit's, in a SLURM job, requeues the job (which continues from the checkpoint). Handlers
    can only be set from the main thread; elsewhere (a launcher's worker thread) the signals keep their usual
    effect.
    """
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {number: signal.signal(number, requests._handle) for number in (*PREEMPTING, signal.SIGINT)}
    try:
        yield requests
    except RunStopped:
        handed_on = previous.get(requests.signal)
        if requests.signal in PREEMPTING and callable(handed_on) and handed_on is not _stop_now:
            handed_on(requests.signal, None)
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
