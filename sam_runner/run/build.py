"""Config nodes -> plain objects (device, data, model, optimizer, scheduler).

The only reader of group configs besides the pre-flight (cli/preflight.py); everything it returns knows nothing of
Hydra. User plug-ins arrive here as `_target_`s: errors locating or calling them become one-line messages.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from sam_runner.data import BatchStream, check_labels, infer_num_classes, materialize, seeded_subset
from sam_runner.errors import ConfigError, DataError
from sam_runner.optim import ESAM, FSAM, GSAM, SAM, SAMON, USAM, LookSAM, normalization_groups
from sam_runner.run.logbook import Stopwatch
from sam_runner.run.measurement import measures_for, training_passes
from sam_runner.run.plan import RunPlan, make_plan
from sam_runner.run.spec import RunSpec, Settings, target_name
from sam_runner.run.stopping import StopRequests
from sam_runner.scale import distributed
from sam_runner.scale.ranks import Team
from sam_runner.sharpness import MeasureChoice
from sam_runner.steps import frozen_batchnorm_stats, has_active_dropout, micro_batches, selected_rows, step_pieces

log = logging.getLogger("sam_runner")
def _partial(node: DictConfig, where: str) -> Callable[..., Any]:
    """The callable a `_target_` node names, with its keys bound; calling it later raises its own errors."""
    try:
        return instantiate(node, _partial_=True)
    except InstantiationException as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"{where}._target_: {reason} (check the dotted path and that its module is importable)") from None


@dataclass
class Data:
    """The streams a run reads. Eval streams are unaugmented; `sharpness` is a fixed, seeded subset.

    `val` is a seeded split carved from the training set (`dataset.val_fraction`), never from the test set;
    `train`, `train_eval` and `sharpness` hold only the rest.
    """

    train: BatchStream
    train_eval: BatchStream
    val: BatchStream | None
    test: BatchStream
    sharpness: list[tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    input_shape: tuple[int, ...]
    majority_fraction: float  # share of the most frequent training label: the accuracy of guessing


def split_validation(inputs: torch.Tensor, targets: torch.Tensor, fraction: float, seed: int
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """(train, val): a seeded random `fraction` of the samples held out; (everything, None) when fraction is 0."""
    held_out = round(fraction * len(targets))
    if held_out == 0:
        return (inputs, targets), None
    if held_out == len(targets):
        raise ConfigError(f"dataset.val_fraction={fraction} leaves no training samples: lower it")
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    val, train = order[:held_out], order[held_out:]
    return (inputs[train], targets[train]), (inputs[val], targets[val])


def build_data(spec: RunSpec, device: torch.device) -> Data:
    dataset, settings = spec.dataset, spec.settings
    make_datasets = _partial(dataset.source, "dataset.source")
    try:
        train_set, test_set = make_datasets()
    except (TypeError, ValueError) as error:
        raise DataError(f"dataset.source ({dataset.source._target_}) failed: {error}; it must return a "
                        f"(train, test) pair of Datasets") from None
    x_train, y_train = materialize(train_set)
    x_test, y_test = materialize(test_set)
    if len(y_train) == 0 or len(y_test) == 0:
        raise DataError(f"dataset {dataset.name}: the training or test set is empty")
    num_classes = dataset.num_classes or infer_num_classes(y_train)
    check_labels(num_classes, y_train, y_test)
    (x_train, y_train), held_out = split_validation(x_train, y_train, dataset.get("val_fraction") or 0.0,
                                                    dataset.get("val_seed") or 0)
    common = {"device": device, "normalize": dataset.normalize, "seed": settings.seed}
    train = BatchStream(x_train, y_train, batch_size=settings.batch_size, shuffle=True,
                        augment=dataset.augment, **common)
    x_eval, y_eval = seeded_subset(x_train, y_train, settings.eval.train_subset, settings.seed)
    train_eval = BatchStream(x_eval, y_eval, batch_size=settings.eval.batch_size, shuffle=False, **common)
    test = BatchStream(x_test, y_test, batch_size=settings.eval.batch_size, shuffle=False, **common)
    val = None if held_out is None else \
        BatchStream(*held_out, batch_size=settings.eval.batch_size, shuffle=False, **common)
    x_sharp, y_sharp = seeded_subset(x_train, y_train, settings.sharpness.num_samples, settings.seed + 1)
    sharpness = list(BatchStream(x_sharp, y_sharp, batch_size=settings.sharpness.batch_size, shuffle=False,
                                 **common).epoch(0))
    majority_fraction = torch.bincount(y_train).max().item() / len(y_train)
    return Data(train, train_eval, val, test, sharpness, int(num_classes), tuple(x_train.shape[1:]),
                majority_fraction)


def build_model(node: DictConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    make_model = _partial(node, "model")
    try:
        model = make_model(num_classes=num_classes, input_shape=tuple(input_shape))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model ({node._target_}) failed to build: {error}; a model callable takes "
                          f"num_classes and input_shape keyword arguments") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model ({node._target_}) returned {type(model).__name__}, not a torch.nn.Module")
    return model


def compile_model(model: nn.Module, data: Data, autocast_dtype: torch.dtype | None, sam: DictConfig | None,
                  clock: Stopwatch, backend: str | Callable[..., Any] = "inductor", accumulate: int = 1,
                  base_steps: bool = False) -> None:
    """Compile `model` in place (`nn.Module.compile`: the module, its parameters and state-dict keys stay the
    same objects, so SAM's parameter groups and checkpoints are unaffected), then compile every graph the run
    will call before its first step, timed as the clock's `compile` phase (`compile_time_s` in summary.json).

    torch.compile is lazy: without this warm-up the first batches and the first evaluation would pay for
    compiling, and the first epoch's images/s would count it. Graphs differ by mode (train/eval), grad mode,
    autocast and batch size; SAM's clean and perturbed passes share one (steps.py restores BatchNorm buffers
    by value, which no guard sees), so a run compiles once per (mode, batch-size class) and never again.
    `base_steps`: a SAM run with sam_start > 0 also takes base-optimizer steps, which forward whole batches (no
    m-sharpness chunks): their sizes are warmed up too. ESAM with γ < 1 adds a no-grad forward of each piece and a
    perturbed pass on ⌈γ·n⌉ rows (steps.py): those graphs too.
    """
    from torch._dynamo.exc import BackendCompilerFailed  # loaded by the compile anyway

    model.compile(backend=backend)
    log.info("compile=true: compiling the model's graphs before the first step (seconds to minutes)")
    with clock("compile"), torch.random.fork_rng(devices=_cuda_devices(model)):  # dropout draws stay the run's
        try:
            _warm_up(model, data, autocast_dtype, sam.micro_batch_size if sam is not None else None, accumulate,
                     base_steps, sam.get("gamma", 1.0) if sam is not None and sam.get("variant") == "esam" else 1.0)
        except BackendCompilerFailed as error:  # e.g. Inductor on a CPU without a C++ compiler
            inner = error.inner_exception
            reason = ": ".join([type(inner).__name__, *str(inner).strip().splitlines()[:1]])
            raise ConfigError(f"compile=true: the torch.compile backend failed ({reason}); set compile=false") from None
    log.info("compiled in %.1fs (summary.json: compile_time_s)", clock.seconds["compile"])


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """The distinct batch sizes one pass over `num_samples` in batches of `batch_size` yields (last one partial)."""
    return sorted({min(batch_size, num_samples), num_samples % batch_size} - {0}, reverse=True)


def _warm_up(model: nn.Module, data: Data, autocast_dtype: torch.dtype | None, micro_batch_size: int | None,
             accumulate: int = 1, base_steps: bool = False, gamma: float = 1.0) -> None:
    """Call the compiled model once for every graph training and evaluation use; leave weights, gradients and
    BatchNorm statistics as they were. Sharpness measures run eagerly (sharpness.py), so they need none.
    `gamma` < 1: ESAM's selection forward (no grad, the step's own pieces) and its pass on the selected rows."""
    def autocast(device_type: str) -> torch.autocast:  # as the step and evaluation run: autocast state is guarded
        return torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    inputs, targets = next(iter(data.train.epoch(0)))  # the run's own first batch (its own generator, no RNG use)
    train_sizes = batch_sizes(data.train.num_samples, data.train.batch_size)
    # what a step forwards: m-sharpness chunks of m samples, accumulation's micro-batches (steps.step_pieces)
    # (base-optimizer steps before sam_start's switch: no chunks)
    chunkings = {micro_batch_size, None} if base_steps else {micro_batch_size}
    piece_sizes = {stop - start for size in train_sizes for m in chunkings
                   for unit in step_pieces(size, accumulate, m) for start, stop in unit}
    selected = {stop - start for size in train_sizes
                for start, stop in micro_batches(selected_rows(size, gamma), accumulate)} if gamma < 1 else set()
    model.train()
    with frozen_batchnorm_stats(model):
        for size in sorted(piece_sizes | selected, reverse=True):
            with autocast(inputs.device.type):
                logits = model(inputs[:size])
            F.cross_entropy(logits.float(), targets[:size]).backward()
        if gamma < 1:
            with torch.no_grad(), autocast(inputs.device.type):
                for size in sorted(piece_sizes, reverse=True):
                    model(inputs[:size])
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for stream in (data.train_eval, data.test, data.val):
            if stream is None:
                continue
            inputs, _ = next(iter(stream.epoch(0)))
            for size in batch_sizes(stream.num_samples, stream.batch_size):
                with autocast(inputs.device.type):
                    model(inputs[:size])
    model.train()


ADAPTIVE_PARAMS = ("weights", "all")  # optimizer.sam.adaptive_params: which parameters ASAM's T rescales
# optimizer.sam.variant (run/spec.py checks the name)
SAM_VARIANTS = {"sam": SAM, "usam": USAM, "gsam": GSAM, "sam_on": SAMON, "fsam": FSAM, "looksam": LookSAM,
                "esam": ESAM}


def _sam_every(sam: DictConfig) -> int:
    """Every how many of its steps a SAM optimizer takes the two-pass step: LookSAM's k (one pass between), else 1."""
    return sam.k if sam.get("variant") == "looksam" else 1


