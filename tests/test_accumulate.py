"""Gradient accumulation (`accumulate=k`): a step over k micro-batches equals the one-piece step.

The reference is the one-piece `train_step` (itself checked against hand computations in test_steps.py), plus one
SAM step written out by hand with ε from the whole batch's gradient. Exact means float64 agreement to ~1e-12: the
micro-batches' gradients are summed weighted by size, which rounds differently from one big reduction, nothing
more. BatchNorm is the documented exception (each micro-batch is normalized with its own statistics).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_json, run_in_process
from hydra import compose, initialize_config_dir
from test_resume import assert_resumes_in_lock_step
from test_steps import (
    LR,
    RHO,
    _counting_updates,
    _InfOnCall,
    _linear_problem,
    _perturbed_grads,
    _recording_masks,
    _weights,
)
from torch import nn

from sam_runner.cli.preflight import CONFIG_DIR
from sam_runner.errors import ConfigError
from sam_runner.optim import SAM
from sam_runner.run.spec import validate
from sam_runner.scale import distributed
from sam_runner.scale.distributed import World
from sam_runner.steps import micro_batches, step_pieces, train_step

N = 13  # samples per batch: no k below divides it, so the micro-batches are uneven


def _tanh_net() -> nn.Module:
    """float64, no BatchNorm and no dropout: a model whose one-piece and accumulated steps agree exactly."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(count: int = 2, n: int = N) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(count)]


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2),
    "sam": lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sam-adamw": lambda m: SAM(m.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, perturb_weight_decay=True,
                               weight_decay=1e-2),
    "asam": lambda m: SAM(m.parameters(), torch.optim.SGD, rho=1.0, adaptive=True, eta=0.01, lr=0.1, momentum=0.9),
}
REPORTED = ("loss", "correct", "grad_norm", "perturbed_loss", "perturbed_correct", "perturbation_norm", "skipped")


def _assert_close_results(accumulated: Any, whole: Any) -> None:
    for name in REPORTED:
        a, b = getattr(accumulated, name), getattr(whole, name)
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-12, atol=1e-14, msg=name)


def _assert_same_state(model: nn.Module, twin: nn.Module, opt: torch.optim.Optimizer,
                       twin_opt: torch.optim.Optimizer) -> None:
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    for index, state in twin_opt.state_dict()["state"].items():  # momenta, Adam moments, step counts
        for key, value in state.items():
            torch.testing.assert_close(opt.state_dict()["state"][index][key], value, rtol=1e-12, atol=1e-14)


def _two_ways(make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], accumulate: int, steps: int = 2,
              make_model: Callable[[], nn.Module] = _tanh_net, **options: Any) -> tuple[list, list, tuple]:
    """`steps` steps with `accumulate` micro-batches, and the same steps in one piece, on twin models."""
    model = make_model()
    twin = copy.deepcopy(model)
    opt, twin_opt = make_optimizer(model), make_optimizer(twin)
    batches = _batches(steps)
    ours = [train_step(model, x, y, opt, F.cross_entropy, accumulate=accumulate, **options) for x, y in batches]
    theirs = [train_step(twin, x, y, twin_opt, F.cross_entropy, **options) for x, y in batches]
    return ours, theirs, (model, twin, opt, twin_opt)


# ---------------------------------------------------------------------------------------------------------
# The micro-batches.

def test_micro_batches_are_contiguous_nearly_equal_and_never_empty() -> None:
    assert micro_batches(13, 4) == [(0, 4), (4, 7), (7, 10), (10, 13)]
    assert micro_batches(13, 1) == [(0, 13)]
    assert micro_batches(3, 5) == [(0, 1), (1, 2), (2, 3)]  # an epoch's last batch smaller than k


def test_a_micro_batch_is_also_cut_at_m_sharpness_chunk_boundaries() -> None:
    assert step_pieces(13, 2, 5) == [[(0, 5)], [(5, 7), (7, 10)], [(10, 13)]]  # micro-batches (0, 7), (7, 13)
    assert step_pieces(13, 2) == [[(0, 7), (7, 13)]]


# ---------------------------------------------------------------------------------------------------------
# Exactness in float64 against the one-piece step.

