"""SAM-ON (only normalization layers perturbed) and F-SAM (ε along g − σ·EMA(g)), docs/sam.md.

Each step against its formula written out here in float64 (plain autograd on a tiny network with a LayerNorm or
BatchNorm layer, never the implementation called twice), the cases that must reduce to SAM exactly, what a SAM step
works with (BatchNorm statistics, fp16 loss scaling, accumulation, DDP, resume), the refusals, and a run of each end
to end.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_cli
from test_distributed import results_of_each_rank
from test_resume import assert_resumes_in_lock_step
from torch import nn
from torch.func import functional_call

from sam_runner.errors import ConfigError
from sam_runner.optim import FSAM, SAM, SAMON, normalization_groups, normalization_parameters
from sam_runner.scale import distributed
from sam_runner.scale.distributed import World
from sam_runner.steps import train_step

# ---------------------------------------------------------------------------------------------------------
# Tiny float64 networks and their loss gradient by plain autograd (the references' gradients).


def _net(norm: str = "layernorm", seed: int = 0) -> nn.Module:
    """Linear → norm → Tanh → Linear; the normalization parameters are "1.weight" and "1.bias"."""
    torch.manual_seed(seed)
    layer = nn.LayerNorm(7) if norm == "layernorm" else nn.BatchNorm1d(7)
    return nn.Sequential(nn.Linear(5, 7), layer, nn.Tanh(), nn.Linear(7, 3)).double()


NORM_NAMES = {"1.weight", "1.bias"}  # written out by hand: the reference does not ask the implementation


def _batch(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _gradient(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
              ) -> dict[str, torch.Tensor]:
    """∇L_B at `weights` (a deep copy of the model, so BatchNorm's running statistics of `model` stay as they are)."""
    model = copy.deepcopy(model)
    leaves = {name: w.detach().clone().requires_grad_(True) for name, w in weights.items()}
    loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _norm(d: dict[str, torch.Tensor], names=None) -> float:
    return math.sqrt(sum(float((v * v).sum()) for k, v in d.items() if names is None or k in names))


# ---------------------------------------------------------------------------------------------------------
# The formulas.


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_sam_on_steps_by_its_formula_in_float64(norm):
    """ε_k = ρ g_k / ‖g_N‖ on the normalization parameters k ∈ N (the norm over them only), 0 elsewhere; every
    parameter then steps with ∇L(w + ε): w ← w − η ∇L(w + ε)."""
    model = _net(norm)
    opt = SAMON(normalization_groups(model), torch.optim.SGD, rho=0.3, lr=0.1)
    w = _weights(model)
    for step in range(3):
        x, y = _batch(seed=step + 1)
        g = _gradient(model, w, x, y)
        scale = 0.3 / _norm(g, NORM_NAMES)
        eps = {k: scale * g[k] if k in NORM_NAMES else torch.zeros_like(g[k]) for k in w}
        gp = _gradient(model, {k: w[k] + eps[k] for k in w}, x, y)
        w = {k: w[k] - 0.1 * gp[k] for k in w}
        result = train_step(model, x, y, opt, F.cross_entropy)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), w[name], rtol=1e-10, atol=1e-12, msg=(step, name))
        assert result.perturbation_norm.item() == pytest.approx(0.3, rel=1e-10)


def test_fsam_steps_by_its_formula_in_float64():
    """m_t = λ m_{t−1} + (1 − λ) g_t with m_0 = 0, d = g_t − σ m_t, ε = ρ d/‖d‖, w ← w − η ∇L(w + ε); the EMA the
    optimizer keeps is m_t after every step."""
    model = _net("batchnorm")
    rho, sigma, lmbda, lr = 0.2, 0.8, 0.6, 0.1
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=rho, sigma=sigma, lmbda=lmbda, lr=lr)
    w = _weights(model)
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    for step in range(4):
        x, y = _batch(seed=step + 1)
        g = _gradient(model, w, x, y)
        m = {k: lmbda * m[k] + (1 - lmbda) * g[k] for k in w}
        d = {k: g[k] - sigma * m[k] for k in w}
        scale = rho / _norm(d)
        gp = _gradient(model, {k: w[k] + scale * d[k] for k in w}, x, y)
        w = {k: w[k] - lr * gp[k] for k in w}
        train_step(model, x, y, opt, F.cross_entropy)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), w[name], rtol=1e-10, atol=1e-12, msg=(step, name))
            torch.testing.assert_close(opt.state[p]["ema"], m[name], rtol=1e-10, atol=1e-13, msg=(step, name))


# ---------------------------------------------------------------------------------------------------------
# Reductions to SAM.


