"""LookSAM (docs/sam.md "LookSAM"): SAM's step every k-th step keeps g_v, the one-pass steps between reuse it.

Against the formula written out in float64 (plain autograd on a tiny MLP, not the implementation called twice); k = 1
is SAM bit for bit; the steps between really forward once; accumulation, fp16 loss scaling, the state dict in lock
step mid-cycle, sam_start and a stopped run's resume. bf16, compile, DDP global mode, refusals and the run end to end
are cases of tests/test_sam_variants.py's parametrized tests.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, composed
from test_resume import assert_resumes_in_lock_step
from test_sam_variants import _dot, _gradient, _mlp, _weights
from torch import nn

from sam_runner.errors import ConfigError
from sam_runner.optim import SAM, LookSAM
from sam_runner.report.runs import optimizer_label
from sam_runner.run import build
from sam_runner.run.measurement import training_passes
from sam_runner.scale import distributed
from sam_runner.scale.distributed import World
from sam_runner.steps import train_step


def _batches(count: int, n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(count)]


def _looksam_reference(model: nn.Module, w: dict, batches: list, rho: float, k: int, alpha: float, lr: float
                       ) -> dict[str, torch.Tensor]:
    """Plain SGD with LookSAM's gradient, written out: on step t with t mod k = 0, g_s = ∇L(w + ρ g/‖g‖) is the
    step's gradient and g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g is kept; on the others the gradient is g + α (‖g‖/‖g_v‖) g_v."""
    g_v = None
    for t, (x, y) in enumerate(batches):
        g = _gradient(model, w, x, y)
        if t % k == 0:
            norm = math.sqrt(_dot(g, g))
            g_s = _gradient(model, {n: w[n] + rho / norm * g[n] for n in w}, x, y)
            c = _dot(g, g_s) / _dot(g, g)
            g_v = {n: g_s[n] - c * g[n] for n in w}
            d = g_s
        else:
            scale = alpha * math.sqrt(_dot(g, g)) / math.sqrt(_dot(g_v, g_v))
            d = {n: g[n] + scale * g_v[n] for n in w}
        w = {n: w[n] - lr * d[n] for n in w}
    return w


def test_steps_follow_the_formula_in_float64_over_two_cycles():
    """k = 3, seven steps (SAM's at 0, 3, 6) on a new batch each, through train_step with plain SGD."""
    model, batches = _mlp(), _batches(7)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.3, k=3, alpha=0.6, lr=0.2)
    reference = _looksam_reference(model, _weights(model), batches, 0.3, 3, 0.6, 0.2)
    perturbed = [train_step(model, x, y, opt, F.cross_entropy).perturbed_loss is not None for x, y in batches]
    assert perturbed == [True, False, False, True, False, False, True] and opt.steps_taken == 7
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=1e-10, atol=1e-12, msg=name)


def _bn_dropout_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def test_k_1_is_sam_bit_for_bit():
    """k = 1: every step is SAM's (g_v is kept but never used), with BatchNorm, dropout, momentum, weight decay."""
    nets = [_bn_dropout_net(), _bn_dropout_net()]
    options = dict(rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opts = [SAM(nets[0].parameters(), torch.optim.SGD, **options),
            LookSAM(nets[1].parameters(), torch.optim.SGD, k=1, alpha=0.7, **options)]
    for x, y in _batches(3, 16):
        x = x.float()
        results = []
        for net, opt in zip(nets, opts):
            torch.manual_seed(5)  # the same dropout masks
            results.append(train_step(net, x, y, opt, F.cross_entropy))
        assert torch.equal(results[0].perturbed_loss, results[1].perturbed_loss)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_the_steps_between_forward_once():
    """A forward hook counts the model's calls: two on SAM's steps, one on the others (no perturbed pass)."""
    model = _mlp()
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=3, lr=0.1)
    per_step = []
    for x, y in _batches(6):
        calls[0] = 0
        train_step(model, x, y, opt, F.cross_entropy)
        per_step.append(calls[0])
    assert per_step == [2, 1, 1, 2, 1, 1]


def test_accumulation_equals_the_one_piece_step():
    """accumulate=k: g, g_s and g_v are the whole batch's, on SAM's steps and on the steps between."""
    models = [_mlp(), _mlp()]
    opts = [LookSAM(m.parameters(), torch.optim.SGD, rho=0.2, k=2, alpha=0.5, lr=0.1, momentum=0.9) for m in models]
    for x, y in _batches(4, 13):
        train_step(models[0], x, y, opts[0], F.cross_entropy)
        train_step(models[1], x, y, opts[1], F.cross_entropy, accumulate=4)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opts[0].state[a]["gv"], opts[1].state[b]["gv"], rtol=1e-10, atol=1e-12)


