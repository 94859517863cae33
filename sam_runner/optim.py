"""Sharpness-Aware Minimization (Foret et al. 2021), its adaptive form ASAM (Kwon et al. 2021), and its variants:
unnormalized SAM (`USAM`, ε = ρ·g), GSAM (`GSAM`, Zhuang et al. 2022: the surrogate-gap descent direction), SAM-ON
(`SAMON`, Mueller et al. 2023: only normalization layers perturbed), F-SAM (`FSAM`, Li et al. 2024: ε along the
gradient minus σ times an EMA of past gradients), LookSAM (`LookSAM`, Liu et al. 2022: SAM's step every k steps, a
kept component of it reused on the one-pass steps between) and ESAM (`ESAM`, Du et al. 2022: a random share of the
tensors perturbed; its data selection is the trainer's, steps.py).

`SAM` wraps a base optimizer. One SAM step: the gradient g at w is there; `perturbed()` moves w to w + ε(g) for
its body, in which the caller computes the gradient at w + ε, and puts w back exactly when the body ends; then the
base optimizer steps with that gradient. `step(closure)` (and the trainer's step, steps.py) run exactly this
sequence; `first_step`/`second_step` are its two halves for users who drive it by hand. The math is in
docs/sam.md; the bugs of the popular PyTorch port this fixes are listed there too.
"""

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

_DELTA = 1e-12  # added to the norm so a zero gradient gives ε = 0, not 0/0
_SAM_KEYS = ("rho", "adaptive", "eta", "perturb_weight_decay", "rho_schedule", "rho_min")
RHO_SCHEDULES = ("constant", "lr")  # ρ fixed, or following the lr schedule (docs/sam.md "ρ schedule")


