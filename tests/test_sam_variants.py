"""The SAM variants (docs/sam.md): ρ following the lr schedule, unnormalized SAM (USAM) and GSAM.

Each step against its formula written out here in float64 (plain autograd on a tiny MLP or a closed-form loss,
never the implementation called twice), the cases that must reduce to SAM exactly, what every SAM step works with
(BatchNorm, dropout, fp16 loss scaling, m-sharpness, accumulation, DDP, resume), and a run of each end to end.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, composed, read_json, run_cli, run_in_process
from test_distributed import results_of_each_rank
from test_resume import assert_resumes_in_lock_step
from torch import nn
from torch.func import functional_call

from sam_runner.errors import ConfigError
from sam_runner.optim import ESAM, FSAM, GSAM, SAM, SAMON, USAM, LookSAM, normalization_groups
from sam_runner.report.runs import optimizer_label
from sam_runner.run.spec import validate
from sam_runner.scale import distributed
from sam_runner.scale.distributed import World
from sam_runner.schedules import cosine
from sam_runner.steps import train_step

# ---------------------------------------------------------------------------------------------------------
# A tiny MLP in float64 and its loss as a function of its parameters (plain autograd: the reference's gradients).


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _gradient(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
              ) -> dict[str, torch.Tensor]:
    """∇L_B at `weights` by autograd on the model's functional form, L_B the batch's mean cross-entropy."""
    leaves = {name: w.detach().clone().requires_grad_(True) for name, w in weights.items()}
    loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _dot(a: dict, b: dict) -> float:
    return sum(float((a[k] * b[k]).sum()) for k in a)


def _reference_direction(model, w, x, y, rho, variant, alpha=0.0) -> dict[str, torch.Tensor]:
    """The gradient the base optimizer steps with, by each paper's formula:
    SAM  ε = ρ g/‖g‖, d = g_p;   USAM  ε = ρ g, d = g_p;
    GSAM ε = ρ g/‖g‖, g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²) g_p, d = g_p − α g_⊥   (g = ∇L(w), g_p = ∇L(w + ε))."""
    g = _gradient(model, w, x, y)
    norm = math.sqrt(_dot(g, g))
    scale = rho if variant == "usam" else rho / norm
    gp = _gradient(model, {k: w[k] + scale * g[k] for k in w}, x, y)
    if variant != "gsam":
        return gp
    c = _dot(g, gp) / _dot(gp, gp)
    return {k: gp[k] - alpha * (g[k] - c * gp[k]) for k in w}


def _plain_sgd(w: dict, d: dict, lr: float) -> dict:
    return {k: w[k] - lr * d[k] for k in w}


@pytest.mark.parametrize("variant", ["usam", "gsam"])
def test_each_variant_steps_by_its_formula_in_float64(variant):
    """Three steps through train_step (plain SGD, so w ← w − η·d is the whole update) against the formula."""
    model, (x, y) = _mlp(), _batch()
    rho, lr, alpha = 0.3, 0.2, 0.4
    opt = USAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr) if variant == "usam" else \
        GSAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, rho_schedule="constant", lr=lr)
    reference = _weights(model)
    for _ in range(3):
        result = train_step(model, x, y, opt, F.cross_entropy)
        reference = _plain_sgd(reference, _reference_direction(model, reference, x, y, rho, variant, alpha), lr)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=1e-10, atol=1e-12, msg=name)
    assert result.perturbation_norm is not None


def test_gsam_direction_is_g_p_minus_alpha_times_the_orthogonal_part_by_hand_api():
    """first_step / second_step by hand, with momentum: the base optimizer sees exactly d = g_p − α·g_⊥, and
    g_⊥ ⟂ g_p (the decomposition's defining property)."""
    model, (x, y) = _mlp(), _batch()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.7, rho_schedule="constant", lr=0.1,
               momentum=0.9)
    w = _weights(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    expected = _reference_direction(model, w, x, y, 0.1, "gsam", 0.7)
    for name, p in model.named_parameters():  # first SGD step with momentum: buffer = d
        torch.testing.assert_close(opt.base_optimizer.state[p]["momentum_buffer"], expected[name], rtol=1e-10,
                                   atol=1e-12)
    g = _gradient(model, w, x, y)
    gp = _reference_direction(model, w, x, y, 0.1, "sam")
    c = _dot(g, gp) / _dot(gp, gp)
    assert abs(_dot({k: g[k] - c * gp[k] for k in g}, gp)) < 1e-12


def test_usam_perturbation_is_rho_times_the_gradient():
    model, (x, y) = _mlp(), _batch()
    opt = USAM(model.parameters(), torch.optim.SGD, rho=0.7, lr=0.1)
    w = _weights(model)
    g = _gradient(model, w, x, y)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - w[name], 0.7 * g[name], rtol=1e-12, atol=1e-15)
    assert opt.last_perturbation_norm.item() == pytest.approx(0.7 * math.sqrt(_dot(g, g)), rel=1e-12)
    opt.restore()


