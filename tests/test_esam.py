"""ESAM (Du et al., ICLR 2022; docs/sam.md "ESAM"): stochastic weight perturbation and sharpness-sensitive data
selection. The step against its formula written out here in float64 (plain autograd on a tiny MLP, the random draw
reproduced from the same seeded generator), β = γ = 1 against SAM bit for bit, the selected rows, accumulation,
BatchNorm statistics, the backward work SWP saves, refusals and a stopped run's resume.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_cli
from test_resume import assert_resumes_in_lock_step
from test_sam_variants import _batch, _mlp, _weights
from torch import nn
from torch.func import functional_call

from sam_runner.errors import ConfigError
from sam_runner.optim import ESAM, SAM
from sam_runner.report.runs import optimizer_label
from sam_runner.scale import distributed
from sam_runner.scale.distributed import World
from sam_runner.steps import train_step

SEED = 6  # its first draw of 4 tensors at β = 0.5 picks none (drawn again), the next ones some


def _esam(model: nn.Module, beta: float = 0.5, gamma: float = 0.5, seed: int = SEED, **kwargs) -> ESAM:
    return ESAM(model.parameters(), torch.optim.SGD, rho=0.2, beta=beta, gamma=gamma, lr=0.1,
                generator=torch.Generator().manual_seed(seed), **kwargs)


def _rows_loss(model: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, w, (x,)), y, reduction="none")


def _grad(model, w, x, y) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}
    return dict(zip(leaves, torch.autograd.grad(_rows_loss(model, leaves, x, y).mean(), list(leaves.values()))))


def _reference_step(model, w, x, y, draws: torch.Generator, rho=0.2, beta=0.5, gamma=0.5, lr=0.1):
    """One ESAM step by the formula: m_j ~ Bernoulli(β) per tensor (drawn again while none is picked),
    ε_j = (ρ/β)·m_j·g_j/‖m⊙g‖, B⁺ the ⌈γ·n⌉ rows with the largest L_i(w + ε) − L_i(w) (ties: the earlier row),
    w ← w − lr·∇(mean over B⁺ of L_i)(w + ε). Returns the new weights and B⁺ (in batch order)."""
    names = list(w)
    picked = _draw(draws, len(names), beta)
    g = _grad(model, w, x, y)
    norm = math.sqrt(sum(float((g[k] ** 2).sum()) for k, keep in zip(names, picked) if keep))
    eps = {k: (rho / beta) * g[k] / norm if keep else torch.zeros_like(g[k]) for k, keep in zip(names, picked)}
    perturbed = {k: w[k] + eps[k] for k in names}
    rise = (_rows_loss(model, perturbed, x, y) - _rows_loss(model, w, x, y)).tolist()
    k = math.ceil(gamma * len(rise) - 1e-9)
    chosen = sorted(sorted(range(len(rise)), key=lambda i: (-rise[i], i))[:k])
    gp = _grad(model, perturbed, x[chosen], y[chosen])
    return {key: w[key] - lr * gp[key] for key in names}, chosen


def _draw(draws: torch.Generator, n: int, beta: float) -> list[bool]:
    """Bernoulli(β) for each of n tensors, drawn again while none is picked."""
    while True:
        picked = (torch.rand(n, generator=draws) < beta).tolist()
        if any(picked):
            return picked


def _rows_seen(model: nn.Module) -> list[torch.Tensor]:
    """Record the input of every forward of `model` (the clean pass, the selection, the perturbed pass)."""
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize(("beta", "gamma"), [(0.5, 0.5), (0.5, 1.0), (1.0, 0.25)])
def test_esam_steps_by_its_formula_in_float64(beta, gamma):
    net, (x, y) = _mlp(), _batch()
    opt = _esam(net, beta, gamma)
    seen = _rows_seen(net)
    w, draws = _weights(net), torch.Generator().manual_seed(SEED)
    for _ in range(3):
        seen.clear()
        train_step(net, x, y, opt, F.cross_entropy)
        w, chosen = _reference_step(net, w, x, y, draws, beta=beta, gamma=gamma)
        for key, value in w.items():
            torch.testing.assert_close(dict(net.named_parameters())[key].detach(), value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(seen[-1], x[chosen], rtol=0, atol=0)  # the perturbed pass saw exactly B⁺


@pytest.mark.parametrize("accumulate", [1, 3])
def test_beta_and_gamma_one_is_sam_bit_for_bit(accumulate):
    """No draw, no selection forward: the same random stream, BatchNorm statistics and dropout masks as SAM."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    twin = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    esam = ESAM(net.parameters(), torch.optim.SGD, rho=0.1, beta=1.0, gamma=1.0, lr=0.1, momentum=0.9)
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(3):
        torch.manual_seed(5)
        got = train_step(net, x, y, esam, F.cross_entropy, accumulate=accumulate)
        torch.manual_seed(5)
        want = train_step(twin, x, y, sam, F.cross_entropy, accumulate=accumulate)
        assert torch.equal(got.perturbed_loss, want.perturbed_loss) and torch.equal(got.grad_norm, want.grad_norm)
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