def _buckets(tensors: Sequence[Tensor], extra: Callable[[int], Hashable] = lambda i: None) -> list[list[int]]:
    """Indices of `tensors` grouped by (device, dtype, extra(i)): foreach kernels take one launch per group."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype, extra(i))].append(i)
    return list(groups.values())


def _at_least_fp32(tensors: list[Tensor]) -> list[Tensor]:
    """fp32 versions of half-precision tensors (the same list when already fp32/fp64).

    There is no foreach cast, so half-precision parameters pay one cast per tensor; fp32 parameters (the
    usual case, also under autocast) take the zero-copy branch.
    """
    if tensors[0].dtype in (torch.float32, torch.float64):
        return tensors
    return [t.float() for t in tensors]


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """⟨(x₁, …, xₙ), (y₁, …, yₙ)⟩ as a 0-dim tensor on the first tensor's device, accumulated in at least fp32."""
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in xs) else torch.float32
    device = xs[0].device
    partial = []
    for idx in _buckets(xs):
        products = torch._foreach_mul(_at_least_fp32([xs[i] for i in idx]), _at_least_fp32([ys[i] for i in idx]))
        partial.append(torch.stack([t.sum() for t in products]).sum().to(device, out_dtype))
    return partial[0] if len(partial) == 1 else torch.stack(partial).sum()


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖(t₁, …, tₙ)‖₂ as a 0-dim tensor on the first tensor's device, accumulated in at least fp32.

    No host sync: one `_foreach_norm` per device and dtype, then a norm of the per-tensor norms.
    """
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device
    partial = []
    for idx in _buckets(tensors):
        bucket = [tensors[i] for i in idx]
        acc = torch.float64 if bucket[0].dtype == torch.float64 else torch.float32
        norms = torch._foreach_norm(bucket, 2, dtype=acc)
        partial.append(torch.linalg.vector_norm(torch.stack(norms)).to(device, out_dtype))
    return partial[0] if len(partial) == 1 else torch.linalg.vector_norm(torch.stack(partial))


class SAM(torch.optim.Optimizer):
    """SAM / ASAM around any base optimizer, sharing its param_groups.

    Args:
        params: parameters or param-group dicts; a group may set its own "rho", "adaptive", "eta",
            "perturb_weight_decay" and any base-optimizer key.
        base_optimizer: an optimizer class, or a callable such as functools.partial(SGD, ...), that is
            called as base_optimizer(param_groups, **base_kwargs).
        rho: radius ρ of the ascent step.
        adaptive: ASAM — scale the ascent by T = |w| + eta elementwise.
        eta: ASAM's η added to |w| (0.01 in the ASAM code; 0 is the form most PyTorch users know).
        perturb_weight_decay: include the L2 term weight_decay·w (the group's "weight_decay") in the gradient
            used for ε, as the official JAX code does by putting L2 into the loss. Off by default: ε sees
            only the data gradient and weight decay is left to the base optimizer.
        rho_schedule: "constant" (ρ every step) or "lr": ρ_t = rho_min + (rho − rho_min)·lr_t / lr_peak, with lr_t
            the group's lr at the step and lr_peak its lr when it was added (the run's peak lr), so ρ_t = rho at
            the peak lr (docs/sam.md "ρ schedule").
        rho_min: ρ_t at lr_t = 0 under rho_schedule="lr" (same units as rho); 0 makes ρ_t proportional to lr_t.
    """

    normalized = True  # ε = ρ·g/‖g‖; USAM: ε = ρ·g
    # a variant's per-parameter state that state_dict() carries: (key in self.state[p], key in the state dict)
    carried: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        perturb_weight_decay: bool = False,
        rho_schedule: str = "constant",
        rho_min: float = 0.0,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, perturb_weight_decay=perturb_weight_decay,
                        rho_schedule=rho_schedule, rho_min=rho_min)
        _check_group(defaults)
        super().__init__(params, dict(defaults, **base_kwargs))
        # The base optimizer is built over the very same group dicts, so LR schedulers and edits of
        # param_groups act on both; it fills in its own defaults (betas, momentum, ...).
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            _set_lr_peak(group)
        self._perturbed: list[tuple[list[Tensor], list[Tensor]]] = []  # (params, saved w) per bucket
        self.last_grad_norm: Tensor | None = None
        self.last_perturbation_norm: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Check ρ and eta; once built, the base optimizer owns the groups, so it adds (and fills) them."""
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            _check_group({k: param_group.get(k, self.defaults[k]) for k in _SAM_KEYS})
            super().add_param_group(param_group)
            return
        for key in _SAM_KEYS:
            param_group.setdefault(key, self.defaults[key])
        _check_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        _set_lr_peak(self.param_groups[-1])

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter that has a gradient to w + ε and keep w for `second_step`.

        ε = ρ·g / (‖g‖₂ + δ), or for ASAM ε = ρ·T²⊙g / (‖T⊙g‖₂ + δ) with T = |w| + eta; the norm is one
        global norm over all groups, and norm and ε are computed in at least fp32. ρ is the group's ρ_t
        (`rho_schedule`); USAM (`normalized = False`) leaves out the division by the norm. Records
        `last_grad_norm` (‖g‖₂) and `last_perturbation_norm` (‖ε‖₂) as 0-dim tensors (no host sync).
        """
        entries = [(p, group) for group in self.param_groups if group.get("perturb", True) for p in group["params"]
                   if p.grad is not None]  # a group with "perturb": False is not perturbed (SAM-ON's non-norm ones)
        if not entries:
            raise RuntimeError("SAM.first_step: no parameter has a gradient; call loss.backward() first")
        params = [p for p, _ in entries]
        groups = [group for _, group in entries]
        g_in = self.ascent_gradients(params)
        work = []  # per bucket: params, gradient used for ε (fp32+), T or None, T⊙g (or g), ρ per param
        for idx in _buckets(params, lambda i: bool(groups[i]["adaptive"])):
            p = [params[i] for i in idx]
            g = _at_least_fp32([g_in[i] for i in idx])
            w32 = _at_least_fp32(p)
            decay = [groups[i].get("weight_decay", 0.0) if groups[i]["perturb_weight_decay"] else 0.0
                     for i in idx]
            if any(decay):
                g = torch._foreach_add(g, torch._foreach_mul(w32, decay))
            t, tg = None, g
            if groups[idx[0]]["adaptive"]:
                t = torch._foreach_abs(w32)
                torch._foreach_add_(t, [groups[i]["eta"] for i in idx])
                tg = torch._foreach_mul(t, g)
            work.append((p, g, t, tg, [self.radius(groups[i]) for i in idx]))

        self.last_grad_norm = global_norm([x for _, g, _, _, _ in work for x in g])
        adaptive = any(t is not None for _, _, t, _, _ in work)
        denominator = global_norm([x for *_, tg, _ in work for x in tg]) if adaptive else self.last_grad_norm
        inv = 1.0 / (denominator + _DELTA) if self.normalized else None

        all_eps = []
        self._perturbed = []
        for p, _, t, tg, rho in work:
            # a new list: the grads stay untouched (USAM: an exact copy, ×1)
            eps = torch._foreach_mul(tg, inv.to(p[0].device)) if inv is not None else torch._foreach_mul(tg, 1.0)
            if t is not None:  # T²⊙g = T⊙(T⊙g)
                torch._foreach_mul_(eps, t)
            torch._foreach_mul_(eps, rho)
            saved = [self._saved_w(q) for q in p]
            torch._foreach_copy_(saved, p)
            torch._foreach_add_(p, eps)
            self._perturbed.append((p, saved))
            all_eps.extend(eps)
        self.last_perturbation_norm = global_norm(all_eps)
        if zero_grad:
            self.zero_grad()

    def radius(self, group: dict[str, Any]) -> float:
        """The length ε gets in `first_step` for a parameter of `group`: ρ_t (ESAM: ρ_t/β)."""
        return rho_t(group)

    def ascent_pass(self) -> AbstractContextManager:
        """Entered around the clean forward + backward whose gradient ε is taken from (steps.py): nothing for SAM;
        ESAM leaves the tensors out of this step's draw without a gradient there."""
        return nullcontext()

    def ascent_gradients(self, params: list[Tensor]) -> list[Tensor]:
        """The gradients ε is taken from, one per parameter of `params` (all with a gradient): `.grad` itself for
        SAM; F-SAM's g − σ·m. Called once per `first_step`."""
        return [p.grad for p in params]

    def _saved_w(self, p: Tensor) -> Tensor:
        """The buffer holding p's clean value; lives in self.state, which state_dict() does not carry."""
        state = self.state[p]
        if "w" not in state:
            state["w"] = torch.empty_like(p, memory_format=torch.preserve_format)
        return state["w"]

    @torch.no_grad()
    def restore(self) -> None:
        """Put back w exactly (a copy, not w + ε − ε, which would round) for every perturbed parameter."""
        if not self._perturbed:
            raise RuntimeError("SAM: no perturbation to undo; call first_step() before second_step()/restore()")
        for params, saved in self._perturbed:
            torch._foreach_copy_(params, saved)
        self._perturbed = []

    @contextmanager
    def perturbed(self) -> Iterator[None]:
        """The body runs at w + ε, ε taken from the gradients now in `.grad` (which are cleared for the body to
        compute the gradient at w + ε); w is restored exactly when the body ends, also when it raises."""
        self.first_step(zero_grad=True)
        try:
            yield
        finally:
            self.restore()

    @torch.no_grad()
    def descent_gradient(self, grad_scale: Tensor | None = None) -> None:
        """Turn the gradient at w + ε in `.grad` into the one the base optimizer steps with; SAM's is that gradient
        itself (GSAM overrides). `grad_scale`: the loss scale the `.grad` values carry (fp16), None when none."""

    def perturbs_next_step(self) -> bool:
        """Whether the next step is a two-pass SAM step (always, but for LookSAM between its SAM steps, whose
        one-pass steps `reuse_gradient` forms)."""
        return True

    @torch.no_grad()
    def reuse_gradient(self) -> None:
        """On a one-pass step (`perturbs_next_step()` False): turn the clean gradient in `.grad` into the one the
        base optimizer steps with. Every SAM step perturbs, so SAM itself never takes one."""
        raise NotImplementedError(f"{type(self).__name__}: every step perturbs; there is no one-pass step")

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w, then let the base optimizer step with the gradient taken at w + ε."""
        self.restore()
        self.descent_gradient()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step; gradients at w must already be there, `closure` recomputes loss and gradients.

        Returns what the closure returns (the loss at w + ε).
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that recomputes the loss and calls backward(); "
                "or call first_step() and second_step() yourself"
            )
        with self.perturbed(), torch.enable_grad():
            loss = closure()
        self.descent_gradient()
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict: its state (momenta, Adam moments, steps) and the shared groups,
        which hold SAM's keys too, plus a variant's own per-parameter state (`carried`) in the parameters' entries.
        The saved copies of w are scratch and are not included."""
        packed = self.base_optimizer.state_dict()
        if not self.carried:
            return packed
        state = {index: dict(entry) for index, entry in packed["state"].items()}  # not the base's own dicts
        for index, p in enumerate(p for group in self.param_groups for p in group["params"]):
            for own, key in self.carried:
                if own in self.state[p]:
                    state.setdefault(index, {})[key] = self.state[p][own]
        return {**packed, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer (without a variant's `carried` entries, which become its own state again:
        absent ones are absent), then share its (new) group dicts again."""
        names = {key: own for own, key in self.carried}
        carried: dict[int, dict[str, Tensor]] = defaultdict(dict)
        rest = {}
        for index, entry in state_dict["state"].items():
            entry = dict(entry)
            for key in names.keys() & entry.keys():
                carried[int(index)][names[key]] = entry.pop(key)
            if entry:
                rest[index] = entry
        self.base_optimizer.load_state_dict({**state_dict, "state": rest} if names else state_dict)
        for index, p in enumerate(p for group in self.base_optimizer.param_groups for p in group["params"]):
            for own in names.values():
                self.state[p].pop(own, None)
            for own, value in carried[index].items():
                self.state[p][own] = value.to(p.device).clone()
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:  # a plain base-optimizer state dict lacks SAM's keys
            for key in _SAM_KEYS:
                group.setdefault(key, self.defaults[key])
            _set_lr_peak(group)
            _check_group(group)
        self._perturbed = []


def _fp32_buffer(state: dict[str, Any], key: str, p: Tensor) -> Tensor:
    """A variant's own per-parameter tensor state[key], created as zeros shaped like p in at least fp32."""
    if key not in state:
        dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    return state[key]


def rho_t(group: dict[str, Any]) -> float:
    """The group's radius this step: ρ, or under rho_schedule "lr" ρ_min + (ρ − ρ_min)·lr_t / lr_peak."""
    if group["rho_schedule"] == "constant":
        return group["rho"]
    return group["rho_min"] + (group["rho"] - group["rho_min"]) * group["lr"] / group["lr_peak"]


def _set_lr_peak(group: dict[str, Any]) -> None:
    """The group's lr when it joined (the run's peak lr; a checkpoint's groups bring their own): rho_schedule "lr"
    divides by it. An LR scheduler built later sets `initial_lr` to the same value."""
    if "lr" in group:
        group.setdefault("lr_peak", group.get("initial_lr", group["lr"]))


def _check_group(group: dict[str, Any]) -> None:
    for key in ("rho", "eta", "rho_min"):
        if group[key] < 0:
            raise ValueError(f"SAM: {key} must be >= 0, got {key}={group[key]!r}")
    if group["rho_schedule"] not in RHO_SCHEDULES:
        raise ValueError(f"SAM: rho_schedule must be one of {', '.join(RHO_SCHEDULES)}, got {group['rho_schedule']!r}")
    if group["rho_schedule"] == "lr" and "lr" in group and not group["lr"] > 0:
        raise ValueError(f"SAM: rho_schedule='lr' needs a peak lr > 0, got lr={group['lr']!r}")


class USAM(SAM):
    """Unnormalized SAM (Andriushchenko & Flammarion 2022; Agarwala & Dauphin 2023): ε = ρ·g, not divided by ‖g‖,
    then the base step with the gradient at w + ε. ρ here is a step size (ε's length is ρ·‖g‖), not a radius."""

    normalized = False

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.05, **kwargs: Any) -> None:
        if kwargs.get("adaptive"):
            raise ValueError("USAM: adaptive=True (an unnormalized ASAM) is not implemented; use adaptive=False")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)


