"""Hessian and sharpness measures of a model at its current weights w.

L(w) is the size-weighted mean of `criterion` over every sample of `batches`, with the model in eval mode.
Everything is computed one batch at a time, so memory is bounded by one batch's (double-backward) graph plus a
few parameter-sized vectors (and Lanczos's basis for `lambda_max`). The parameters are shifted in place and
copied back from saved tensors, so they end bit-identical; `.grad` is never touched (`torch.autograd.grad`).
Definitions, methods and costs: docs/sharpness.md.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from functools import cached_property

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sam_runner.errors import ConfigError

__all__ = ["MEASURES", "CHEAP_PARAMETER_LIMIT", "CPU_COST_MARGIN", "Cost", "MeasureChoice", "MeasureError",
           "MeasurementStopped", "Options", "default_measures", "estimate_cost", "measure", "parameter_count"]

MEASURES = ("lambda_max", "trace", "worst", "ascent", "average", "keskar", "alignment")
CHEAP_PARAMETER_LIMIT = 1_000_000  # above it, `default_measures` drops the 100-HVP / 100-forward estimators
COSTLY_MEASURES = ("trace", "average")
CPU_COST_MARGIN = 2  # on a CPU, `default_measures` keeps the estimate within this many times the training's passes

Batch = tuple[Tensor, Tensor]
Criterion = Callable[[Tensor, Tensor], Tensor]


class MeasureError(ConfigError, ValueError):
    """An unknown measure or option, or a value out of range: a config problem the user fixes."""


class NotFinite(MeasureError):
    """The weights, or the loss at them, are not finite (a diverged run): sharpness is undefined there."""


class MeasurementStopped(Exception):
    """`measure`'s `should_stop` asked it to stop; the weights are back as they were, no value was computed."""


@dataclass(frozen=True)
class Options:
    """Knobs of `measure`; the defaults follow PyHessian (Lanczos), Hutchinson practice and Keskar et al."""

    tolerance: float = 1e-3  # lambda_max: stop when the Ritz residual is <= tolerance * |lambda|
    max_iterations: int = 100  # lambda_max: Lanczos steps (Hessian-vector products over the data)
    trace_probes: int = 100  # trace: Rademacher probes
    average_samples: int = 100  # average: antithetic pairs +-u, u uniform on the sphere (2 forwards each)
    worst_steps: int = 20  # worst: gradient steps on the sphere of radius rho
    worst_step_size: float = 1.0  # worst: step length, in units of rho, along the normalized gradient
    keskar_epsilon: float = 1e-3  # keskar: box half-width eps * (|w_i| + 1)
    keskar_random_starts: int = 4  # keskar: seeded random corners, besides the sign(grad) and +-sign(v1) ones
    keskar_steps: int = 10  # keskar: at most this many corner jumps per start
    progress: bool = False  # a tqdm bar counting batch passes

    def __post_init__(self) -> None:
        for name, least in _AT_LEAST.items():
            if getattr(self, name) < least:
                raise MeasureError(f"sharpness option {name} must be at least {least}, got {getattr(self, name)}")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise MeasureError(f"sharpness option {name} must be positive, got {getattr(self, name)}")


_AT_LEAST = {"tolerance": 0, "max_iterations": 1, "trace_probes": 2, "average_samples": 2, "worst_steps": 0,
             "keskar_random_starts": 0, "keskar_steps": 0}
_POSITIVE = ("worst_step_size", "keskar_epsilon")
_NEEDS_RHO = ("worst", "ascent", "average")


@dataclass(frozen=True)
class Cost:
    """Passes over the measured data that `measure` takes at most (one batch each): forwards, and backwards with a
    Hessian-vector product's backward-with-graph and double backward counted as two."""

    forward: int
    backward: int

    @property
    def passes(self) -> int:
        return self.forward + self.backward

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, factor: int) -> Cost:
        return Cost(self.forward * factor, self.backward * factor)


