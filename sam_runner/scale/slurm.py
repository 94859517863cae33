"""What a sam-run job needs on a cluster, added to Hydra's submitit launchers (SLURM, and submitit's local
executor, which runs the same jobs on this machine). The launchers themselves are declared in
hydra_plugins/sam_runner_launcher, the only place Hydra looks for launcher classes.

- A job with several tasks (`tasks_per_node` × `nodes`) is one DDP run: every task learns its rank from
  submitit (SLURM's variables) as it would from torchrun, and only rank 0's Hydra writes (torchrun_env.py).
- A job warned of pre-emption or of its time limit (submitit's signal) stops after the current step with a
  checkpoint, then submitit requeues it (stopping.py hands the signal on); the requeued job calls the same job
  again, whose run directory it continues exactly (resume.py).
- A job stopped otherwise (`scancel`'s SIGTERM) hands its `RunStopped` back to the sweep, which then ends as a
  local sweep does: the table, exit 75, and the same command continues it.
- A job that ends without a result (killed with SIGKILL, out of memory, its node lost) ends the sweep command with
  its table and one line naming the job's log (`JobLost`), instead of submitit's traceback.
"""

from __future__ import annotations

from typing import Any

from hydra.core.utils import JobReturn, JobStatus

from sam_runner.errors import JobNotStarted
from sam_runner.run.stopping import RunStopped, raised_while_waiting
from sam_runner.scale import torchrun_env


class JobLost(BaseException):
    """A sweep job ended without a result. A BaseException, like `RunStopped`, so that it reaches sam-run's own
    handling (the table, one line, exit 1) rather than Hydra's traceback printer."""


class SamRunJob:
    """What runs inside a submitted job, before and around Hydra's job (mixed into the plugin's launchers)."""

    def __call__(self, sweep_overrides: list[str], *args: Any) -> JobReturn:
        import submitit

        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, as torchrun sets them
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            sweep_overrides = [*sweep_overrides, *torchrun_env.hydra_overrides()]
        try:
            return super().__call__(sweep_overrides, *args)  # type: ignore[misc]
        except (RunStopped, JobNotStarted) as stopped:  # not requeued: the sweep re-raises it reading the result
            return JobReturn(overrides=sweep_overrides, status=JobStatus.FAILED, _return_value=stopped)

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        from submitit.core.utils import UncompletedJobError

        try:
            with raised_while_waiting():
                return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        except UncompletedJobError as error:  # submitit: "Job N (task: 0) with path ... has not produced any output"
            reason = " ".join(str(error).split("\n")[:2])
            raise JobLost(f"a job ended without a result (killed, out of memory, or its node lost): {reason}; "
                          f"re-run the same command to continue it from its checkpoint") from None