def test_a_reloaded_state_dict_steps_in_lock_step_mid_cycle():
    """Reloaded after a SAM step and one step between (k = 3): the copy keeps the counter and g_v and steps as the
    original does, bit for bit (momentum too)."""
    model, batches = _mlp(), _batches(6)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.3, k=3, alpha=0.7, lr=0.1, momentum=0.9)
    for x, y in batches[:2]:
        train_step(model, x, y, opt, F.cross_entropy)
    twin = copy.deepcopy(model)
    twin_opt = LookSAM(twin.parameters(), torch.optim.SGD, rho=0.3, k=3, alpha=0.7, lr=0.1, momentum=0.9)
    state = copy.deepcopy(opt.state_dict())
    assert state["looksam_steps"] == 2 and all("looksam_gv" in entry for entry in state["state"].values())
    twin_opt.load_state_dict(state)
    for x, y in batches[2:]:
        train_step(model, x, y, opt, F.cross_entropy)
        train_step(twin, x, y, twin_opt, F.cross_entropy)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_under_a_grad_scaler_the_steps_are_the_unscaled_ones():
    """fp16 loss scaling (scale 2^10 on the CPU): g_v is kept unscaled and the reused term scales with g, so the
    scaler's one unscale gives the unscaled steps."""
    models = [_mlp(), _mlp()]
    opts = [LookSAM(m.parameters(), torch.optim.SGD, rho=0.2, k=2, alpha=0.7, lr=0.1, momentum=0.9) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in _batches(4):
        scaled = train_step(models[0], x, y, opts[0], F.cross_entropy, scaler=scaler)
        plain = train_step(models[1], x, y, opts[1], F.cross_entropy)
        assert scaled.skipped.item() == 0.0
        torch.testing.assert_close(scaled.grad_norm, plain.grad_norm)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opts[0].state[a]["gv"], opts[1].state[b]["gv"], rtol=1e-10, atol=1e-12)


def test_a_skipped_sam_step_keeps_no_non_finite_g_v_and_a_zero_g_v_gives_the_plain_step():
    """The first SAM step's perturbed pass overflows: the step is skipped and g_v stays 0 (not NaN); the next step
    (one pass) then takes g itself, as plain SGD would, with no NaN from ‖g_v‖ = 0."""
    model, batches = _mlp(), _batches(2)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.2, k=3, alpha=0.7, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls = [0]

    def inf_second_pass(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        loss = F.cross_entropy(logits, targets)
        return loss * math.inf if calls[0] == 2 else loss

    assert train_step(model, *batches[0], opt, inf_second_pass, scaler=scaler).skipped.item() == 1.0
    assert all(torch.equal(opt.state[p]["gv"], torch.zeros_like(p)) for p in model.parameters())
    w = _weights(model)
    x, y = batches[1]
    g = _gradient(model, w, x, y)
    assert train_step(model, x, y, opt, F.cross_entropy, scaler=scaler).skipped.item() == 0.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[name] - 0.1 * g[name], rtol=1e-10, atol=1e-12)


def test_its_counter_stands_still_during_the_base_steps_before_sam_start():
    """Before sam_start's switch the loop steps the base optimizer alone (build.Training.step_optimizer): LookSAM's
    counter does not advance, so the first step after the switch is a SAM step."""
    model, batches = _mlp(), _batches(3)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=2, lr=0.1)
    for x, y in batches[:2]:
        train_step(model, x, y, opt.base_optimizer, F.cross_entropy)
    assert opt.steps_taken == 0
    assert train_step(model, *batches[2], opt, F.cross_entropy).perturbed_loss is not None


def test_m_sharpness_and_the_local_ddp_mode_are_refused_in_one_line():
    model, (x, y) = _mlp(), _batches(1)[0]
    opt = LookSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="LookSAM takes no micro_batch_size"):
        train_step(model, x, y, opt, F.cross_entropy, micro_batch_size=4)
    with pytest.raises(ConfigError, match="LookSAM with the local SAM mode is not supported") as error:
        distributed.check_setup(World(world_size=2), batch_size=64, num_samples=128, sam_mode="local",
                                sam_variant="looksam")
    assert "\n" not in str(error.value)


def test_a_stopped_run_with_sam_start_resumes_in_lock_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """k = 3 after sam_start=0.25 (2 base steps of 8): killed right after its checkpoint at step 6 (LookSAM's own
    step 4, between its SAM steps 3 and 6), then re-run: equal to the run never stopped, counter and g_v included."""
    assert_resumes_in_lock_step(tmp_path, monkeypatch, *TINY, "optimizer=looksam", "optimizer.sam.k=3",
                                "sam_start=0.25", "checkpoint.every_steps=2")


def test_a_rho_sweep_gives_one_label_per_radius():
    summaries = [{"optimizer": "looksam", "base_optimizer": "sgd", "rho": rho, "looksam_k": 5, "looksam_alpha": 0.7,
                  "rho_schedule": "constant"} for rho in (0.05, 0.1)]
    assert [optimizer_label(s, with_rho=True) for s in summaries] == ["looksam ρ=0.05 k=5 α=0.7",
                                                                       "looksam ρ=0.1 k=5 α=0.7"]
    assert optimizer_label({**summaries[0], "base_optimizer": "adamw"}) == "looksam(adamw) k=5 α=0.7"


def test_a_run_counts_one_plus_one_over_k_passes_per_step(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """What the `auto` choice of sharpness measures weighs: (1 + 1/k) forward and backward passes a sample."""
    cfg, _ = composed(workdir, monkeypatch, ["optimizer=looksam"])
    share = 1 / build._sam_every(cfg.optimizer.sam)
    assert training_passes(1, 100, sam=share, every=0) == pytest.approx(100 * 2 * (1 + 1 / 5))
    assert build._sam_every(composed(workdir, monkeypatch, ["optimizer=gsam"])[0].optimizer.sam) == 1