def estimate_cost(measures: Sequence[str], num_batches: int, parameter_count: int,
                  **options: float | int | bool) -> Cost:
    """An upper bound on the passes `measure(..., measures=measures, **options)` takes over `num_batches` batches
    of a model with `parameter_count` trainable parameters: the per-batch costs of `measure`'s docstring, each
    shared computation counted once (the finiteness check, L(w) with its gradient, the ascent point, Lanczos)."""
    names, settings = checked_measures(measures), checked_options(options)
    step = Cost(1, 1)  # one forward and backward
    per_batch = Cost(1, 0)  # the finiteness check of L(w)
    if set(names) & {"alignment", "worst", "ascent", "average", "keskar"}:
        per_batch += step  # L(w) and its gradient, shared
    if set(names) & {"ascent", "worst"}:
        per_batch += Cost(1, 0)  # L at the ascent point, shared
    eigen = bool(set(names) & {"lambda_max", "alignment"})
    if eigen:
        per_batch += Cost(1, 2) * min(settings.max_iterations, parameter_count)  # Lanczos stops at full dimension
    if "trace" in names:
        per_batch += Cost(1, 1 + settings.trace_probes)
    if "average" in names:
        per_batch += Cost(2 * settings.average_samples, 0)
    if "worst" in names:
        per_batch += step * settings.worst_steps + Cost(1, 0)
    if "keskar" in names:
        starts = 1 + settings.keskar_random_starts + (2 if eigen else 0)
        per_batch += step * (starts * (settings.keskar_steps + 1))
    return per_batch * num_batches


@dataclass(frozen=True)
class MeasureChoice:
    """The measures `sharpness.measures: auto` took, and why, in words for the log and summary.json."""

    measures: list[str]
    reason: str

    def __bool__(self) -> bool:
        return bool(self.measures)  # `sharpness.measures=[]`: nothing to measure


def default_measures(model: nn.Module, *, device: torch.device | str | None = None, num_batches: int = 1,
                     num_samples: int | None = None, training_passes: float | None = None,
                     **options: float | int | bool) -> MeasureChoice:
    """The measures worth their cost: all up to CHEAP_PARAMETER_LIMIT trainable parameters, all but
    COSTLY_MEASURES above it; on a CPU, when the training's cost is known (`training_passes`: forward and
    backward passes over single samples), the cheapest of those whose estimate over `num_samples` samples stays
    within CPU_COST_MARGIN times it (always at least the cheapest one): a CPU measures no faster than it trains,
    so an 11M-parameter model trained one epoch on 200 samples must not be measured for hundreds of epochs' time.
    """
    count = parameter_count(model)
    device = torch.device(device) if device is not None else _model_device(model)
    if count <= CHEAP_PARAMETER_LIMIT:
        names, reason = list(MEASURES), f"{count:,} parameters <= {CHEAP_PARAMETER_LIMIT:,}: every measure"
    else:
        names = [name for name in MEASURES if name not in COSTLY_MEASURES]
        reason = f"{count:,} parameters > {CHEAP_PARAMETER_LIMIT:,}: all but {', '.join(COSTLY_MEASURES)}"
    if device.type != "cpu" or training_passes is None or not num_samples or not num_batches:
        return MeasureChoice(names, reason)

    def sample_passes(chosen: list[str]) -> float:
        return estimate_cost(chosen, num_batches, count, **options).passes / num_batches * num_samples

    return _within_budget(names, reason, sample_passes, training_passes)


