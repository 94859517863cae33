"""Stop requests outside the training steps (start-up, a sharpness measurement) and `sam-measure` beside a run that
trains or will be continued: nothing is lost, every ending is one line with its exit code."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import BIN, TINY, read_json, run_cli, run_in_process
from test_experiment import strict_json
from test_resume import assert_same_run, checkpointed_step, in_background, metric_lines

# TINY with an end-of-run measurement slow enough (a few seconds) to be stopped in: 8 steps, then a trace of many
# probes.
SLOWLY_MEASURED = [*TINY, "sharpness.measures=[trace]", "+sharpness.options={trace_probes:1000}"]
FINAL_STEP = 8  # TINY: 2 epochs of 4 batches
# A model plug-in whose import makes every TensorBoard record write fail as on a full disk: in TensorBoard's own
# writer thread, the first to write.
FULL_DISK_FOR_TENSORBOARD = textwrap.dedent("""
    import errno

    import torch
    from tensorboard.summary.writer import record_writer


    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


    record_writer.RecordWriter.write = full


    class Net(torch.nn.Module):
        def __init__(self, num_classes, input_shape):
            super().__init__()
            self.layer = torch.nn.Linear(40, num_classes)

        def forward(self, x):
            return self.layer(x.flatten(1))
""")


def checksums(run_dir: Path) -> dict[str, str]:
    return {str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(run_dir.rglob("*")) if path.is_file()}


def assert_strict_metrics(run_dir: Path) -> None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def caught_signals(pid: int) -> int:
    """The bit mask of signals process `pid` handles itself (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)


def handles(process: subprocess.Popen[str], number: int) -> bool:
    return process.poll() is None and bool(caught_signals(process.pid) >> (number - 1) & 1)


def stopped_when(process: subprocess.Popen[str], ready: Callable[[], bool], stop_signal: signal.Signals, code: int,
                 *, waiting_for: str, to_group: bool = False) -> tuple[str, str]:
    """Send `stop_signal` to `process` (or its process group) once `ready()`; its stdout and stderr once it ended
    with exit code `code`."""
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, f"never reached: {waiting_for}"
        time.sleep(0.02)
    if to_group:
        os.killpg(process.pid, stop_signal)
    else:
        process.send_signal(stop_signal)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    return stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize(("stop_signal", "status", "code"), [(signal.SIGTERM, "preempted", 75),
                                                             (signal.SIGINT, "interrupted", 130)])