class _KeepsCleanGradient(SAM):
    """A SAM variant whose step needs the clean gradient g next to the perturbed one (GSAM, LookSAM): `first_step`
    keeps a copy of g (one copy of the gradients) until `descent_gradient` takes it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._clean: list[tuple[Tensor, Tensor]] = []
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Keep the clean gradient g, then SAM's ascent."""
        self._clean = [(p, p.grad.clone()) for group in self.param_groups for p in group["params"]
                       if p.grad is not None]
        super().first_step(zero_grad)

    def _take_clean(self) -> tuple[list[Tensor], list[Tensor]]:
        """(the parameters that have a gradient now and a kept clean one, their clean gradients); the copy is
        dropped."""
        pairs = [(p, g) for p, g in self._clean if p.grad is not None]
        self._clean = []
        return [p for p, _ in pairs], [g for _, g in pairs]


class GSAM(_KeepsCleanGradient):
    """GSAM (Zhuang et al., ICLR 2022, Algorithm 1): ε = ρ_t·g/‖g‖ as SAM's, g_p the gradient at w + ε; g is split
    into its component along g_p and the orthogonal rest g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²)·g_p, and the base optimizer
    steps with g_p − α·g_⊥. ρ_t follows the lr between rho_min and rho (= ρ_max) by default (rho_schedule "lr").

    alpha: α, dimensionless (Table 4 of the paper: 0.01 for ResNets with SGD, 0.05–1.0 for ViT/Mixer with AdamW).
    The clean gradient g is kept (one copy of the gradients) from `first_step` to `descent_gradient`.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.04, alpha: float = 0.01,
                 rho_min: float = 0.02, rho_schedule: str = "lr", **kwargs: Any) -> None:
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"GSAM: alpha must be a finite number >= 0, got alpha={alpha!r}")
        if kwargs.get("adaptive"):
            raise ValueError("GSAM: adaptive=True is not implemented (the paper's adaptive ρ scales by |w|, not "
                             "ASAM's T²); use adaptive=False")
        self.alpha = alpha
        super().__init__(params, base_optimizer, rho=rho, rho_min=rho_min, rho_schedule=rho_schedule, **kwargs)

    @torch.no_grad()
    def descent_gradient(self, grad_scale: Tensor | None = None) -> None:
        """`.grad` (g_p, times grad_scale under fp16) becomes g_p − α·g_⊥ (times the same scale).

        The projection coefficient ⟨g, g_p⟩/(‖g_p‖² + δ) is taken in at least fp32; a zero g_p gives g_⊥ = g.
        g is the clean gradient `first_step` saw (unscaled); g_⊥ does not depend on g_p's scale, so only the α·g_⊥
        term is multiplied by grad_scale. A parameter without a gradient at w + ε keeps None.
        """
        params, clean = self._take_clean()
        if not params:
            return
        grads = [p.grad for p in params]
        coefficient = _dot(clean, grads) / (global_norm(grads) ** 2 + _DELTA)
        factor = self.alpha if grad_scale is None else self.alpha * grad_scale
        for idx in _buckets(grads):
            gp = [grads[i] for i in idx]
            device = gp[0].device
            perpendicular = torch._foreach_mul(gp, (-coefficient).to(device))  # −c·g_p
            torch._foreach_add_(perpendicular, [clean[i] for i in idx])  # g_⊥ = g − c·g_p
            torch._foreach_mul_(perpendicular, factor.to(device) if isinstance(factor, Tensor) else factor)
            torch._foreach_sub_(gp, perpendicular)  # g_p − α·g_⊥


# The layers whose affine parameters (weight γ and bias β) SAM-ON perturbs: BatchNorm of any dimension (SyncBatchNorm,
# InstanceNorm: `_NormBase`), LayerNorm, GroupNorm, and RMSNorm where torch has it.
NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm) + \
    ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def normalization_parameters(model: nn.Module) -> list[Tensor]:
    """The trainable affine parameters of `model`'s normalization layers (`NORMALIZATION_LAYERS`), by module type
    (not by name, as the SAM-ON authors' code does), each once."""
    seen: dict[int, Tensor] = {}
    for module in model.modules():
        if isinstance(module, NORMALIZATION_LAYERS):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    seen.setdefault(id(p), p)
    return list(seen.values())


def normalization_groups(model: nn.Module) -> list[dict[str, Any]]:
    """SAM-ON's param groups: the normalization parameters, perturbed, and every other trainable parameter in a group
    with "perturb": False (stepped with the gradient at w + ε, never perturbed). Empty groups are left out."""
    norm = {id(p) for p in normalization_parameters(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) in norm]},
              {"params": [p for p in model.parameters() if id(p) not in norm and p.requires_grad], "perturb": False}]
    return [group for group in groups if group["params"]]


