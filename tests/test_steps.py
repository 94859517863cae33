"""train_step against hand computations: SAM update, m-sharpness, clipping, BatchNorm statistics, AMP; and runs
that train with it end to end (mixed precision, BatchNorm with augmentation)."""

import contextlib
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_json, run_in_process
from torch import nn

from sam_runner import steps
from sam_runner.optim import SAM
from sam_runner.steps import train_step

# ---------------------------------------------------------------------------------------------------------
# A float64 linear classifier with the closed-form cross-entropy gradient (softmax − one-hot)/N.

LR, RHO = 0.5, 0.1


def _linear_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, x, y


def _ce(ws, x, y) -> float:
    logits = x @ ws[0].T + ws[1]
    return float(-(logits.log_softmax(1)[torch.arange(len(y)), y]).mean())


def _ce_grads(ws, x, y) -> list[torch.Tensor]:
    logits = x @ ws[0].T + ws[1]
    delta = (logits.softmax(1) - F.one_hot(y, 3).double()) / len(y)
    return [delta.T @ x, delta.sum(0)]


def _norm(ts) -> float:
    return math.sqrt(sum(float((t**2).sum()) for t in ts))


def _perturbed_grads(ws, x, y) -> tuple[list[torch.Tensor], float]:
    """The gradient at w + ε with ε = ρ g/(‖g‖ + δ), and ‖ε‖."""
    g = _ce_grads(ws, x, y)
    scale = RHO / (_norm(g) + 1e-12)
    return _ce_grads([w + scale * gi for w, gi in zip(ws, g)], x, y), scale * _norm(g)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_sam_step_matches_hand_computation(max_grad_norm):
    model, x, y = _linear_problem()
    ws = _weights(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    result = train_step(model, x, y, opt, F.cross_entropy, max_grad_norm=max_grad_norm)

    g_pert, eps_norm = _perturbed_grads(ws, x, y)
    norm = _norm(g_pert)
    clip = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (norm + 1e-6))
    assert clip < 1.0 or max_grad_norm is None  # the clipped case really clips
    expected = [w - LR * clip * g for w, g in zip(ws, g_pert)]
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)

    assert result.grad_norm.item() == pytest.approx(norm, rel=1e-12)  # second pass, before clipping
    assert result.loss.item() == pytest.approx(_ce(ws, x, y), rel=1e-12)
    correct = int(((x @ ws[0].T + ws[1]).argmax(1) == y).sum())
    assert result.correct.item() == correct
    eps_ws = [w + RHO / (_norm(_ce_grads(ws, x, y)) + 1e-12) * g for w, g in zip(ws, _ce_grads(ws, x, y))]
    assert result.perturbed_loss.item() == pytest.approx(_ce(eps_ws, x, y), rel=1e-12)
    assert result.perturbation_norm.item() == pytest.approx(eps_norm, rel=1e-12)
    assert result.skipped is None


def test_plain_step_matches_hand_computation_with_clipping():
    model, x, y = _linear_problem()
    ws = _weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    result = train_step(model, x, y, opt, F.cross_entropy, max_grad_norm=0.05)
    g = _ce_grads(ws, x, y)
    clip = min(1.0, 0.05 / (_norm(g) + 1e-6))
    for p, w, gi in zip(model.parameters(), ws, g):
        torch.testing.assert_close(p.detach(), w - LR * clip * gi, rtol=1e-12, atol=1e-14)
    assert result.grad_norm.item() == pytest.approx(_norm(g), rel=1e-12)
    assert result.perturbed_loss is None and result.perturbation_norm is None


def test_m_sharpness_matches_explicit_per_chunk_computation():
    model, x, y = _linear_problem()
    ws = _weights(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    result = train_step(model, x, y, opt, F.cross_entropy, micro_batch_size=3)  # chunks of 3, 3, 2

    update = [torch.zeros_like(w) for w in ws]
    eps_norms = []
    for xc, yc in [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])]:
        g_pert, eps_norm = _perturbed_grads(ws, xc, yc)
        update = [u + len(xc) / len(x) * g for u, g in zip(update, g_pert)]
        eps_norms.append(eps_norm)
    for p, w, u in zip(model.parameters(), ws, update):
        torch.testing.assert_close(p.detach(), w - LR * u, rtol=1e-12, atol=1e-14)
    assert result.loss.item() == pytest.approx(_ce(ws, x, y), rel=1e-12)  # whole batch
    assert result.grad_norm.item() == pytest.approx(_norm(update), rel=1e-12)
    assert result.perturbation_norm.item() == pytest.approx(sum(eps_norms) / 3, rel=1e-12)


@pytest.mark.parametrize("option", [dict(micro_batch_size=2), dict(clean_pass=lambda: contextlib.nullcontext())])
def test_sam_only_options_without_sam_are_an_error(option):
    model, x, y = _linear_problem()
    with pytest.raises(ValueError, match="SAM only"):
        train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, **option)


