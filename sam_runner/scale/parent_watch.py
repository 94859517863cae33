"""A sweep job in a worker process (`hydra/launcher=parallel`: joblib's workers, children of sam-run) stops when
sam-run itself is gone (kill -9, the OOM killer): nothing else tells the workers, which would train on unseen, in
run directories that the same command, re-run, then finds in use. The job stops as a pre-empted one does, with a
checkpoint and `preempted`, so that re-running the command continues it."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sam_runner.run.stopping import EXIT_PREEMPTED

log = logging.getLogger("sam_runner")


@contextmanager
def stopped_when_orphaned(poll_s: float = 1.0) -> Iterator[None]:
    """In a worker process started by multiprocessing, send this process SIGTERM (the run's stop request) once its
    parent has died; elsewhere (sam-run itself, a SLURM or torchrun process) do nothing."""
    parent = multiprocessing.parent_process()
    if parent is None:
        yield
        return
    done, orphaned = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if os.getppid() != parent.pid:  # re-parented: the process that started this worker has died
                log.warning("sam-run, which started this sweep, is gone: stopping this job with a checkpoint")
                orphaned.set()
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, name="sam-run parent watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        if orphaned.is_set():  # the run is recorded; no one is left to hand a result to, or to give this worker work
            logging.shutdown()
            os._exit(EXIT_PREEMPTED)