# ---------------------------------------------------------------------------------------------------------
# Reductions to SAM.


def _bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_gsam_with_alpha_zero_and_constant_rho_is_sam_bit_for_bit(micro_batch_size):
    """With BatchNorm and dropout, momentum and weight decay, m-sharpness or not: weights, BatchNorm statistics,
    momentum buffers and the random stream equal SAM's exactly."""
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    nets = [_bn_dropout_net(), _bn_dropout_net()]
    opts = [SAM(nets[0].parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=5e-4),
            GSAM(nets[1].parameters(), torch.optim.SGD, rho=0.1, alpha=0.0, rho_schedule="constant", lr=0.1,
                 momentum=0.9, weight_decay=5e-4)]
    states = []
    for net, opt in zip(nets, opts):
        torch.manual_seed(3)
        for _ in range(3):
            train_step(net, x, y, opt, F.cross_entropy, micro_batch_size=micro_batch_size)
        states.append(torch.get_rng_state())
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(opts[0].base_optimizer.state[p]["momentum_buffer"],
                           opts[1].base_optimizer.state[q]["momentum_buffer"])
    assert torch.equal(states[0], states[1])


# Final weights of three SAM steps (and three ASAM steps) on the closed-form loss of `_golden_run`, computed with
# sam_runner/optim.py as it was before rho_schedule existed (commit a258456), as float.hex(): the constant schedule
# must reproduce them bit for bit.
GOLDEN = {
    "sam": ['0x1.e497b3b19ba46p-3', '-0x1.2eb3956f3ff34p+0', '0x1.c771a5696a17fp-2', '0x1.11023a9c7cd52p+0',
            '-0x1.935ae3b7dc24fp-3', '0x1.f706be97c5940p-5', '0x1.0f07392d735f9p-1'],
    "asam": ['0x1.dccb260f0ba3cp-3', '-0x1.03a92431a060bp+0', '-0x1.a02fa8e6e8e36p-3', '0x1.0c1e44130547fp+0',
             '-0x1.876902317fd11p-3', '0x1.f889cf9252431p-5', '0x1.0dda2403b2e31p-1'],
}


def _golden_run(**options: Any) -> list[str]:
    """L(w, v) = Σ aᵢwᵢ⁴/4 + Σ bᵢⱼvᵢⱼ²/2 + (w₀v₁₁)², three SAM steps with momentum SGD and weight decay."""
    a = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    b = torch.tensor([[0.4, 1.9], [-0.8, 0.25]], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([0.3, -0.9, 1.1], dtype=torch.float64))
    v = nn.Parameter(torch.tensor([[1.2, -0.4], [0.05, 0.6]], dtype=torch.float64))
    opt = SAM([w, v], torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4, **options)

    def loss() -> torch.Tensor:
        return (a * w**4 / 4).sum() + (b * v**2 / 2).sum() + (w[0] * v[1, 1]) ** 2

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    for _ in range(3):
        closure()
        opt.step(closure)
    return [value.hex() for t in (w, v) for value in t.detach().flatten().tolist()]