def test_a_stop_during_the_measurement_ends_the_run_at_once_and_the_rerun_measures_again(
        workdir: Path, stop_signal: signal.Signals, status: str, code: int) -> None:
    process = in_background(workdir, *SLOWLY_MEASURED, "hydra.run.dir=run")
    checkpoint = workdir / "run" / "checkpoints" / "last.pt"
    _, stderr = stopped_when(process, lambda: checkpointed_step(checkpoint)[0] >= FINAL_STEP,  # written before it
                             stop_signal, code, waiting_for="the run's final measurement")
    assert stderr.strip().splitlines() == [f"sam-run: error: {status}: stopped by {stop_signal.name} after step "
                                           f"{FINAL_STEP}; the checkpoint there is written: re-run the same command "
                                           f"to continue"]
    summary = read_json(workdir / "run" / "summary.json")
    assert summary["status"] == status and "measurements" not in summary
    assert checkpointed_step(checkpoint)[0] == FINAL_STEP
    if stop_signal == signal.SIGINT:
        return  # the continuation is the same as SIGTERM's
    assert run_cli("sam-run", *SLOWLY_MEASURED, "hydra.run.dir=reference", cwd=workdir).returncode == 0
    resumed = run_cli("sam-run", *SLOWLY_MEASURED, "hydra.run.dir=run", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(workdir / "run", workdir / "reference")
    assert_strict_metrics(workdir / "run")


@pytest.mark.parametrize(("stop_signal", "status", "code"), [(signal.SIGTERM, "preempted", 75),
                                                             (signal.SIGINT, "interrupted", 130)])
def test_a_stop_during_start_up_is_one_line_with_its_exit_code_and_writes_nothing(
        workdir: Path, stop_signal: signal.Signals, status: str, code: int) -> None:
    """Sent as soon as sam-run handles SIGTERM itself: in its first second, while its pre-flight loads torch."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc to see when sam-run handles signals")
    process = in_background(workdir, *TINY, "hydra.run.dir=run")
    deadline = time.monotonic() + 60
    while not handles(process, signal.SIGTERM):
        assert process.poll() is None and time.monotonic() < deadline, "sam-run never handled SIGTERM"
        time.sleep(0.001)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"sam-run: error: {status}: stopped by {stop_signal.name} while no run "
                                           f"was training (nothing to checkpoint): re-run the same command to go on"]
    assert not (workdir / "run").exists()


@pytest.mark.slow
def test_a_stop_anywhere_in_start_up_is_one_line_with_its_exit_code_and_writes_nothing(workdir: Path) -> None:
    """Signals at moments spread over the seconds of imports, pre-flight and Hydra's start (Hydra has made the run's
    directory and its log before the run claims it): raised into an import, a stop was swallowed (the run trained)
    or left numpy half-imported. Every try must end in one line, 75 or 130, with no directory."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc to see when sam-run handles signals")
    tries = 8
    for attempt in range(tries):
        stop_signal = (signal.SIGTERM, signal.SIGINT)[attempt % 2]
        # 2000 epochs (~17 s of training here): no try can complete before its signal, and a lost stop shows
        process = in_background(workdir, *TINY, "epochs=2000", f"hydra.run.dir=out/run{attempt}")
        deadline = time.monotonic() + 60
        while not handles(process, signal.SIGTERM):
            assert process.poll() is None and time.monotonic() < deadline, "sam-run never handled SIGTERM"
            time.sleep(0.001)
        time.sleep(0.2 + 2.8 * attempt / (tries - 1))  # across the imports' seconds, where the stops were lost
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=120)
        status, code = ("interrupted", 130) if stop_signal == signal.SIGINT else ("preempted", 75)
        if (workdir / "out" / f"run{attempt}" / "summary.json").is_file():
            assert read_json(workdir / "out" / f"run{attempt}" / "summary.json")["status"] == status, stderr
            continue  # the run had started: it stopped with a checkpoint (another test's case)
        assert (process.returncode, stderr.strip().splitlines()) == (code, [
            f"sam-run: error: {status}: stopped by {stop_signal.name} while no run was training (nothing to "
            f"checkpoint): re-run the same command to go on"]), f"try {attempt}"
        assert not (workdir / "out" / f"run{attempt}").exists(), f"try {attempt} left its directory"


PARALLEL_SWEEP = ["-m", "hydra/launcher=parallel", *TINY, "sharpness.measures=[]", "epochs=400",
                  "checkpoint.every_steps=1", "seed=0,1", "hydra.sweep.dir=sweep"]