class _Tagged(nn.Module):
    """The MLP on all input columns but the last, which carries the row's number (for the hook to see)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x[:, :-1])


def test_ties_go_to_the_earlier_rows_and_the_share_rounds_up():
    """Seven copies of one sample rise alike: γ = 0.3 of 7 rows takes ⌈2.1⌉ = 3 rows, the first three."""
    net = _Tagged()
    x, y = _batch(1)
    x, y = torch.cat([x.expand(7, 5), torch.arange(7.0, dtype=x.dtype)[:, None]], dim=1), y.expand(7)
    seen = _rows_seen(net)
    train_step(net, x, y, _esam(net, beta=1.0, gamma=0.3), F.cross_entropy)
    assert seen[-1][:, -1].tolist() == [0.0, 1.0, 2.0]


def test_accumulation_equals_the_one_piece_step():
    """The clean pass and the selection forward in 3 micro-batches, the ⌈γ·n⌉ selected rows in 3 again: the same
    step as in one piece, to float64 rounding."""
    one, pieces = _mlp(), _mlp()
    x, y = _batch(13)
    opt_one, opt_pieces = _esam(one), _esam(pieces)
    for _ in range(3):
        train_step(one, x, y, opt_one, F.cross_entropy)
        train_step(pieces, x, y, opt_pieces, F.cross_entropy, accumulate=3)
    for a, b in zip(one.parameters(), pieces.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_fp16_loss_scaling_gives_the_unscaled_step_and_a_non_finite_batch_skips_it():
    """One GradScaler per step: the clean gradient unscaled by hand before ε, the selection on unscaled losses, the
    selected rows' gradient unscaled by the base step. A batch whose clean gradient is not finite skips the step."""
    scaled_net, plain_net, (x, y) = _mlp(), _mlp(), _batch()
    scaled_opt, plain_opt = _esam(scaled_net), _esam(plain_net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        result = train_step(scaled_net, x, y, scaled_opt, F.cross_entropy, scaler=scaler)
        train_step(plain_net, x, y, plain_opt, F.cross_entropy)
    for a, b in zip(scaled_net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert result.skipped.item() == 0.0
    broken, before = x.clone(), _weights(scaled_net)
    broken[0, 0] = math.inf
    assert train_step(scaled_net, broken, y, scaled_opt, F.cross_entropy, scaler=scaler).skipped.item() == 1.0
    assert all(torch.equal(p, before[n]) for n, p in scaled_net.named_parameters())
    assert scaler.get_scale() == 2.0**9


def test_batchnorm_statistics_come_from_the_clean_pass_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    clean = copy.deepcopy(net)
    x, y = _batch()
    train_step(net, x, y, _esam(net), F.cross_entropy)
    clean(x)  # one training-mode forward: what the clean pass does to the statistics
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(net[1], name), getattr(clean[1], name)), name


def test_swp_computes_no_clean_gradient_for_the_tensors_left_out():
    """A tensor the draw leaves out gets one gradient (at w + ε), a picked one two: the clean backward really skips
    the left-out tensors' weight gradients, and they stay trainable after the step."""
    net, (x, y) = _mlp(), _batch()
    opt = _esam(net, beta=0.5, gamma=1.0)
    computed = {name: 0 for name, _ in net.named_parameters()}
    for name, p in net.named_parameters():
        p.register_hook(lambda grad, name=name: computed.__setitem__(name, computed[name] + 1))
    picked = _draw(torch.Generator().manual_seed(SEED), 4, 0.5)
    assert not all(picked)
    train_step(net, x, y, opt, F.cross_entropy)
    assert list(computed.values()) == [2 if keep else 1 for keep in picked]
    assert all(p.requires_grad for p in net.parameters())


def test_esam_refuses_what_its_step_cannot_do():
    with pytest.raises(ValueError, match="beta must be in"):
        ESAM(_mlp().parameters(), torch.optim.SGD, beta=0.0)
    with pytest.raises(RuntimeError, match="steps through sam_runner.steps.train_step"):
        _esam(_mlp()).step(lambda: None)
    dropout = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 3)).double()
    with pytest.raises(ValueError, match="needs a model without active dropout"):
        train_step(dropout, *_batch(), _esam(dropout), F.cross_entropy)
    with pytest.raises(ConfigError, match="ESAM does not run under DDP") as error:
        distributed.check_setup(World(world_size=2), batch_size=64, num_samples=128, sam_mode="global",
                                sam_variant="esam")
    assert "\n" not in str(error.value)


def test_esam_on_a_network_with_dropout_is_refused_before_writing(workdir):
    options = [o for o in TINY if not o.startswith("model=")]
    result = run_cli("sam-run", *options, "model=keskar_c1", "dataset.source.input_shape=[3,8,8]", "optimizer=esam",
                     "hydra.run.dir=refused", cwd=workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "esam with gamma < 1 needs a model without active dropout" in lines[0], result.stderr
    assert not (workdir / "refused").exists()


def test_a_stopped_esam_run_resumes_in_lock_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The draws come from the run's seeded CPU generator, which the checkpoint restores: killed at step 6 of 8 (ESAM
    switched on at step 2, sam_start) and re-run, the run equals the one never stopped."""
    assert_resumes_in_lock_step(tmp_path, monkeypatch, *TINY, "optimizer=esam", "sam_start=0.25",
                                "checkpoint.every_steps=2")


def test_a_rho_sweep_over_esam_gives_one_label_per_radius():
    summaries = [{"optimizer": "esam", "base_optimizer": "sgd", "rho": rho, "esam_beta": 0.6, "esam_gamma": 0.5,
                  "rho_schedule": "constant"} for rho in (0.05, 0.1)]
    assert [optimizer_label(s, with_rho=True) for s in summaries] == ["esam ρ=0.05 β=0.6 γ=0.5",
                                                                       "esam ρ=0.1 β=0.6 γ=0.5"]