@pytest.mark.parametrize("schedule", [{}, {"rho_schedule": "constant"}])
def test_constant_rho_schedule_is_todays_sam_and_asam_bit_for_bit(schedule):
    assert _golden_run(rho=0.05, **schedule) == GOLDEN["sam"]
    assert _golden_run(rho=0.5, adaptive=True, eta=0.01, perturb_weight_decay=True, **schedule) == GOLDEN["asam"]


# ---------------------------------------------------------------------------------------------------------
# ρ following the lr schedule.


@pytest.mark.parametrize(("make", "rho_min"), [
    (lambda params: SAM(params, torch.optim.SGD, rho=0.05, rho_schedule="lr", lr=0.4, momentum=0.9), 0.0),
    (lambda params: SAM(params, torch.optim.SGD, rho=1.0, adaptive=True, eta=0.01, rho_schedule="lr", lr=0.4), 0.0),
    (lambda params: GSAM(params, torch.optim.SGD, rho=0.04, rho_min=0.01, alpha=0.3, lr=0.4), 0.01),
])
def test_rho_follows_the_cosine_schedule(make, rho_min):
    """At chosen steps of a cosine schedule with warm-up (peak lr 0.4 at step 3), ‖ε‖ (SAM, GSAM) or the ASAM
    radius equals ρ_t = ρ_min + (ρ − ρ_min)·lr_t/lr_peak; at the peak lr it is the configured ρ."""
    model, (x, y) = _mlp(), _batch()
    opt = make(model.parameters())
    rho, adaptive = opt.param_groups[0]["rho"], opt.param_groups[0]["adaptive"]
    scheduler = cosine(opt.base_optimizer, steps_per_epoch=4, total_steps=20, warmup_epochs=1.0)
    seen = {}
    for step in range(20):
        lr = opt.param_groups[0]["lr"]
        w = _weights(model)
        result = train_step(model, x, y, opt, F.cross_entropy)
        scheduler.step()
        expected = rho_min + (rho - rho_min) * lr / 0.4
        if adaptive:  # ‖T⁻¹ε‖ = ρ_t for ASAM (T = |w| + η elementwise)
            g = _gradient(model, w, x, y)
            t = {k: w[k].abs() + 0.01 for k in w}
            norm = math.sqrt(sum(float(((t[k] * g[k]) ** 2).sum()) for k in g))
            measured = result.perturbation_norm.item() / (math.sqrt(sum(float(((t[k] ** 2 * g[k]) ** 2).sum())
                                                                        for k in g)) / norm)
        else:
            measured = result.perturbation_norm.item()
        seen[step] = (lr, measured, expected)
    for step in (0, 3, 7, 12, 19):  # warm-up, the peak, the decay, near the end
        lr, measured, expected = seen[step]
        assert measured == pytest.approx(expected, rel=1e-9, abs=1e-15), step
    assert seen[3][0] == pytest.approx(0.4) and seen[3][1] == pytest.approx(rho, rel=1e-9)


def test_rho_schedule_survives_a_state_dict_round_trip():
    """lr_peak travels with the groups: a SAM rebuilt mid-schedule from a state dict takes the same ρ_t."""
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, rho_schedule="lr", lr=0.4)
    opt.param_groups[0]["lr"] = 0.1  # as a scheduler leaves it
    rebuilt = SAM(_mlp().parameters(), torch.optim.SGD, rho=0.05, rho_schedule="lr", lr=0.25)
    rebuilt.load_state_dict(opt.state_dict())
    assert rebuilt.param_groups[0]["lr_peak"] == 0.4 and rebuilt.param_groups[0]["lr"] == 0.1


# ---------------------------------------------------------------------------------------------------------
# What a SAM step works with: fp16 loss scaling, BatchNorm statistics, m-sharpness, accumulation.