def build_optimizer(node: DictConfig, rho: float, lr: float, model: nn.Module, model_name: str = "custom"
                    ) -> torch.optim.Optimizer:
    """The base optimizer alone, or SAM/ASAM wrapped around it (the `sam` node is null for plain ones).

    `lr` is the run's peak lr after batch-size scaling (plan.py); it replaces the one the config node holds.
    `model_name` names the model in a refusal (sam_on on a network without normalization layers).
    """
    make_base = _partial(node.base.build, "optimizer.base.build")
    try:
        if node.sam is None:
            return make_base(model.parameters(), lr=lr)
        variant = node.sam.get("variant", "sam")  # configs written before the key existed are SAM/ASAM
        options = dict(rho=rho, adaptive=node.sam.adaptive, eta=node.sam.eta,
                       perturb_weight_decay=node.sam.perturb_weight_decay,
                       rho_schedule=node.sam.get("rho_schedule", "constant"), rho_min=node.sam.get("rho_min", 0.0))
        if variant == "gsam":
            options["alpha"] = node.sam.alpha
        if variant == "fsam":
            options.update(sigma=node.sam.sigma, lmbda=node.sam.lmbda)
        if variant == "looksam":
            options.update(k=node.sam.k, alpha=node.sam.alpha)
        if variant == "esam":
            options.update(beta=node.sam.beta, gamma=node.sam.gamma)
            if node.sam.gamma < 1 and has_active_dropout(model):
                raise ConfigError(f"esam with gamma < 1 needs a model without active dropout (model {model_name} "
                                  f"has some): the perturbed pass on the selected rows cannot replay the clean "
                                  f"pass's dropout masks row for row; use optimizer.sam.gamma=1 or a model "
                                  f"without dropout")
        groups = normalization_groups(model) if variant == "sam_on" else _perturbation_groups(model, node.sam)
        if not any(group.get("perturb", True) for group in groups):  # sam_on on a network without them
            raise ConfigError(f"sam_on perturbs only normalization layers; model {model_name} has none (no "
                              f"BatchNorm, LayerNorm or GroupNorm affine parameters): use a model with them (e.g. "
                              f"model=resnet18, keskar_c1, or cnn1d with model.norm=batch), or optimizer=sam")
        return SAM_VARIANTS[variant](groups, make_base, **options, lr=lr)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer {node.name}: {error}") from None