def _within_budget(names: list[str], reason: str, sample_passes: Callable[[list[str]], float],
                   training_passes: float) -> MeasureChoice:
    """The cheapest of `names` whose estimate fits within CPU_COST_MARGIN x training_passes (at least one)."""
    kept: list[str] = []
    for name in sorted(names, key=lambda name: sample_passes([name])):
        if not kept or sample_passes([*kept, name]) <= CPU_COST_MARGIN * training_passes:
            kept.append(name)
    kept = [name for name in MEASURES if name in kept]
    if kept == names:
        return MeasureChoice(names, f"{reason}; on the cpu, estimated {sample_passes(names):,.0f} sample passes "
                                    f"<= {CPU_COST_MARGIN} x training's {training_passes:,.0f}")
    dropped = ", ".join(name for name in names if name not in kept)
    return MeasureChoice(kept, f"{reason}; on the cpu, {dropped} dropped: all of them would take an estimated "
                               f"{sample_passes(names):,.0f} sample passes, over {CPU_COST_MARGIN} x training's "
                               f"{training_passes:,.0f} (these: {sample_passes(kept):,.0f})")


def measure(
    model: nn.Module,
    criterion: Criterion,
    batches: Sequence[Batch],
    *,
    rho: float,
    measures: Sequence[str] = MEASURES,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
    **options: float | int | bool,
) -> dict[str, float]:
    """Sharpness of `model` at its current weights: one key per requested measure, plus the documented extras.

    `criterion(model(inputs), targets)` must return the batch *mean* (reduction='mean'); batches are weighted
    by `len(targets)`; the model is measured in eval mode (BatchNorm running statistics, no dropout). Options
    (see `Options`): tolerance=1e-3, max_iterations=100, trace_probes=100, average_samples=100, worst_steps=20,
    worst_step_size=1.0, keskar_epsilon=1e-3, keskar_random_starts=4, keskar_steps=10, progress=False.
    Cost per batch of the data (F forward, B backward, HVP one forward, backward with graph and double
    backward): L(w) and its gradient, shared, 1 F+B; lambda_max k HVP (k <= max_iterations); alignment adds
    nothing to lambda_max; trace 1 F+B + trace_probes double backwards; ascent 1 F; average
    2 * average_samples F; worst worst_steps F+B + 1 F (plus ascent's); keskar at most
    S * (keskar_steps + 1) F+B over S = 1 + keskar_random_starts starts (+2 when lambda_max or alignment is
    requested too); a start stops early when a jump no longer raises L.
    Seeded by `seed` through local generators; the global RNG is untouched.
    `should_stop`, if given, is asked before every batch pass and Hessian-vector product, so that a caller
    asked to stop (a pre-empted job) need not wait for a measurement that can take minutes: when it answers
    True, `measure` raises MeasurementStopped.
    """
    names = checked_measures(measures)
    settings = checked_options(options)
    if rho <= 0 and any(name in _NEEDS_RHO for name in names):
        raise MeasureError(f"sharpness radius rho must be positive for {', '.join(_NEEDS_RHO)}, got {rho}")
    landscape = _Landscape(model, criterion, batches, rho=rho, seed=seed, options=settings, should_stop=should_stop)
    modes = {module: module.training for module in model.modules()}
    model.eval()  # BatchNorm uses (and keeps) its running statistics; dropout is off
    results: dict[str, float] = {}
    try:
        with torch.enable_grad(), _eager():
            if not bool(torch.isfinite(landscape.w).all()) or not math.isfinite(landscape.loss()):
                raise NotFinite("the weights or the loss at them are not finite (a diverged run?): sharpness "
                                "is undefined there; measure an earlier checkpoint")
            for name in sorted(names, key=lambda name: name == "keskar"):  # keskar last: it reuses v1 if known
                landscape.bar.set_description(f"sharpness/{name}")
                results.update(_MEASURE_FUNCTIONS[name](landscape))
    finally:
        landscape.close()
        for module, training in modes.items():
            module.training = training
    return results