def test_gsam_under_a_grad_scaler_gives_the_unscaled_step():
    """The perturbed gradient arrives multiplied by the loss scale; the step must not depend on it."""
    model, (x, y) = _mlp(), _batch()
    twin = copy.deepcopy(model)
    make = lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=0.2, alpha=0.5, rho_schedule="constant", lr=0.1,
                          momentum=0.9)  # noqa: E731
    opt, twin_opt = make(model), make(twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        scaled = train_step(model, x, y, opt, F.cross_entropy, scaler=scaler)
        plain = train_step(twin, x, y, twin_opt, F.cross_entropy)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert scaled.skipped.item() == 0.0 and scaler.get_scale() == 2.0**10
    torch.testing.assert_close(scaled.grad_norm, plain.grad_norm)


def test_gsam_non_finite_perturbed_gradient_skips_the_step():
    model, (x, y) = _mlp(), _batch()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.2, alpha=0.5, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls = [0]

    def inf_second_pass(logits, targets):
        calls[0] += 1
        loss = F.cross_entropy(logits, targets)
        return loss * math.inf if calls[0] == 2 else loss

    before = _weights(model)
    assert train_step(model, x, y, opt, inf_second_pass, scaler=scaler).skipped.item() == 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and not opt.base_optimizer.state
    assert scaler.get_scale() == 2.0**9


def test_gsam_leaves_batchnorm_statistics_to_the_clean_pass():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(net)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    train_step(net, x, y, GSAM(net.parameters(), torch.optim.SGD, rho=0.5, alpha=0.5, lr=0.1), F.cross_entropy)
    with torch.no_grad():
        reference(x)  # the clean forward alone
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(net[1], name), getattr(reference[1], name)), name


def test_gsam_m_sharpness_decomposes_each_chunk_and_averages():
    """micro_batch_size=m: each chunk's own g, ε, g_p and direction; the step takes their size-weighted mean."""
    model, (x, y) = _mlp(), _batch(10)
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.3, alpha=0.6, rho_schedule="constant", lr=0.2)
    w = _weights(model)
    train_step(model, x, y, opt, F.cross_entropy, micro_batch_size=4)  # chunks 4, 4, 2
    chunks = [(0, 4), (4, 8), (8, 10)]
    directions = [_reference_direction(model, w, x[a:b], y[a:b], 0.3, "gsam", 0.6) for a, b in chunks]
    mean = {k: sum((b - a) / 10 * d[k] for (a, b), d in zip(chunks, directions)) for k in w}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[name] - 0.2 * mean[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["usam", "gsam"])
def test_accumulation_equals_the_one_piece_step(variant):
    """accumulate=k: g and g_p are the whole batch's (GSAM decomposes once per batch), as in one piece."""
    models = [_mlp(), _mlp()]
    x, y = _batch(13)
    make = (lambda m: USAM(m.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)) if variant == "usam" \
        else (lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.5, lr=0.1, momentum=0.9))
    opts = [make(m) for m in models]
    for _ in range(2):
        train_step(models[0], x, y, opts[0], F.cross_entropy)
        train_step(models[1], x, y, opts[1], F.cross_entropy, accumulate=4)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# DDP on gloo, two CPU processes: global mode equals one process on the global batch.

DDP_BATCHES = [(0, 12), (12, 24), (24, 31)]
DDP_LOCAL_BATCHES = [(0, 12), (12, 19)]  # shards 6 + 6, then 4 + 3


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(31, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (31,), generator=g)


def _ddp_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _make_variant(name: str, model: nn.Module) -> SAM:
    if name == "looksam":  # k = 2 over DDP_BATCHES: a SAM step, a one-pass step, a SAM step
        return LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=0.7, lr=0.2, momentum=0.9)
    if name == "gsam":
        return GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.5, rho_schedule="constant", lr=0.2,
                    momentum=0.9)
    return USAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.2, momentum=0.9)


def _ddp_work(world: World) -> dict:
    x, y = _ddp_data()
    results = {}
    for name in ("gsam", "usam", "looksam"):
        model = distributed.wrap_model(_ddp_mlp(), world)
        optimizer = _make_variant(name, model)
        for start, stop in DDP_BATCHES:
            distributed.distributed_step(model, x[start:stop], y[start:stop], optimizer, nn.CrossEntropyLoss(),
                                         world, sam_mode="global", max_grad_norm=0.5)
        results[name] = distributed.unwrap(model).state_dict()
    model = distributed.wrap_model(_ddp_mlp(), world)  # local mode: each process's own ε = ρ·g_shard
    optimizer = USAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.2)
    for start, stop in DDP_LOCAL_BATCHES:
        distributed.distributed_step(model, x[start:stop], y[start:stop], optimizer, nn.CrossEntropyLoss(),
                                     world, sam_mode="local")
    results["usam_local"] = distributed.unwrap(model).state_dict()
    return results