def test_loss_weight_scales_the_update_but_neither_epsilon_nor_the_reported_loss():
    """What DDP needs for uneven shards: ε is invariant to the weight, the base step sees weight · g'."""
    model, x, y = _linear_problem()
    ws = _weights(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    result = train_step(model, x, y, opt, F.cross_entropy, loss_weight=0.75)
    g_pert, _ = _perturbed_grads(ws, x, y)
    for p, w, g in zip(model.parameters(), ws, g_pert):
        torch.testing.assert_close(p.detach(), w - LR * 0.75 * g, rtol=1e-12, atol=1e-14)
    assert result.loss.item() == pytest.approx(_ce(ws, x, y), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# BatchNorm.


def _bn_net(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=momentum), nn.ReLU(), nn.Linear(8, 3))


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_statistics_come_from_the_clean_pass_only(micro_batch_size, momentum):
    net, (x, y) = _bn_net(momentum), _batch()
    reference = copy.deepcopy(net)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    train_step(net, x, y, opt, F.cross_entropy, micro_batch_size=micro_batch_size)
    with torch.no_grad():  # what the clean forwards alone (train mode) do to the statistics
        for chunk in x.split(micro_batch_size) if micro_batch_size else [x]:
            reference(chunk)
    bn, bn_ref = net[1], reference[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert torch.equal(bn.num_batches_tracked, bn_ref.num_batches_tracked)


def test_rho_zero_train_step_is_bit_identical_to_base_with_batchnorm():
    net, (x, y) = _bn_net(), _batch()
    twin = copy.deepcopy(net)
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9, weight_decay=1e-3)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        train_step(net, x, y, sam, F.cross_entropy)
        train_step(twin, x, y, plain, F.cross_entropy)
    for a, b in zip(net.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Dropout: both passes of a SAM step see the same mask.


def _dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_rho_zero_with_dropout_is_bit_identical_to_a_plain_step_with_the_same_mask():
    net, (x, y) = _dropout_net(), _batch()
    twin = copy.deepcopy(net)
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    results = [train_step(net, x, y, sam, F.cross_entropy) for _ in range(3)]
    after_sam = torch.get_rng_state()
    torch.manual_seed(1)
    for _ in range(3):
        train_step(twin, x, y, plain, F.cross_entropy)
    assert all(torch.equal(r.perturbed_loss, r.loss) for r in results)  # the same sub-network
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), after_sam)  # a SAM step draws what a plain step draws


def _recording_masks(dropout: nn.Module) -> list[torch.Tensor]:
    """The kept entries of every forward of `dropout` (its inputs are never exactly zero here)."""
    masks: list[torch.Tensor] = []
    dropout.register_forward_hook(lambda module, inputs, output: masks.append(output != 0))
    return masks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_both_passes_of_a_sam_step_see_the_same_dropout_mask(device, micro_batch_size):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.5), nn.Linear(5, 3)).to(device)
    x, y = (t.to(device) for t in _batch())
    masks = _recording_masks(net[0])
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    for _ in range(2):
        train_step(net, x, y, opt, F.cross_entropy, micro_batch_size=micro_batch_size)
    chunks = 1 if micro_batch_size is None else len(x) // micro_batch_size
    assert len(masks) == 2 * 2 * chunks  # steps x chunks x (clean, perturbed)
    clean, perturbed = masks[0::2], masks[1::2]
    assert all(torch.equal(a, b) for a, b in zip(clean, perturbed))
    assert not torch.equal(clean[-1], clean[-1 - chunks])  # the next step draws a new mask


@pytest.mark.parametrize("net", [
    nn.Sequential(nn.Linear(5, 3)),
    nn.Sequential(nn.Dropout(0.5), nn.Linear(5, 3)).eval(),
    nn.Sequential(nn.Dropout(0.0), nn.Linear(5, 3)),
], ids=["no-dropout", "dropout-in-eval-mode", "dropout-p-zero"])
def test_a_step_without_active_dropout_leaves_the_rng_state_alone(net, monkeypatch):
    def refuse(device):
        raise AssertionError("read the RNG state of a model that draws no dropout mask")

    monkeypatch.setattr(steps, "_rng_state", refuse)
    x, y = _batch()
    train_step(net, x, y, SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1), F.cross_entropy)


# ---------------------------------------------------------------------------------------------------------
# Mixed precision and GradScaler.


class _InfOnCall:
    """A criterion that returns an infinite loss on its `bad`-th call: a non-finite gradient on demand."""

    def __init__(self, bad: int):
        self.bad, self.calls = bad, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets)
        self.calls += 1
        return loss * math.inf if self.calls == self.bad else loss


def _counting_updates(scaler: torch.amp.GradScaler) -> list[int]:
    calls = [0]
    update = scaler.update

    def counted(*args, **kwargs):
        calls[0] += 1
        return update(*args, **kwargs)

    scaler.update = counted
    return calls


