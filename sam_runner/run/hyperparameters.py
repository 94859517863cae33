"""The hyper-parameters of a run as summary.json records them, derived from its spec: the one list that summaries,
runs.csv and every grouping of `sam-report` read (a new hyper-parameter is one field of `HyperParameters`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from sam_runner.run.plan import effective_lr, protocol_name
from sam_runner.run.spec import RunSpec, target_name


def _sam_only() -> Any:
    return field(default=None, metadata={"sam_only": True})


@dataclass(frozen=True)
class HyperParameters:
    """The flat hyper-parameters summary.json carries, in the order reports list them. A report groups runs that
    agree on all of them but `seed`; one field here is one hyper-parameter in summary.json, runs.csv and every
    grouping. Fields marked `sam_only` are null for plain optimizers (rho too)."""

    protocol: str
    dataset: str
    model: str
    optimizer: str
    base_optimizer: str
    rho: Optional[float]
    adaptive: Optional[bool] = _sam_only()
    eta: Optional[float] = _sam_only()
    adaptive_params: Optional[str] = _sam_only()
    micro_batch_size: Optional[int] = _sam_only()
    weight_decay: float = 0.0
    weight_decay_in_perturbation: Optional[bool] = _sam_only()
    lr: float = 0.0  # the peak lr trained with (lr_base scaled by lr_scaling)
    lr_base: float = 0.0
    lr_scaling: str = "none"
    lr_reference_batch_size: int = 0
    batch_size: int = 0
    budget: str = "epochs"
    epochs: Optional[int] = None  # budget=epochs
    steps_budget: Optional[int] = None  # optimizer updates the run trains: known once its data is built
    stop_train_acc: Optional[float] = None
    stop_train_loss: Optional[float] = None
    scheduler: str = ""
    label_smoothing: float = 0.0
    max_grad_norm: Optional[float] = None
    val_fraction: float = 0.0
    precision: str = ""
    device: str = ""
    seed: int = 0

    @classmethod
    def of(cls, spec: RunSpec, steps_budget: int | None = None) -> HyperParameters:
        settings, sam = spec.settings, spec.sam
        adaptive = sam is not None and bool(sam.adaptive)
        return cls(
            protocol=protocol_name(settings), dataset=spec.dataset.name,
            model=spec.choices.get("model", target_name(spec.model)), optimizer=spec.optimizer.name,
            base_optimizer=spec.optimizer.base.name, rho=settings.rho if sam is not None else None,
            adaptive=adaptive if sam is not None else None, eta=sam.eta if adaptive else None,
            adaptive_params=sam.get("adaptive_params", "all") if adaptive else None,
            micro_batch_size=sam.micro_batch_size if sam is not None else None,
            weight_decay=spec.optimizer.base.build.get("weight_decay", 0.0),
            weight_decay_in_perturbation=bool(sam.perturb_weight_decay) if sam is not None else None,
            lr=effective_lr(settings), lr_base=settings.lr, lr_scaling=settings.lr_scaling,
            lr_reference_batch_size=settings.lr_reference_batch_size, batch_size=settings.batch_size,
            budget=settings.budget, epochs=settings.epochs if settings.budget == "epochs" else None,
            steps_budget=steps_budget, stop_train_acc=settings.stop.train_acc,
            stop_train_loss=settings.stop.train_loss, scheduler=spec.choices.get("scheduler", target_name(spec.scheduler)),
            label_smoothing=settings.label_smoothing, max_grad_norm=settings.max_grad_norm,
            val_fraction=spec.dataset.get("val_fraction") or 0.0, precision=spec.precision, device=spec.device.type,
            seed=settings.seed)

    def record(self) -> dict[str, Any]:
        """summary.json's flat keys."""
        recorded = asdict(self)
        if self.steps_budget is None:  # known only once the data is built: a run that never built keeps it out
            del recorded["steps_budget"]
        return recorded


HPARAM_KEYS = tuple(item.name for item in fields(HyperParameters))
GROUP_KEYS = tuple(key for key in HPARAM_KEYS if key != "seed")
SAM_ONLY_KEYS = tuple(item.name for item in fields(HyperParameters) if item.metadata.get("sam_only"))
