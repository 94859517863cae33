"""A run's spec: its composed config typed, checked and resolved once, then handed to everything below the CLI.

`validate` types and checks the top-level keys (the `Settings` schema, whose defaults are config.yaml's) and the
cross-field rules; the pre-flight calls it for every job of a command. `make_spec` does the same once inside the
run and resolves what depends on the machine (device, precision). Group configs (dataset, model, optimizer,
scheduler) are free-form `_target_` nodes so users can plug in their own; their values are checked by the builders
that consume them.
Everything here raises `ConfigError` with one line that names the key, the bad value and what would be valid.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sam_runner.errors import ConfigError, one_line

if TYPE_CHECKING:  # torch is imported when a spec is made, not for the pre-flight's `validate`
    import torch

# optimizer.sam.variant: SAM/ASAM, unnormalized SAM, GSAM, SAM-ON, Friendly SAM, LookSAM, Efficient SAM (docs/sam.md)
SAM_VARIANTS = ("sam", "usam", "gsam", "sam_on", "fsam", "looksam", "esam")
RHO_SCHEDULES = ("constant", "lr")  # optimizer.sam.rho_schedule (sam_runner.optim.RHO_SCHEDULES, torch-free here)

# The values a string key may take (config.yaml explains each).
CHOICES = {"device": ("auto", "cpu", "cuda"), "precision": ("auto", "fp32", "bf16", "fp16"),
           "lr_scaling": ("none", "linear", "sqrt"), "budget": ("epochs", "steps"),
           "ddp.sam_mode": ("global", "local")}


@dataclass
class DdpSettings:
    sam_mode: str = "global"
    sync_batchnorm: bool = False


@dataclass
class EvalSettings:
    batch_size: int = 1024
    train_subset: Optional[int] = None
    every: int = 1


@dataclass
class CheckpointSettings:
    every: int = 1
    every_steps: Optional[int] = None


@dataclass
class StopSettings:
    train_acc: Optional[float] = None
    train_loss: Optional[float] = None


@dataclass
class SharpnessSettings:
    measures: Any = "auto"
    rho: float = 0.05
    every: int = 0
    every_steps: Optional[int] = None
    num_samples: int = 1024
    batch_size: int = 256
    options: Any = None


@dataclass
class Settings:
    """The keys users type at the top level, typed; defaults are configs/config.yaml's (meanings and units there).
    `rho` and `lr` have none here: config.yaml takes them from the chosen optimizer."""

    rho: float = MISSING
    lr: float = MISSING
    lr_scaling: str = "none"
    lr_reference_batch_size: int = 128
    batch_size: int = 128
    accumulate: int = 1
    sam_start: float = 0.0
    budget: str = "epochs"
    epochs: int = 100
    steps: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    data_dir: str = "data"
    label_smoothing: float = 0.0
    max_grad_norm: Optional[float] = None
    progress_every: int = 25
    resume: bool = True
    init_from: Optional[str] = None
    jobs_per_gpu: int = 1
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    stop: StopSettings = field(default_factory=StopSettings)
    sharpness: SharpnessSettings = field(default_factory=SharpnessSettings)
    ddp: DdpSettings = field(default_factory=DdpSettings)


FINITE_KEYS = ("rho", "lr", "sam_start", "label_smoothing", "max_grad_norm", "sharpness.rho", "stop.train_acc",
               "stop.train_loss")


def _resolved(cfg: DictConfig, key: str) -> Any:
    """A top-level value with its interpolations (e.g. `rho: ${optimizer.default_rho}`) resolved in `cfg`."""
    value = cfg[key]
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _typed(cfg: DictConfig) -> Settings:
    """The top-level keys checked against `Settings` (types, unknown nested keys) and returned as its instance."""
    names = [item.name for item in fields(Settings)]
    try:
        values = {name: _resolved(cfg, name) for name in names if name in cfg}
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Settings), values))
    except OmegaConfBaseException as error:
        raise ConfigError(one_line(error)) from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _number(value: Any) -> bool:
    """An int or a float, not a bool (YAML's true is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_non_negative(value: Any) -> bool:
    """A number that is finite and >= 0: a variant's weight (GSAM's alpha, F-SAM's sigma, LookSAM's alpha)."""
    return _number(value) and math.isfinite(value) and value >= 0


# The variants whose step is defined on the whole batch only, and why: m-sharpness (micro_batch_size) is refused.
WHOLE_BATCH_VARIANTS = {
    "fsam": "its EMA estimates the full gradient from one batch gradient per step",
    "looksam": "it keeps one g_v per step, from the whole batch's gradients, and reuses it on the one-pass steps",
    "esam": "its data selection ranks the whole batch",
}


def _select(settings: Settings, key: str) -> Any:
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


def sharpness_measures(value: Any) -> list[str] | str:
    """`auto`, or the list of measure names (a comma-separated string is accepted from the command line), checked
    by sharpness.py's own check (imported late: it loads torch, which `sam-run --help` does not need)."""
    from sam_runner.sharpness import MeasureError, checked_measures

    if value is None:
        return []
    if isinstance(value, str):
        if value == "auto":
            return "auto"
        value = [name for name in value.split(",") if name]
    if not isinstance(value, (list, tuple, ListConfig)):
        raise ConfigError(f"sharpness.measures must be `auto` or a list of names (got {value!r})")
    try:
        return checked_measures(list(value))
    except MeasureError as error:
        raise ConfigError(f"sharpness.measures: {error}, or `auto`") from None


def sharpness_options(value: Any) -> dict[str, Any]:
    """Extra keyword options for `sharpness.measure`, checked now so a typo fails before training, not after."""
    from sam_runner.sharpness import MeasureError, checked_options

    options = OmegaConf.to_container(value) if isinstance(value, DictConfig) else dict(value or {})
    try:
        checked_options(options)
    except MeasureError as error:
        raise ConfigError(f"sharpness.options: {error}") from None
    return options


def validate(cfg: DictConfig) -> Settings:
    """Types, ranges and cross-field rules of a composed config. Returns the typed top-level keys."""
    missing = sorted(OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])))
    _require(not missing, f"{', '.join(missing)} must be set (e.g. `{missing[0] if missing else ''}=mypkg.module.name` "
                          f"for a plug-in)")
    top = _typed(cfg)
    for key, allowed in CHOICES.items():
        value = _select(top, key)
        _require(value in allowed, f"{key}: invalid value '{value}', expected one of [{', '.join(allowed)}]")
    for key in FINITE_KEYS:  # inf passes every range check below, and nan fails them with a puzzling message
        value = _select(top, key)
        _require(value is None or math.isfinite(value), f"{key} must be a finite number (got {value})")
    _require(0 <= top.seed < 2**32, f"seed must be in [0, 2**32 - 1] (got {top.seed}): NumPy takes 32-bit seeds")
    _require(top.rho >= 0, f"rho must be >= 0 (got {top.rho}): it is the radius of the weight perturbation")
    _require(top.lr > 0, f"lr must be > 0 (got {top.lr})")
    _require(top.batch_size > 0, f"batch_size must be > 0 (got {top.batch_size})")
    _require(1 <= top.accumulate <= top.batch_size,
             f"accumulate must be an integer in [1, batch_size={top.batch_size}] micro-batches per optimizer step "
             f"(got {top.accumulate})")
    _require(0 <= top.sam_start < 1,
             f"sam_start must be a fraction of the budget in [0, 1) (got {top.sam_start}): the share of the optimizer "
             f"steps trained with the base optimizer alone before SAM is switched on")
    _require(top.epochs > 0, f"epochs must be > 0 (got {top.epochs})")
    _require(top.lr_reference_batch_size > 0,
             f"lr_reference_batch_size must be > 0 samples (got {top.lr_reference_batch_size})")
    _require(top.budget != "steps" or top.steps is not None,
             "budget=steps needs steps > 0 optimizer updates (got steps=null): e.g. steps=2000")
    _require(top.steps is None or top.steps > 0, f"steps must be > 0 optimizer updates or null (got {top.steps})")
    _require(top.stop.train_acc is None or 0 < top.stop.train_acc <= 1,
             f"stop.train_acc must be a fraction in (0, 1] or null (got {top.stop.train_acc})")
    _require(top.stop.train_loss is None or top.stop.train_loss > 0,
             f"stop.train_loss must be > 0 or null (got {top.stop.train_loss})")
    _require(top.eval.every > 0, f"eval.every must be >= 1 epoch (got {top.eval.every})")
    _require(top.checkpoint.every > 0, f"checkpoint.every must be >= 1 epoch (got {top.checkpoint.every})")
    _require(top.checkpoint.every_steps is None or top.checkpoint.every_steps > 0,
             f"checkpoint.every_steps must be >= 1 optimizer step or null (got {top.checkpoint.every_steps})")
    _require(0 <= top.label_smoothing < 1, f"label_smoothing must be in [0, 1) (got {top.label_smoothing})")
    _require(top.max_grad_norm is None or top.max_grad_norm > 0,
             f"max_grad_norm must be > 0 or null (got {top.max_grad_norm})")
    _require(top.progress_every > 0, f"progress_every must be > 0 (got {top.progress_every})")
    _require(top.jobs_per_gpu > 0, f"jobs_per_gpu must be >= 1 (got {top.jobs_per_gpu})")
    _require(top.eval.batch_size > 0, f"eval.batch_size must be > 0 (got {top.eval.batch_size})")
    _require(top.eval.train_subset is None or top.eval.train_subset > 0,
             f"eval.train_subset must be > 0 or null (got {top.eval.train_subset})")
    _require(top.sharpness.rho > 0, f"sharpness.rho must be > 0 (got {top.sharpness.rho})")
    _require(top.sharpness.every >= 0, f"sharpness.every must be >= 0 epochs (got {top.sharpness.every})")
    _require(top.sharpness.every_steps is None or top.sharpness.every_steps > 0,
             f"sharpness.every_steps must be >= 1 optimizer step or null (got {top.sharpness.every_steps})")
    _require(top.sharpness.num_samples > 0, f"sharpness.num_samples must be > 0 (got {top.sharpness.num_samples})")
    _require(top.sharpness.batch_size > 0, f"sharpness.batch_size must be > 0 (got {top.sharpness.batch_size})")
    sharpness_measures(top.sharpness.measures)
    sharpness_options(top.sharpness.options)
    _validate_optimizer(cfg, top)
    _validate_dataset(cfg)
    for where in PLUGIN_TARGETS:
        locate_target(cfg, where)
    return top