class SAMON(SAM):
    """SAM-ON (Mueller, Vlaar, Rolnick & Hein, NeurIPS 2023): only the normalization layers' affine parameters are
    perturbed, ε = ρ·g_N/‖g_N‖ with g_N the gradient restricted to them (the norm over them only); every parameter
    then takes the base step with the gradient at w + ε. Build the groups with `normalization_groups(model)`: a
    group with "perturb": False is neither perturbed nor counted in the norm."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.5, **kwargs: Any) -> None:
        if kwargs.get("adaptive"):
            raise ValueError("SAM-ON: adaptive=True (the authors' ASAM-ON) is not implemented; use adaptive=False")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        if not any(group.get("perturb", True) and group["params"] for group in self.param_groups):
            raise ValueError("SAM-ON: no parameter to perturb; build the groups with normalization_groups(model)")


class FSAM(SAM):
    """Friendly SAM (Li, Zhou, He, Cheng & Huang, CVPR 2024): ε along the clean gradient minus σ times an EMA of past
    clean gradients, m_t = λ·m_{t−1} + (1 − λ)·g_t (m_0 = 0), d = g_t − σ·m_t, ε = ρ_t·d/(‖d‖ + δ); then the base
    step with the gradient at w + ε.

    sigma: σ, dimensionless (0: SAM's step exactly). lmbda: λ in [0, 1), the EMA's decay per SAM step.
    The EMA is optimizer state: one tensor per parameter (at least fp32), advanced once per `first_step` (not during
    base-optimizer steps), carried by `state_dict()` as "fsam_ema" entries of the parameters' state. A non-finite g
    (an fp16 overflow; the step is then skipped) leaves it as it was.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.05, sigma: float = 1.0,
                 lmbda: float = 0.6, **kwargs: Any) -> None:
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"FSAM: sigma must be a finite number >= 0, got sigma={sigma!r}")
        if not (0 <= lmbda < 1):
            raise ValueError(f"FSAM: lmbda must be in [0, 1), got lmbda={lmbda!r}")
        if kwargs.get("adaptive"):
            raise ValueError("FSAM: adaptive=True is not implemented; use adaptive=False")
        self.sigma, self.lmbda = sigma, lmbda
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    carried = (("ema", "fsam_ema"),)

    @torch.no_grad()
    def ascent_gradients(self, params: list[Tensor]) -> list[Tensor]:
        """m ← λ·m + (1 − λ)·g (kept where g is not finite), then d = g − σ·m, in at least fp32."""
        g = _at_least_fp32([p.grad for p in params])
        finite = torch.isfinite(global_norm(g))
        m = [_fp32_buffer(self.state[p], "ema", p) for p in params]
        d: list[Tensor] = [g[0]] * len(params)
        for idx in _buckets(g):
            gb, mb = [g[i] for i in idx], [m[i] for i in idx]
            new = torch._foreach_mul(mb, self.lmbda)
            torch._foreach_add_(new, gb, alpha=1 - self.lmbda)
            keep = finite.to(gb[0].device)
            for old, fresh in zip(mb, new):
                old.copy_(torch.where(keep, fresh, old))
            for i, di in zip(idx, torch._foreach_add(gb, mb, alpha=-self.sigma)):
                d[i] = di
        return d


