"""Stopping a run on request: SIGTERM and SIGUSR1 (a cluster pre-empting the job) and SIGINT (Ctrl-C).

A signal only raises a flag; the trainer looks at it between optimizer steps, writes a checkpoint there and
raises `RunStopped`, so the run can be continued exactly by re-running its command. A second Ctrl-C stops at
once (the last checkpoint is still there to resume from).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger("sam_runner")

# Exit codes (README "Exit codes"): 75 (EX_TEMPFAIL, "try again later") tells a cluster to requeue the job.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
PREEMPTING = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(BaseException):
    """A run stopped at a step boundary on request, after writing its checkpoint.

    A BaseException, like KeyboardInterrupt, so that neither a plug-in's `except Exception` nor a Hydra
    launcher swallows it: a stop request ends the process.
    """

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status  # "preempted" or "interrupted"
        self.exit_code = EXIT_PREEMPTED if status == "preempted" else EXIT_INTERRUPTED


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
        status = "interrupted" if self.signal == signal.SIGINT else "preempted"
        return RunStopped(status, f"stopped by {self.signal.name} after step {step}; the checkpoint there is "
                                  f"written: re-run the same command to continue")

    def _handle(self, number: int, frame: FrameType | None) -> None:
        received = signal.Signals(number)
        if received == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal = self.signal or received
        hint = " (Ctrl-C again to stop at once)" if received == signal.SIGINT else ""
        log.warning("%s received: stopping after the current step, with a checkpoint%s", received.name, hint)


@contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Catch the stopping signals while a run trains; the previous handlers come back afterwards.

    Handlers can only be set from the main thread; elsewhere (a launcher's worker thread) the signals keep
    their usual effect.
    """
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {number: signal.signal(number, requests._handle) for number in (*PREEMPTING, signal.SIGINT)}
    try:
        yield requests
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
