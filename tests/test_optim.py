"""SAM against hand-written float64 references, the contracts of the optimizer, and two behaviour checks."""

import copy
import functools
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from sam_runner.cli.preflight import CONFIG_DIR
from sam_runner.errors import ConfigError
from sam_runner.optim import SAM
from sam_runner.run.build import build_optimizer

# ---------------------------------------------------------------------------------------------------------
# A least-squares model with closed-form gradients: L(W, b) = ½·mean_n ‖W xₙ + b − yₙ‖².


def _problem() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    w0 = 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    b0 = 0.5 * torch.randn(3, generator=g, dtype=torch.float64)
    return x, y, w0, b0


def _loss(w, b, x, y):
    return 0.5 * ((x @ w.T + b - y) ** 2).sum(1).mean()


def _grads(w, b, x, y) -> list[torch.Tensor]:
    r = x @ w.T + b - y
    return [r.T @ x / len(x), r.mean(0)]


def _reference_eps(ws, gs, rhos, adaptive, eta, decays):
    """ε by the formula of REFERENCE.md §1, one tensor per parameter."""
    gs = [g + d * w for w, g, d in zip(ws, gs, decays)]
    ts = [w.abs() + eta if adaptive else torch.ones_like(w) for w in ws]
    norm = math.sqrt(sum(float(((t * g) ** 2).sum()) for t, g in zip(ts, gs)))
    return [r * t * t * g / (norm + 1e-12) for r, t, g in zip(rhos, ts, gs)]


class _RefSGD:
    """torch.optim.SGD's documented update (dampening 0), written out."""

    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.lr, self.mu, self.nesterov, self.wd, self.buf = lr, momentum, nesterov, weight_decay, None

    def __call__(self, ws, gs):
        ds = [g + self.wd * w for w, g in zip(ws, gs)]
        if self.mu:
            self.buf = ds if self.buf is None else [self.mu * b + d for b, d in zip(self.buf, ds)]
            ds = [d + self.mu * b for d, b in zip(ds, self.buf)] if self.nesterov else self.buf
        return [w - self.lr * d for w, d in zip(ws, ds)]


class _RefAdamW:
    """Loshchilov & Hutter's AdamW with bias correction, written out."""

    def __init__(self, lr, betas, eps, weight_decay):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.t, self.m, self.v = 0, None, None

    def __call__(self, ws, gs):
        self.t += 1
        self.m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(self.m or [0 * g for g in gs], gs)]
        self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v or [0 * g for g in gs], gs)]
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        return [w * (1 - self.lr * self.wd) - self.lr * (m / c1) / ((v / c2).sqrt() + self.eps)
                for w, m, v in zip(ws, self.m, self.v)]


SGD_MOMENTUM = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
ADAMW = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
CASES = {  # name: (base class, base kwargs, SAM kwargs, (rho of W, rho of b) or None, reference factory)
    "sgd": (torch.optim.SGD, dict(lr=0.1), dict(rho=0.05), None, lambda: _RefSGD(lr=0.1)),
    "sgd-momentum-wd": (torch.optim.SGD, SGD_MOMENTUM, dict(rho=0.05), None, lambda: _RefSGD(**SGD_MOMENTUM)),
    "sgd-nesterov-wd": (torch.optim.SGD, dict(SGD_MOMENTUM, nesterov=True), dict(rho=0.1), None,
                        lambda: _RefSGD(nesterov=True, **SGD_MOMENTUM)),
    "adamw": (torch.optim.AdamW, ADAMW, dict(rho=0.05), None, lambda: _RefAdamW(**ADAMW)),
    "asam-eta0": (torch.optim.SGD, SGD_MOMENTUM, dict(rho=0.5, adaptive=True), None,
                  lambda: _RefSGD(**SGD_MOMENTUM)),
    "asam-eta0.01": (torch.optim.SGD, SGD_MOMENTUM, dict(rho=0.5, adaptive=True, eta=0.01), None,
                     lambda: _RefSGD(**SGD_MOMENTUM)),
    "two-groups-rho": (torch.optim.SGD, SGD_MOMENTUM, dict(), (0.2, 0.01), lambda: _RefSGD(**SGD_MOMENTUM)),
    "perturb-weight-decay": (torch.optim.SGD, SGD_MOMENTUM, dict(rho=0.05, perturb_weight_decay=True), None,
                             lambda: _RefSGD(**SGD_MOMENTUM)),
}