class LookSAM(_KeepsCleanGradient):
    """LookSAM (Liu, Mai, Chen, Hsieh & You, CVPR 2022): SAM's step on every k-th step, which also keeps g_v, the
    part of the perturbed gradient g_s orthogonal to the clean g, g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g; the k − 1 steps
    between take one forward and backward at w and the base step with g + α·(‖g‖/‖g_v‖)·g_v.

    k: a SAM step every k steps, counting from the first (1: SAM's step every step). alpha: α, dimensionless.
    Optimizer state, carried by `state_dict()`: `steps_taken` (its own steps, SAM's and the one-pass ones; not the
    base optimizer's steps before sam_start's switch) as "looksam_steps", and g_v (one tensor per parameter, at
    least fp32) as "looksam_gv" entries of the parameters' state.
    """

    carried = (("gv", "looksam_gv"),)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.1, k: int = 5,
                 alpha: float = 0.7, **kwargs: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"LookSAM: k must be an integer >= 1, got k={k!r}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"LookSAM: alpha must be a finite number >= 0, got alpha={alpha!r}")
        if kwargs.get("adaptive"):
            raise ValueError("LookSAM: adaptive=True is not implemented; use adaptive=False")
        self.k, self.alpha = k, alpha
        self.steps_taken = 0
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def perturbs_next_step(self) -> bool:
        """SAM's step on steps 0, k, 2k, … of its own."""
        return self.steps_taken % self.k == 0

    @torch.no_grad()
    def descent_gradient(self, grad_scale: Tensor | None = None) -> None:
        """The SAM step steps with g_s as it is, and keeps g_v = g_s − (⟨g, g_s⟩/(‖g‖² + δ))·g, unscaled (`.grad`
        holds grad_scale·g_s under fp16, g is unscaled), in at least fp32. A non-finite g or g_s (a step the
        scaler skips) leaves g_v as it was (zero before any)."""
        self.steps_taken += 1
        params, clean = self._take_clean()
        if not params:
            return
        grads = [p.grad for p in params]
        coefficient = _dot(clean, grads) / (global_norm(clean) ** 2 + _DELTA)  # ⟨g, g_s⟩/‖g‖², times the scale
        g_v = [torch.empty(0)] * len(params)
        for idx in _buckets(grads):
            device = grads[idx[0]].device
            bucket = torch._foreach_mul(_at_least_fp32([clean[i] for i in idx]), (-coefficient).to(device))
            torch._foreach_add_(bucket, _at_least_fp32([grads[i] for i in idx]))  # scale·(g_s − c·g)
            if grad_scale is not None:
                torch._foreach_div_(bucket, grad_scale.to(device))
            for i, value in zip(idx, bucket):
                g_v[i] = value
        finite = torch.isfinite(global_norm(g_v))
        for p, value in zip(params, g_v):
            kept = _fp32_buffer(self.state[p], "gv", p)
            kept.copy_(torch.where(finite.to(kept.device), value, kept))

    @torch.no_grad()
    def reuse_gradient(self) -> None:
        """`.grad` (g, times the loss scale under fp16) becomes g + α·(‖g‖/(‖g_v‖ + δ))·g_v. ‖g‖ carries g's scale,
        so the added term carries it too and the scaler's one unscale gives the unscaled step; ‖g‖ is the norm over
        every parameter with a gradient, ‖g_v‖ over every kept g_v. g_v = 0 leaves g as it is."""
        self.steps_taken += 1
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        reused = [p for p in with_grad if "gv" in self.state[p]]
        if not reused:
            return
        g_v = [self.state[p]["gv"] for p in reused]
        factor = self.alpha * global_norm([p.grad for p in with_grad]) / (global_norm(g_v) + _DELTA)
        for idx in _buckets(g_v):
            term = torch._foreach_mul([g_v[i] for i in idx], factor.to(g_v[idx[0]].device))
            torch._foreach_add_([reused[i].grad for i in idx], term)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """SAM's step (`closure` recomputes loss and gradients at w + ε) on every k-th step; on the others the base
        step with the reused direction, without calling `closure` (one pass: the point of LookSAM). Returns the
        closure's loss, or None on a one-pass step."""
        if self.perturbs_next_step():
            return super().step(closure)
        self.reuse_gradient()
        self.base_optimizer.step()
        return None

    def state_dict(self) -> dict[str, Any]:
        """SAM's state dict with g_v in the parameters' entries and the step counter as "looksam_steps"."""
        return {**super().state_dict(), "looksam_steps": self.steps_taken}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The counter (0 when absent), then SAM's state dict with g_v."""
        state_dict = dict(state_dict)
        self.steps_taken = int(state_dict.pop("looksam_steps", 0))
        super().load_state_dict(state_dict)
        self._clean = []


