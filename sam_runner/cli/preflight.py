"""The pre-flight: before Hydra starts any job, compose the config of every job a command will run (every
combination of a sweep's values) and check it, so a typo, a bad type, rho < 0, an unknown group option or an unusable
output directory stops everything with one line and exit code 2 before anything is trained or written.

Also where the configs are found and the resolvers the configs use are registered (`job_dirname`, `pid`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sam_runner.errors import ConfigError, one_line
from sam_runner.run.spec import validate
from sam_runner.scale import torchrun_env


def _config_dir() -> str:
    """configs/ ships inside the package (pip install .) or sits beside it in the repository (pip install -e .)."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"sam-runner is installed without its configs (looked in {package}); reinstall it")


CONFIG_DIR = _config_dir()
JOB_NAME_LIMIT = 80  # characters of a sweep job's directory name: far below any file system's 255-byte limit


def job_dirname(overrides: str) -> str:
    """A sweep job's directory name from its overrides: as they are when short, else cut with a hash of the whole.

    Names must not nest (`optimizer/base=adamw` has a slash) nor exceed file-name limits however many overrides a
    sweep has; each job's full overrides are in its `.hydra/overrides.yaml` and `run.json`.
    """
    name = overrides.replace("/", "-")
    if len(name) <= JOB_NAME_LIMIT:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:JOB_NAME_LIMIT - 9]}~{digest}"


OmegaConf.register_new_resolver("job_dirname", lambda text: job_dirname(str(text)), replace=True)

# The launching process's id, fixed once per config (cached, like Hydra's `now`), so that the default directory of
# two runs started in the same second differs while every job of a sweep, in whatever worker, sees the same one.
OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)


