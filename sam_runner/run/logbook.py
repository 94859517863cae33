"""Everything a run writes besides checkpoints: TensorBoard events, metrics.jsonl, summary.json, run.json.

Metric names follow one scheme everywhere: `train/*`, `test/*`, `gap/*`, `opt/*`, `sharpness/*`.
summary.json is rewritten after every epoch, so a killed run still says how far it got.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from sam_runner.run.checkpoint import strict_json, write_json_atomic
from sam_runner.run.rundir import METRICS, RUN_INFO, SUMMARY
from sam_runner.run.status import ENDED

log = logging.getLogger("sam_runner")

SHOW_PROGRESS = sys.stderr.isatty()  # bars only for a person at a terminal, never in logs or CI

# Final metrics shown in TensorBoard's HParams table (summary.json key -> scalar tag).
HPARAM_METRICS = {"train_acc": "train/acc", "test_acc": "test/acc", "gap_acc": "gap/acc",
                  "train_loss": "train/loss", "test_loss": "test/loss", "gap_loss": "gap/loss",
                  "val_acc": "val/acc", "val_loss": "val/loss"}


class Stopwatch:
    """Seconds a run spends per phase (train, eval, checkpoint, sharpness), so its cost can be read apart.

    Phases nest exclusively: a checkpoint written in the middle of a training epoch pauses the train phase, so
    every second is counted once. The totals carry over a resume (`previous`, from the checkpoint).
    """

    def __init__(self, previous: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float, (previous or {}).get("phases", {}))
        self.wall_before = (previous or {}).get("wall", 0.0)  # wall time of the attempts before a resume
        self._open: list[list[Any]] = []  # [phase, since] of the phases entered and not left, innermost last

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._charge_innermost()
        self._open.append([phase, time.perf_counter()])
        try:
            yield
        finally:
            self._charge_innermost()
            self._open.pop()
            if self._open:
                self._open[-1][1] = time.perf_counter()  # the outer phase runs again from now

    def _charge_innermost(self) -> None:
        if self._open:
            now = time.perf_counter()
            self.seconds[self._open[-1][0]] += now - self._open[-1][1]
            self._open[-1][1] = now

    def total(self, phase: str) -> float:
        """Seconds in `phase` so far, the running stretch included."""
        self._charge_innermost()
        return self.seconds[phase]

    def state(self) -> dict[str, Any]:
        self._charge_innermost()
        return {"phases": dict(self.seconds), "wall": self.wall_before + time.perf_counter() - self.started}

    def times(self) -> dict[str, float]:
        """`<phase>_time_s` for every phase so far, and `wall_time_s` of the whole run (every attempt)."""
        state = self.state()
        return {**{f"{phase}_time_s": value for phase, value in state["phases"].items()},
                "wall_time_s": state["wall"]}


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    """The commit of the sam-runner source when it runs from its own git checkout (an editable install).

    An installed copy inside some other repository (a venv in a project) must not report that project's commit.
    """
    package = Path(__file__).resolve().parents[1]
    try:
        result = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True,
                                text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / "sam_runner" != package:
        return None
    return lines[1]


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a run ran: enough to explain a difference between two runs."""
    info: dict[str, Any] = {
        "host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
        "git_sha": _git_sha(),
        "versions": {name: _package_version(name) for name in
                     ("sam-runner", "torch", "torchvision", "hydra-core", "omegaconf", "mnist1d")},
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX512, AVX2, ...: with the threads, picks kernels
    }
    if device.type == "cuda":
        info["cuda"] = {"name": torch.cuda.get_device_name(device), "capability": torch.cuda.get_device_capability(device),
                        "cuda_version": torch.version.cuda}
    return info


def write_run_info(run_dir: Path, argv: list[str], resolved_config: dict[str, Any], device: torch.device, *,
                   resumed_at_step: int | None = None) -> None:
    """run.json: the command, config and environment of the run; a continuation is added to `resumes`. Written
    before any other record, so a directory with sam-run's records and no run.json is not a sam-run's (rundir)."""
    info = {"argv": argv, "config": resolved_config, **environment(device)}
    path = run_dir / RUN_INFO
    if resumed_at_step is not None:
        earlier = json.loads(path.read_text())
        resume = {"argv": argv, "host": info["host"], "at_step": resumed_at_step,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        info = {**earlier, "resumes": [*earlier.get("resumes", []), resume]}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(info, path)


class Logbook:
    """Writes one run's records into its run directory.

    A continued run passes where its checkpoint left the records: metrics.jsonl is cut back to `metrics_offset`
    bytes (or, when something shortened it below that, to its last whole line) and TensorBoard hides the events
    from `purge_step` on, so each epoch appears exactly once and every line is whole.
    """

    def __init__(self, run_dir: Path, hparams: dict[str, Any], *, metrics_offset: int = 0,
                 purge_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.hparams = hparams
        run_dir.mkdir(parents=True, exist_ok=True)
        self._purge_step = purge_step
        self._metrics_file = (run_dir / METRICS).open("a+b")
        self._metrics_file.truncate(_whole_lines_up_to(self._metrics_file, metrics_offset))

    @cached_property
    def _writer(self) -> SummaryWriter:
        """Opened at the first event, inside the run's own error handling: a writer that fails (a full disk) ends
        the run with a record that says so."""
        return SummaryWriter(log_dir=str(self.run_dir), purge_step=self._purge_step)

    def log_metrics(self, epoch: int, step: int, metrics: dict[str, float]) -> int:
        """One line of metrics.jsonl (an epoch's, or a measurement's within one) and one TensorBoard scalar per
        metric, at the global step. Returns the size of metrics.jsonl, which a checkpoint records."""
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()
        self._metrics_file.write((strict_json({"epoch": epoch, "step": step, **metrics}) + "\n").encode())
        self._metrics_file.flush()
        return self._metrics_file.tell()

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic({**summary, **self.hparams}, self.run_dir / SUMMARY)

    def close(self, summary: dict[str, Any]) -> None:
        """Write the HParams record into this run's own event file (add_hparams would make a second run), once the
        run has ended; a run that stopped to be continued gets it when it ends."""
        if summary.get("status") in ENDED:
            self._write_hparams(summary)
        if "_writer" in self.__dict__:  # opened
            self._writer.close()
        self._metrics_file.close()

    def _write_hparams(self, summary: dict[str, Any]) -> None:
        metrics = {tag: summary[key] for key, tag in HPARAM_METRICS.items()
                   if isinstance(summary.get(key), (int, float)) and math.isfinite(summary[key])}
        hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in self.hparams.items()}
        for event in hparams_summary(hparams, metrics):
            self._writer.file_writer.add_summary(event)


def _whole_lines_up_to(file: BinaryIO, offset: int) -> int:
    """Where metrics.jsonl is cut on opening: at `offset`, the end of the last line the checkpoint knows, or, when
    the file is shorter (truncated, or torn by a kill mid-write), after its last whole line."""
    size = file.seek(0, os.SEEK_END)
    if size >= offset:
        return offset
    file.seek(0)
    whole = file.read()
    cut = whole.rfind(b"\n") + 1
    kept = whole[:cut].splitlines()
    last = f"its last whole line is epoch {json.loads(kept[-1]).get('epoch')}" if kept else "no line of it is whole"
    log.warning("%s is shorter (%d bytes) than when the checkpoint was written (%d): %s, and the lines of the epochs "
                "after it are lost from it (TensorBoard's events still hold them)", file.name, size, offset, last)
    return cut