# The `_target_` nodes a run calls: each must name something importable before any directory is made.
PLUGIN_TARGETS = ("dataset.source", "model", "optimizer.base.build", "scheduler")


def locate_target(cfg: DictConfig, where: str) -> Any:
    """What the `_target_` of node `where` names (importing its module), or a ConfigError saying why not."""
    from hydra._internal.utils import _locate  # what instantiate uses, without get_object's error logging

    path = str(OmegaConf.select(cfg, f"{where}._target_"))
    try:
        return _locate(path)
    except (ImportError, ValueError) as error:  # ValueError: a relative path (`.x`, `a..b`)
        reason = str(error).splitlines()[1] if len(str(error).splitlines()) > 1 else str(error)
        raise ConfigError(f"{where}._target_: cannot import {path} ({reason}): check the dotted path and that its "
                          f"module is importable") from None


def _validate_dataset(cfg: DictConfig) -> None:
    """What can be checked of `dataset` without its data: sizes, augmentation, normalization, classes."""
    from sam_runner.data import SOURCE_CHECKS, check_augment, check_normalize  # loads torch: imported late

    dataset = cfg.get("dataset") or {}
    val_fraction = dataset.get("val_fraction") or 0.0
    _require(isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1,
             f"dataset.val_fraction must be in [0, 1) (got {val_fraction}): the share of the training set held out")
    num_classes = dataset.get("num_classes")
    _require(num_classes is None or (isinstance(num_classes, int) and num_classes >= 2),
             f"dataset.num_classes must be at least 2 classes (one class leaves nothing to learn) or null "
             f"(inferred from the labels); got {num_classes}")
    check_augment(dataset.get("augment") or {})
    if dataset.get("normalize"):
        check_normalize(dataset.normalize)
    source = locate_target(cfg, "dataset.source")
    if source in SOURCE_CHECKS:
        arguments = OmegaConf.to_container(dataset.source, resolve=True)
        arguments.pop("_target_")
        try:
            bound = inspect.signature(source).bind_partial(**arguments)
        except TypeError as error:
            raise ConfigError(f"dataset.source ({dataset.source._target_}): {error}") from None
        bound.apply_defaults()
        SOURCE_CHECKS[source](**bound.arguments)