class ESAM(SAM):
    """ESAM (Du, Yan, Feng, Zhou, Zhen, Goh & Tan, ICLR 2022), its stochastic weight perturbation (SWP): each step a
    Bernoulli(β) draw per parameter tensor picks the tensors perturbed; the others take no part in the clean backward
    (`ascent_pass`: requires_grad off, so their weight gradients are not computed) and get ε = 0; the picked ones get
    ε = (ρ_t/β)·g_S/(‖g_S‖ + δ), g_S the clean gradient restricted to them (the norm over them only). Every tensor
    then takes the base step with its gradient at w + ε. A draw that picks no tensor is drawn again.

    The sharpness-sensitive data selection (SDS: the perturbed pass on the share γ of the batch whose loss rises most
    from w to w + ε) needs the model and the batch, so the trainer's step does it (steps.train_step); this class only
    holds γ. beta, gamma: shares in (0, 1]; β = γ = 1 is SAM's step exactly (no draw, no selection).
    generator: where the draws come from; None: torch's default CPU generator (the run's seeded one, in checkpoints).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.05, beta: float = 0.6,
                 gamma: float = 0.5, generator: torch.Generator | None = None, **kwargs: Any) -> None:
        for name, share in (("beta", beta), ("gamma", gamma)):
            if not (isinstance(share, (int, float)) and 0 < share <= 1):
                raise ValueError(f"ESAM: {name} must be in (0, 1], got {name}={share!r}")
        if kwargs.get("adaptive"):
            raise ValueError("ESAM: adaptive=True is not implemented; use adaptive=False")
        self.beta, self.gamma, self.generator = beta, gamma, generator
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def radius(self, group: dict[str, Any]) -> float:
        """ρ_t/β: the picked tensors' ε is scaled up by 1/β (the authors' code)."""
        return rho_t(group) / self.beta

    @contextmanager
    def ascent_pass(self) -> Iterator[None]:
        """SWP: the tensors this step's draw leaves out do not require grad for the body (restored after it)."""
        left_out = self._left_out()
        for p in left_out:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in left_out:
                p.requires_grad_(True)

    def _left_out(self) -> list[Tensor]:
        """One Bernoulli(β) draw per trainable tensor (in param-group order) from `generator`, on the CPU (no device
        sync); the tensors not picked. β = 1 draws nothing (SAM's random stream untouched)."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if self.beta == 1:
            return []
        while True:
            picked = (torch.rand(len(params), generator=self.generator) < self.beta).tolist()
            if any(picked):
                return [p for p, keep in zip(params, picked) if not keep]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Refused: SWP's clean pass and SDS's selection belong to the trainer's step."""
        raise RuntimeError("ESAM steps through sam_runner.steps.train_step (SWP's clean pass and SDS's selection "
                           "are part of the step), not through step(closure)")