def _bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _assert_same_training(nets, opts, **step_options):
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    states = []
    for net, opt in zip(nets, opts):
        torch.manual_seed(3)
        for _ in range(3):
            train_step(net, x, y, opt, F.cross_entropy, **step_options)
        states.append(torch.get_rng_state())
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        if not p.requires_grad:
            continue
        assert torch.equal(opts[0].base_optimizer.state[p]["momentum_buffer"],
                           opts[1].base_optimizer.state[q]["momentum_buffer"])
    assert torch.equal(states[0], states[1])


@pytest.mark.parametrize("accumulate", [1, 4])
def test_fsam_with_sigma_zero_is_sam_bit_for_bit(accumulate):
    """With BatchNorm and dropout, momentum and weight decay, accumulation or not: weights, BatchNorm statistics,
    momentum buffers and the random stream equal SAM's exactly (the EMA still runs, unused)."""
    nets = [_bn_dropout_net(), _bn_dropout_net()]
    opts = [SAM(nets[0].parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=5e-4),
            FSAM(nets[1].parameters(), torch.optim.SGD, rho=0.1, sigma=0.0, lmbda=0.6, lr=0.1, momentum=0.9,
                 weight_decay=5e-4)]
    _assert_same_training(nets, opts, accumulate=accumulate)


@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_sam_on_where_every_parameter_is_a_normalization_parameter_is_sam_bit_for_bit(micro_batch_size):
    def all_norm() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.BatchNorm1d(5), nn.Dropout(0.3), nn.LayerNorm(5), nn.Tanh(), nn.GroupNorm(1, 5),
                             nn.Linear(5, 3, bias=False).requires_grad_(False))

    nets = [all_norm(), all_norm()]
    assert {id(p) for p in normalization_parameters(nets[1])} == {id(p) for p in nets[1].parameters()
                                                                  if p.requires_grad}
    params = [[p for p in net.parameters() if p.requires_grad] for net in nets]
    opts = [SAM(params[0], torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4),
            SAMON(normalization_groups(nets[1]), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4)]
    _assert_same_training(nets, opts, micro_batch_size=micro_batch_size)


# ---------------------------------------------------------------------------------------------------------
# What a SAM step works with.


def test_sam_on_leaves_the_other_parameters_unperturbed_and_batchnorm_statistics_to_the_clean_pass():
    net = _net("batchnorm")
    reference = copy.deepcopy(net)
    x, y = _batch(16)
    seen = {}

    def criterion(logits, targets):  # records the weights of each pass
        seen.setdefault("passes", []).append({n: p.detach().clone() for n, p in net.named_parameters()})
        return F.cross_entropy(logits, targets)

    before = _weights(net)
    train_step(net, x, y, SAMON(normalization_groups(net), torch.optim.SGD, rho=0.5, lr=0.1), criterion)
    clean, perturbed = seen["passes"]
    for name in before:
        assert torch.equal(clean[name], before[name])
        assert torch.equal(perturbed[name], before[name]) == (name not in NORM_NAMES), name
    with torch.no_grad():
        reference(x)  # the clean forward alone
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(net[1], name), getattr(reference[1], name)), name


def _make(variant: str, model: nn.Module) -> SAM:
    if variant == "sam_on":
        return SAMON(normalization_groups(model), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    return FSAM(model.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lmbda=0.6, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("variant", ["sam_on", "fsam"])
def test_under_a_grad_scaler_the_step_is_the_unscaled_one(variant):
    models = [_net(), _net()]
    opts = [_make(variant, m) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        x, y = _batch(seed=step + 1)
        scaled = train_step(models[0], x, y, opts[0], F.cross_entropy, scaler=scaler)
        plain = train_step(models[1], x, y, opts[1], F.cross_entropy)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        if variant == "fsam":
            torch.testing.assert_close(opts[0].state[a]["ema"], opts[1].state[b]["ema"], rtol=1e-10, atol=1e-13)
    assert scaled.skipped.item() == 0.0 and scaler.get_scale() == 2.0**10
    torch.testing.assert_close(scaled.grad_norm, plain.grad_norm)


def test_fsam_non_finite_clean_gradient_skips_the_step_and_leaves_the_ema():
    model = _net()
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _batch()
    train_step(model, x, y, opt, F.cross_entropy, scaler=scaler)
    ema = {p: opt.state[p]["ema"].clone() for p in model.parameters()}
    before = _weights(model)
    calls = [0]

    def inf_first_pass(logits, targets):
        calls[0] += 1
        loss = F.cross_entropy(logits, targets)
        return loss * math.inf if calls[0] == 1 else loss

    assert train_step(model, x, y, opt, inf_first_pass, scaler=scaler).skipped.item() == 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(opt.state[p]["ema"], ema[p]) for p in model.parameters())
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("variant", ["sam_on", "fsam"])
def test_accumulation_equals_the_one_piece_step(variant):
    """accumulate=k: ε (and F-SAM's EMA update) from the whole batch's gradient, as in one piece."""
    models = [_net(), _net()]
    opts = [_make(variant, m) for m in models]
    for step in range(3):
        x, y = _batch(13, seed=step + 1)
        train_step(models[0], x, y, opts[0], F.cross_entropy)
        train_step(models[1], x, y, opts[1], F.cross_entropy, accumulate=4)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fsam_state_dict_carries_the_ema_and_a_rebuilt_optimizer_steps_in_lock_step():
    model = _net()
    make = lambda m: FSAM(m.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lmbda=0.6, lr=0.1,  # noqa: E731
                          momentum=0.9)
    opt = make(model)
    for step in range(2):
        train_step(model, *_batch(seed=step + 1), opt, F.cross_entropy)
    saved = opt.state_dict()
    assert all("fsam_ema" in saved["state"][i] for i in range(4))
    assert not any("fsam_ema" in s for s in opt.base_optimizer.state.values())  # the base's own state untouched
    twin = copy.deepcopy(model)
    twin_opt = make(twin)
    twin_opt.load_state_dict(copy.deepcopy(saved))
    for step in range(2, 4):
        train_step(model, *_batch(seed=step + 1), opt, F.cross_entropy)
        train_step(twin, *_batch(seed=step + 1), twin_opt, F.cross_entropy)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b) and torch.equal(opt.state[a]["ema"], twin_opt.state[b]["ema"])


# ---------------------------------------------------------------------------------------------------------
# Refusals, in one line.


def test_fsam_with_the_local_ddp_mode_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="F-SAM with the local SAM mode is not supported") as error:
        distributed.check_setup(World(world_size=2), batch_size=64, num_samples=128, sam_mode="local",
                                sam_variant="fsam")
    assert "\n" not in str(error.value)
    distributed.check_setup(World(world_size=2), batch_size=64, num_samples=128, sam_mode="local",
                            sam_variant="sam_on")