def _explain_compose_error(error: Exception) -> ConfigError:
    """Hydra's composition errors span several lines; say the same in one."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        return ConfigError(f"unknown {group} '{choice}'; choose one of: {', '.join(sorted(error.options))}")
    message = one_line(error)
    if "Could not override" in message or "not in struct" in message:
        key = message.split("'")[1] if "'" in message else "?"
        return ConfigError(f"unknown key '{key}' (a typo? `sam-run --cfg job` lists the keys; `+{key}=...` adds a new one)")
    return ConfigError(message)


def _split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The fixed overrides; and per key, the single-value overrides a sweep job takes from it, in the order and
    with the precedence of Hydra's basic sweeper (a later override of a key replaces an earlier one). An interval
    for a sweeper such as Optuna has no values to list: it is left to that sweeper."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    by_key: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        by_key.pop(key, None)
        if override.is_discrete_sweep():
            by_key[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        elif not override.is_sweep_override():
            by_key[key] = [override.input_line]
    return [o.input_line for o in parsed if not o.is_sweep_override()], by_key


def _jobs(by_key: dict[str, list[str]]) -> list[list[str]]:
    """The overrides of every job a sweep runs (the product of its values)."""
    return [list(job) for job in itertools.product(*by_key.values())]


def _job_configs(args: argparse.Namespace, base: DictConfig, jobs: list[list[str]], search: list[str]
                 ) -> Iterator[DictConfig]:
    """Every job's config, as Hydra composes it, at the cost of one composition per distinct choice of config
    groups: the other overrides (values, as Hydra applies them after the defaults list) go onto a copy.

    Hydra takes about 0.2 s per composition on 2 CPU cores, so composing each of a thousand-job sweep would take
    minutes; applying a value takes a millisecond. Every combination is checked, however large the sweep.
    """
    groups = set(base.hydra.runtime.choices)
    parser = OverridesParser.create()
    composed: dict[tuple[str, ...], DictConfig] = {}
    for job in jobs:
        parsed = parser.parse_overrides(job)
        choices = tuple(o.input_line for o in parsed if _chooses_config(o, groups, base))
        if choices not in composed:
            composed[choices] = _composed(args, [*choices, *search])
        task = composed[choices]  # without the large `hydra` node: a job's own settings of it are not checked
        cfg = OmegaConf.masked_copy(task, [key for key in task if key != "hydra"])
        OmegaConf.set_struct(cfg, True)  # as composed: a key the config lacks is a typo, not a new key
        values = [o for o in parsed if not _chooses_config(o, groups, base) and not o.key_or_group.startswith("hydra.")]
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        except (HydraException, OmegaConfBaseException) as error:
            raise _explain_compose_error(error) from None
        yield cfg


def _chooses_config(override: Override, groups: set[str], base: DictConfig) -> bool:
    """An override that changes the defaults list: a config group's option, or a top-level key the base lacks
    (`+my_group=x` from --config-dir, or a new key: composing it is only slower)."""
    key = override.key_or_group
    return key in groups or ("." not in key and key not in base)


NAME_MAX = 255  # bytes in one file or folder name on Linux and macOS file systems


def _check_writable(directory: Path, key: str) -> None:
    too_long = [part for part in directory.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise ConfigError(f"{key}: the name {too_long[0][:20]}... is {len(os.fsencode(too_long[0]))} bytes, longer "
                          f"than file systems allow ({NAME_MAX}): choose a shorter {key}")
    existing = directory
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as error:  # the whole path longer than the system takes (PATH_MAX), say
        raise ConfigError(f"{key}: {error.strerror} ({len(os.fsencode(str(directory)))} bytes): choose a shorter "
                          f"{key}") from None
    if not existing.is_dir():
        raise ConfigError(f"cannot write run outputs under {existing}, a file: choose a writable {key}")
    try:  # a folder made and removed at once: permissions (root's too), read-only mounts and /proc all answer
        tempfile.TemporaryDirectory(dir=existing, prefix=".sam-run-check-").cleanup()
    except OSError as error:
        raise ConfigError(f"cannot write run outputs under {existing} ({error.strerror}): choose a writable "
                          f"{key}") from None


def hydra_arguments(argv: list[str]) -> argparse.Namespace:
    """argv read by Hydra's own parser, so flags and overrides are split exactly as Hydra will split them."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _check_launcher_found(target: str) -> None:
    """A launcher class Hydra would not find: sam-runner's own (hydra_plugins/) in an editable install."""
    from hydra.core.plugins import Plugins

    if target.startswith("hydra_plugins.") and target not in Plugins.instance().class_name_to_class:
        raise ConfigError(f"Hydra finds no launcher {target}: install sam-runner without -e (pip install "
                          f"'.[launchers]'), or editable with --config-settings editable_mode=strict (a default "
                          f"editable install hides Hydra plugins)")


def _check_slurm_present(target: str) -> None:
    """A SLURM launcher on a machine without SLURM fails deep inside submitit, after Hydra has made the sweep."""
    if target.endswith(".SlurmLauncher") and shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm submits each job with sbatch, which is not on this machine's PATH: "
                          "run the sweep from a SLURM login node, or try it here with hydra/launcher=slurm_local")


@dataclass(frozen=True)
class Checked:
    """What the pre-flight found: the command's output directory (the run's or the sweep's; None when nothing will
    run) and a sweep's first rho (its preset's grid included): plain optimizers ignore rho, so their jobs at the
    sweep's other radii are duplicates."""

    output: Path | None = None
    first_rho: str | None = None


