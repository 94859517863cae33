"""One run over two processes, end to end: `torchrun --nproc_per_node=2 --no-python sam-run ...` on gloo (CPU).

Rank 0 alone writes the run directory; two processes in `global` mode train the weights one process trains;
a run pre-empted through torchrun (SIGTERM) continues, by re-running its command, exactly as the run that was
never stopped. distributed.py's step math is checked in test_distributed.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, TINY, read_json, run_cli
from test_resume import assert_same_run, checkpointed_step

# SAM (global mode) on an MLP, no BatchNorm: two processes equal one to float tolerance. 256 = 5 x 48 + 16, so
# every epoch ends with a smaller batch.
EQUAL = [*TINY, "optimizer=sam", "batch_size=48"]
# BatchNorm (cnn1d) and SAM with a checkpoint every 2 steps: 8 steps an epoch, long enough to be stopped inside.
RESUMABLE = ["dataset=synthetic", "dataset.source.num_train=256", "dataset.source.num_test=128", "model=cnn1d",
             "optimizer=sam", "epochs=2", "batch_size=32", "checkpoint.every_steps=2",
             "sharpness.measures=[ascent]", "sharpness.num_samples=64"]


def torchrun(*args: str, cwd: Path, wait: bool = True) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """torchrun with two local processes, each `sam-run args` (one thread each: the machine has few cores)."""
    command = [str(BIN / "torchrun"), "--nproc_per_node=2", "--no-python", str(BIN / "sam-run"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if wait:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_write_one_run_directory_with_the_weights_of_one_process(workdir: Path) -> None:
    two = torchrun(*EQUAL, "hydra.run.dir=two", cwd=workdir)
    assert two.returncode == 0, two.stderr
    one = run_cli("sam-run", *EQUAL, "hydra.run.dir=one", cwd=workdir, extra_env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    assert sorted(path.name for path in workdir.iterdir()) == ["data", "one", "two"], "no directory per process"
    run_dir = workdir / "two"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert [line.count('"epoch"') for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 1]
    assert sorted(path.name for path in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml",
                                                                            "overrides.yaml"]
    assert (run_dir / "sam-run.log").read_text().count("done (completed)") == 1, "rank 1 logs nothing there"
    assert two.stdout.count("done (completed)") == 1, "nor on the console (warnings only)"
    summary, alone = read_json(run_dir / "summary.json"), read_json(workdir / "one" / "summary.json")
    assert (summary["world_size"], summary["ddp_sam_mode"], summary["sync_batchnorm"]) == (2, "global", False)
    assert (alone["world_size"], alone["ddp_sam_mode"]) == (1, None)
    assert alone["train_acc"] > 0.3, "trained well beyond chance (0.1), so equal weights mean equal training"
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert abs(summary[key] - alone[key]) < 1e-5, key
    ours, theirs = (torch.load(workdir / name / "checkpoints" / "last.pt", weights_only=True) for name in ("two", "one"))
    for name, tensor in theirs["model"].items():
        torch.testing.assert_close(ours["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert len(ours["ranks"]) == 2 and theirs["ranks"] is None


@pytest.mark.slow
def test_a_preempted_two_process_run_continues_exactly_and_only_over_two_processes(workdir: Path) -> None:
    reference = torchrun(*RESUMABLE, "hydra.run.dir=ref", cwd=workdir)
    assert reference.returncode == 0, reference.stderr
    checkpoint = workdir / "run" / "checkpoints" / "last.pt"
    process = torchrun(*RESUMABLE, "hydra.run.dir=run", cwd=workdir, wait=False)
    deadline = time.monotonic() + 120
    while process.poll() is None and checkpointed_step(checkpoint)[0] < 2:
        assert time.monotonic() < deadline, "the run never wrote a checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes, as SLURM's scancel would
    _, stderr = process.communicate(timeout=120)
    assert stderr.count("sam-run: error: preempted: stopped by SIGTERM after step") == 2, stderr
    summary = read_json(workdir / "run" / "summary.json")
    assert summary["status"] == "preempted", summary
    stopped_at = int(summary["error"].split("after step ")[1].split(";")[0])
    assert stopped_at < 16, "stopped inside training"
    assert checkpointed_step(checkpoint)[0] == stopped_at, "both processes stopped after the step rank 0 saved"
    alone = run_cli("sam-run", *RESUMABLE, "hydra.run.dir=run", cwd=workdir)
    assert alone.returncode == 2 and alone.stderr.strip().splitlines() == [alone.stderr.strip()]
    assert "written by a run over 2 process(es)" in alone.stderr and "--nproc_per_node=2" in alone.stderr
    resumed = torchrun(*RESUMABLE, "hydra.run.dir=run", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {stopped_at})" in resumed.stdout
    assert_same_run(workdir / "run", workdir / "ref")


def test_under_torchrun_a_run_directory_named_from_the_clock_is_refused_in_one_line(workdir: Path) -> None:
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    result = run_cli("sam-run", *TINY, cwd=workdir, extra_env=torchrun)  # as torchrun starts rank 0
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "every process must name the same run directory" in result.stderr
    assert "hydra.run.dir=outputs/runs/<name>" in result.stderr
    assert not (workdir / "outputs").exists()


def test_the_ranks_stop_on_what_they_agreed_not_on_a_signal_that_lands_after_the_all_reduce(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM reaching one rank just after the stop flags were all-reduced must wait for the next step's: had
    that rank stopped alone, its checkpoint's collectives would meet the others' next step (a hang or a lost rank,
    seen about once in six pre-emptions under load)."""
    from sam_runner.run.stopping import StopRequests
    from sam_runner.scale import ranks
    from sam_runner.scale.distributed import World

    stop = StopRequests()

    def all_reduce_then_the_signal_lands(tensor: torch.Tensor, **kwargs: object) -> None:
        stop.take(signal.SIGTERM)  # the other rank saw no signal: the reduced flag stays this rank's own, 0 first

    monkeypatch.setattr(ranks.dist, "all_reduce", all_reduce_then_the_signal_lands)
    team = ranks.Team(World(rank=1, world_size=2))
    assert team.stop_requested(stop) is False, "agreed 0: this step goes on on every rank"
    assert team.stop_requested(stop) is True, "the next step's all-reduce carries it to every rank"


# Rank 0 fails alone while rank 1 is busy elsewhere: rank 1 never reaches the barrier that settles the gloo group.
ONE_RANK_FAILS = """
import time
import torch
from sam_runner.scale import distributed
distributed.SETTLE_WAIT_AFTER_ERROR_S = 1.0
with distributed.process_group(torch.device("cpu")) as world:
    if world.rank == 0:
        raise RuntimeError("rank 0 failed alone")
    time.sleep(120)
"""


def test_a_process_that_failed_alone_waits_only_briefly_for_the_others_before_it_exits(workdir: Path) -> None:
    """The barrier that settles gloo before a process exits is bounded after an error: rank 0 exits and torchrun
    stops the rank that never came (unbounded, rank 0 would wait until rank 1 woke, or gloo's 30-minute timeout)."""
    script = workdir / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", str(script)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "rank 0 failed alone" in result.stderr
