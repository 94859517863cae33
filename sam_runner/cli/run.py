"""Entry points (`sam-run`, `sam-measure`, `sam-report`, `sam-landscape`): the one place that turns exceptions into
clear messages and exit codes.

`sam-run` is a Hydra app. Before Hydra starts any job, a pre-flight composes the config of every job (every
combination of a sweep's values) and validates it, so a typo, a bad type, rho < 0 or an unknown group option
stops everything with one line and exit code 2 before anything is trained or written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sam_runner.errors import ConfigError, SamRunnerError, describe_unforeseen
from sam_runner.report.runs import SweepTable
from sam_runner.run.spec import validate
from sam_runner.run.status import FINISHED
from sam_runner.run.stopping import EXIT_INTERRUPTED, RunStopped, stop_at_once
from sam_runner.scale import torchrun_env
from sam_runner.scale.slurm import JobLost

# Exit codes (README "Exit codes"): 0 every run completed; 1 a run failed on an unforeseen error or diverged, or some
# job of a sweep did not complete; 2 bad input (config, data, checkpoint), nothing trained; 75 pre-empted (SIGTERM,
# SIGUSR1, SIGUSR2: checkpointed, re-run to continue); 130 interrupted (Ctrl-C).
EXIT_NOT_COMPLETED = 1
EXIT_USAGE = 2
# The first rho of a sweep: plain optimizers ignore rho, so their runs at other rho values are duplicates.
PLAIN_RHO_ENV = "SAM_RUNNER_PLAIN_RHO"


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


def _fail(error: Exception | str, program: str = "sam-run", code: int = EXIT_USAGE) -> None:
    print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(code)


def _fail_unforeseen(error: Exception, program: str) -> None:
    """An error no check foresaw, in one line and exit 1; HYDRA_FULL_ERROR=1 (as for sam-run) re-raises it."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    _fail(f"{describe_unforeseen(error)} (HYDRA_FULL_ERROR=1 shows where)", program, EXIT_NOT_COMPLETED)


def _warnings_in_one_line(program: str) -> None:
    """Warnings as `program: warning: ...` lines, without Python's file and source line."""
    import warnings

    warnings.formatwarning = lambda message, *_: f"{program}: warning: {message}\n"


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith(("full_key", "object_type", "Set the env")))


def _explain_compose_error(error: Exception) -> ConfigError:
    """Hydra's composition errors span several lines; say the same in one."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        return ConfigError(f"unknown {group} '{choice}'; choose one of: {', '.join(sorted(error.options))}")
    message = _one_line(error)
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


def _first_rho(overrides: list[str]) -> str | None:
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "rho" and override.is_discrete_sweep():
            return next(iter(override.sweep_string_iterator()))
    return None


NAME_MAX = 255  # bytes in one file or folder name on Linux and macOS file systems


def _check_writable(directory: Path, key: str) -> None:
    too_long = [part for part in directory.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise ConfigError(f"{key}: the name {too_long[0][:20]}... is {len(os.fsencode(too_long[0]))} bytes, longer "
                          f"than file systems allow ({NAME_MAX}): choose a shorter {key}")
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"cannot write run outputs under {existing}: choose a writable {key}")


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


def preflight(args: argparse.Namespace) -> None:
    """Compose and validate every configuration the command will run, before Hydra launches anything.

    A sweep is checked job by job — each combination of its values, its preset's `hydra.sweeper.params`
    included — since values valid alone can clash (a micro-batch larger than a swept batch size).
    """
    if args.help or args.hydra_help or args.info or args.shell_completion or args.cfg or args.config_path:
        return  # nothing runs, or the user replaced the primary config (Hydra reports its own errors)
    try:
        fixed, by_key = _split_overrides(args.overrides)
    except HydraException as error:
        raise ConfigError(f"cannot parse the overrides: {_one_line(error)}") from None
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
        _check_outputs(args, base)
        if args.multirun and torchrun_env.launched_rank() == 0:  # under torchrun, rank 0 holds it for all
            _claim_sweep_dir(base)


def _check_outputs(args: argparse.Namespace, cfg: DictConfig) -> None:
    """The output directory of the command's config `cfg`: usable, and (a single run) free to continue or start."""
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
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


def _check_data_dir(cfg: DictConfig) -> None:
    data_dir = Path(str(cfg.data_dir))
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"data_dir={data_dir} is a file, not a folder: datasets are read and cached in a folder; "
                          f"choose another data_dir")


# A sweep's directory is held (rundir's lock) from the pre-flight until the process ends: a second sweep into
# it is refused before it runs anything, even between two of the first sweep's jobs.
_held_sweep_dir = contextlib.ExitStack()