def _validate_optimizer(cfg: DictConfig, top: Settings) -> None:
    optimizer = cfg.get("optimizer")
    _require(isinstance(optimizer, DictConfig) and "base" in optimizer and "build" in optimizer.base,
             "optimizer must be a config from configs/optimizer/ (with a `base` optimizer node)")
    sam = optimizer.get("sam")
    if sam is None:
        _require(top.sam_start == 0,
                 f"sam_start needs a SAM optimizer (got sam_start={top.sam_start} with optimizer="
                 f"{optimizer.get('name', '?')}, which has no SAM step to switch on): use e.g. optimizer=sam, or "
                 f"sam_start=0")
        return
    m = sam.get("micro_batch_size")
    _require(m is None or (isinstance(m, int) and 0 < m <= top.batch_size),
             f"optimizer.sam.micro_batch_size must be null or in [1, batch_size={top.batch_size}] (got {m})")
    eta = sam.get("eta", 0.0)
    _require(isinstance(eta, (int, float)) and eta >= 0, f"optimizer.sam.eta must be >= 0 (got {eta})")
    variant = sam.get("variant", "sam")
    _require(variant in SAM_VARIANTS, f"optimizer.sam.variant: invalid value '{variant}', expected one of "
                                      f"[{', '.join(SAM_VARIANTS)}]")
    schedule = sam.get("rho_schedule", "constant")
    _require(schedule in RHO_SCHEDULES, f"optimizer.sam.rho_schedule: invalid value '{schedule}', expected one of "
                                        f"[{', '.join(RHO_SCHEDULES)}]")
    rho_min = sam.get("rho_min", 0.0)
    _require(isinstance(rho_min, (int, float)) and math.isfinite(rho_min) and 0 <= rho_min <= top.rho,
             f"optimizer.sam.rho_min must be in [0, rho={top.rho:g}] (got {rho_min}): the radius at lr 0 under "
             f"rho_schedule=lr, in rho's units")
    _require(variant == "sam" or not sam.get("adaptive"),
             f"optimizer.sam.adaptive=true is not implemented for the {variant} variant: set "
             f"optimizer.sam.adaptive=false")
    if variant == "gsam":
        alpha = sam.get("alpha")
        _require(_finite_non_negative(alpha), f"optimizer.sam.alpha must be a finite number >= 0 (got {alpha}): "
                                              f"GSAM's weight of the clean gradient's part orthogonal to the "
                                              f"perturbed one")
    if variant == "fsam":
        sigma, lmbda = sam.get("sigma"), sam.get("lmbda")
        _require(_finite_non_negative(sigma), f"optimizer.sam.sigma must be a finite number >= 0 (got {sigma}): "
                                              f"F-SAM's weight of the gradient EMA subtracted from the gradient")
        _require(_number(lmbda) and 0 <= lmbda < 1,
                 f"optimizer.sam.lmbda must be in [0, 1) (got {lmbda}): the decay per step of F-SAM's gradient EMA")
    if variant == "looksam":
        k, alpha = sam.get("k"), sam.get("alpha")
        _require(isinstance(k, int) and not isinstance(k, bool) and k >= 1,
                 f"optimizer.sam.k must be an integer >= 1 (got {k}): LookSAM takes SAM's step every k steps")
        _require(_finite_non_negative(alpha), f"optimizer.sam.alpha must be a finite number >= 0 (got {alpha}): "
                                              f"LookSAM's weight of the reused component g_v")
    if variant == "esam":
        for key, what in (("beta", "the share of parameter tensors SWP perturbs"),
                          ("gamma", "the share of the batch SDS takes the perturbed pass on")):
            share = sam.get(key)
            _require(_number(share) and 0 < share <= 1,
                     f"optimizer.sam.{key} must be in (0, 1] (got {share}): ESAM's {what}")
    _require(m is None or variant not in WHOLE_BATCH_VARIANTS,
             f"optimizer.sam.micro_batch_size (m-sharpness) is not supported by {variant} (got {m}): "
             f"{WHOLE_BATCH_VARIANTS.get(variant)}; set optimizer.sam.micro_batch_size=null")
    if variant == "esam":
        _require(not (top.compile and sam.beta < 1),
                 f"compile=true with esam's beta < 1 (got {sam.beta}) is refused: each step's random set of tensors "
                 f"without a gradient is a new graph for torch.compile (a recompile per draw); set compile=false or "
                 f"optimizer.sam.beta=1")