@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
@pytest.mark.parametrize("accumulate", [2, 4, N])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_accumulated_step_equals_the_one_piece_step(name: str, accumulate: int, max_grad_norm: float | None
                                                       ) -> None:
    ours, theirs, state = _two_ways(OPTIMIZERS[name], accumulate, max_grad_norm=max_grad_norm)
    for a, b in zip(ours, theirs):
        _assert_close_results(a, b)
    _assert_same_state(*state)
    if max_grad_norm is not None:
        assert theirs[0].grad_norm > max_grad_norm  # the clipped case really clips


def test_accumulated_sam_matches_the_hand_computation_with_epsilon_from_the_whole_batch() -> None:
    """ε = ρ g / ‖g‖ with g the gradient of the *whole* batch (closed form, test_steps.py), then the gradient at
    w + ε; not a per-micro-batch ε."""
    model, x, y = _linear_problem()  # 8 samples; 3 micro-batches of 3, 3, 2
    ws = _weights(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    result = train_step(model, x, y, opt, F.cross_entropy, accumulate=3)
    g_perturbed, eps_norm = _perturbed_grads(ws, x, y)
    for p, w, g in zip(model.parameters(), ws, g_perturbed):
        torch.testing.assert_close(p.detach(), w - LR * g, rtol=1e-12, atol=1e-14)
    assert result.perturbation_norm.item() == pytest.approx(eps_norm, rel=1e-12)


@pytest.mark.parametrize("accumulate", [2, 3, 5])
def test_m_sharpness_with_accumulation_equals_m_sharpness_in_one_piece(accumulate: int) -> None:
    """Each chunk keeps its own ε from its own whole gradient, wherever the micro-batches cut it."""
    ours, theirs, state = _two_ways(OPTIMIZERS["sam"], accumulate, micro_batch_size=5)
    for a, b in zip(ours, theirs):
        _assert_close_results(a, b)
    _assert_same_state(*state)


def test_loss_weight_with_accumulation_is_the_one_piece_step_s() -> None:
    ours, theirs, state = _two_ways(OPTIMIZERS["sam"], 3, loss_weight=0.75)
    _assert_same_state(*state)


# ---------------------------------------------------------------------------------------------------------
# BatchNorm: what is not exact, and what the perturbed passes leave alone.

def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_batchnorm_statistics_are_the_clean_micro_batches_and_the_perturbed_passes_leave_them(name: str) -> None:
    """Each clean micro-batch updates the running statistics once (as in every framework's accumulation: k
    updates per step, each from its micro-batch's statistics); the perturbed passes leave them untouched."""
    model = _bn_net()
    reference = copy.deepcopy(model)
    (x, y), = _batches(1)
    train_step(model, x, y, OPTIMIZERS[name](model), F.cross_entropy, accumulate=3)
    with torch.no_grad():
        for start, stop in micro_batches(N, 3):
            reference(x[start:stop])
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], key), getattr(reference[1], key)), key
    assert int(model[1].num_batches_tracked) == 3


def test_with_batchnorm_the_accumulated_step_differs_from_the_one_piece_step() -> None:
    """Documented, not a bug: a micro-batch is normalized with its own batch statistics, so its gradient is not
    its rows' share of the whole batch's (docs/sam.md, "Gradient accumulation")."""
    ours, theirs, (model, twin, _, _) = _two_ways(OPTIMIZERS["sam"], 3, steps=1, make_model=_bn_net)
    assert not torch.allclose(model[0].weight, twin[0].weight, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Dropout: the clean and perturbed pass of each micro-batch draw the same mask.

def test_each_micro_batch_s_two_passes_see_the_same_dropout_mask() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.5), nn.Linear(5, 3))
    x, y = (t.float() if t.is_floating_point() else t for t in _batches(1)[0])
    masks = _recording_masks(net[0])
    train_step(net, x, y, SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1), F.cross_entropy, accumulate=3)
    assert len(masks) == 2 * 3  # clean passes of the three micro-batches, then their perturbed passes
    assert all(torch.equal(clean, perturbed) for clean, perturbed in zip(masks[:3], masks[3:]))
    assert [len(mask) for mask in masks[:3]] == [stop - start for start, stop in micro_batches(N, 3)]