@pytest.mark.parametrize("case", CASES.keys())
def test_steps_match_float64_reference(case):
    base, base_kwargs, sam_kwargs, group_rhos, make_reference = CASES[case]
    x, y, w0, b0 = _problem()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    params = [{"params": [w], "rho": group_rhos[0]}, {"params": [b], "rho": group_rhos[1]}] if group_rhos \
        else [w, b]
    opt = SAM(params, base, **sam_kwargs, **base_kwargs)

    rhos = group_rhos or (sam_kwargs["rho"],) * 2
    adaptive, eta = sam_kwargs.get("adaptive", False), sam_kwargs.get("eta", 0.0)
    decays = [base_kwargs.get("weight_decay", 0.0) if sam_kwargs.get("perturb_weight_decay") else 0.0] * 2
    reference, ref_ws = make_reference(), [w0.clone(), b0.clone()]

    for _ in range(3):
        opt.zero_grad()
        _loss(w, b, x, y).backward()
        opt.step(lambda: _loss(w, b, x, y).backward())

        gs = _grads(*ref_ws, x, y)
        eps = _reference_eps(ref_ws, gs, rhos, adaptive, eta, decays)
        perturbed = [w_ + e for w_, e in zip(ref_ws, eps)]
        ref_ws = reference(ref_ws, _grads(*perturbed, x, y))

        torch.testing.assert_close(w.detach(), ref_ws[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.detach(), ref_ws[1], rtol=1e-12, atol=1e-14)
    expected_eps_norm = math.sqrt(sum(float((e**2).sum()) for e in eps))
    assert opt.last_perturbation_norm.item() == pytest.approx(expected_eps_norm, rel=1e-12)


def test_records_gradient_norm_of_first_pass():
    x, y, w0, b0 = _problem()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = SAM([w, b], torch.optim.SGD, rho=0.05, lr=0.1)
    _loss(w, b, x, y).backward()
    opt.first_step()
    expected = math.sqrt(sum(float((g**2).sum()) for g in _grads(w0, b0, x, y)))
    assert opt.last_grad_norm.item() == pytest.approx(expected, rel=1e-12)
    assert opt.last_perturbation_norm.item() == pytest.approx(0.05, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# ASAM's two published forms, built from their presets by build_optimizer (REFERENCE.md §1 and §5).


def _optimizer_config(name: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"optimizer={name}"])


def _asam_net() -> nn.Module:
    """Named weights (two Linear, one BatchNorm) and biases, in float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()


def _asam_reference_eps(net: nn.Module, rho: float, eta: float, rescaled) -> dict[str, torch.Tensor]:
    """ε = ρ·T²⊙g / (‖T⊙g‖₂ + δ), one norm over all parameters; T = |w| + eta where rescaled(name), else 1."""
    ts = {n: p.detach().abs() + eta if rescaled(n) else torch.ones_like(p) for n, p in net.named_parameters()}
    grads = {n: p.grad for n, p in net.named_parameters()}
    norm = math.sqrt(sum(float(((ts[n] * grads[n]) ** 2).sum()) for n in ts))
    return {n: rho * ts[n] ** 2 * grads[n] / (norm + 1e-12) for n in ts}


@pytest.mark.parametrize("name, rho, eta, rescaled", [
    ("asam", 1.0, 0.01, lambda n: "weight" in n),  # the ASAM authors' code
    ("asam_davda54", 2.0, 0.0, lambda n: True),  # the davda54 port
])
def test_asam_presets_perturb_by_their_published_formulas(name, rho, eta, rescaled):
    cfg = _optimizer_config(name)
    assert (cfg.rho, cfg.optimizer.sam.eta) == (rho, eta)
    net, (x, y) = _asam_net(), _batch()
    opt = build_optimizer(cfg.optimizer, cfg.rho, 0.1, net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    F.cross_entropy(net(x.double()), y).backward()
    expected = _asam_reference_eps(net, rho, eta, rescaled)
    opt.first_step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] + expected[n], rtol=1e-12, atol=1e-15)
    expected_norm = math.sqrt(sum(float((e**2).sum()) for e in expected.values()))
    assert opt.last_perturbation_norm.item() == pytest.approx(expected_norm, rel=1e-12)


def test_the_two_asam_forms_differ_on_biases_and_by_eta():
    """Guards the test above against forms that coincide: same gradient, other ε on biases and weights."""
    net, (x, y) = _asam_net(), _batch()
    F.cross_entropy(net(x.double()), y).backward()
    authors = _asam_reference_eps(net, 1.0, 0.01, lambda n: "weight" in n)
    port = _asam_reference_eps(net, 1.0, 0.0, lambda n: True)
    moving = [n for n, p in net.named_parameters() if p.grad.norm() > 1e-9]  # not 0.bias: BatchNorm cancels it
    assert moving == ["0.weight", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert all(not torch.allclose(authors[n], port[n], rtol=1e-3) for n in moving)


def test_authors_form_puts_batchnorm_weights_with_the_rescaled_weights():
    net = _asam_net()
    opt = build_optimizer(_optimizer_config("asam").optimizer, 1.0, 0.1, net)
    names = {p: n for n, p in net.named_parameters()}
    groups = [(g["adaptive"], sorted(names[p] for p in g["params"])) for g in opt.param_groups]
    assert groups == [(True, ["0.weight", "1.weight", "3.weight"]), (False, ["0.bias", "1.bias", "3.bias"])]


def test_unknown_adaptive_params_is_a_config_error():
    cfg = _optimizer_config("asam")
    OmegaConf.update(cfg, "optimizer.sam.adaptive_params", "biases")
    with pytest.raises(ConfigError, match="adaptive_params must be one of weights, all"):
        build_optimizer(cfg.optimizer, cfg.rho, 0.1, _asam_net())


# ---------------------------------------------------------------------------------------------------------
# ρ = 0, zero and missing gradients, argument checks.


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)


def _sam_step(net, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step(lambda: F.cross_entropy(net(x), y).backward())


@pytest.mark.parametrize("base, kwargs", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
])
def test_rho_zero_is_bit_identical_to_base_optimizer(base, kwargs):
    net, x, y = _net(), *_batch()
    twin = copy.deepcopy(net)
    sam, plain = SAM(net.parameters(), base, rho=0.0, **kwargs), base(twin.parameters(), **kwargs)
    for _ in range(5):
        _sam_step(net, sam, x, y)
        plain.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        plain.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_zero_perturbation(adaptive):
    w = torch.randn(5, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1)
    (0.0 * w).sum().backward()
    before = w.detach().clone()
    opt.first_step()
    assert torch.equal(w, before)
    assert opt.last_perturbation_norm.item() == 0.0
    opt.second_step()
    assert torch.equal(w, before)


def test_parameters_without_gradient_are_neither_perturbed_nor_moved():
    used, unused = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = SAM([used, unused], torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    loss = lambda: (used**2).sum() + (unused**2).sum()  # noqa: E731
    opt.zero_grad()
    loss().backward()
    opt.step(lambda: loss().backward())  # both get a perturbation and a step
    after_first = unused.detach().clone()

    only_used = lambda: (used**3).sum()  # noqa: E731
    opt.zero_grad()
    only_used().backward()
    opt.first_step(zero_grad=True)
    assert torch.equal(unused, after_first)  # not perturbed
    only_used().backward()
    opt.second_step()
    # not moved, and not "restored" to a stale copy from the first step either
    assert torch.equal(unused, after_first)


def test_no_gradient_at_all_is_a_clear_error():
    opt = SAM([torch.randn(3, requires_grad=True)], torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="no parameter has a gradient; call loss.backward"):
        opt.first_step()


@pytest.mark.parametrize("kwargs, shown", [
    (dict(rho=-0.1), "rho=-0.1"),
    (dict(eta=-1.0), "eta=-1.0"),
])
def test_negative_rho_or_eta_is_value_error(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        SAM([torch.randn(2, requires_grad=True)], torch.optim.SGD, lr=0.1, **kwargs)


def test_negative_rho_in_a_group_is_value_error():
    with pytest.raises(ValueError, match="rho=-0.5"):
        SAM([{"params": [torch.randn(2, requires_grad=True)], "rho": -0.5}], torch.optim.SGD, lr=0.1)
    opt = SAM([torch.randn(2, requires_grad=True)], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho=-2"):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], "rho": -2})


def test_step_without_closure_and_second_step_without_first_step_are_clear_errors():
    w = torch.randn(3, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()


# ---------------------------------------------------------------------------------------------------------
# Param groups shared with the base optimizer; state_dict carries the base state.


def test_param_groups_are_shared_with_the_base_optimizer():
    net, x, y = _net(), *_batch()
    opt = SAM(net.parameters(), functools.partial(torch.optim.SGD, momentum=0.9), rho=0.05, lr=0.1)
    assert opt.param_groups is opt.base_optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _sam_step(net, opt, x, y)
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)

    extra = torch.randn(2, requires_grad=True)
    opt.add_param_group({"params": [extra], "rho": 0.2})
    group = opt.base_optimizer.param_groups[-1]
    assert group["momentum"] == 0.9 and group["rho"] == 0.2 and group["adaptive"] is False


@pytest.mark.parametrize("base", [
    functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.05),
])
def test_resume_from_state_dict_steps_in_lock_step(base):
    net, x, y = _net(), *_batch()
    opt = SAM(net.parameters(), base, rho=0.05, adaptive=True, eta=0.01)
    for _ in range(3):
        _sam_step(net, opt, x, y)

    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    saved_state = checkpoint["optimizer"]["state"]
    assert saved_state and all("w" not in s for s in saved_state.values())  # base state, no scratch copies

    torch.manual_seed(123)  # a fresh model with other weights: everything must come from the checkpoint
    resumed = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = SAM(resumed.parameters(), base, rho=0.05)  # rho/adaptive/eta come back from the groups
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.param_groups is resumed_opt.base_optimizer.param_groups
    assert resumed_opt.param_groups[0]["adaptive"] is True

    for _ in range(4):
        _sam_step(net, opt, x, y)
        _sam_step(resumed, resumed_opt, x, y)
    for p, q in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------------------
# Precision and loss scaling.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_norm_does_not_overflow(dtype):
    w = torch.zeros(1000, dtype=dtype, requires_grad=True)
    w.grad = torch.full((1000,), 300.0, dtype=dtype)  # ‖g‖² = 9e7, beyond fp16's 65504
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.1)
    opt.first_step()
    expected = torch.full((1000,), 0.05 / math.sqrt(1000)).to(dtype)
    assert torch.equal(w.detach(), expected)


def test_half_precision_asam_perturbation_computed_in_fp32():
    # T²⊙g = 1e-9 underflows to 0 in fp16 (smallest subnormal ≈ 6e-8); ε itself (1e-4) is representable.
    w = torch.full((100,), 1e-3, dtype=torch.float16, requires_grad=True)
    w.grad = torch.full((100,), 1e-3, dtype=torch.float16)
    opt = SAM([w], torch.optim.SGD, rho=1.0, adaptive=True, lr=0.1)
    w0 = w.detach().double()
    t, g = w0.abs(), w.grad.double()
    expected = w0 + t * t * g / (t * g).norm()
    opt.first_step()
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("k", [8, 16])
def test_perturbation_invariant_to_loss_scaling(k):
    net, x, y = _net(), *_batch()
    before = [p.detach().clone() for p in net.parameters()]

    def eps(scale: float) -> list[torch.Tensor]:
        opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        (scale * F.cross_entropy(net(x), y)).backward()
        opt.first_step(zero_grad=True)
        out = [p.detach() - w for p, w in zip(net.parameters(), before)]
        opt.restore()
        return out

    for a, b in zip(eps(1.0), eps(2.0**k)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Behaviour.


def test_sam_finds_the_flat_minimum_where_gradient_descent_finds_the_sharp_one():
    """L(x, y) = h(x² − 1)² + ½a(x)y²: equal-depth minima at x = ±1, curvature a(−1) ≈ 97 vs a(1) ≈ 3.

    Along the valley floor SAM descends ≈ L + ½ρ²λ_max (Wen, Ma & Li), which pushes it over the barrier
    into the flat minimum; gradient descent stays in the sharp one it starts next to.
    """
    def loss(w: torch.Tensor) -> torch.Tensor:
        x, y = w[0], w[1]
        curvature = 1 + 99 * torch.sigmoid(-4 * x)
        return 0.05 * (x**2 - 1) ** 2 + 0.5 * curvature * y**2

    def run(rho: float) -> torch.Tensor:
        w = torch.tensor([-0.8, 0.5], dtype=torch.float64, requires_grad=True)
        opt = SAM([w], torch.optim.SGD, rho=rho, lr=0.01)
        for _ in range(1000):
            opt.zero_grad()
            loss(w).backward()
            opt.step(lambda: loss(w).backward())
        return w.detach()

    gd, sam = run(0.0), run(0.2)
    assert abs(gd[0] + 1) < 0.01 and abs(gd[1]) < 1e-6  # sharp minimum
    assert abs(sam[0] - 1) < 0.05 and abs(sam[1]) < 0.01  # flat minimum


def test_full_batch_sam_on_a_quadratic_converges_to_the_top_eigenvector():
    """Wen, Ma & Li (ICLR 2023) Thm 4.8: x → ±v₁ in direction and ‖x‖ → ηρλ₁ / (2 − ηλ₁)."""
    g = torch.Generator().manual_seed(0)
    eigenvalues = torch.cat([torch.tensor([5.0, 3.0]), torch.linspace(2.0, 0.1, 8)]).double()
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    a = q @ torch.diag(eigenvalues) @ q.T
    x = torch.randn(10, generator=g, dtype=torch.float64, requires_grad=True)
    lr, rho = 0.1, 0.01
    opt = SAM([x], torch.optim.SGD, rho=rho, lr=lr)
    for _ in range(3000):  # converged to float64 precision after about 2000 steps from this start
        x.grad = a @ x.detach()
        opt.first_step()
        x.grad = a @ x.detach()
        opt.second_step()
    x = x.detach()
    cosine = abs(float(x @ q[:, 0])) / float(x.norm())
    assert cosine == pytest.approx(1.0, abs=1e-9)
    assert float(x.norm()) == pytest.approx(lr * rho * 5.0 / (2 - lr * 5.0), rel=1e-6)