def _perturbation_groups(model: nn.Module, sam: DictConfig) -> list[dict[str, Any]]:
    """SAM's param groups: one, or for ASAM with `adaptive_params: weights` (the ASAM authors' code) two —
    parameters whose name contains "weight" (BatchNorm's too) get T = |w| + eta, the rest plain SAM scaling.

    Both groups share SAM's one global norm, so ε = ρ·T²⊙g / ‖T⊙g‖ with T = 1 outside the weights: the
    authors' formula (docs/sam.md). `all` (the davda54 port) rescales every parameter.
    """
    scope = sam.get("adaptive_params", "all")  # configs written before the key existed rescaled every parameter
    if scope not in ADAPTIVE_PARAMS:
        raise ConfigError(f"optimizer.sam.adaptive_params must be one of {', '.join(ADAPTIVE_PARAMS)} "
                          f"(got {scope!r}): `weights` as in ASAM's code, `all` as in the davda54 port")
    if not sam.adaptive or scope == "all":
        return [{"params": list(model.parameters())}]
    named = list(model.named_parameters())
    groups = [{"params": [p for name, p in named if "weight" in name]},
              {"params": [p for name, p in named if "weight" not in name], "adaptive": False}]
    return [group for group in groups if group["params"]]


def build_scheduler(node: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    make_scheduler = _partial(node, "scheduler")
    # SAM shares its param_groups with the base optimizer, whose step() the scheduler sees being called.
    stepped = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    try:
        return make_scheduler(stepped, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    except TypeError as error:
        raise ConfigError(f"scheduler ({node._target_}): {error}") from None


@dataclass
class Training:
    """Everything one run needs, built once from its config, so `fit` reads as a loop rather than a switchboard."""

    spec: RunSpec  # what runs: its settings, resolved config (checkpoints name the run they belong to), precision
    plan: RunPlan
    data: Data
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    micro_batch_size: int | None  # SAM's m-sharpness chunk; None: the whole batch
    measures: MeasureChoice  # sharpness measures taken during and at the end of the run, and what chose them
    clock: Stopwatch
    stop: StopRequests  # SIGTERM/SIGUSR1/SIGUSR2/Ctrl-C requests, honoured between steps
    team: Team  # the processes of the run (one without torchrun): model is DDP-wrapped when there are several
    run_dir: Path  # where its checkpoint goes; the other records are the logbook's, which `fit` is handed

    @property
    def settings(self) -> Settings:
        return self.spec.settings

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.spec.autocast_dtype

    def step_optimizer(self, step: int) -> torch.optim.Optimizer:
        """What takes the step after `step` steps: the optimizer, or a SAM optimizer's base optimizer alone (one
        pass, its own step, its own state: momenta and moments carry over to the SAM steps) before the plan's
        `sam_start_step` (sam_start)."""
        if isinstance(self.optimizer, SAM) and not self.plan.sam_on(step):
            return self.optimizer.base_optimizer
        return self.optimizer

    @property
    def network(self) -> nn.Module:
        """The model outside DDP's wrapper: evaluation, sharpness and checkpoints use it (no collectives inside,
        no 'module.' prefix in the state)."""
        return distributed.unwrap(self.model)


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (every CUDA device's too): model init and dropout draw
    from them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(spec: RunSpec, team: Team, run_dir: Path, clock: Stopwatch, stop: StopRequests) -> Training:
    """Data, model, optimizer and schedule, and the run's plan (lr scaling, budget, targets). Writes nothing."""
    settings = spec.settings
    seed_everything(settings.seed)
    data = team.main_first(build_data, spec, team.device)  # rank 0 downloads, the others read
    sam = spec.sam
    micro_batch_size = sam.micro_batch_size if sam is not None else None
    distributed.check_setup(team.world, batch_size=settings.batch_size, num_samples=data.train.num_samples,
                            sam_mode=settings.ddp.sam_mode, sync_batchnorm=settings.ddp.sync_batchnorm,
                            compile=settings.compile, micro_batch_size=micro_batch_size,
                            accumulate=settings.accumulate, sam_variant=sam.get("variant") if sam is not None else None)
    model_name = spec.choices.get("model", target_name(spec.model))
    plan = make_plan(settings, len(data.train))
    model = build_model(spec.model, data.num_classes, data.input_shape).to(team.device)
    if settings.compile:  # every graph compiled before the first step, timed apart as compile_time_s (build.py)
        compile_model(model, data, spec.autocast_dtype, sam, clock, accumulate=settings.accumulate,
                      base_steps=sam is not None and plan.sam_start_step > 0)
    optimizer = build_optimizer(spec.optimizer, settings.rho, plan.lr, model, model_name)
    scheduler = build_scheduler(spec.scheduler, optimizer, plan.steps_per_epoch, plan.total_steps)
    model = distributed.wrap_model(model, team.world, sync_batchnorm=settings.ddp.sync_batchnorm)
    return Training(spec=spec, plan=plan, data=data, model=model, optimizer=optimizer, scheduler=scheduler,
                    scaler=torch.amp.GradScaler(team.device.type) if spec.precision == "fp16" else None,
                    criterion=nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing),
                    micro_batch_size=micro_batch_size,
                    measures=measures_for(model, settings, data.sharpness, training_passes=training_passes(
                        plan.total_steps / plan.steps_per_epoch, data.train.num_samples,
                        sam=0.0 if sam is None else (1 - plan.sam_start_step / plan.total_steps) / _sam_every(sam),
                        every=settings.sharpness.every, every_steps=settings.sharpness.every_steps,
                        total_steps=plan.total_steps)),
                    clock=clock, stop=stop, team=team, run_dir=run_dir)
