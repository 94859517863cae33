"""Sharpness-Aware Minimization (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021).

`SAM` wraps a base optimizer. One SAM step: the gradient g at w is there; `perturbed()` moves w to w + ε(g) for
its body, in which the caller computes the gradient at w + ε, and puts w back exactly when the body ends; then the
base optimizer steps with that gradient. `step(closure)` (and the trainer's step, steps.py) run exactly this
sequence; `first_step`/`second_step` are its two halves for users who drive it by hand. The math is in
docs/sam.md; the bugs of the popular PyTorch port this fixes are listed there too.
"""

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

_DELTA = 1e-12  # added to the norm so a zero gradient gives ε = 0, not 0/0
_SAM_KEYS = ("rho", "adaptive", "eta", "perturb_weight_decay")


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
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        perturb_weight_decay: bool = False,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, perturb_weight_decay=perturb_weight_decay)
        _check_group(defaults)
        super().__init__(params, dict(defaults, **base_kwargs))
        # The base optimizer is built over the very same group dicts, so LR schedulers and edits of
        # param_groups act on both; it fills in its own defaults (betas, momentum, ...).
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._perturbed: list[tuple[list[Tensor], list[Tensor]]] = []  # (params, saved w) per bucket
        self.last_grad_norm: Tensor | None = None
        self.last_perturbation_norm: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Check ρ and eta; once built, the base optimizer owns the groups, so it adds (and fills) them."""
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            _check_group({k: param_group.get(k, self.defaults[k]) for k in ("rho", "eta")})
            super().add_param_group(param_group)
            return
        for key in _SAM_KEYS:
            param_group.setdefault(key, self.defaults[key])
        _check_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter that has a gradient to w + ε and keep w for `second_step`.

        ε = ρ·g / (‖g‖₂ + δ), or for ASAM ε = ρ·T²⊙g / (‖T⊙g‖₂ + δ) with T = |w| + eta; the norm is one
        global norm over all groups, and norm and ε are computed in at least fp32. Records
        `last_grad_norm` (‖g‖₂) and `last_perturbation_norm` (‖ε‖₂) as 0-dim tensors (no host sync).
        """
        entries = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not entries:
            raise RuntimeError("SAM.first_step: no parameter has a gradient; call loss.backward() first")
        params = [p for p, _ in entries]
        groups = [group for _, group in entries]
        work = []  # per bucket: params, gradient used for ε (fp32+), T or None, T⊙g (or g), ρ per param
        for idx in _buckets(params, lambda i: bool(groups[i]["adaptive"])):
            p = [params[i] for i in idx]
            g = _at_least_fp32([q.grad for q in p])
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
            work.append((p, g, t, tg, [groups[i]["rho"] for i in idx]))

        self.last_grad_norm = global_norm([x for _, g, _, _, _ in work for x in g])
        adaptive = any(t is not None for _, _, t, _, _ in work)
        denominator = global_norm([x for *_, tg, _ in work for x in tg]) if adaptive else self.last_grad_norm
        inv = 1.0 / (denominator + _DELTA)

        all_eps = []
        self._perturbed = []
        for p, _, t, tg, rho in work:
            eps = torch._foreach_mul(tg, inv.to(p[0].device))  # a new list: the grads stay untouched
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
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w, then let the base optimizer step with the gradient taken at w + ε."""
        self.restore()
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
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict: its state (momenta, Adam moments, steps) and the shared groups,
        which hold SAM's keys too. The saved copies of w are scratch and are not included."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer, then share its (new) group dicts again."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:  # a plain base-optimizer state dict lacks SAM's keys
            for key in _SAM_KEYS:
                group.setdefault(key, self.defaults[key])
            _check_group(group)
        self._perturbed = []


def _check_group(group: dict[str, Any]) -> None:
    for key in ("rho", "eta"):
        if group[key] < 0:
            raise ValueError(f"SAM: {key} must be >= 0, got {key}={group[key]!r}")
