"""sharpness.measure against independent references (explicit Hessians, closed forms, brute force); its cost
estimate against counted passes, and what `auto` chooses."""

import itertools
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_json, run_in_process
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

from sam_runner.run.measurement import training_passes
from sam_runner.sharpness import (
    CHEAP_PARAMETER_LIMIT,
    COSTLY_MEASURES,
    CPU_COST_MARGIN,
    MEASURES,
    default_measures,
    estimate_cost,
    measure,
)

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: intra-op threads only add overhead, and thrash on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models and data --------------------------------------------------------------------------------------------


def mlp_problem(seed: int = 0):
    """2-layer tanh MLP, 3 -> 8 -> 2 (50 parameters), squared error on random data, two unequal batches."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(DTYPE)
    inputs, targets = torch.randn(20, 3, dtype=DTYPE), torch.randn(20, 2, dtype=DTYPE)
    return model, nn.MSELoss(), [(inputs[:7], targets[:7]), (inputs[7:], targets[7:])]


def softmax_problem(seed: int = 0):
    """Softmax regression, 5 features -> 4 classes (24 parameters), cross-entropy, two unequal batches."""
    torch.manual_seed(seed)
    model = nn.Linear(5, 4).to(DTYPE)
    inputs, targets = torch.randn(30, 5, dtype=DTYPE), torch.randint(0, 4, (30,))
    return model, nn.CrossEntropyLoss(), [(inputs[:11], targets[:11]), (inputs[11:], targets[11:])]


PROBLEMS = {"mlp": mlp_problem, "softmax": softmax_problem}


class Quadratic(nn.Module):
    """A 'model' whose output is the loss 1/2 (w - center)^T A (w - center); it ignores its inputs."""

    def __init__(self, matrix: torch.Tensor, center: torch.Tensor, start: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(start.clone())
        self.register_buffer("matrix", matrix)
        self.register_buffer("center", center)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        offset = self.w - self.center
        return 0.5 * offset @ self.matrix @ offset


def loss_output(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return output


QUADRATIC_BATCHES = [(torch.zeros(1), torch.zeros(1))]


def quadratic(eigenvalues: list[float], seed: int = 0, at_minimum: bool = True) -> tuple[Quadratic, torch.Tensor]:
    """A = Q diag(eigenvalues) Q^T with a random rotation Q; w at the center or at a random point."""
    generator = torch.Generator().manual_seed(seed)
    size = len(eigenvalues)
    rotation, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=DTYPE))
    matrix = rotation @ torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)) @ rotation.T
    center = torch.randn(size, generator=generator, dtype=DTYPE)
    start = center if at_minimum else center + torch.randn(size, generator=generator, dtype=DTYPE)
    return Quadratic(matrix, center, start), matrix


# --- the explicit reference: L as a function of the flattened parameter vector ----------------------------------


def flat_loss(model: nn.Module, criterion, batches):
    """theta -> size-weighted mean loss over all samples with the model in eval mode; and theta at w."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    total = sum(len(targets) for _, targets in batches)

    def loss(vector: torch.Tensor) -> torch.Tensor:
        chunks = vector.split([math.prod(shape) for shape in shapes])
        params = {name: chunk.view(shape) for name, chunk, shape in zip(names, chunks, shapes)}
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            return sum(criterion(functional_call(model, params, (x,)), y) * len(y) for x, y in batches) / total
        finally:
            for module, training in modes.items():
                module.training = training

    return loss, theta


def explicit(model, criterion, batches):
    """L(w), grad L(w), the full Hessian and the function theta -> L(theta), from torch.autograd.functional."""
    loss, theta = flat_loss(model, criterion, batches)
    point = theta.clone().requires_grad_()
    value = loss(point)
    (gradient,) = torch.autograd.grad(value, point)
    return value.item(), gradient, hessian(loss, theta), loss, theta


# --- Hessian measures against the explicit matrix ------------------------------------------------------------


@pytest.mark.parametrize("name", PROBLEMS)
def test_lambda_max_and_alignment_match_the_explicit_hessian(name):
    model, criterion, batches = PROBLEMS[name]()
    _, gradient, matrix, _, _ = explicit(model, criterion, batches)
    values, vectors = torch.linalg.eigh(matrix)
    assert values[-1] - values[-2] > 1e-3 * values[-1].abs()  # a gap, so the top eigenvector is well defined
    expected_alignment = (gradient @ vectors[:, -1]).abs() / gradient.norm()

    result = measure(model, criterion, batches, rho=0.05, measures=["lambda_max", "alignment"], tolerance=1e-8)

    assert result["lambda_max"] == pytest.approx(values[-1].item(), rel=1e-6)
    assert result["alignment"] == pytest.approx(expected_alignment.item(), abs=1e-5)
    assert 1 <= result["lambda_max_iterations"] <= matrix.shape[0]


