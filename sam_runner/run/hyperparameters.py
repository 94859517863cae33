"""The hyper-parameters of a run as summary.json records them, derived from its spec: the one list that summaries,
runs.csv and every grouping of `sam-report` read (a new hyper-parameter is one field of `HyperParameters`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig

from sam_runner.run.plan import effective_lr, protocol_name
from sam_runner.run.spec import RunSpec, target_name


def _setting() -> Any:
    """The top-level key of the same name, as the run's Settings hold it."""
    return field(default=None)


def _derived(derive: Callable[[RunSpec], Any], *, sam_only: bool = False) -> Any:
    """A value derived from the spec; `sam_only`: null for plain optimizers, and compared among SAM runs only."""
    return field(default=None, metadata={"derive": derive, "sam_only": sam_only})


def _sam(value: Callable[[DictConfig], Any]) -> Any:
    """A value of the optimizer's `sam` node; null for a plain optimizer."""
    return _derived(lambda spec: value(spec.sam) if spec.sam is not None else None, sam_only=True)


def _asam(value: Callable[[DictConfig], Any]) -> Any:
    """A value of ASAM's (`sam.adaptive`); null for SAM and for a plain optimizer."""
    return _derived(lambda spec: value(spec.sam) if spec.sam is not None and spec.sam.adaptive else None,
                    sam_only=True)


def _variant(name: str, value: Callable[[DictConfig], Any]) -> Any:
    """A value of one SAM variant's (`sam.variant`, e.g. gsam's alpha); null for the others and plain optimizers."""
    return _derived(lambda spec: value(spec.sam) if spec.sam is not None and spec.sam.get("variant") == name
                    else None, sam_only=True)


@dataclass(frozen=True)
class HyperParameters:
    """The flat hyper-parameters summary.json carries, in the order reports list them. A report groups runs that
    agree on all of them but `seed`. One field here is one hyper-parameter in summary.json, runs.csv and every
    grouping: `_setting()` for a top-level key as configured, `_derived(...)` for a value computed from the spec."""

    protocol: str = _derived(lambda spec: protocol_name(spec.settings))
    dataset: str = _derived(lambda spec: spec.dataset.name)
    model: str = _derived(lambda spec: spec.choices.get("model", target_name(spec.model)))
    optimizer: str = _derived(lambda spec: spec.optimizer.name)
    base_optimizer: str = _derived(lambda spec: spec.optimizer.base.name)
    rho: Optional[float] = _derived(lambda spec: spec.settings.rho if spec.sam is not None else None)
    adaptive: Optional[bool] = _sam(lambda sam: bool(sam.adaptive))
    eta: Optional[float] = _asam(lambda sam: sam.eta)
    adaptive_params: Optional[str] = _asam(lambda sam: sam.get("adaptive_params", "all"))
    # sam (and ASAM), usam, gsam, sam_on, fsam, looksam or esam
    sam_variant: Optional[str] = _sam(lambda sam: sam.get("variant", "sam"))
    rho_schedule: Optional[str] = _sam(lambda sam: sam.get("rho_schedule", "constant"))  # constant or lr
    rho_min: Optional[float] = _derived(lambda spec: spec.sam.get("rho_min", 0.0) if spec.sam is not None and
                                        spec.sam.get("rho_schedule", "constant") == "lr" else None, sam_only=True)
    gsam_alpha: Optional[float] = _variant("gsam", lambda sam: sam.alpha)
    fsam_sigma: Optional[float] = _variant("fsam", lambda sam: sam.sigma)
    fsam_lambda: Optional[float] = _variant("fsam", lambda sam: sam.lmbda)
    looksam_k: Optional[int] = _variant("looksam", lambda sam: sam.k)
    looksam_alpha: Optional[float] = _variant("looksam", lambda sam: sam.alpha)
    esam_beta: Optional[float] = _variant("esam", lambda sam: sam.beta)
    esam_gamma: Optional[float] = _variant("esam", lambda sam: sam.gamma)
    micro_batch_size: Optional[int] = _sam(lambda sam: sam.micro_batch_size)
    weight_decay: float = _derived(lambda spec: spec.optimizer.base.build.get("weight_decay", 0.0))
    weight_decay_in_perturbation: Optional[bool] = _sam(lambda sam: bool(sam.perturb_weight_decay))
    lr: float = _derived(lambda spec: effective_lr(spec.settings))  # the peak lr trained with: lr_base scaled
    lr_base: float = _derived(lambda spec: spec.settings.lr)
    lr_scaling: str = _setting()
    lr_reference_batch_size: int = _setting()
    batch_size: int = _setting()
    accumulate: int = _setting()  # micro-batches per optimizer step (the batch is batch_size whatever it is)
    # the fraction of the budget trained with the base optimizer before SAM is switched on (summary: sam_start_step)
    sam_start: Optional[float] = _derived(lambda spec: spec.settings.sam_start if spec.sam is not None else None,
                                          sam_only=True)
    budget: str = _setting()
    epochs: Optional[int] = _derived(lambda spec: spec.settings.epochs if spec.settings.budget == "epochs" else None)
    steps_budget: Optional[int] = _derived(lambda spec: None)  # optimizer updates: known once the data is built
    stop_train_acc: Optional[float] = _derived(lambda spec: spec.settings.stop.train_acc)
    stop_train_loss: Optional[float] = _derived(lambda spec: spec.settings.stop.train_loss)
    scheduler: str = _derived(lambda spec: spec.choices.get("scheduler", target_name(spec.scheduler)))
    label_smoothing: float = _setting()
    max_grad_norm: Optional[float] = _setting()
    val_fraction: float = _derived(lambda spec: spec.dataset.get("val_fraction") or 0.0)
    precision: str = _derived(lambda spec: spec.precision)  # resolved: fp32, bf16 or fp16
    device: str = _derived(lambda spec: spec.device.type)  # resolved: cpu or cuda
    # whose weights the run started from, as written: `fit/seed_${seed}` groups a study's seeds (init_source: the file)
    init_from: Optional[str] = _derived(lambda spec: spec.init_from_as_written)
    seed: int = _setting()

    @classmethod
    def of(cls, spec: RunSpec, **known: Any) -> HyperParameters:
        """The run's values; `known` gives those its spec cannot tell (steps_budget, once the data is built)."""
        values = {item.name: item.metadata["derive"](spec) if "derive" in item.metadata
                  else getattr(spec.settings, item.name) for item in fields(cls)}
        return cls(**{**values, **known})

    def record(self) -> dict[str, Any]:
        """summary.json's flat keys."""
        recorded = asdict(self)
        if self.steps_budget is None:  # known only once the data is built: a run that never built keeps it out
            del recorded["steps_budget"]
        return recorded


HPARAM_KEYS = tuple(item.name for item in fields(HyperParameters))
GROUP_KEYS = tuple(key for key in HPARAM_KEYS if key != "seed")
SAM_ONLY_KEYS = tuple(item.name for item in fields(HyperParameters) if item.metadata.get("sam_only"))