def test_ddp_global_mode_equals_one_process_and_usam_local_mode_the_per_shard_formula(tmp_path):
    ranks = results_of_each_rank(_ddp_work, tmp_path)
    x, y = _ddp_data()
    for name in ("gsam", "usam", "looksam"):
        model = _ddp_mlp()
        optimizer = _make_variant(name, model)
        for start, stop in DDP_BATCHES:
            train_step(model, x[start:stop], y[start:stop], optimizer, nn.CrossEntropyLoss(), max_grad_norm=0.5)
        for rank in ranks:
            for key, value in model.state_dict().items():
                torch.testing.assert_close(rank[name][key], value, rtol=1e-10, atol=1e-12, msg=(name, key))


    # local mode, written out: w ← w − η Σ_shards (n_s/n) ∇L_s(w + ρ ∇L_s(w))
    model = _ddp_mlp()
    w = _weights(model)
    for shards in ([(0, 6), (6, 12)], [(12, 16), (16, 19)]):
        n = shards[-1][1] - shards[0][0]
        directions = [_reference_direction(model, w, x[a:b], y[a:b], 0.3, "usam") for a, b in shards]
        w = _plain_sgd(w, {k: sum((b - a) / n * d[k] for (a, b), d in zip(shards, directions)) for k in w}, 0.2)
    for rank in ranks:
        for key, value in w.items():
            torch.testing.assert_close(rank["usam_local"][key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_gsam_with_the_local_ddp_mode_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="GSAM with the local SAM mode is not supported") as error:
        distributed.check_setup(World(world_size=2), batch_size=64, num_samples=128, sam_mode="local",
                                sam_variant="gsam")
    assert "\n" not in str(error.value)
    distributed.check_setup(World(world_size=2), batch_size=64, num_samples=128, sam_mode="local", sam_variant="usam")


# ---------------------------------------------------------------------------------------------------------
# Configs: refusals in the pre-flight, runs end to end, resume, labels.


@pytest.mark.parametrize(("overrides", "message"), [
    (["optimizer=sam", "optimizer.sam.variant=xsam"], "optimizer.sam.variant: invalid value 'xsam'"),
    (["optimizer=sam", "optimizer.sam.rho_schedule=cosine"], "optimizer.sam.rho_schedule: invalid value 'cosine'"),
    (["optimizer=gsam", "rho=0.01"], r"optimizer.sam.rho_min must be in \[0, rho=0.01\]"),
    (["optimizer=gsam", "optimizer.sam.alpha=-0.1"], "optimizer.sam.alpha must be a finite number >= 0"),
    (["optimizer=usam", "optimizer.sam.adaptive=true"], "adaptive=true is not implemented for the usam variant"),
    (["optimizer=gsam", "optimizer.sam.adaptive=true"], "adaptive=true is not implemented for the gsam variant"),
    (["optimizer=fsam", "optimizer.sam.sigma=-1"], "optimizer.sam.sigma must be a finite number >= 0"),
    (["optimizer=fsam", "optimizer.sam.lmbda=1.0"], r"optimizer.sam.lmbda must be in \[0, 1\)"),
    (["optimizer=fsam", "optimizer.sam.micro_batch_size=8"], "m-sharpness\\) is not supported by fsam"),
    (["optimizer=fsam", "optimizer.sam.adaptive=true"], "adaptive=true is not implemented for the fsam variant"),
    (["optimizer=sam_on", "optimizer.sam.adaptive=true"], "adaptive=true is not implemented for the sam_on variant"),
    (["optimizer=looksam", "optimizer.sam.k=0"], "optimizer.sam.k must be an integer >= 1"),
    (["optimizer=looksam", "optimizer.sam.k=2.5"], "optimizer.sam.k must be an integer >= 1"),
    (["optimizer=looksam", "optimizer.sam.alpha=-1"], "optimizer.sam.alpha must be a finite number >= 0"),
    (["optimizer=looksam", "optimizer.sam.micro_batch_size=8"], "m-sharpness\\) is not supported by looksam"),
    (["optimizer=looksam", "optimizer.sam.adaptive=true"], "adaptive=true is not implemented for the looksam variant"),
    (["optimizer=esam", "optimizer.sam.beta=0"], r"optimizer.sam.beta must be in \(0, 1\]"),
    (["optimizer=esam", "optimizer.sam.gamma=1.5"], r"optimizer.sam.gamma must be in \(0, 1\]"),
    (["optimizer=esam", "optimizer.sam.micro_batch_size=8"], "m-sharpness\\) is not supported by esam"),
    (["optimizer=esam", "compile=true"], "compile=true with esam's beta < 1 \\(got 0.6\\) is refused"),
    (["optimizer=esam", "optimizer.sam.adaptive=true"], "adaptive=true is not implemented for the esam variant"),
])
def test_bad_variant_settings_are_refused_in_one_line(workdir, monkeypatch, overrides, message):
    cfg, _ = composed(workdir, monkeypatch, overrides)
    with pytest.raises(ConfigError, match=message) as error:
        validate(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("variant", "extra", "recorded", "label"), [
    ("usam", [], {"sam_variant": "usam", "rho_schedule": "constant", "rho_min": None, "gsam_alpha": None,
                  "rho": 0.05}, "usam ρ=0.05"),
    ("gsam", [], {"sam_variant": "gsam", "rho_schedule": "lr", "rho_min": 0.02, "gsam_alpha": 0.01, "rho": 0.04},
     "gsam ρ=0.04 α=0.01 ρ∝lr ρ_min=0.02"),
    ("sam", ["optimizer.sam.rho_schedule=lr", "optimizer/base=adamw"],
     {"sam_variant": "sam", "rho_schedule": "lr", "rho_min": 0.0, "gsam_alpha": None, "rho": 0.05},
     "sam(adamw) ρ=0.05 ρ∝lr"),
    # cnn1d and mlp have no normalization layer: Keskar's C1 (BatchNorm in its conv and dense blocks) on 8x8 images
    ("sam_on", ["model=keskar_c1", "dataset.source.input_shape=[3,8,8]"],
     {"sam_variant": "sam_on", "rho": 0.5, "fsam_sigma": None, "fsam_lambda": None}, "sam_on ρ=0.5"),
    ("fsam", ["optimizer/base=adamw", "accumulate=2"],
     {"sam_variant": "fsam", "rho": 0.2, "fsam_sigma": 1.0, "fsam_lambda": 0.6, "accumulate": 2},
     "fsam(adamw) ρ=0.2 σ=1 λ=0.6"),
    ("looksam", ["optimizer.sam.k=3", "accumulate=2"],
     {"sam_variant": "looksam", "rho": 0.1, "looksam_k": 3, "looksam_alpha": 0.7, "gsam_alpha": None},
     "looksam ρ=0.1 k=3 α=0.7"),
    ("esam", ["optimizer.sam.beta=0.5", "accumulate=2"],
     {"sam_variant": "esam", "rho": 0.05, "esam_beta": 0.5, "esam_gamma": 0.5, "fsam_sigma": None, "accumulate": 2},
     "esam ρ=0.05 β=0.5 γ=0.5"),
])
def test_a_variant_runs_end_to_end_and_its_summary_records_it(workdir, monkeypatch, variant, extra, recorded, label):
    options = [o for o in TINY if not (o.startswith("model=") and any(e.startswith("model=") for e in extra))]
    run_dir = run_in_process(workdir, monkeypatch, *options, f"optimizer={variant}", *extra)
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["optimizer"] == variant
    assert {key: summary[key] for key in recorded} == recorded
    assert math.isfinite(summary["test_loss"]) and summary["steps_completed"] == 8
    assert optimizer_label(summary, with_rho=True) == label


@pytest.mark.parametrize("variant", [["optimizer=gsam", "optimizer.sam.alpha=0.4"], ["optimizer=usam"],
                                     ["optimizer=sam_on", "model.norm=batch"]], ids=["gsam", "usam", "sam_on"])
def test_a_stopped_variant_run_resumes_in_lock_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    variant: list[str]) -> None:
    """Killed right after its checkpoint at step 6 (of 8, mid-epoch 2; GSAM's ρ_t following the cosine lr), then
    re-run: equal to the run never stopped, weights, optimizer state, metrics and summary. (F-SAM, LookSAM and ESAM,
    which keep state of their own, have theirs in their own test files.)"""
    assert_resumes_in_lock_step(tmp_path, monkeypatch, *(o for o in TINY if not o.startswith("model=")),
                                "model=cnn1d", *variant, "checkpoint.every_steps=2")


