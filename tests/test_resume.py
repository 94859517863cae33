"""Exact resume and stop requests, end to end through the installed `sam-run`.

A run killed (`kill -9`) at random moments, or stopped by SIGTERM or Ctrl-C, and then continued by re-running the
same command must end bitwise equal to a run that was never interrupted: weights, optimizer state, metrics.jsonl,
TensorBoard scalars (each epoch exactly once) and the summary's numbers. Only timings may differ.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import BIN, TINY, read_json, run_cli, run_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Long enough to be killed inside training (32 steps an epoch, a checkpoint every 4 steps), with BatchNorm
# (cnn1d) and SAM, so restored buffers and optimizer state matter.
RESUMABLE = ["dataset=synthetic", "dataset.source.num_train=1024", "dataset.source.num_test=256", "model=cnn1d",
             "optimizer=sam", "epochs=3", "batch_size=32", "checkpoint.every_steps=4",
             "sharpness.measures=[ascent,lambda_max]", "sharpness.num_samples=128"]
TIMING_KEYS = ("opt/epoch_time_s", "opt/images_per_s")


def in_background(workdir: Path, *args: str) -> subprocess.Popen[str]:
    """`sam-run ARGS` started as a user would, without waiting for it."""
    return subprocess.Popen([str(BIN / "sam-run"), *args], cwd=workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start(workdir: Path, run_dir: str, *overrides: str) -> subprocess.Popen[str]:
    return in_background(workdir, *RESUMABLE, *overrides, f"hydra.run.dir={run_dir}")


def started(workdir: Path, run_dir: str, *overrides: str) -> subprocess.Popen[str]:
    """`sam-run` on RESUMABLE, once it has written a checkpoint of its own (or ended)."""
    checkpoint = workdir / run_dir / "checkpoints" / "last.pt"
    before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
    process = start(workdir, run_dir, *overrides)
    deadline = time.monotonic() + 120
    while process.poll() is None and (checkpoint.stat().st_mtime_ns if checkpoint.exists() else None) == before:
        assert time.monotonic() < deadline, "the run never wrote a checkpoint"
        time.sleep(0.01)
    return process


def without_timings(summary: dict[str, Any]) -> dict[str, Any]:
    kept = {key: value for key, value in summary.items() if not key.endswith("_time_s")}
    kept["measurements"] = [{key: value for key, value in record.items() if key != "time_s"}
                            for record in summary.get("measurements", [])]
    return kept


def metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key not in TIMING_KEYS} for line in lines]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's view of the run: every scalar tag's (step, value) list, purged events hidden."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag not in TIMING_KEYS}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    assert without_timings(read_json(run_dir / "summary.json")) == without_timings(read_json(reference / "summary.json"))
    assert metric_lines(run_dir) == metric_lines(reference)
    assert scalars(run_dir) == scalars(reference)
    ours, theirs = (torch.load(path / "checkpoints" / "last.pt", weights_only=True) for path in (run_dir, reference))
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name
    for index, state in theirs["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(ours["optimizer"]["state"][index][key], value), (index, key)


def assert_resumes_in_lock_step(workdir: Path, monkeypatch: pytest.MonkeyPatch, *options: str, step: int = 6) -> None:
    """A run killed right after its checkpoint at `step` (as `kill -9` there), then re-run, ends equal to the run
    never stopped: weights, buffers, optimizer state (a variant's own state too), metrics and summary."""
    from sam_runner.run import loop

    run_in_process(workdir, monkeypatch, *options, run_dir="reference")
    save = loop.save_checkpoint

    def killed_after_the_step(run: Any, progress: Any, summary: Any) -> None:
        save(run, progress, summary)
        if progress.step == step:
            raise SystemExit(137)

    monkeypatch.setattr(loop, "save_checkpoint", killed_after_the_step)
    with pytest.raises(SystemExit):
        run_in_process(workdir, monkeypatch, *options)
    assert checkpointed_step(workdir / "run" / "checkpoints" / "last.pt")[0] == step
    monkeypatch.setattr(loop, "save_checkpoint", save)
    run_in_process(workdir, monkeypatch, *options)  # in a later second than the killed run, as a real re-run
    assert_same_run(workdir / "run", workdir / "reference")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, never interrupted."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_cli("sam-run", *RESUMABLE, "hydra.run.dir=ref", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir / "ref"


def checkpointed_step(path: Path) -> tuple[int, int, int]:
    """(step, epoch, batch) of the checkpoint at `path` ((-1, -1, -1) while there is none)."""
    try:
        progress = torch.load(path, weights_only=True)["progress"]
    except (OSError, RuntimeError, EOFError):
        return -1, -1, -1
    return progress["step"], progress["epoch"], progress["batch"]


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_bitwise_equal(workdir: Path, reference: Path) -> None:
    """Two kills at random points of training (each a random few milliseconds after a checkpoint at a random
    step), then one right after the checkpoint that precedes the final measurement; then the same command."""
    draw = random.Random(9)
    targets = sorted(draw.sample(range(1, 90), 2)) + [96]  # steps (3 epochs x 32); 96: the end of training
    checkpoint = workdir / "run" / "checkpoints" / "last.pt"
    attempts = []
    for target in targets:
        process = start(workdir, "run")
        deadline = time.monotonic() + 120
        while process.poll() is None and checkpointed_step(checkpoint)[0] < target:
            assert time.monotonic() < deadline, f"the run never reached step {target}"
            time.sleep(0.005)
        time.sleep(draw.uniform(0, 0.05))
        process.kill()
        attempts.append((target, process.wait(), checkpointed_step(checkpoint)))
    final = run_cli("sam-run", *RESUMABLE, "hydra.run.dir=run", cwd=workdir)
    assert final.returncode == 0, final.stderr
    assert_same_run(workdir / "run", reference)
    assert [code for _, code, _ in attempts[:2]] == [-signal.SIGKILL] * 2, attempts
    assert not list((workdir / "run").rglob("*.tmp")), "half-written files of a killed run are cleaned up"
    assert len(read_json(workdir / "run" / "run.json")["resumes"]) >= 2


@pytest.mark.parametrize(("stop_signal", "status", "code"), [(signal.SIGTERM, "preempted", 75),
                                                             (signal.SIGINT, "interrupted", 130)])
def test_a_stop_signal_checkpoints_at_a_step_and_the_rerun_continues_exactly(
        workdir: Path, reference: Path, stop_signal: signal.Signals, status: str, code: int) -> None:
    process = started(workdir, "run")
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert f"sam-run: error: {status}: stopped by {stop_signal.name}" in stderr and "Traceback" not in stderr
    summary = read_json(workdir / "run" / "summary.json")
    assert summary["status"] == status and "re-run the same command" in summary["error"]
    stopped_at = int(summary["error"].split("after step ")[1].split(";")[0])
    assert checkpointed_step(workdir / "run" / "checkpoints" / "last.pt")[0] == stopped_at
    if stop_signal == signal.SIGINT:
        return  # the continuation is the same code path as SIGTERM's
    resumed = run_cli("sam-run", *RESUMABLE, "hydra.run.dir=run", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing" in resumed.stdout
    assert_same_run(workdir / "run", reference)


@pytest.mark.slow
def test_a_rerun_leaves_a_finished_run_refuses_another_config_and_starts_over_only_when_asked(workdir: Path) -> None:
    assert run_cli("sam-run", *TINY, "hydra.run.dir=run", cwd=workdir).returncode == 0
    written = {path: path.read_bytes() for path in (workdir / "run").rglob("*")
               if path.is_file() and path.name not in ("sam-run.log", ".lock")}  # the log and lock name each attempt
    again = run_cli("sam-run", *TINY, "hydra.run.dir=run", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "completed already: not trained again" in again.stdout
    refused = run_cli("sam-run", *TINY, "lr=0.3", "hydra.run.dir=run", cwd=workdir)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "lr: 0.1 -> 0.3" in refused.stderr and "resume=false" in refused.stderr
    now = {path: path.read_bytes() for path in written}
    assert now == written, "neither the re-run nor the refused one changed a file (.hydra/ included)"
    over = run_cli("sam-run", *TINY, "lr=0.3", "resume=false", "hydra.run.dir=run", cwd=workdir)
    assert over.returncode == 0, over.stderr
    assert read_json(workdir / "run" / "run.json")["config"]["lr"] == 0.3
    assert len(metric_lines(workdir / "run")) == 2  # this run's two epochs only
    assert len(list((workdir / "run").glob("events.out.tfevents.*"))) == 1


def test_a_second_run_on_a_directory_in_use_is_refused_and_the_first_is_untouched(workdir: Path) -> None:
    first = started(workdir, "run", "epochs=50")  # still training when the second one starts
    second = run_cli("sam-run", *RESUMABLE, "epochs=50", "hydra.run.dir=run", cwd=workdir)
    assert first.poll() is None, "the first run must still be running for this test to mean anything"
    assert second.returncode == 2
    assert "is in use by another sam-run (pid" in second.stderr
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 75, stderr
    assert read_json(workdir / "run" / "summary.json")["status"] == "preempted"
    assert "resumes" not in read_json(workdir / "run" / "run.json")
    assert len(list((workdir / "run").glob("events.out.tfevents.*"))) == 1


def test_two_runs_started_at_once_get_their_own_default_directories(workdir: Path) -> None:
    runs = [in_background(workdir, *TINY, "epochs=1", f"seed={seed}") for seed in (0, 1)]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    directories = sorted((workdir / "outputs" / "runs").iterdir())
    assert len(directories) == 2
    assert sorted(read_json(path / "summary.json")["seed"] for path in directories) == [0, 1]
    for path in directories:
        assert [line["epoch"] for line in metric_lines(path)] == [1]


def test_a_full_disk_fails_the_run_in_one_line_and_its_summary_says_so(workdir: Path) -> None:
    """A file-size limit below a checkpoint's size makes its write fail as a full disk would; summary.json
    (smaller) still records why the run stopped."""
    import resource

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # bytes: summary fits, the checkpoint not

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([str(BIN / "sam-run"), *TINY, "model.hidden=[200]", "hydra.run.dir=run"], cwd=workdir,
                            env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "File too large" in result.stderr and "re-run the same command" in result.stderr
    summary = read_json(workdir / "run" / "summary.json")
    assert summary["status"] == "failed" and "File too large" in summary["error"]
    assert not list((workdir / "run").rglob("*.tmp")), "the half-written checkpoint is removed"


def test_sigusr1_and_sigterm_ask_for_preemption_and_a_second_ctrl_c_stops_at_once() -> None:
    from sam_runner.run.stopping import EXIT_PREEMPTED, stop_requests

    before = signal.getsignal(signal.SIGTERM)
    with stop_requests() as requests:
        assert not requests.requested
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)  # a later signal does not replace the first
        stopped = requests.stopped(step=7)
        assert (stopped.status, stopped.exit_code) == ("preempted", EXIT_PREEMPTED)
        assert "SIGUSR1 after step 7" in str(stopped)
    with stop_requests() as requests:
        signal.raise_signal(signal.SIGINT)
        assert requests.stopped(step=1).status == "interrupted"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handlers come back"



def test_a_scheduler_handler_runs_after_the_stop_and_the_stop_survives_pickling() -> None:
    """submitit's handler of its signal (SIGUSR2) requeues a SLURM job: it must run, once, after the checkpoint."""
    import pickle

    from sam_runner.run.stopping import RunStopped, stop_requests

    calls: list[tuple[int, str]] = []
    previous = signal.signal(signal.SIGUSR2, lambda number, frame: calls.append((number, "scheduler")))
    try:
        with pytest.raises(RunStopped) as raised:
            with stop_requests() as requests:
                signal.raise_signal(signal.SIGUSR2)
                assert calls == [], "not before the run has checkpointed and stopped"
                raise requests.stopped(step=3)
        assert calls == [(signal.SIGUSR2, "scheduler")]
        copy = pickle.loads(pickle.dumps(raised.value))  # as a SLURM job hands it back to the sweep
        assert (copy.status, copy.exit_code, str(copy)) == ("preempted", 75, str(raised.value))
        with stop_requests():
            signal.raise_signal(signal.SIGUSR2)  # a run that ends anyway: nothing handed on
        assert len(calls) == 1
    finally:
        signal.signal(signal.SIGUSR2, previous)

def test_a_claimed_run_directory_is_refused_to_a_second_claim_and_leftovers_are_removed(tmp_path: Path) -> None:
    from sam_runner.errors import ConfigError
    from sam_runner.run import rundir

    (tmp_path / "checkpoints").mkdir()
    leftovers = [tmp_path / "checkpoints" / ".last.pt.x1y2.tmp", tmp_path / ".summary.json.abc.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    kept = tmp_path / "checkpoints" / "last.pt"
    kept.write_bytes(b"whole")
    with rundir.claim(tmp_path):
        assert not any(path.exists() for path in leftovers) and kept.exists()
        with pytest.raises(ConfigError, match=f"in use by another sam-run \\(pid {os.getpid()} on "):
            with rundir.claim(tmp_path):
                pass
    with rundir.claim(tmp_path):  # released when the holder is done
        pass


def test_config_differences_name_every_changed_key_except_the_harmless_ones() -> None:
    from sam_runner.run.resume import config_differences

    earlier = {"lr": 0.1, "optimizer": {"sam": {"rho": 0.05}, "name": "sam"}, "data_dir": "data", "resume": True,
               "hidden": [100, 100]}
    now = {"lr": 0.1, "optimizer": {"sam": {"rho": 0.1}, "name": "sam"}, "data_dir": "/scratch/data",
           "resume": False, "hidden": [100], "epochs": 5}
    assert config_differences(earlier, now) == ["epochs: (absent) -> 5", "hidden: [100, 100] -> [100]",
                                                "optimizer.sam.rho: 0.05 -> 0.1"]
    assert config_differences(earlier, earlier) == []
    # keys sam-runner gained since the earlier run, off: that run ran without them; on, or removed, they differ
    added = {"init_from": None, "sharpness": {"every_steps": None}, "compile": False, "accumulate": 1,
             "optimizer": {**earlier["optimizer"], "sam": {"rho": 0.05, "variant": "sam", "rho_schedule": "constant"}}}
    assert config_differences(earlier, {**earlier, **added}) == []
    assert config_differences(earlier, {**earlier, "accumulate": 2, "optimizer": {
        **earlier["optimizer"], "sam": {"rho": 0.05, "variant": "gsam", "rho_schedule": "lr"}}}) == [
        "accumulate: (absent) -> 2", "optimizer.sam.rho_schedule: (absent) -> lr",
        "optimizer.sam.variant: (absent) -> gsam"]
    assert config_differences(earlier, {**earlier, "init_from": "runs/a", "sharpness": {"every_steps": 5}}) == [
        "init_from: (absent) -> runs/a", "sharpness.every_steps: (absent) -> 5"]
    assert config_differences({**earlier, **added}, earlier) == [
        "accumulate: 1 -> (absent)", "compile: False -> (absent)", "init_from: None -> (absent)",
        "optimizer.sam.rho_schedule: constant -> (absent)", "optimizer.sam.variant: sam -> (absent)",
        "sharpness.every_steps: None -> (absent)"]


def test_the_stopwatch_counts_a_nested_phase_once_and_carries_over_a_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    from sam_runner.run import logbook

    now = [100.0]
    monkeypatch.setattr(logbook.time, "perf_counter", lambda: now[0])

    def spend(seconds: float) -> None:
        now[0] += seconds

    clock = logbook.Stopwatch()
    with clock("train"):
        spend(1)
        with clock("checkpoint"):
            spend(2)
        spend(4)
    spend(8)
    assert clock.state() == {"phases": {"train": 5, "checkpoint": 2}, "wall": 15}
    resumed = logbook.Stopwatch(clock.state())
    with resumed("train"):
        spend(16)
        assert resumed.total("train") == 21, "the running stretch counts"
    assert resumed.times() == {"train_time_s": 21, "checkpoint_time_s": 2, "wall_time_s": 31}


def test_a_run_killed_in_its_final_measurement_is_not_completed_and_the_rerun_measures_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the measurement is where the end of a run spends its time, so a kill lands there often."""
    from sam_runner.run import loop

    run_in_process(tmp_path, monkeypatch, *TINY, run_dir="reference")
    measure = loop.take_measurement

    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit(137)  # as `kill -9` mid-measurement: nothing of the run's own handling runs

    monkeypatch.setattr(loop, "take_measurement", killed)
    with pytest.raises(SystemExit):
        run_in_process(tmp_path, monkeypatch, *TINY)
    assert read_json(tmp_path / "run" / "summary.json")["status"] != "completed"
    assert [line["epoch"] for line in metric_lines(tmp_path / "run")] == [1], "the measured epoch is not logged yet"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["batch"], state["epoch"]) == (1, 4, 2)
    monkeypatch.setattr(loop, "take_measurement", measure)
    run_in_process(tmp_path, monkeypatch, *TINY)
    assert_same_run(tmp_path / "run", tmp_path / "reference")


@pytest.mark.slow
def test_a_preempted_sweep_prints_its_table_and_the_same_command_finishes_it(workdir: Path) -> None:
    """What a cluster's requeue does: the sweep is stopped (exit 75), then its command runs again."""
    command = ["-m", *RESUMABLE, "dataset.source.num_train=512", "epochs=2", "seed=0,1", "hydra.sweep.dir=sweep"]
    sweep = in_background(workdir, *command)
    deadline = time.monotonic() + 120
    while not list(workdir.glob("sweep/0_*/checkpoints/last.pt")):
        assert sweep.poll() is None and time.monotonic() < deadline, "the first job never wrote a checkpoint"
        time.sleep(0.01)
    first_job = next(workdir.glob("sweep/0_*"))
    sweep.send_signal(signal.SIGTERM)
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 75, stderr
    assert "preempted" in stdout.split("sweep ")[-1], "the table lists the stopped job"
    assert read_json(first_job / "summary.json")["status"] == "preempted"
    again = run_cli("sam-run", *command, cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "continuing" in again.stdout
    jobs = sorted(workdir.glob("sweep/[01]_*"))
    assert len(jobs) == 2
    for job in jobs:
        assert read_json(job / "summary.json")["status"] == "completed"
        assert [line["epoch"] for line in metric_lines(job)] == [1, 2]