@pytest.mark.parametrize("name", PROBLEMS)
def test_lambda_max_at_default_tolerance(name):
    model, criterion, batches = PROBLEMS[name]()
    top = torch.linalg.eigvalsh(explicit(model, criterion, batches)[2])[-1].item()
    assert measure(model, criterion, batches, rho=0.05, measures=["lambda_max"])["lambda_max"] == pytest.approx(
        top, rel=1e-3)


def test_lambda_max_is_the_largest_algebraic_eigenvalue_not_the_largest_magnitude():
    eigenvalues = [2.0, 1.0, 0.5, -1.0, -5.0]
    model, _ = quadratic(eigenvalues, at_minimum=False)
    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["lambda_max"])
    assert result["lambda_max"] == pytest.approx(2.0, rel=1e-3)


def test_lambda_max_of_an_indefinite_mlp_hessian():
    """At a random initialization the MLP's Hessian is indefinite; check the sign pattern and the value."""
    model, criterion, batches = mlp_problem(seed=3)
    values = torch.linalg.eigvalsh(explicit(model, criterion, batches)[2])
    assert values[0] < 0 < values[-1]
    result = measure(model, criterion, batches, rho=0.05, measures=["lambda_max"])
    assert result["lambda_max"] == pytest.approx(values[-1].item(), rel=1e-3)


@pytest.mark.parametrize("name", PROBLEMS)
def test_trace_within_four_standard_errors_of_the_explicit_trace(name):
    """4 rather than 3 standard errors: the seed is fixed, and at 3 one case in ~370 fails by chance alone."""
    model, criterion, batches = PROBLEMS[name]()
    exact = torch.trace(explicit(model, criterion, batches)[2]).item()
    result = measure(model, criterion, batches, rho=0.05, measures=["trace"])
    assert result["trace_stderr"] > 0
    assert abs(result["trace"] - exact) <= 4 * result["trace_stderr"]


def test_trace_of_a_diagonal_quadratic_is_exact():
    """z^T A z = Tr A for every Rademacher z when A is diagonal: the estimate is exact, its error zero."""
    eigenvalues = [3.0, 1.0, 0.25, -0.5]
    model = Quadratic(torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)), torch.zeros(4, dtype=DTYPE),
                      torch.ones(4, dtype=DTYPE))
    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["trace"])
    assert result["trace"] == pytest.approx(sum(eigenvalues), rel=1e-12)
    assert result["trace_stderr"] == pytest.approx(0.0, abs=1e-12)


# --- radius-rho sharpness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROBLEMS)
def test_ascent_matches_a_direct_evaluation(name):
    model, criterion, batches = PROBLEMS[name]()
    value, gradient, _, loss, theta = explicit(model, criterion, batches)
    rho = 0.1
    with torch.no_grad():
        expected = loss(theta + rho * gradient / gradient.norm()).item() - value
    result = measure(model, criterion, batches, rho=rho, measures=["ascent"])
    assert result["ascent"] == pytest.approx(expected, rel=1e-10)


def test_ascent_is_nan_where_the_gradient_is_zero():
    model, _ = quadratic([1.0, 2.0])
    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.1, measures=["ascent", "alignment"])
    assert math.isnan(result["ascent"]) and math.isnan(result["alignment"])


def test_average_at_a_quadratic_minimum_is_rho_squared_trace_over_2d():
    eigenvalues = [5.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1]
    model, _ = quadratic(eigenvalues)
    rho = 0.1
    expected = rho**2 * sum(eigenvalues) / (2 * len(eigenvalues))
    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=rho, measures=["average"])
    assert result["average_stderr"] > 0
    assert abs(result["average"] - expected) <= 4 * result["average_stderr"]
    assert result["average"] == pytest.approx(expected, rel=0.1)


