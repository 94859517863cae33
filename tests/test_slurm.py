"""The SLURM launcher's jobs, run by submitit's local executor (`hydra/launcher=slurm_local`): the same job code
as on a cluster, with pre-emption simulated by the signals SLURM and submitit send.

- SIGUSR2 (submitit's warning of pre-emption or of the time limit): the job checkpoints, submitit requeues it,
  and the requeued job continues its run to the end, within the same sweep command.
- SIGTERM (`scancel`): the job checkpoints and stops; the sweep ends as a local one does (its table, exit 75),
  and the same command continues the job.
- tasks_per_node=2: one job is one DDP run over two processes (gloo), one run directory.
- SIGKILL: the job leaves no result; the sweep command ends with its table and one line, and the same command
  continues the job.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import TINY, read_json, run_cli
from test_resume import RESUMABLE, in_background, metric_lines

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the launchers extra")

LOCAL = ["-m", "hydra/launcher=slurm_local", "hydra.sweep.dir=sweep"]


def signal_jobs_once_checkpointed(sweep_dir: Path, signals: dict[int, signal.Signals], deadline: float) -> None:
    """Send job N's signal to the process training it as soon as that job has written a checkpoint."""
    pending = dict(signals)
    while pending:
        assert time.monotonic() < deadline, f"jobs {sorted(pending)} never wrote a checkpoint"
        for number in list(pending):
            job = next(sweep_dir.glob(f"{number}_*"), None)
            if job is not None and (job / "checkpoints" / "last.pt").exists():
                holder = (job / ".lock").read_text().split()  # "sam-run pid N on HOST", written by the run's lock
                pid = int(holder[holder.index("pid") + 1])
                os.kill(pid, pending.pop(number))
        time.sleep(0.01)


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_a_cancelled_one_continues_on_the_next_command(workdir: Path) -> None:
    command = [*LOCAL, *RESUMABLE, "epochs=2", "seed=0,1"]
    sweep = in_background(workdir, *command)
    signal_jobs_once_checkpointed(workdir / "sweep", {0: signal.SIGUSR2, 1: signal.SIGTERM}, time.monotonic() + 180)
    requeued, cancelled = sorted(workdir.glob("sweep/[01]_*"))
    stdout, stderr = sweep.communicate(timeout=300)

    assert sweep.returncode == 75, stderr
    table = stdout.split("sweep sweep")[-1]
    assert "completed" in table and "preempted" in table, "the table shows both jobs where they got to"
    submitit_logs = "".join(path.read_text() for path in (workdir / "sweep" / ".submitit").rglob("*.out"))
    assert "Requeued job" in submitit_logs
    first = read_json(requeued / "summary.json")
    assert first["status"] == "completed"
    assert len(read_json(requeued / "run.json")["resumes"]) == 1, "continued by the requeued job, not restarted"
    assert [line["epoch"] for line in metric_lines(requeued)] == [1, 2]
    assert read_json(cancelled / "summary.json")["status"] == "preempted"

    again = run_cli("sam-run", *command, cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert read_json(requeued / "summary.json") == first, "a completed job is not trained again"
    assert read_json(cancelled / "summary.json")["status"] == "completed"
    assert [line["epoch"] for line in metric_lines(cancelled)] == [1, 2]


@pytest.mark.slow
def test_a_job_with_two_tasks_is_one_ddp_run(workdir: Path) -> None:
    result = run_cli("sam-run", *LOCAL, *TINY, "epochs=1", "optimizer=sam", "hydra.launcher.tasks_per_node=2",
                     "seed=0", cwd=workdir)
    assert result.returncode == 0, result.stderr
    (job,) = workdir.glob("sweep/0_*")
    summary = read_json(job / "summary.json")
    assert (summary["status"], summary["world_size"], summary["ddp_sam_mode"]) == ("completed", 2, "global")
    assert [line["epoch"] for line in metric_lines(job)] == [1]
    log = (job / "sam-run.log").read_text()
    assert log.count("done (completed)") == 1, "rank 1 logs only warnings"


@pytest.mark.slow
def test_a_job_killed_without_a_result_ends_the_sweep_with_its_table_and_one_line(workdir: Path) -> None:
    command = [*LOCAL, *RESUMABLE, "dataset.source.num_train=512", "epochs=1", "seed=0"]
    sweep = in_background(workdir, *command)
    signal_jobs_once_checkpointed(workdir / "sweep", {0: signal.SIGKILL}, time.monotonic() + 180)
    stdout, stderr = sweep.communicate(timeout=300)

    assert sweep.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("sam-run: error: a job ended without a result") and "re-run the same command" in last
    assert "Traceback" not in stderr
    assert "running" in stdout.split("sweep sweep")[-1], "the table shows where the killed job got to"
    again = run_cli("sam-run", *command, cwd=workdir)
    assert again.returncode == 0, again.stderr
    (job,) = workdir.glob("sweep/0_*")
    assert read_json(job / "summary.json")["status"] == "completed"
    assert len(read_json(job / "run.json")["resumes"]) == 1