@pytest.mark.slow
@pytest.mark.parametrize(("stop_signal", "status", "code", "to_group"), [
    (signal.SIGTERM, "preempted", 75, False),  # `kill` of sam-run
    (signal.SIGTERM, "preempted", 75, True),  # a scheduler's pre-emption of the whole job
    (signal.SIGINT, "interrupted", 130, True),  # Ctrl-C in a terminal
], ids=["sigterm-to-sam-run", "sigterm-to-its-group", "ctrl-c-to-its-group"])
def test_a_stopped_parallel_sweep_records_every_job_stopped_and_says_so_in_one_line(
        workdir: Path, stop_signal: signal.Signals, status: str, code: int, to_group: bool) -> None:
    """The signal to sam-run alone, or to its process group, which holds joblib's workers: each job stops after a
    step with a checkpoint, as a single run does, and sam-run prints the table and one line. Raised in sam-run inside
    joblib, the stop had the workers killed, their jobs left `running`."""
    process = subprocess.Popen([str(BIN / "sam-run"), *PARALLEL_SWEEP], cwd=workdir, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    def trained() -> bool:
        jobs = _job_dirs(workdir)
        return len(jobs) == 2 and all((job / "metrics.jsonl").is_file() and len(metric_lines(job)) >= 3
                                      for job in jobs)

    stdout, stderr = stopped_when(process, trained, stop_signal, code, waiting_for="3 epochs of both jobs",
                                  to_group=to_group)
    assert stderr.strip().splitlines() == [
        f"sam-run: error: {status}: stopped by {stop_signal.name}: any of the sweep's jobs still training stopped "
        f"with a checkpoint (the table above says which): re-run the same command to continue"]
    assert [read_json(job / "summary.json")["status"] for job in _job_dirs(workdir)] == [status, status]
    assert stdout.split("sweep sweep")[-1].count(status) >= 2, "the table shows both jobs stopped"
    for job in _job_dirs(workdir):  # each stopped after a step, with its checkpoint there
        step = checkpointed_step(job / "checkpoints" / "last.pt")[0]
        assert f"stopped by {stop_signal.name} after step {step};" in read_json(job / "summary.json")["error"]


# Loaded by Python at start-up from PYTHONPATH: an exit handler, the last to run, that says when sam-run is exiting
# and gives a stop request the time to land there.
SLOW_EXIT = textwrap.dedent("""
    import atexit
    import os
    import time


    def exiting():
        open(os.environ["EXIT_MARK"], "w").close()
        time.sleep(60)


    atexit.register(exiting)
""")


def test_a_stop_while_sam_run_exits_after_its_run_ended_is_no_traceback(workdir: Path) -> None:
    """The run completed and said so; a SIGTERM in the exit handlers ends the process as the signal does (143),
    not with RunStopped raised in an exit handler (a traceback, then exit 0)."""
    (workdir / "hooks").mkdir()
    (workdir / "hooks" / "sitecustomize.py").write_text(SLOW_EXIT)
    mark = workdir / "exiting"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EXIT_MARK": str(mark), "PYTHONPATH": str(workdir / "hooks")}
    process = subprocess.Popen([str(BIN / "sam-run"), *TINY, "epochs=1", "hydra.run.dir=run"], cwd=workdir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "done (completed)" in stdout and read_json(workdir / "run" / "summary.json")["status"] == "completed"


def test_sam_measure_refuses_a_run_in_use_and_its_measurement_survives_the_resume(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed in its final measurement (in process, as in test_resume) is measured by sam-measure before it
    is continued: the continued run keeps that measurement beside its own."""
    from sam_runner.run import loop, rundir

    measure = loop.take_measurement

    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit(137)

    monkeypatch.setattr(loop, "take_measurement", killed)
    with pytest.raises(SystemExit):
        run_in_process(workdir, monkeypatch, *TINY)
    monkeypatch.setattr(loop, "take_measurement", measure)

    with rundir.claim(workdir / "run"):  # as a sam-run training there holds it
        before = checksums(workdir / "run")
        refused = run_cli("sam-measure", "run", "--measures", "ascent", cwd=workdir)
        assert checksums(workdir / "run") == before
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "sam-measure: error:" in refused.stderr and "in use by another sam-run" in refused.stderr

    measured = run_cli("sam-measure", "run", "--measures", "ascent", cwd=workdir)
    assert measured.returncode == 0, measured.stderr
    remeasured = read_json(workdir / "run" / "summary.json")["measurements"]
    assert [record["source"] for record in remeasured] == ["sam-measure"]
    run_in_process(workdir, monkeypatch, *TINY)
    summary = read_json(workdir / "run" / "summary.json")
    assert summary["status"] == "completed"
    assert [record["source"] for record in summary["measurements"]] == ["sam-measure", "sam-run"]
    assert summary["measurements"][0] == remeasured[0]
    assert summary["sharpness"] == summary["measurements"][1]["values"], "the run's own values are its headline"
    assert [line["epoch"] for line in metric_lines(workdir / "run")] == [1, 2]
    assert_strict_metrics(workdir / "run")
    assert torch.load(workdir / "run" / "checkpoints" / "last.pt", weights_only=True)["summary"]["measurements"] \
        == summary["measurements"], "a later continuation keeps it too"


def test_the_measurement_gives_up_when_asked_and_leaves_the_weights_as_they_were() -> None:
    from sam_runner import sharpness

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    weights = [p.detach().clone() for p in model.parameters()]
    asked: list[int] = []

    def after_five() -> bool:
        asked.append(1)
        return len(asked) > 5

    with pytest.raises(sharpness.MeasurementStopped):
        sharpness.measure(model, torch.nn.CrossEntropyLoss(), batches, rho=0.05, measures=["trace", "worst"],
                          should_stop=after_five)
    assert len(asked) == 6, "asked before every pass, and not again once it said stop"
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert model.training, "the model's mode is back too"


def test_a_full_disk_in_the_tensorboard_writer_thread_is_the_run_s_one_line_error(workdir: Path) -> None:
    (workdir / "full_disk_plugin.py").write_text(FULL_DISK_FOR_TENSORBOARD)
    result = run_cli("sam-run", *TINY, "model=custom", "model._target_=full_disk_plugin.Net", "sharpness.measures=[]",
                     "hydra.run.dir=run", cwd=workdir, extra_env={"PYTHONPATH": str(workdir)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], "no traceback from the thread"
    assert result.stderr.startswith("sam-run: error: out of disk space (No space left on device)")
    assert read_json(workdir / "run" / "summary.json")["status"] == "failed"


def test_sam_run_handles_stop_signals_before_its_heavy_imports() -> None:
    """The console script's module loads neither Hydra nor torch before it installs the handlers: a Ctrl-C in the
    first second of start-up is then one line too (it printed a KeyboardInterrupt traceback from an import)."""
    from importlib.metadata import entry_points

    (script,) = [point for point in entry_points(group="console_scripts") if point.name == "sam-run"]
    module = script.value.partition(":")[0]
    probe = subprocess.run([sys.executable, "-c", f"import sys, signal, {module}; {module}.stop_at_once(); "
                            "print(sorted(name for name in ('hydra', 'torch', 'omegaconf') if name in sys.modules), "
                            "signal.getsignal(signal.SIGINT).__name__)"], capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["[]", "_stop_outside_runs"]


def test_ctrl_c_in_sam_measure_is_one_line_and_adds_nothing(workdir: Path) -> None:
    assert run_cli("sam-run", *TINY, "sharpness.measures=[]", "hydra.run.dir=run", cwd=workdir).returncode == 0
    before = checksums(workdir / "run")
    process = subprocess.Popen([str(Path(sys.executable).parent / "sam-measure"), "run", "--measures", "average",
                                "--num-samples", "128"], cwd=workdir, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # in its imports (torch: 1.4 s here), inside its stop handling (entered within 0.05 s)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines() == [
        "sam-measure: error: interrupted (Ctrl-C): nothing was added to the run's summary.json"], stderr
    assert checksums(workdir / "run") == before


@pytest.mark.slow
def test_a_parallel_sweep_whose_sam_run_is_killed_stops_its_workers_and_the_command_continues_it(
        workdir: Path) -> None:
    """kill -9 of sam-run leaves joblib's workers without a parent: each job stops as if pre-empted (checkpoint,
    `preempted`) and its worker exits, instead of training on unseen; the same command then finishes the sweep."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux's /proc to find the worker processes")
    command = ["-m", "hydra/launcher=parallel", *TINY, "dataset.source.num_train=2048", "epochs=80",
               "checkpoint.every_steps=10", "sharpness.measures=[]", "seed=0,1", "hydra.sweep.dir=sweep"]
    process = in_background(workdir, *command)
    deadline = time.monotonic() + 120
    while len(jobs := _job_dirs(workdir)) < 2 or \
            not all(checkpointed_step(job / "checkpoints" / "last.pt")[0] > 0 for job in jobs):
        assert process.poll() is None and time.monotonic() < deadline, "the jobs never checkpointed"
        time.sleep(0.2)
    workers = [int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    process.kill()
    process.wait()  # not communicate(): workers that live on would hold its pipes open
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived sam-run"
        time.sleep(0.2)
    assert [read_json(job / "summary.json")["status"] for job in _job_dirs(workdir)] == ["preempted", "preempted"]
    again = run_cli("sam-run", *command, cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert [read_json(job / "summary.json")["status"] for job in _job_dirs(workdir)] == ["completed", "completed"]


def _job_dirs(workdir: Path) -> list[Path]:
    return sorted((workdir / "sweep").glob("[0-9]_*"))


@pytest.mark.slow
def test_a_parallel_sweep_s_jobs_stopped_before_they_start_leave_no_folder(workdir: Path) -> None:
    """Four jobs, two at a time: stopped while jobs 0 and 1 train, jobs 2 and 3 start only to stop before their run
    begins. They never started, so they leave nothing behind (they left a folder with Hydra's log and the lock)."""
    command = [*PARALLEL_SWEEP[:-2], "seed=0,1,2,3", "hydra.sweep.dir=sweep"]
    process = in_background(workdir, *command)

    def trained() -> bool:
        jobs = _job_dirs(workdir)
        return len(jobs) == 2 and all((job / "metrics.jsonl").is_file() and len(metric_lines(job)) >= 1 for job in jobs)

    _, stderr = stopped_when(process, trained, signal.SIGTERM, 75, waiting_for="an epoch of jobs 0 and 1")
    assert stderr.strip().splitlines()[-1].startswith("sam-run: error: preempted: stopped by SIGTERM: "), stderr
    assert [job.name[0] for job in _job_dirs(workdir)] == ["0", "1"], "jobs 2 and 3 left a folder"
    assert [read_json(job / "summary.json")["status"] for job in _job_dirs(workdir)] == ["preempted", "preempted"]


# Loaded by Python at start-up from PYTHONPATH: once the joblib launcher has every job's result, and before Hydra's
# callbacks print the table, say so and give a stop request the time to land there.
SLOW_AFTER_THE_LAST_JOB = textwrap.dedent("""
    import os
    import time

    from hydra_plugins.hydra_joblib_launcher import _core

    launch = _core.launch


    def launched(*args, **kwargs):
        results = launch(*args, **kwargs)
        open(os.environ["LAUNCHED_MARK"], "w").close()
        time.sleep(3)
        return results


    _core.launch = launched
""")


@pytest.mark.slow
def test_a_stop_after_a_parallel_sweep_s_last_job_still_prints_the_table(workdir: Path) -> None:
    """Every job has ended when the stop (SIGTERM; Ctrl-C takes the same path, tested above during the jobs) lands:
    the table is printed (every job completed, each with the rho the launcher gave it), then the stopped sweep's one
    line and exit code (already so before issue 17's last pass; kept by this test)."""
    stop_signal, status, code = signal.SIGTERM, "preempted", 75
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    (workdir / "hooks").mkdir()
    (workdir / "hooks" / "sitecustomize.py").write_text(SLOW_AFTER_THE_LAST_JOB)
    mark = workdir / "launched"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LAUNCHED_MARK": str(mark), "PYTHONPATH": str(workdir / "hooks")}
    process = subprocess.Popen([str(BIN / "sam-run"), "-m", "hydra/launcher=parallel", *TINY, "epochs=1",
                                "sharpness.measures=[]", "optimizer=sam", "rho=0.01,0.1", "hydra.sweep.dir=sweep"],
                               cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = stopped_when(process, mark.exists, stop_signal, code, waiting_for="the jobs' results")
    assert stderr.strip().splitlines()[-1].startswith(f"sam-run: error: {status}: stopped by {stop_signal.name}"), \
        stderr
    table = stdout.split("sweep sweep (2 runs)")[-1]
    assert "sweep sweep (2 runs)" in stdout and table.count("completed") == 2, stdout
    summaries = [read_json(job / "summary.json") for job in _job_dirs(workdir)]
    assert [(s["status"], s["rho"]) for s in summaries] == [("completed", 0.01), ("completed", 0.1)]  # each its own


@pytest.mark.slow
def test_a_run_directory_held_by_sam_measure_is_refused_naming_sam_measure(workdir: Path) -> None:
    """sam-run started on a run that sam-measure is measuring: one line, exit 2, naming the tool that holds it (it
    said "in use by another sam-run")."""
    assert run_cli("sam-run", *TINY, "sharpness.measures=[]", "+sharpness.options={trace_probes:2000}",
                   "hydra.run.dir=run", cwd=workdir).returncode == 0
    measuring = subprocess.Popen([str(BIN / "sam-measure"), "run", "--measures", "trace"], cwd=workdir,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = workdir / "run" / ".lock"
    deadline = time.monotonic() + 120
    while f"pid {measuring.pid} " not in lock.read_text():
        assert measuring.poll() is None and time.monotonic() < deadline, measuring.communicate()
        time.sleep(0.02)
    refused = run_cli("sam-run", *TINY, "sharpness.measures=[]", "+sharpness.options={trace_probes:2000}",
                      "hydra.run.dir=run", cwd=workdir)
    held = measuring.poll() is None  # the refusal came while sam-measure still held the directory
    _, measure_errors = measuring.communicate(timeout=300)
    assert measuring.returncode == 0, measure_errors
    assert held, "sam-measure ended before sam-run was refused: measure for longer"
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"sam-run: error: run is in use by another sam-measure (pid {measuring.pid} on "
        f"{socket.gethostname()}): wait for it to end (or, for a new run, choose another hydra.run.dir)"]


def test_the_lock_s_refusal_names_its_holder_or_no_tool(tmp_path: Path) -> None:
    from sam_runner.errors import ConfigError
    from sam_runner.run import rundir

    with rundir.claim(tmp_path, by="sam-measure"):
        with pytest.raises(ConfigError, match=rf"in use by another sam-measure \(pid {os.getpid()} on "):
            rundir.refuse_if_held(tmp_path)
        (tmp_path / ".lock").write_text("pid 12 on elsewhere\n")  # as sam-runner wrote it before naming the tool
        with pytest.raises(ConfigError, match=r"in use by another sam-runner process \(pid 12 on elsewhere\)"):
            rundir.refuse_if_held(tmp_path)


@pytest.mark.parametrize("moment", ["start-up", "measuring"])
def test_sigterm_in_sam_measure_is_one_line_exit_75_and_adds_nothing(workdir: Path, moment: str) -> None:
    """As sam-run's pre-emption: one line and 75, the run's records as they were (it died by the signal, 143,
    without a word)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc to see when sam-measure handles signals")
    assert run_cli("sam-run", *TINY, "sharpness.measures=[]", "+sharpness.options={trace_probes:2000}",
                   "hydra.run.dir=run", cwd=workdir).returncode == 0
    before = checksums(workdir / "run")
    process = subprocess.Popen([str(BIN / "sam-measure"), "run", "--measures", "trace"], cwd=workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = workdir / "run" / ".lock"
    ready = (lambda: handles(process, signal.SIGTERM)) if moment == "start-up" else \
        (lambda: f"pid {process.pid} " in lock.read_text())
    _, stderr = stopped_when(process, ready, signal.SIGTERM, 75, waiting_for=moment)
    assert stderr.strip().splitlines() == [
        "sam-measure: error: preempted (SIGTERM): nothing was added to the run's summary.json"]
    after = checksums(workdir / "run")
    assert {name: digest for name, digest in after.items() if name != ".lock"} == \
        {name: digest for name, digest in before.items() if name != ".lock"}


# Loaded by every Python process at start-up from PYTHONPATH: joblib's worker processes take 5 s to start, so that a
# stop lands while they exist and no job has started.
SLOW_WORKERS = textwrap.dedent("""
    import sys
    import time

    if "popen_loky_posix" in " ".join(sys.argv):
        time.sleep(5)
""")


def test_a_parallel_sweep_stopped_before_its_first_job_takes_its_workers_along(workdir: Path) -> None:
    """Stopped while joblib's workers start and no job has: sam-run ends at once (one line, 75, nothing left) and so
    do its idle workers. They lived on, holding sam-run's stdout and stderr open: whoever read them never saw the
    end (a `| tee`, this test's communicate)."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux's /proc to find the worker processes")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    (workdir / "hooks").mkdir()
    (workdir / "hooks" / "sitecustomize.py").write_text(SLOW_WORKERS)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(workdir / "hooks")}
    process = subprocess.Popen([str(BIN / "sam-run"), *PARALLEL_SWEEP], cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    def workers() -> list[int]:
        with contextlib.suppress(OSError):
            return [int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()
                    if b"popen_loky_posix" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        return []

    deadline = time.monotonic() + 120
    while not (started := workers()):
        assert process.poll() is None and time.monotonic() < deadline, "no worker started"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        for pid in started:  # on the old code they live on
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == 75
    assert stderr.strip().splitlines() == ["sam-run: error: preempted: stopped by SIGTERM while no run was training "
                                           "(nothing to checkpoint): re-run the same command to go on"]
    assert not (workdir / "sweep").exists()