def test_average_far_from_a_quadratic_minimum_is_rho_squared_trace_over_2d_with_a_small_error():
    """Far from the minimum the first-order term rho grad.u dominates a plain Monte Carlo sample; each
    antithetic pair cancels it, leaving rho^2 u^T A u / 2 exactly (the quadratic has no higher terms)."""
    eigenvalues = [5.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1]
    matrix = quadratic(eigenvalues)[1]
    generator = torch.Generator().manual_seed(1)
    center, offset = torch.zeros(10, dtype=DTYPE), 5 * torch.randn(10, generator=generator, dtype=DTYPE)
    model = Quadratic(matrix, center, center + offset)
    rho = 0.1
    expected = rho**2 * sum(eigenvalues) / (2 * len(eigenvalues))

    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=rho, measures=["average"])

    assert abs(result["average"] - expected) <= 4 * result["average_stderr"]
    assert result["average"] == pytest.approx(expected, rel=0.1)
    directions = torch.randn(100, 10, generator=generator, dtype=DTYPE)
    directions = rho * directions / directions.norm(dim=1, keepdim=True)
    plain = [0.5 * (offset + u) @ matrix @ (offset + u) - 0.5 * offset @ matrix @ offset for u in directions]
    plain_stderr = torch.stack(plain).std().item() / 10
    assert (matrix @ offset).norm() > 10  # far from the minimum: a large gradient
    assert result["average_stderr"] < plain_stderr / 100


class LinearLoss(nn.Module):
    """A 'model' whose output is the loss a.w + b: no curvature, so every average sharpness is zero."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(20, generator=generator, dtype=DTYPE))
        self.register_buffer("a", 10 * torch.randn(20, generator=generator, dtype=DTYPE))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.a @ self.w + 3.0


def test_average_of_a_linear_loss_is_zero_the_first_order_term_cancels():
    result = measure(LinearLoss(), loss_output, QUADRATIC_BATCHES, rho=0.5, measures=["average", "ascent"])
    assert result["ascent"] > 10  # a plain sample L(w + rho u) - L(w) = rho a.u is of this size
    assert abs(result["average"]) < 1e-12 and result["average_stderr"] < 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_worst_at_a_quadratic_minimum_is_rho_squared_lambda_over_2(seed):
    """20 steps from a random direction (grad = 0 here) come within 1%; more steps converge to the maximum."""
    eigenvalues = [5.0, 3.0, 2.0, 1.0, 0.5, 0.1]
    model, _ = quadratic(eigenvalues, seed=seed)
    rho = 0.1
    exact = rho**2 * max(eigenvalues) / 2
    default = measure(model, loss_output, QUADRATIC_BATCHES, rho=rho, measures=["worst"], seed=seed)["worst"]
    longer = measure(model, loss_output, QUADRATIC_BATCHES, rho=rho, measures=["worst"], seed=seed, worst_steps=200)
    assert exact * 0.99 <= default <= longer["worst"] <= exact * (1 + 1e-12)  # a lower bound, never above
    assert longer["worst"] == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_worst_is_never_below_ascent_nor_above_the_quadratic_bound(seed):
    eigenvalues = [4.0, 2.0, 1.0, -1.0, -3.0]
    model, _ = quadratic(eigenvalues, seed=seed, at_minimum=False)
    gradient_norm = (model.matrix @ (model.w - model.center)).norm().item()
    rho = 0.5
    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=rho, measures=["ascent", "worst"])
    assert result["worst"] >= result["ascent"]
    assert result["worst"] <= rho * gradient_norm + rho**2 * max(eigenvalues) / 2  # g.v + v^T A v / 2 on ||v||=rho


@pytest.mark.parametrize("name", PROBLEMS)
def test_worst_is_never_below_ascent_on_networks(name):
    model, criterion, batches = PROBLEMS[name](seed=1)
    for rho in (0.05, 0.5):
        result = measure(model, criterion, batches, rho=rho, measures=["ascent", "worst"])
        assert result["worst"] >= result["ascent"] > 0


# --- Keskar et al. epsilon-sharpness ---------------------------------------------------------------------------


def test_keskar_at_a_diagonal_quadratic_minimum_matches_the_closed_form():
    """At the minimum of a diagonal PSD quadratic every box corner attains the maximum 1/2 sum A_ii b_i^2."""
    diagonal = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=DTYPE)
    center = torch.tensor([0.3, -2.0, 0.0, 1.5, -0.7], dtype=DTYPE)
    model = Quadratic(torch.diag(diagonal), center, center)
    epsilon = 1e-3
    half_width = epsilon * (center.abs() + 1)
    expected = 100 * 0.5 * (diagonal * half_width**2).sum().item() / (1 + 0.0)
    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["keskar"], keskar_epsilon=epsilon)
    assert result["keskar"] == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_keskar_matches_a_brute_force_search_over_box_corners(seed):
    """A convex function's maximum over a box is at a corner: search all 2^6 of them."""
    model, matrix = quadratic([3.0, 2.0, 1.0, 0.6, 0.3, 0.1], seed=seed, at_minimum=False)
    epsilon = 0.05
    w, center = model.w.detach(), model.center

    def loss(point):
        return 0.5 * (point - center) @ matrix @ (point - center)

    half_width = epsilon * (w.abs() + 1)
    corners = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=6)), dtype=DTYPE)
    best = max(loss(w + corner * half_width).item() for corner in corners)
    expected = 100 * (best - loss(w).item()) / (1 + loss(w).item())

    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["keskar"], keskar_epsilon=epsilon)
    assert result["keskar"] == pytest.approx(expected, rel=1e-10)


