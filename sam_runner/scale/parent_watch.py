"""A parallel sweep (`hydra/launcher=parallel`: joblib's worker processes, children of sam-run) stops as one: a stop
signal to sam-run reaches every job, which stops as a single run does (a checkpoint, `preempted` or `interrupted`),
and so does sam-run's own death (kill -9, the OOM killer), which nothing else tells the workers: they would train on
unseen, in run directories that the same command, re-run, then finds in use.

sam-run does not signal the workers: a signal to its whole process group (Ctrl-C in a terminal, a batch system)
reaches them too, and a second SIGINT would mean "stop at once". It writes the signal into a file named in the
workers' environment, which each job watches (`stop_requests`' `request_stop` takes it once); a job that starts
later stops before it runs. joblib's own processes (its resource tracker) are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sam_runner.run import stopping
from sam_runner.run.stopping import EXIT_PREEMPTED

log = logging.getLogger("sam_runner")

# The folder where sam-run says that the sweep was stopped (file STOPPED) and its jobs that they started (STARTED).
SWEEP_STOPS_ENV = "SAM_RUNNER_SWEEP_STOPS"
STOPPED, STARTED = "stopped", "started"
TRACKER_WARNINGS = tuple(f"ignore::UserWarning:{module}" for module in (
    "joblib.externals.loky.backend.resource_tracker", "multiprocessing.resource_tracker"))


@contextmanager
def stops_handed_to_workers() -> Iterator[None]:
    """In sam-run during a sweep: a stop is handed on to the jobs that run in worker processes, if any has started
    (until then sam-run ends at once, as without a sweep)."""
    folder = Path(tempfile.mkdtemp(prefix="sam-run-sweep-"))

    def hand_on(received: signal.Signals) -> bool:  # in the signal handler: a file written whole, then a look
        written = os.open(folder / f".{STOPPED}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(written, str(int(received)).encode())
        os.close(written)
        os.replace(folder / f".{STOPPED}", folder / STOPPED)
        return (folder / STARTED).exists()

    os.environ[SWEEP_STOPS_ENV] = str(folder)
    # joblib's resource trackers, started with the workers, clean up what a sam-run ended at once left (its queues'
    # semaphores, memory-mapping folders) and then warn about it on sam-run's stderr, after its one line
    warnings = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [warnings, *TRACKER_WARNINGS]))
    stopping.undo_when_stopped_at_once(lambda: shutil.rmtree(folder, ignore_errors=True))
    stopping.undo_when_stopped_at_once(_end_idle_workers, first=True)  # before the folders they may be making go
    stopping.hand_stops_on(hand_on)
    try:
        yield
    finally:
        stopping.hand_stops_on(None)
        os.environ.pop(SWEEP_STOPS_ENV, None)
        if warnings is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = warnings
        shutil.rmtree(folder, ignore_errors=True)


def _end_idle_workers() -> None:
    """When sam-run ends at once (a stop before any job started), joblib's worker processes, started before the
    first job, have no job to watch its parent from: they would live on, idle, holding sam-run's output open
    (a pipe reader waits for them). They hold no record yet: they end with it (SIGKILL). Their resource trackers
    are left alone: they clean up and exit once every process that used them has. (Linux /proc; elsewhere
    nothing.)"""
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError, ValueError):
                    if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                        os.kill(int(child), signal.SIGKILL)


def in_worker() -> bool:
    """Whether this process is a worker that multiprocessing started (a parallel sweep's job)."""
    return multiprocessing.parent_process() is not None


@contextmanager
def stopped_with_the_sweep(poll_s: float = 0.2) -> Iterator[None]:
    """In a worker process started by multiprocessing, stop the job (as a stop signal would, once) when sam-run was
    stopped, and send this process SIGTERM (the run's stop request) once its parent has died; elsewhere (sam-run
    itself, a SLURM or torchrun process) do nothing."""
    parent = multiprocessing.parent_process()
    if parent is None:
        yield
        return
    folder = Path(named) if (named := os.environ.get(SWEEP_STOPS_ENV)) else None
    stopping.defer_stops()  # a stop outside the run must not kill the worker: joblib would kill the other jobs
    if folder is not None:
        with contextlib.suppress(OSError):
            (folder / STARTED).touch()  # before the look below: sam-run, stopped now, sees it or this job sees the file
    done, orphaned = threading.Event(), threading.Event()

    def stopped() -> bool:
        if folder is None or not (folder / STOPPED).is_file():
            return False
        stopping.request_stop(int((folder / STOPPED).read_text()))
        return True

    def watch() -> None:
        while not done.wait(poll_s):
            if os.getppid() != parent.pid:  # re-parented: the process that started this worker has died
                log.warning("sam-run, which started this sweep, is gone: stopping this job with a checkpoint")
                orphaned.set()
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if stopped():
                return

    if not stopped():
        threading.Thread(target=watch, name="sam-run parent watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        if orphaned.is_set():  # the run is recorded; no one is left to hand a result to, or to give this worker work
            logging.shutdown()
            os._exit(EXIT_PREEMPTED)