def preflight(args: argparse.Namespace) -> Checked:
    """Compose and validate every configuration the command will run, before Hydra launches anything.

    A sweep is checked job by job — each combination of its values, its preset's `hydra.sweeper.params`
    included — since values valid alone can clash (a micro-batch larger than a swept batch size).
    """
    if args.help or args.hydra_help or args.info or args.shell_completion or args.cfg or args.config_path:
        return Checked()  # nothing runs, or the user replaced the primary config (Hydra reports its own errors)
    try:
        fixed, by_key = _split_overrides(args.overrides)
    except HydraException as error:
        raise ConfigError(f"cannot parse the overrides: {one_line(error)}") from None
    # The user's own config groups (--config-dir) are searched too.
    search = [f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]"] if args.config_dir else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = _composed(args, fixed + search)  # as Hydra: a sweep's own config comes from the fixed overrides alone
        if args.multirun:
            launcher = str(OmegaConf.select(base, "hydra.launcher._target_"))
            _check_launcher_found(launcher)
            _check_slurm_present(launcher)
        preset_params = (OmegaConf.select(base, "hydra.sweeper.params") or {}) if args.multirun else {}
        if preset_params:  # a preset's grid comes first; the command line's overrides of the same keys win
            _, preset = _split_overrides([f"{key}={value}" for key, value in preset_params.items()])
            by_key = {**preset, **by_key}
        jobs = _jobs(by_key)
        for cfg in [base] if jobs == [fixed] else _job_configs(args, base, jobs, search):
            validate(cfg)
            _check_data_dir(cfg)
        first_rho = by_key["rho"][0].split("=", 1)[1] if args.multirun and "rho" in by_key else None
        return Checked(_check_outputs(args, base), first_rho)


def output_key(args: argparse.Namespace) -> str:
    return "hydra.sweep.dir" if args.multirun else "hydra.run.dir"


def pinned_output(args: argparse.Namespace, output: Path) -> str:
    """The override that makes Hydra use `output`, the directory the pre-flight checked: Hydra composes the config
    again and would resolve a name made from the clock (`${now:...}`, the default) a second later."""
    quoted = str(output).replace("\\", "\\\\").replace("'", "\\'")
    return f"{output_key(args)}='{quoted}'"


def _check_outputs(args: argparse.Namespace, cfg: DictConfig) -> Path:
    """The output directory of the command's config `cfg`: usable, and (a single run) free to continue or start."""
    key = output_key(args)
    output = str(OmegaConf.select(cfg, key) or "").strip()
    if not output:
        raise ConfigError(f"{key} is empty: name a directory for the run's outputs (e.g. {key}=outputs/mine)")
    _check_writable(Path(output), key)
    parent, _, leaf = key.rpartition(".")
    unresolved = OmegaConf.to_container(OmegaConf.select(cfg, parent))[leaf]
    torchrun_env.refuse_per_process_directory(key, str(unresolved))
    # before Hydra writes .hydra/ into a directory that holds another run; under torchrun rank 0 checks
    # for all (it may hold the run's lock already when another process gets here)
    if not args.multirun and torchrun_env.launched_rank() == 0:
        from sam_runner.run import resume  # loads torch: not for `--help`
        task = OmegaConf.masked_copy(cfg, [name for name in cfg if name != "hydra"])
        resume.check_before_launch(Path(output), OmegaConf.to_container(task, resolve=True),
                                   resume=bool(cfg.resume))
    return Path(output)


def _check_data_dir(cfg: DictConfig) -> None:
    data_dir = Path(str(cfg.data_dir))
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"data_dir={data_dir} is a file, not a folder: datasets are read and cached in a folder; "
                          f"choose another data_dir")


@contextlib.contextmanager
def held_sweep_dir(sweep_dir: Path) -> Iterator[None]:
    """Hold a sweep's directory (rundir's lock) while it runs, so that a second sweep into it is refused before it
    runs anything, even between two of the first sweep's jobs. Under torchrun rank 0 holds it for all."""
    from sam_runner.run import rundir

    with contextlib.ExitStack() as held:
        if torchrun_env.launched_rank() == 0:
            try:
                held.enter_context(rundir.claim(sweep_dir))
            except ConfigError:
                raise ConfigError(f"{sweep_dir} is in use by another sweep: wait for it to end, or choose another "
                                  f"hydra.sweep.dir") from None
        yield


def _composed(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name=args.config_name or "config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OSError) as error:
        raise _explain_compose_error(error) from None