NETWORK_LIKE = [10.0, 4.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]  # a few large eigenvalues, a small bulk


def brute_force_keskar(model: Quadratic, epsilon: float) -> float:
    """phi over all 2^D corners of the box: exact for a convex quadratic (its maximum is at a corner)."""
    w, center, matrix = model.w.detach(), model.center, model.matrix
    half_width = epsilon * (w.abs() + 1)
    corners = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=len(w))), dtype=DTYPE) * half_width
    offsets = w + corners - center
    base = 0.5 * (w - center) @ matrix @ (w - center)
    return (100 * (0.5 * ((offsets @ matrix) * offsets).sum(1).max() - base) / (1 + base)).item()


@pytest.mark.parametrize("with_eigenvector", [False, True], ids=["keskar-alone", "with-lambda_max"])
def test_keskar_at_a_quadratic_minimum_reaches_95_percent_of_the_brute_force_maximum(with_eigenvector):
    """At a minimum sign(grad) is no guide (here grad = 0: a random corner); a single start reached 54% and
    61% of the maximum on seeds 11 and 6. Every seed must reach 95%, and never exceed the maximum."""
    measures = ["lambda_max", "keskar"] if with_eigenvector else ["keskar"]
    reached = {}
    for seed in range(12):
        model, _ = quadratic(NETWORK_LIKE, seed=seed)
        result = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=measures, seed=seed)
        reached[seed] = result["keskar"] / brute_force_keskar(model, 1e-3)
    assert all(0.95 <= fraction <= 1 + 1e-9 for fraction in reached.values()), reached


def test_keskar_adds_the_top_eigenvector_corners_when_lanczos_has_run():
    """Two more starts, the same random ones: never lower; the measure order does not matter."""
    model, _ = quadratic(NETWORK_LIKE, seed=6)
    alone = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["keskar"])
    first = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["keskar", "lambda_max"])
    last = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["alignment", "keskar"])
    assert (alone["keskar_starts"], first["keskar_starts"], last["keskar_starts"]) == (5, 7, 7)
    assert first["keskar"] == last["keskar"] >= alone["keskar"]
    single = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["keskar"], keskar_random_starts=0)
    assert single["keskar_starts"] == 1 and single["keskar"] <= alone["keskar"]


def test_keskar_is_zero_at_a_maximum():
    """y = 0 is in the box, so phi >= 0: at a maximum every corner is lower and phi is exactly 0."""
    model, _ = quadratic([-1.0, -2.0, -0.5], seed=0)
    assert measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["keskar"])["keskar"] == 0.0


def test_keskar_is_a_lower_bound_in_a_large_box():
    """In a box large against the curvature the ascent can stop at a local-maximum corner: never above the
    brute-force maximum, never below the value at its starting corner sign(grad)."""
    model, matrix = quadratic([3.0, 2.0, 1.0, 0.6, 0.3, 0.1], seed=0, at_minimum=False)
    w, center = model.w.detach(), model.center
    half_width = 0.5 * (w.abs() + 1)
    gradient = matrix @ (w - center)

    def phi(shift):
        base = 0.5 * (w - center) @ matrix @ (w - center)
        return (100 * (0.5 * (w + shift - center) @ matrix @ (w + shift - center) - base) / (1 + base)).item()

    corners = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=6)), dtype=DTYPE)
    result = measure(model, loss_output, QUADRATIC_BATCHES, rho=0.05, measures=["keskar"], keskar_epsilon=0.5)
    assert phi(half_width * gradient.sign()) <= result["keskar"] <= max(phi(c * half_width) for c in corners)