def _eager() -> AbstractContextManager[None]:
    """Run a `torch.compile`d model (compile=true) eagerly: HVPs need double backward, which compiled graphs lack.

    Nothing can be compiled before torch._dynamo is loaded, and importing it costs seconds, so only then.
    """
    return torch.compiler.set_stance("force_eager") if "torch._dynamo" in sys.modules else nullcontext()


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters: those `measure` moves (D in docs/sharpness.md)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def checked_measures(measures: Sequence[str]) -> list[str]:
    """The measure names, each once; `MeasureError` names any unknown one (also the run spec's check)."""
    names = [measures] if isinstance(measures, str) else list(measures)
    unknown = [name for name in names if name not in MEASURES]
    if unknown:
        raise MeasureError(f"unknown sharpness measure(s) {unknown}; valid: {', '.join(MEASURES)}")
    return list(dict.fromkeys(names))


def checked_options(options: dict[str, float | int | bool]) -> Options:
    """`Options` from a dict; `MeasureError` names any unknown option (also the run spec's check)."""
    valid = [field.name for field in fields(Options)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise MeasureError(f"unknown sharpness option(s) {unknown}; valid: {', '.join(valid)}")
    return Options(**options)


def _derived_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed per (seed, labels) so each measure's randomness is independent of which others run."""
    digest = hashlib.blake2b(repr((seed, *labels)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _unit(vector: Tensor) -> Tensor:
    """vector / ||vector||, or the zero vector unchanged (no direction to take)."""
    norm = torch.linalg.vector_norm(vector)
    return vector / norm if norm > 0 else vector


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    return samples.mean().item(), (samples.std() / math.sqrt(samples.numel())).item()


@dataclass(frozen=True)
class _Eigenpair:
    value: float
    vector: Tensor
    iterations: int


class _Landscape:
    """L, its gradient and Hessian-vector products over all batches, at w or at w + v (flat vectors v)."""

    def __init__(self, model: nn.Module, criterion: Criterion, batches: Sequence[Batch], *, rho: float,
                 seed: int, options: Options, should_stop: Callable[[], bool] | None = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise MeasureError("the model has no parameters that require grad: nothing to measure")
        batches = list(batches)
        total = sum(len(targets) for _, targets in batches)
        if total == 0:
            raise MeasureError("sharpness needs at least one (inputs, targets) batch with samples")
        self.weighted_batches = [(inputs, targets, len(targets) / total) for inputs, targets in batches]
        self.model, self.criterion, self.rho, self.seed, self.options = model, criterion, rho, seed, options
        self.should_stop = should_stop
        self.origin = [p.detach().clone() for p in self.params]
        self.w = torch.cat([p.reshape(-1) for p in self.origin])
        self.bar = tqdm(disable=not options.progress, unit="batch", desc="sharpness")

    def close(self) -> None:
        self._restore()
        self.bar.close()

    # --- vectors -------------------------------------------------------------------------------------------

    def _split(self, vector: Tensor) -> list[Tensor]:
        chunks = vector.split([p.numel() for p in self.params])
        return [chunk.view_as(p) for chunk, p in zip(chunks, self.params)]

    @staticmethod
    def _flat(tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def generator(self, *labels: object) -> torch.Generator:
        return torch.Generator(device=self.w.device).manual_seed(_derived_seed(self.seed, *labels))

    def gaussian(self, generator: torch.Generator) -> Tensor:
        return torch.randn(self.w.shape, generator=generator, device=self.w.device, dtype=self.w.dtype)

    def random_signs(self, generator: torch.Generator) -> Tensor:
        bits = torch.randint(0, 2, self.w.shape, generator=generator, device=self.w.device)
        return (2 * bits - 1).to(self.w.dtype)

    # --- evaluation ----------------------------------------------------------------------------------------

    @contextmanager
    def _shifted(self, shift: Tensor | None) -> Iterator[None]:
        """Parameters at w + shift inside the block, copied back exactly (not subtracted) on leaving."""
        if shift is None:
            yield
            return
        with torch.no_grad():
            for p, p0, step in zip(self.params, self.origin, self._split(shift)):
                torch.add(p0, step, out=p)
        try:
            yield
        finally:
            self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self.origin):
                p.copy_(p0)

    def _stop_if_asked(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise MeasurementStopped("the sharpness measurement was asked to stop")

    def _batch_losses(self) -> Iterator[tuple[Tensor, float]]:
        for inputs, targets, weight in self.weighted_batches:
            self._stop_if_asked()
            yield self.criterion(self.model(inputs), targets), weight
            self.bar.update()

    def loss(self, shift: Tensor | None = None) -> float:
        """L(w + shift): one forward per batch."""
        with torch.no_grad(), self._shifted(shift):
            return sum(loss.double() * weight for loss, weight in self._batch_losses()).item()

    def loss_and_gradient(self, shift: Tensor | None = None) -> tuple[float, Tensor]:
        """L(w + shift) and its gradient as a flat vector: one forward and backward per batch."""
        total, gradient = torch.zeros((), dtype=torch.float64, device=self.w.device), torch.zeros_like(self.w)
        with self._shifted(shift):
            for loss, weight in self._batch_losses():
                grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
                gradient.add_(self._flat(grads), alpha=weight)
                total += loss.detach().double() * weight
        return total.item(), gradient

    def hessian_products(self) -> Iterator[Callable[[Tensor], Tensor]]:
        """Per batch, v -> weight * H_batch v by double backward; the batch's graph lives until the next one."""
        for loss, weight in self._batch_losses():
            grads = torch.autograd.grad(loss, self.params, create_graph=True, materialize_grads=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]  # a constant gradient has no curvature
            yield self._batch_hvp([grads[i] for i in live], live, weight)

    def _batch_hvp(self, grads: list[Tensor], live: list[int], weight: float) -> Callable[[Tensor], Tensor]:
        def product(vector: Tensor) -> Tensor:
            self._stop_if_asked()  # trace runs trace_probes products on one batch's graph
            if not grads:
                return torch.zeros_like(vector)
            chunks = self._split(vector)
            hv = torch.autograd.grad(grads, self.params, grad_outputs=[chunks[i] for i in live],
                                     retain_graph=True, materialize_grads=True)
            return self._flat(hv) * weight

        return product

    def hessian_product(self, vector: Tensor) -> Tensor:
        """H v over all batches: one HVP per batch."""
        return sum((product(vector) for product in self.hessian_products()), torch.zeros_like(vector))

    # --- shared, computed once per call --------------------------------------------------------------------

    @cached_property
    def base(self) -> tuple[float, Tensor]:
        """L(w) and the gradient at w."""
        return self.loss_and_gradient()

    @cached_property
    def ascent_shift(self) -> Tensor | None:
        """rho * grad / ||grad||, or None where the gradient is exactly zero (the direction is undefined)."""
        gradient = self.base[1]
        return self.rho * _unit(gradient) if bool(gradient.any()) else None

    @cached_property
    def ascent_sharpness(self) -> float:
        shift = self.ascent_shift
        return math.nan if shift is None else self.loss(shift) - self.base[0]

    @property
    def known_top_eigenvector(self) -> Tensor | None:
        """v1 if lambda_max or alignment has already run Lanczos in this call, else None (nothing is computed)."""
        pair = self.__dict__.get("top_eigenpair")  # where cached_property keeps its value once computed
        return None if pair is None else pair.vector

    @cached_property
    def top_eigenpair(self) -> _Eigenpair:
        start = self.gaussian(self.generator("lambda_max"))
        pair, converged = _lanczos(self.hessian_product, start, self.options.tolerance, self.options.max_iterations)
        if not converged:
            warnings.warn(f"Lanczos did not reach tolerance {self.options.tolerance} in {pair.iterations} "
                          "iterations; lambda_max is a lower estimate", RuntimeWarning)
        return pair


def _lanczos(apply: Callable[[Tensor], Tensor], start: Tensor, tolerance: float,
             max_iterations: int) -> tuple[_Eigenpair, bool]:
    """Largest algebraic eigenpair of the symmetric operator `apply` by Lanczos with full reorthogonalization.

    Stops when the Ritz residual ||H y - theta y|| = beta_k |s_k| is <= tolerance * |theta| (an eigenvalue
    lies within it of theta), when the Krylov space fills the whole space, or after max_iterations products.
    """
    basis, alphas, betas = [_unit(start)], [], []
    for iteration in range(1, max_iterations + 1):
        product = apply(basis[-1])
        alphas.append(torch.dot(basis[-1], product).item())
        for _ in range(2):  # Gram-Schmidt twice against the whole basis: the three-term recurrence, made stable
            for q in basis:
                product -= torch.dot(q, product) * q
        beta = torch.linalg.vector_norm(product).item()
        values, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        converged = beta * abs(vectors[-1, -1].item()) <= tolerance * abs(values[-1].item())
        if converged or iteration == start.numel() or iteration == max_iterations:
            break
        betas.append(beta)
        basis.append(product / beta)
    ritz = torch.zeros_like(start)
    for coefficient, q in zip(vectors[:, -1].tolist(), basis):
        ritz.add_(q, alpha=coefficient)
    return _Eigenpair(values[-1].item(), ritz, iteration), converged or iteration == start.numel()


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    off = torch.tensor(betas, dtype=torch.float64)
    return torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)


def _projected_ascent(landscape: _Landscape, start: Tensor, step: Callable[[Tensor, Tensor], Tensor],
                      steps: int) -> float:
    """Best loss seen along start, step(start, grad), ... after `steps` gradient steps: a lower bound."""
    shift, best = start, -math.inf
    for _ in range(steps):
        loss, gradient = landscape.loss_and_gradient(shift)
        best = max(best, loss)
        shift = step(shift, gradient)
    return max(best, landscape.loss(shift))


# --- the measures: each maps a landscape to its result keys --------------------------------------------------


def _lambda_max(landscape: _Landscape) -> dict[str, float]:
    pair = landscape.top_eigenpair
    return {"lambda_max": pair.value, "lambda_max_iterations": pair.iterations}


def _alignment(landscape: _Landscape) -> dict[str, float]:
    """|cos(grad, v1)|; NaN where the gradient is exactly zero."""
    gradient, top = landscape.base[1], landscape.top_eigenpair.vector
    norms = torch.linalg.vector_norm(gradient) * torch.linalg.vector_norm(top)
    return {"alignment": (torch.dot(gradient, top).abs() / norms).item() if norms > 0 else math.nan}


def _trace(landscape: _Landscape) -> dict[str, float]:
    """Hutchinson: z^T H z over Rademacher z; probes are regenerated per batch so each batch's graph is built
    once and serves every probe."""
    probes = landscape.options.trace_probes
    estimates = torch.zeros(probes, dtype=torch.float64, device=landscape.w.device)
    for product in landscape.hessian_products():
        for i in range(probes):
            probe = landscape.random_signs(landscape.generator("trace", i))
            estimates[i] += torch.dot(probe, product(probe)).double()
    mean, stderr = _mean_and_stderr(estimates)
    return {"trace": mean, "trace_stderr": stderr}


def _ascent(landscape: _Landscape) -> dict[str, float]:
    return {"ascent": landscape.ascent_sharpness}


def _average(landscape: _Landscape) -> dict[str, float]:
    """Antithetic pairs (L(w + rho u) + L(w - rho u)) / 2 - L(w): the same expectation as L(w + rho u) - L(w)
    (u and -u are equally likely), with the first-order term rho grad.u, which dominates the plain estimator's
    variance away from a minimum, cancelled in every pair."""
    generator, base_loss = landscape.generator("average"), landscape.base[0]
    samples = []
    for _ in range(landscape.options.average_samples):
        shift = landscape.rho * _unit(landscape.gaussian(generator))
        samples.append((landscape.loss(shift) + landscape.loss(-shift)) / 2 - base_loss)
    mean, stderr = _mean_and_stderr(torch.tensor(samples, dtype=torch.float64))
    return {"average": mean, "average_stderr": stderr}


def _worst(landscape: _Landscape) -> dict[str, float]:
    """Projected gradient ascent on the sphere from the ascent direction (a random one where grad = 0)."""
    rho, size = landscape.rho, landscape.options.worst_step_size
    start = landscape.ascent_shift
    if start is None:
        start = rho * _unit(landscape.gaussian(landscape.generator("worst")))

    def step(shift: Tensor, gradient: Tensor) -> Tensor:
        return rho * _unit(shift + size * rho * _unit(gradient))

    best = _projected_ascent(landscape, start, step, landscape.options.worst_steps) - landscape.base[0]
    ascent = landscape.ascent_sharpness
    return {"worst": best if math.isnan(ascent) else max(best, ascent)}


def _keskar(landscape: _Landscape) -> dict[str, float]:
    """phi = 100 (max L(w + y) - L(w)) / (1 + L(w)) over the box |y_i| <= eps(|w_i| + 1), the max taken over
    corner ascents from several corners: sign(grad), seeded random ones, and +-sign(v1) when Lanczos has run.

    Near a minimum sign(grad) is noise, so one start reaches only part of the box maximum; more starts, and
    the top eigenvector's corners (where L grows fastest), make the lower bound tight. y = 0 counts too, so
    phi >= 0 as in its definition.
    """
    options, (base_loss, gradient) = landscape.options, landscape.base
    half = options.keskar_epsilon * (landscape.w.abs() + 1)
    generator = landscape.generator("keskar")
    corners = [_corner(gradient, landscape.random_signs(generator))]
    corners += [landscape.random_signs(generator) for _ in range(options.keskar_random_starts)]
    top = landscape.known_top_eigenvector  # drawn after the random corners: those stay the same either way
    if top is not None:
        corner = _corner(top, landscape.random_signs(generator))
        corners += [corner, -corner]
    best = max([base_loss] + [_corner_ascent(landscape, half * signs, half, options.keskar_steps)
                              for signs in corners])
    return {"keskar": 100 * (best - base_loss) / (1 + base_loss), "keskar_starts": len(corners)}


def _corner(direction: Tensor, fallback: Tensor) -> Tensor:
    """sign(direction) as a +-1 vector, with `fallback`'s signs where an entry is exactly zero."""
    return torch.where(direction != 0, direction.sign(), fallback)


def _corner_ascent(landscape: _Landscape, start: Tensor, half: Tensor, jumps: int) -> float:
    """Largest L found by jumping from corner to corner of the box |y| <= half: each jump goes to the corner
    that maximizes L's linearization at the current one, y <- half * sign(grad L(w + y)), and is kept only
    if L rises. Where L is convex in the box (near a minimum) no jump can lower L, so stopping at the first
    one that does not raise it stops at a fixed point. At most `jumps` + 1 forward-backward passes."""
    shift = start
    loss, gradient = landscape.loss_and_gradient(shift)
    for _ in range(jumps):
        target = torch.where(gradient != 0, half * gradient.sign(), shift)
        if torch.equal(target, shift):
            break
        target_loss, target_gradient = landscape.loss_and_gradient(target)
        if target_loss <= loss:
            break
        shift, loss, gradient = target, target_loss, target_gradient
    return loss


_MEASURE_FUNCTIONS: dict[str, Callable[[_Landscape], dict[str, float]]] = {
    "lambda_max": _lambda_max, "trace": _trace, "worst": _worst, "ascent": _ascent, "average": _average,
    "keskar": _keskar, "alignment": _alignment,
}
assert tuple(_MEASURE_FUNCTIONS) == MEASURES