def test_a_rho_sweep_over_gsam_gives_one_label_per_radius():
    summaries = [{"optimizer": "gsam", "base_optimizer": "sgd", "rho": rho, "gsam_alpha": 0.4,
                  "rho_schedule": "lr", "rho_min": 0.0} for rho in (0.05, 0.1)]
    assert [optimizer_label(s, with_rho=True) for s in summaries] == ["gsam ρ=0.05 α=0.4 ρ∝lr",
                                                                       "gsam ρ=0.1 α=0.4 ρ∝lr"]
    assert optimizer_label({**summaries[0], "base_optimizer": "adamw"}) == "gsam(adamw) α=0.4 ρ∝lr"


# Each variant around SGD with momentum, for the tests that run them all alike.
VARIANTS: dict[str, Callable[[nn.Module], SAM]] = {
    "usam": lambda m: USAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
    "gsam": lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.5, lr=0.1, momentum=0.9),
    "sam_on": lambda m: SAMON(normalization_groups(m), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9),
    "fsam": lambda m: FSAM(m.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9),
    "looksam": lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=0.7, lr=0.1, momentum=0.9),
    # β = 1: compile=true refuses β < 1 (each draw a new graph); the selection (γ < 1) compiles
    "esam": lambda m: ESAM(m.parameters(), torch.optim.SGD, rho=0.1, beta=1.0, gamma=0.5, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_variant_steps_agree_with_eager_ones(variant):
    """compile=true compiles the model only (the optimizer, F-SAM's EMA included, runs eagerly): with Dynamo +
    AOTAutograd (`aot_eager`, no C++ build) the variant's steps on a BatchNorm network match the eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv1d(1, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 12, 4))
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    eager_opt, compiled_opt = VARIANTS[variant](eager), VARIANTS[variant](compiled)
    try:
        for _ in range(3):
            want = train_step(eager, x, y, eager_opt, F.cross_entropy)
            got = train_step(compiled, x, y, compiled_opt, F.cross_entropy)
            torch.testing.assert_close(got.grad_norm, want.grad_norm, rtol=1e-5, atol=1e-5)
        for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(("overrides", "message"), [
    (["optimizer=gsam", "rho=0.01"], "optimizer.sam.rho_min must be in [0, rho=0.01]"),
    (["optimizer=looksam", "optimizer.sam.micro_batch_size=8"], "is not supported by looksam"),
])
def test_sam_run_refuses_a_bad_variant_setting_with_exit_2_before_writing(workdir, overrides, message):
    result = run_cli("sam-run", *TINY, *overrides, "hydra.run.dir=refused", cwd=workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (workdir / "refused").exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_steps_stay_close_to_fp32(variant):
    """bf16 autocast (no scaler): the forwards in bf16, gradients, ε and the decomposition in the fp32 parameters'
    dtype; two steps stay within bf16's resolution of the fp32 ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    twin = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    opt, twin_opt = VARIANTS[variant](net), VARIANTS[variant](twin)
    for _ in range(2):
        low = train_step(net, x, y, opt, F.cross_entropy, autocast_dtype=torch.bfloat16)
        full = train_step(twin, x, y, twin_opt, F.cross_entropy)
        assert math.isfinite(low.loss.item()) and low.loss.item() == pytest.approx(full.loss.item(), rel=3e-2)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-3)