# --- state, weighting, seeding, errors --------------------------------------------------------------------------


def batch_norm_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    model = model.to(DTYPE).train()
    inputs, targets = torch.randn(24, 4, dtype=DTYPE), torch.randint(0, 3, (24,))
    for _ in range(3):  # running statistics away from their initial values
        model(inputs)
    return model, nn.CrossEntropyLoss(), [(inputs[:10], targets[:10]), (inputs[10:], targets[10:])]


SMALL = dict(max_iterations=20, trace_probes=10, average_samples=10, worst_steps=3, keskar_steps=3,
             keskar_random_starts=1)


def test_batch_norm_model_is_measured_in_eval_mode_and_left_exactly_as_found():
    model, criterion, batches = batch_norm_problem()
    model[4].eval()  # a mixed-mode model: each module's own flag must come back
    state = {key: value.clone() for key, value in model.state_dict().items()}
    value, gradient, _, loss, theta = explicit(model, criterion, batches)  # eval-mode reference

    result = measure(model, criterion, batches, rho=0.1, measures=MEASURES, **SMALL)

    with torch.no_grad():
        expected_ascent = loss(theta + 0.1 * gradient / gradient.norm()).item() - value
    assert result["ascent"] == pytest.approx(expected_ascent, rel=1e-10)
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert model.training and model[1].training and model[3].training and not model[4].training
    assert all(p.grad is None for p in model.parameters())


def test_batches_are_weighted_by_size():
    model, criterion, batches = mlp_problem()
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    split = measure(model, criterion, batches, rho=0.1, **SMALL)
    joined = measure(model, criterion, whole, rho=0.1, **SMALL)
    assert split.keys() == joined.keys() == set(MEASURES) | {"lambda_max_iterations", "trace_stderr",
                                                             "average_stderr", "keskar_starts"}
    assert split == pytest.approx(joined, rel=1e-9, abs=1e-12)


def test_same_seed_gives_the_same_numbers_and_leaves_the_global_rng_alone():
    model, criterion, batches = mlp_problem()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = measure(model, criterion, batches, rho=0.1, seed=7, **SMALL)
    assert torch.equal(torch.get_rng_state(), before)
    assert measure(model, criterion, batches, rho=0.1, seed=7, **SMALL) == first
    other = measure(model, criterion, batches, rho=0.1, seed=8, **SMALL)
    assert other["trace"] != first["trace"] and other["average"] != first["average"]


def test_a_measure_does_not_depend_on_which_others_are_requested():
    model, criterion, batches = mlp_problem()
    alone = measure(model, criterion, batches, rho=0.1, measures=["average"], **SMALL)
    together = measure(model, criterion, batches, rho=0.1, **SMALL)
    assert alone["average"] == together["average"]


def test_unknown_measure_or_option_raises_value_error_naming_the_valid_ones():
    model, criterion, batches = mlp_problem()
    with pytest.raises(ValueError, match="lambda_max, trace, worst"):
        measure(model, criterion, batches, rho=0.1, measures=["sharpest"])
    with pytest.raises(ValueError, match="trace_probes"):
        measure(model, criterion, batches, rho=0.1, trace_probe=10)
    with pytest.raises(ValueError, match="rho"):
        measure(model, criterion, batches, rho=0.0, measures=["worst"])
    with pytest.raises(ValueError, match="trace_probes"):
        measure(model, criterion, batches, rho=0.1, trace_probes=1)
    with pytest.raises(ValueError, match="keskar_random_starts must be at least 0"):
        measure(model, criterion, batches, rho=0.1, keskar_random_starts=-1)


# --- cost and the `auto` choice ---------------------------------------------------------------------------------

# Options under which every measure's pass count is known exactly: Lanczos runs all 5 steps (a zero tolerance is
# never met), each Keskar start takes its one forward-backward (no jumps).
EXACT = {"max_iterations": 5, "tolerance": 0.0, "trace_probes": 3, "average_samples": 4, "worst_steps": 3,
         "keskar_random_starts": 2, "keskar_steps": 0}