# -- the run's spec ------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible: use device=auto or device=cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 autocast on CUDA (no loss scaling needed), fp32 on the CPU."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


@dataclass(frozen=True)
class RunSpec:
    """One run's config, typed, checked and resolved once (`make_spec`); nothing below the CLI reads Hydra's config.

    The group nodes are read-only `_target_` configs for the builders (run/build.py).
    """

    settings: Settings
    dataset: DictConfig
    model: DictConfig
    optimizer: DictConfig
    scheduler: DictConfig
    device: torch.device
    precision: str  # fp32, bf16 or fp16: `precision=auto` resolved for the device
    config: dict[str, Any]  # the whole config, interpolations resolved, as run.json records it
    choices: dict[str, str]  # Hydra's group choices (model=cnn1d, ...): the names runs are reported by
    # init_from as written, before interpolation (`fit/seed_${seed}`): the setting that a study's seeds share
    init_from_as_written: str | None = None

    @property
    def sam(self) -> DictConfig | None:
        """The SAM node of the optimizer config; None for a plain optimizer."""
        return self.optimizer.get("sam")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        import torch

        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def make_spec(cfg: DictConfig, choices: dict[str, str] | None = None) -> RunSpec:
    """The run's spec from its composed config (without Hydra's own node), validated once."""
    settings = validate(cfg)
    device = resolve_device(settings.device)
    groups = {}
    for name in ("dataset", "model", "optimizer", "scheduler"):
        node = OmegaConf.create(OmegaConf.to_container(cfg[name], resolve=True))
        OmegaConf.set_readonly(node, True)
        groups[name] = node
    task = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    written = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["init_from"]), resolve=False).get("init_from")
    return RunSpec(settings=settings, device=device, precision=resolve_precision(settings.precision, device),
                   config=OmegaConf.to_container(task, resolve=True), choices=dict(choices or {}),
                   init_from_as_written=written, **groups)


def target_name(node: DictConfig) -> str:
    """A short name for a `_target_` node: the last part of its dotted path."""
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]