def test_scaler_without_overflow_gives_the_unscaled_step():
    net, (x, y) = _bn_net(), _batch()
    twin = copy.deepcopy(net)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, perturb_weight_decay=True,
              weight_decay=1e-2)
    twin_opt = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                   perturb_weight_decay=True, weight_decay=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    updates = _counting_updates(scaler)
    for _ in range(2):
        scaled = train_step(net, x, y, opt, F.cross_entropy, scaler=scaler)
        plain = train_step(twin, x, y, twin_opt, F.cross_entropy)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scaled.perturbation_norm, plain.perturbation_norm)
    torch.testing.assert_close(scaled.grad_norm, plain.grad_norm)
    assert scaled.skipped.item() == 0.0 and updates[0] == 2 and scaler.get_scale() == 2.0**12


class _InfOnlyInCleanPass:
    """Gives `extra` (a parameter outside the model) an infinite gradient in the clean pass only: its NaN
    perturbation never reaches the perturbed pass, which stays finite, so nothing but an explicit check
    of the clean-pass gradient can skip the step."""

    def __init__(self, extra: nn.Parameter):
        self.extra, self.calls = extra, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = F.cross_entropy(logits, targets)
        return loss + math.inf * self.extra.sum() if self.calls == 1 else loss


@pytest.mark.parametrize("bad", ["clean-pass", "perturbed-pass", "clean-pass-only"])
def test_non_finite_gradient_in_either_pass_skips_the_sam_step(bad):
    net, (x, y) = _bn_net(), _batch()
    extra = nn.Parameter(torch.ones(2))
    opt = SAM([*net.parameters(), extra], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    updates = _counting_updates(scaler)
    before = _weights(net)
    criterion = {"clean-pass": _InfOnCall(1), "perturbed-pass": _InfOnCall(2),
                 "clean-pass-only": _InfOnlyInCleanPass(extra)}[bad]

    result = train_step(net, x, y, opt, criterion, scaler=scaler)
    assert result.skipped.item() == 1.0
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), before))  # restored, not stepped
    assert not opt.base_optimizer.state  # no momentum buffer: the base optimizer never stepped
    assert updates[0] == 1 and scaler.get_scale() == 2.0**11  # lowered once

    result = train_step(net, x, y, opt, F.cross_entropy, scaler=scaler)  # and training goes on
    assert result.skipped.item() == 0.0
    assert not all(torch.equal(p, w) for p, w in zip(net.parameters(), before))


def test_non_finite_gradient_skips_the_plain_step():
    net, (x, y) = _bn_net(), _batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = _weights(net)
    result = train_step(net, x, y, opt, _InfOnCall(1), scaler=scaler)
    assert result.skipped.item() == 1.0 and scaler.get_scale() == 2.0**11
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), before))


def _autocast_close_to_fp32(device: str, dtype: torch.dtype, scaler: torch.amp.GradScaler | None) -> None:
    net, (x, y) = _bn_net(), _batch(64)
    net, x, y = net.to(device), x.to(device), y.to(device)
    twin = copy.deepcopy(net)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    twin_opt = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    low = train_step(net, x, y, opt, F.cross_entropy, autocast_dtype=dtype, scaler=scaler)
    full = train_step(twin, x, y, twin_opt, F.cross_entropy)
    assert low.loss.dtype == torch.float32 and torch.isfinite(low.grad_norm)
    torch.testing.assert_close(low.loss, full.loss, rtol=2e-2, atol=1e-2)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    assert (low.skipped is None) == (scaler is None)


def test_autocast_on_cpu_close_to_fp32():
    _autocast_close_to_fp32("cpu", torch.bfloat16, None)
    _autocast_close_to_fp32("cpu", torch.float16, torch.amp.GradScaler("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_on_cuda_close_to_fp32():
    _autocast_close_to_fp32("cuda", torch.bfloat16, None)
    _autocast_close_to_fp32("cuda", torch.float16, torch.amp.GradScaler("cuda"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_sam_run_learns_on_the_cpu(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   precision: str) -> None:
    run_dir = run_in_process(workdir, monkeypatch, *TINY, "optimizer=sam", f"precision={precision}",
                             "sharpness.measures=[]")
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["precision"] == precision
    assert summary["train_acc"] > 0.5  # ten easy synthetic classes: a broken AMP step would stay near 0.1
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("opt/skipped_steps" in last) == (precision == "fp16")


def test_image_model_with_batchnorm_and_augmentation_trains_under_sam(workdir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = run_in_process(workdir, monkeypatch, "dataset=synthetic", "dataset.source.input_shape=[3,32,32]",
                             "dataset.source.num_train=128", "dataset.source.num_test=64",
                             "dataset.augment={crop_padding:4,horizontal_flip:true}", "model=keskar_c1",
                             "optimizer=sam", "epochs=1", "batch_size=64", "sharpness.measures=[ascent]",
                             "sharpness.num_samples=64")
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    metrics = json.loads((run_dir / "metrics.jsonl").read_text())
    assert metrics["opt/perturbation_norm"] == pytest.approx(0.05, rel=1e-4)  # ||eps|| = rho
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert any(key.endswith("running_mean") for key in state["model"])