def counted_forwards(measures, **options) -> tuple[int, int]:
    """Forward calls `measure` makes on the MLP problem, and the estimate of them."""
    model, criterion, batches = mlp_problem()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    measure(model, criterion, batches, rho=0.1, measures=measures, **options)
    return len(calls), estimate_cost(measures, len(batches), sum(p.numel() for p in model.parameters()),
                                     **options).forward


@pytest.mark.filterwarnings("ignore:Lanczos did not reach tolerance")
@pytest.mark.parametrize("measures", [[name] for name in MEASURES] + [list(MEASURES), ["worst", "ascent"]])
def test_the_cost_estimate_counts_every_forward_pass(measures):
    counted, estimated = counted_forwards(measures, **EXACT)
    assert counted == estimated


def test_the_cost_estimate_bounds_the_passes_under_the_default_options():
    counted, estimated = counted_forwards(list(MEASURES))
    assert 0 < counted <= estimated
    assert estimate_cost(["lambda_max"], 2, 50).forward == 2 * (1 + 50)  # Lanczos stops at the full dimension


def test_auto_takes_every_measure_of_a_small_model_but_the_cheap_ones_of_a_large_model_on_a_gpu():
    small, large = nn.Linear(100, 10), nn.Linear(1000, CHEAP_PARAMETER_LIMIT // 1000)  # just over the limit
    cheap = [name for name in MEASURES if name not in COSTLY_MEASURES]
    for device in ("cpu", "cuda"):  # without a training budget the device does not matter
        assert default_measures(small, device=device).measures == list(MEASURES)
        assert default_measures(large, device=device).measures == cheap
    choice = default_measures(large, device="cuda", num_batches=1, num_samples=200, training_passes=400)
    assert choice.measures == cheap and "> 1,000,000" in choice.reason


def test_auto_on_a_cpu_keeps_the_measurement_within_a_margin_of_the_training():
    small, large = nn.Linear(100, 10), nn.Linear(1000, CHEAP_PARAMETER_LIMIT // 1000)
    long_training = 100 * 4000 * 2  # the README's SGD job: 100 epochs of 4000 samples, a forward and a backward
    assert default_measures(small, device="cpu", num_batches=4, num_samples=1024,
                            training_passes=long_training).measures == list(MEASURES)
    for model in (small, large):  # one epoch on 200 samples: hardly anything is worth its cost
        choice = default_measures(model, device="cpu", num_batches=1, num_samples=200, training_passes=400)
        assert choice.measures == ["ascent"] and "dropped" in choice.reason
    choice = default_measures(small, device="cpu", num_batches=4, num_samples=1024, training_passes=20 * 4000 * 2)
    estimate = estimate_cost(choice.measures, 4, 1010).passes / 4 * 1024
    assert estimate <= CPU_COST_MARGIN * 20 * 4000 * 2 and "ascent" in choice.measures
    assert len(choice.measures) < len(MEASURES)


def test_each_measurement_is_weighed_against_its_share_of_the_training():
    assert training_passes(100, 4000, sam=False, every=0) == 800_000  # a forward and a backward per sample
    assert training_passes(100, 4000, sam=True, every=0) == 1_600_000  # two of each with SAM
    assert training_passes(100, 4000, sam=False, every=30) == 160_000  # step 0, epochs 30, 60, 90 and the end
    assert training_passes(100, 4000, sam=False, every=50) == 800_000 / 3  # step 0, epochs 50 and 100 (the end)
    # step 0, steps 1000, 2000 and 3000 of 3200, and the end
    assert training_passes(100, 4000, sam=False, every=0, every_steps=1000, total_steps=3200) == 160_000


def test_a_run_logs_what_it_measures_and_records_why(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The lines of the run's log (sam-run writes them to its sam-run.log), read from the logger in process."""
    caplog.set_level(logging.INFO, logger="sam_runner")
    run_dir = run_in_process(workdir, monkeypatch, *TINY, "sharpness.measures=auto")
    log = caplog.text
    assert "sharpness.measures auto: ascent (" in log and "on the cpu" in log
    before = log.index("sharpness at epoch 2, step 8: measuring ascent on 128 samples; estimate: at most 3 forward "
                       "and 1 backward batch passes (1 batches of <= 256)")
    assert before < log.index("sharpness at epoch 2, step 8 (")  # announced before it starts, then its result
    record = read_json(run_dir / "summary.json")["measurements"][-1]
    assert record["measures"] == ["ascent"] and "dropped" in record["chosen_by"]
    assert record["estimated_passes"] == {"forward": 3, "backward": 1}