def _claim_sweep_dir(cfg: DictConfig) -> None:
    """Hold the sweep's directory, when its name is fixed: one named by the time (`${now:...}`, the default) may
    resolve to another name when Hydra composes it again, and no other sweep can be running in it anyway."""
    from sam_runner.run import rundir

    if "${now:" in OmegaConf.to_container(cfg.hydra.sweep)["dir"]:
        return
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    try:
        _held_sweep_dir.enter_context(rundir.claim(sweep_dir))
    except ConfigError:
        raise ConfigError(f"{sweep_dir} is in use by another sweep: wait for it to end, or choose another "
                          f"hydra.sweep.dir") from None


def _composed(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name=args.config_name or "config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OSError) as error:
        raise _explain_compose_error(error) from None


def objective(summary: dict[str, Any]) -> float | None:
    """What a Hydra sweeper (Optuna) maximizes: validation accuracy when the run holds out a split
    (`dataset.val_fraction`), else test accuracy — tuning on the test set is only a fallback."""
    return summary.get("val_acc", summary.get("test_acc"))


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _hydra_job(cfg: DictConfig) -> float | None:
    """One Hydra job = one run. Returns its `objective` for Hydra sweepers."""
    from sam_runner.run.experiment import run_experiment
    from sam_runner.scale import gpu_slots  # imported here so `sam-run --help` stays fast

    hydra_config = HydraConfig.get()
    in_sweep = hydra_config.mode == RunMode.MULTIRUN
    try:
        with gpu_slots.pinned_gpu(str(hydra_config.launcher.get("_target_", "")) if in_sweep else "",
                                  Path(hydra_config.sweep.dir), cfg.jobs_per_gpu, str(cfg.device)):
            summary = run_experiment(cfg, Path(hydra_config.runtime.output_dir),
                                           choices=dict(hydra_config.runtime.choices),
                                           plain_rho=os.environ.get(PLAIN_RHO_ENV) if in_sweep else None)
    except Exception as error:  # any class: the run's summary.json says failed, and a sweep goes on
        foreseen = isinstance(error, SamRunnerError)
        if not foreseen and os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = str(error) if foreseen else f"{describe_unforeseen(error)} (HYDRA_FULL_ERROR=1 shows where)"
        if not in_sweep:
            _fail(message, code=EXIT_USAGE if foreseen else EXIT_NOT_COMPLETED)
        print(f"sam-run: run {hydra_config.job.num} failed: {message}", file=sys.stderr)
        return None
    if not in_sweep and summary["status"] not in FINISHED:
        _fail(f"the run {summary['status']}: {summary.get('error')}", code=EXIT_NOT_COMPLETED)
    return objective(summary)


def _leave_kept_thread_errors_to_the_run() -> None:
    """TensorBoard's writer thread keeps the error that ends it (a full disk) and raises it again in the run's
    next write, where it becomes the run's one-line error and its `failed` summary; Python's default hook would
    print the thread's traceback before that line. Every other thread's error is shown as usual."""
    show = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        kept = getattr(args.thread, "exception", None) is args.exc_value is not None
        if not (kept and type(args.thread).__module__.startswith("tensorboard.")):
            show(args)

    threading.excepthook = hook


def main() -> None:
    """`sam-run`: validate everything up front, then hand over to Hydra (single run or `-m` sweep)."""
    stop_at_once()  # a stop during start-up (seconds of imports and pre-flight) is one line and 75/130 too
    _leave_kept_thread_errors_to_the_run()
    try:
        args = hydra_arguments(sys.argv[1:])
        try:
            preflight(args)
        except SamRunnerError as error:
            _fail(error)
        sys.argv += torchrun_env.hydra_overrides()  # under torchrun, Hydra writes nothing in ranks other than 0
        first_rho = _first_rho(args.overrides) if args.multirun else None
        if first_rho is not None:
            os.environ[PLAIN_RHO_ENV] = first_rho
        _hydra_job()
    except (RunStopped, JobLost, KeyboardInterrupt) as stopped:
        if SweepTable.sweep_dir is not None:  # a stop ends the whole sweep: show where every job got to
            SweepTable.show(SweepTable.sweep_dir)
        if isinstance(stopped, JobLost):
            _fail(stopped, code=EXIT_NOT_COMPLETED)
        if isinstance(stopped, RunStopped):
            _fail(f"{stopped.status}: {stopped}", code=stopped.exit_code)
        _fail("interrupted; the run's summary.json says so, and re-running the same command continues from its "
              "last checkpoint", code=EXIT_INTERRUPTED)
    if args.multirun and SweepTable.unfinished:
        sys.exit(EXIT_NOT_COMPLETED)


def measure_main(argv: list[str] | None = None) -> None:
    """`sam-measure RUN_DIR`: measure the sharpness of a saved checkpoint without retraining."""
    parser = argparse.ArgumentParser(prog="sam-measure", description=measure_main.__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory written by sam-run (holds run.json and checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to measure (default: RUN_DIR/checkpoints/last.pt)")
    parser.add_argument("--measures", help="comma-separated measure names, or `auto` (default: the run's setting)")
    parser.add_argument("--rho", type=float, help="sharpness radius (default: the run's sharpness.rho)")
    parser.add_argument("--num-samples", type=int, help="training samples to measure on (default: the run's setting)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to measure (default: the run's device)")
    args = parser.parse_args(argv)
    from sam_runner.report.remeasure import measure_checkpoint

    try:
        result = measure_checkpoint(args.run_dir, checkpoint_path=args.checkpoint, measures=args.measures,
                                    rho=args.rho, num_samples=args.num_samples, device=args.device)
    except SamRunnerError as error:
        _fail(error, "sam-measure")
    except Exception as error:  # a plug-in dataset or model that raises, a full disk: one line, not a traceback
        _fail_unforeseen(error, "sam-measure")
    for name, value in result.items():
        print(f"{name:>16s}  {value:.6g}")


def landscape_main(argv: list[str] | None = None) -> None:
    """`sam-landscape RUN [RUN...]` or `sam-landscape --interpolate RUN_A RUN_B`: pictures of flatness, PNG + CSV."""
    parser = argparse.ArgumentParser(
        prog="sam-landscape", description=landscape_main.__doc__,
        epilog="Train and test loss along a filter-normalized random direction, one curve pair per run; or, with "
               "--interpolate, loss and accuracy along w(alpha) = alpha*w_B + (1-alpha)*w_A. docs/landscape.md")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories written by sam-run")
    parser.add_argument("--interpolate", action="store_true",
                        help="Keskar's parametric plot between exactly two runs of one network (same seed)")
    parser.add_argument("--range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="t along the direction (default -1 1), or alpha with --interpolate (default -1 2)")
    parser.add_argument("--points", type=int, help="points along the line (default 41; 25 with --interpolate)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random direction and --num-samples' subset")
    parser.add_argument("--num-samples", type=int,
                        help="evaluate on a fixed, seeded subset of this many training and this many test samples "
                             "(default: all)")
    parser.add_argument("--bn-stats", choices=["recompute", "interpolate"],
                        help="with --interpolate: BatchNorm running statistics recomputed at each alpha (default) "
                             "or interpolated like the weights")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to evaluate (default: the run's device)")
    parser.add_argument("--out", type=Path, help="output directory (default: FIRST_RUN/landscape)")
    args = parser.parse_args(argv)
    if args.interpolate and len(args.runs) != 2:
        parser.error(f"--interpolate takes exactly two runs, RUN_A RUN_B (got {len(args.runs)})")
    if args.bn_stats and not args.interpolate:
        parser.error("--bn-stats applies only with --interpolate (a direction leaves BatchNorm statistics as trained)")
    from sam_runner.report import landscape

    _warnings_in_one_line("sam-landscape")
    given = {"span": args.range, "points": args.points, "bn_stats": args.bn_stats}
    options = {"seed": args.seed, "num_samples": args.num_samples, "device": args.device,
               **{key: value for key, value in given.items() if value is not None}}
    try:
        if args.interpolate:
            paths = landscape.interpolation(*args.runs, args.out, **options)
        else:
            paths = landscape.directions(args.runs, args.out, **options)
    except SamRunnerError as error:
        _fail(error, "sam-landscape")
    except Exception as error:  # a plug-in dataset or model that raises, a full disk: one line, not a traceback
        _fail_unforeseen(error, "sam-landscape")
    for path in paths:
        print(path)


def report_main(argv: list[str] | None = None) -> None:
    """`sam-report PATH [PATH...]`: seeds aggregated, Kendall's τ and plots for every run under the paths."""
    parser = argparse.ArgumentParser(prog="sam-report", description=report_main.__doc__)
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="sweep or run directories written by sam-run (searched recursively for summary.json)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: <first PATH>/report)")
    parser.add_argument("--no-pictures", action="store_true",
                        help="skip the flatness pictures of a small/large-batch pair (they read checkpoints)")
    args = parser.parse_args(argv)
    from sam_runner.report.runs import ReportError  # imported here so `sam-report --help` stays fast
    from sam_runner.report.writer import write_report

    _warnings_in_one_line("sam-report")  # e.g. a flatness picture skipped over a corrupt checkpoint
    try:
        report = write_report(args.paths, args.out, pictures=not args.no_pictures)
    except SamRunnerError as error:
        if not isinstance(error, ReportError):
            _fail(error, "sam-report")
        for problem in error.problems:
            print(f"sam-report: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except Exception as error:  # a plug-in that raises while a picture is drawn, a full disk: one line
        _fail_unforeseen(error, "sam-report")
    print(report.markdown)
    print("wrote:", *(f"  {path}" for path in report.files), sep="\n")
