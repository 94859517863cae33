"""Stopping a run on request: SIGTERM, SIGUSR1 and submitit's SIGUSR2 (a cluster pre-empting the job, or its
time limit near) and SIGINT (Ctrl-C).

While a run trains, a signal only raises a flag; the trainer looks at it between optimizer steps, writes a
checkpoint there and raises `RunStopped`, so the run can be continued exactly by re-running its command. A
sharpness measurement looks at it between its batch passes and gives up (the checkpoint before it is written;
the continued run measures again). A second Ctrl-C stops at once (the last checkpoint is still there to resume
from). A handler that was installed before ours for the stopping signal (submitit's, which requeues the job) runs
once the checkpoint is written.

While no run trains there is nothing to checkpoint, and no exception is raised from the handler: raised in
whatever code runs then (an import, a destructor, a weakref callback) it is swallowed or leaves modules half made.
Before any run of the command has started (imports, the pre-flight, Hydra's start) `stop_at_once` makes a stop end
the process at once: what the command created is removed, one line, exit 75 or 130. Once a run has started (between
a sweep's jobs, after a run) the stop waits: the next run raises `RunStopped` before it starts, and a stop that
no run took gets the signal's default action once the command is over (`leave_stops_to_the_system`). A parallel
sweep's sam-run hands a stop on to its jobs' processes (`hand_stops_on`, scale/parent_watch.py), which stop as a
single run does (`request_stop`).

The tools that read runs (sam-measure, sam-report, sam-landscape) have no checkpoint to write: there SIGTERM, SIGUSR1
and SIGUSR2 raise `ToolStopped` as Ctrl-C raises KeyboardInterrupt (`stops_raised`), one line and exit 75; while they
import what they work with, a stop ends them at once with the same line (`stops_end_at_once`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


def _stopped_outside_runs(received: signal.Signals) -> RunStopped:
    return RunStopped(_status(received), f"stopped by {received.name} while no run was training (nothing to "
                                         f"checkpoint): re-run the same command to go on")


@dataclass
class _OutsideRuns:
    """What a stop does while no run of this process trains (see the module's docstring): the process's one
    instance, `_outside`, is what its signal handlers, which take no arguments, read and set."""

    program: str = "sam-run"
    at_once: bool = False  # until a run starts, from `stop_at_once`
    pending: signal.Signals | None = None  # a stop that no run has taken yet
    handed_on: bool = False  # told to jobs in other processes, which record it and stop
    raising: bool = False  # waiting for jobs on a cluster, in a loop that sleeps: `RunStopped` ends the wait
    hand_on: Callable[[signal.Signals], bool] | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)
    training: StopRequests | None = None


_outside = _OutsideRuns()


def _stop_outside_runs(number: int, frame: FrameType | None) -> None:
    received = signal.Signals(number)
    if received == signal.SIGINT and _outside.pending == signal.SIGINT:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now, as in a run
    if _outside.raising:
        raise _stopped_outside_runs(received)
    told = _outside.hand_on is not None and _outside.hand_on(received)
    _outside.handed_on = _outside.handed_on or told
    if _outside.at_once and not told:
        _end_at_once(received)
    _outside.pending = _outside.pending or received


def _end_at_once(received: signal.Signals) -> None:
    """End the process from the signal handler. Nothing of a run exists yet; what the command created (an empty run
    directory Hydra made) goes."""
    for undo in _outside.undo:
        try:
            undo()
        except Exception:  # noqa: BLE001 - the stop matters more than a leftover folder
            pass
    stopped = _stopped_outside_runs(received)
    _exit_saying(f"{_outside.program}: error: {stopped.status}: {stopped}", stopped.exit_code)


def _exit_saying(line: str, code: int) -> None:
    """Write `line` and end the process with `code`, from a signal handler: nothing can swallow os._exit. The line
    goes to the file descriptor, not through sys.stderr, which the interrupted code may be in the middle of
    writing."""
    os.write(2, f"{line}\n".encode())
    os._exit(code)


def _install_outside_handler() -> None:
    for number in (signal.SIGINT, *PREEMPTING):  # SIGINT first: whoever sees SIGTERM handled may send either
        signal.signal(number, _stop_outside_runs)


def stop_at_once(program: str = "sam-run") -> None:
    """Until a run starts, SIGTERM/SIGUSR1/SIGUSR2 and Ctrl-C end `program` at once: one line and exit code 75 or
    130, instead of death by signal (143) or a KeyboardInterrupt traceback in the middle of start-up. From the main
    thread only (as every signal handler)."""
    _outside.program, _outside.at_once, _outside.pending, _outside.handed_on = program, True, None, False
    _outside.undo.clear()
    _install_outside_handler()


def defer_stops() -> None:
    """In a parallel sweep's worker process: a stop outside a run waits for the run (`stop_requests` raises it),
    instead of killing the worker, which would make joblib tear down every other job."""
    if threading.current_thread() is threading.main_thread():
        _install_outside_handler()


def undo_when_stopped_at_once(undo: Callable[[], None], *, first: bool = False) -> None:
    """Call `undo` (remove what the command created) if a stop ends the process at once; `first`: before the
    others."""
    _outside.undo.insert(0, undo) if first else _outside.undo.append(undo)


@contextmanager
def raised_while_waiting() -> Iterator[None]:
    """While sam-run only waits for a sweep's jobs that run elsewhere (SLURM, which pre-empts them itself), a stop
    ends the wait as `RunStopped`: the sweep's table and one line, the jobs going on or stopping by themselves."""
    _outside.raising = True
    try:
        yield
    finally:
        _outside.raising = False


def hand_stops_on(to: Callable[[signal.Signals], bool] | None) -> None:
    """While jobs run in other processes, tell them of a stop with `to`, which says whether any job had started:
    then this process waits for them to record it instead of ending at once."""
    _outside.hand_on = to


def request_stop(number: int) -> None:
    """Stop as the process that started this one was asked to: as the signal would, once (never a second Ctrl-C's
    stop at once, when the signal also reached this process). From any thread."""
    received = signal.Signals(number)
    _outside.pending = _outside.pending or received
    training = _outside.training
    if training is not None and not training.requested:
        log.warning("sam-run, which runs this sweep, was stopped by %s: stopping after the current step, with a "
                    "checkpoint", received.name)
        training.take(number)


def stop_handed_on() -> RunStopped | None:
    """The stop that this process handed on to its jobs, which recorded it: how the command ends."""
    received = _outside.pending
    if received is None or not _outside.handed_on:
        return None
    return RunStopped(_status(received), f"stopped by {received.name}: any of the sweep's jobs still training "
                                         f"stopped with a checkpoint (the table above says which): re-run the same "
                                         f"command to continue")


class ToolStopped(BaseException):
    """A tool that reads runs (sam-measure, sam-report, sam-landscape) asked to stop by SIGTERM, SIGUSR1 or SIGUSR2,
    raised as Ctrl-C raises KeyboardInterrupt: it ends the tool with one line and exit code 75, as sam-run's stop."""

    def __init__(self, received: signal.Signals) -> None:
        super().__init__(f"stopped by {received.name}")
        self.signal = received


def _raise_tool_stopped(number: int, frame: FrameType | None) -> None:
    raise ToolStopped(signal.Signals(number))


@contextmanager
def stops_raised() -> Iterator[None]:
    """While a tool works: SIGTERM, SIGUSR1 and SIGUSR2 raise `ToolStopped` (the default action ends the process
    without a word, 143). The previous handlers are back once it ends, before the tool says why it stopped."""
    with _handled_by(_raise_tool_stopped, PREEMPTING):
        yield


@contextmanager
def stops_end_at_once(line: Callable[[signal.Signals], tuple[str, int]]) -> Iterator[None]:
    """While a tool imports what it works with: a stop, Ctrl-C included, ends the process from the signal handler,
    printing the line and exiting with the code that `line(signal)` gives. Raised into those imports instead,
    KeyboardInterrupt was swallowed by torch's import of numpy, and the tool went on as if never stopped."""

    def end(number: int, frame: FrameType | None) -> None:
        _exit_saying(*line(signal.Signals(number)))

    with _handled_by(end, (signal.SIGINT, *PREEMPTING)):
        yield


@contextmanager
def _handled_by(handler: Callable[[int, FrameType | None], None], numbers: tuple[int, ...]) -> Iterator[None]:
    """`handler` for the signals `numbers` in the body, the previous handlers afterwards; in the main thread only
    (no other can set one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in numbers}
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


def ignore_stops() -> None:
    """From now on this process ignores the stop signals, Ctrl-C included: what it was asked for is done and is
    being written (sam-measure's summary.json), and a stop now would only make its line wrong."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, *PREEMPTING):
            signal.signal(number, signal.SIG_IGN)


def leave_stops_to_the_system() -> None:
    """Once the command has ended, its runs having recorded how they ended, a stop request has nothing left to
    checkpoint or report: the signals' default action ends the process at once (exit status 128 + signal), not
    `RunStopped` raised in one of Python's exit handlers, which prints a traceback and exits 0. A stop that waited
    and that no run took (it came after the last one) gets that default action now."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, *PREEMPTING):
            signal.signal(number, signal.SIG_DFL)
        if _outside.pending is not None and not _outside.handed_on:
            signal.raise_signal(_outside.pending)


@contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Catch the stopping signals while a run trains; the previous handlers come back afterwards.

    When the run stopped, the handler that was there before ours for the signal that stopped it runs then, if
    it is a function: submitit's, in a SLURM job, requeues the job (which continues from the checkpoint). Handlers
    can only be set from the main thread; elsewhere (a launcher's worker thread) the signals keep their usual
    effect.
    """
    requests = StopRequests()
    _outside.at_once, _outside.training = False, requests  # a run has started: a later stop waits for a safe point
    waiting, _outside.pending = _outside.pending, None
    in_main = threading.current_thread() is threading.main_thread()
    previous = {number: signal.signal(number, requests._handle) for number in (*PREEMPTING, signal.SIGINT)} \
        if in_main else {}
    try:
        if waiting is not None:  # asked before this run started (between a sweep's jobs): it does not start
            raise _stopped_outside_runs(waiting)
        yield requests
    except RunStopped:
        handed_on = previous.get(requests.signal)
        if requests.signal in PREEMPTING and callable(handed_on) and handed_on is not _stop_outside_runs:
            handed_on(requests.signal, None)
        raise
    finally:
        _outside.training = None
        for number, handler in previous.items():
            signal.signal(number, handler)