def test_rho_zero_with_dropout_and_accumulation_is_bit_identical_to_an_accumulated_plain_step() -> None:
    """The SAM step draws what the plain step draws: the generator ends where the clean passes left it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    twin = copy.deepcopy(net)
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(3)
    torch.manual_seed(1)
    for x, y in batches:
        train_step(net, x, y, sam, F.cross_entropy, accumulate=3)
    after_sam = torch.get_rng_state()
    torch.manual_seed(1)
    for x, y in batches:
        train_step(twin, x, y, plain, F.cross_entropy, accumulate=3)
    assert torch.equal(torch.get_rng_state(), after_sam)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# fp16 loss scaling: one scaler update per optimizer step, a non-finite micro-batch skips the whole step.

@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_a_scaled_accumulated_step_equals_the_scaled_one_piece_step_with_one_update(name: str) -> None:
    model = _tanh_net()
    twin = copy.deepcopy(model)
    opt, twin_opt = OPTIMIZERS[name](model), OPTIMIZERS[name](twin)
    scaler, twin_scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2))
    updates = _counting_updates(scaler)
    for x, y in _batches(2):
        ours = train_step(model, x, y, opt, F.cross_entropy, scaler=scaler, accumulate=4)
        theirs = train_step(twin, x, y, twin_opt, F.cross_entropy, scaler=twin_scaler)
        _assert_close_results(ours, theirs)
    _assert_same_state(model, twin, opt, twin_opt)
    assert updates[0] == 2 and scaler.get_scale() == 2.0**12


@pytest.mark.parametrize("name, bad", [("sgd", 2), ("sam", 2), ("sam", 3 + 2)])  # 3 clean calls, then 3 perturbed
def test_a_non_finite_micro_batch_skips_the_whole_step(name: str, bad: int) -> None:
    model = _tanh_net()
    opt = OPTIMIZERS[name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    updates = _counting_updates(scaler)
    before = _weights(model)
    (x, y), = _batches(1)
    result = train_step(model, x, y, opt, _InfOnCall(bad), scaler=scaler, accumulate=3)
    assert result.skipped.item() == 1.0 and updates[0] == 1 and scaler.get_scale() == 2.0**11
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line each.

def _composed(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("override", ["accumulate=0", "accumulate=-2", "accumulate=129"])
def test_accumulate_out_of_range_is_one_line(override: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("accumulate must be an integer in [1, batch_size=128] "
                                                    "micro-batches per optimizer step")):
        validate(_composed(override))


def test_accumulate_that_is_not_an_integer_is_one_line() -> None:
    with pytest.raises(ConfigError, match="accumulate") as error:
        validate(_composed("accumulate=2.5"))
    assert "\n" not in str(error.value)


def test_accumulate_up_to_the_batch_size_is_valid() -> None:
    assert validate(_composed("accumulate=128", "optimizer=sam", "optimizer.sam.micro_batch_size=32")).accumulate == 128


def test_ddp_with_more_micro_batches_than_a_shard_has_samples_is_refused() -> None:
    world = World(world_size=4)
    distributed.check_setup(world, batch_size=64, num_samples=128, sam_mode="global", accumulate=16)
    with pytest.raises(ConfigError, match=r"^accumulate=17 is more micro-batches than the 16 samples"):
        distributed.check_setup(world, batch_size=64, num_samples=128, sam_mode="global", accumulate=17)
    with pytest.raises(ConfigError, match="than the 5 samples of the smallest shard"):  # the last batch: 20 / 4
        distributed.check_setup(world, batch_size=64, num_samples=148, sam_mode="global", accumulate=6)


# ---------------------------------------------------------------------------------------------------------
# End to end: a run records accumulate, and a stopped run resumes exactly.

def test_an_accumulated_run_records_accumulate_and_trains_as_the_one_piece_run(workdir: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    options = [*TINY, "optimizer=sam", "sharpness.measures=[]"]
    accumulated = read_json(run_in_process(workdir, monkeypatch, *options, "accumulate=3", run_dir="k3")
                            / "summary.json")
    whole = read_json(run_in_process(workdir, monkeypatch, *options, run_dir="k1") / "summary.json")
    assert (accumulated["status"], accumulated["accumulate"], whole["accumulate"]) == ("completed", 3, 1)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):  # float32: rounding only, over 8 steps
        assert accumulated[key] == pytest.approx(whole[key], rel=1e-4), key


def test_a_stopped_accumulated_run_resumes_in_lock_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed right after its checkpoint at step 6 (of 8; mid-epoch 2), then re-run: equal to the run never
    stopped, weights, optimizer state, metrics and summary."""
    assert_resumes_in_lock_step(tmp_path, monkeypatch, *(o for o in TINY if not o.startswith("model=")),
                                "model=cnn1d", "optimizer=sam", "accumulate=3", "checkpoint.every_steps=2")