"""sam-run's launchers for Hydra (configs/hydra/launcher/slurm.yaml and slurm_local.yaml): Hydra's submitit
launchers with sam_runner.slurm_launcher's job added. Hydra accepts launcher classes only from the
hydra_plugins namespace, hence this package; it declares nothing without the `launchers` extra."""

from importlib.util import find_spec

if find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher

    from sam_runner.scale.slurm import SamRunJob

    class SlurmLauncher(SamRunJob, submitit_launcher.SlurmLauncher):
        """`hydra/launcher=slurm`: each sweep job on SLURM."""

    class LocalLauncher(SamRunJob, submitit_launcher.LocalLauncher):
        """`hydra/launcher=slurm_local`: the slurm preset's jobs as local processes (a dry run of a cluster sweep)."""