def test_sam_on_on_a_network_without_normalization_layers_is_refused_before_writing(workdir):
    result = run_cli("sam-run", *TINY, "optimizer=sam_on", "hydra.run.dir=refused", cwd=workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sam_on perturbs only normalization layers; model mlp has none" in lines[0], \
        result.stderr
    assert not (workdir / "refused").exists()


# ---------------------------------------------------------------------------------------------------------
# End to end, resume, labels.


def test_a_stopped_fsam_run_resumes_in_lock_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed right after its checkpoint at step 6 (of 8, mid-epoch 2), then re-run: equal to the run never stopped —
    weights, optimizer state with the EMA (`assert_same_run` compares every state entry), metrics and summary."""
    assert_resumes_in_lock_step(tmp_path, monkeypatch, *TINY, "optimizer=fsam", "optimizer.sam.lmbda=0.5",
                                "sam_start=0.25", "checkpoint.every_steps=2")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["state"]
    assert state and all("fsam_ema" in entry for entry in state.values())


DDP_BATCHES = [(0, 12), (12, 24), (24, 31)]


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(31, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (31,), generator=g)


def _ddp_work(world: World) -> dict:
    x, y = _ddp_data()
    results = {}
    for variant in ("sam_on", "fsam"):
        model = distributed.wrap_model(_net(), world)
        optimizer = _make(variant, distributed.unwrap(model))
        for start, stop in DDP_BATCHES:
            distributed.distributed_step(model, x[start:stop], y[start:stop], optimizer, nn.CrossEntropyLoss(),
                                         world, sam_mode="global")
        results[variant] = {"model": distributed.unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
    return results


def test_ddp_global_mode_equals_one_process_and_the_fsam_ema_is_the_same_on_every_rank(tmp_path):
    """Two gloo processes on shards of each batch: weights and F-SAM's EMA (from the all-reduced gradient) equal one
    process on the whole batch, on both ranks."""
    ranks = results_of_each_rank(_ddp_work, tmp_path)
    x, y = _ddp_data()
    for variant in ("sam_on", "fsam"):
        model = _net()
        optimizer = _make(variant, model)
        for start, stop in DDP_BATCHES:
            train_step(model, x[start:stop], y[start:stop], optimizer, nn.CrossEntropyLoss())
        state = optimizer.state_dict()["state"]
        for rank in ranks:
            for key, value in model.state_dict().items():
                torch.testing.assert_close(rank[variant]["model"][key], value, rtol=1e-10, atol=1e-12,
                                           msg=(variant, key))
            for index, entry in state.items():
                for key, value in entry.items():
                    torch.testing.assert_close(rank[variant]["optimizer"]["state"][index][key], value, rtol=1e-10,
                                               atol=1e-12, msg=(variant, index, key))
        if variant == "fsam":
            assert all("fsam_ema" in entry for entry in state.values())
            for index, entry in ranks[0]["fsam"]["optimizer"]["state"].items():
                assert torch.equal(entry["fsam_ema"], ranks[1]["fsam"]["optimizer"]["state"][index]["fsam_ema"])
