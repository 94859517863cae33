"""One training step, plain or SAM: BatchNorm statistics, dropout masks, AMP, gradient clipping, m-sharpness.

A step is a function of (model, batch, optimizer) so that DDP can wrap it (distributed.py passes a loss weight
and the `no_sync` context through the two keywords made for it). It returns 0-dim device
tensors and never calls .item(): the trainer reads them once per logging interval. The only host sync is the
one inside GradScaler.step, which must know whether to skip (fp16 only).
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from sam_runner.optim import ESAM, SAM, LookSAM, global_norm

Criterion = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Statistic:
    """How the trainer sums one StepResult field over an epoch, and the metric its mean is logged as.

    `per`: "sample" divides the epoch's sum by the samples seen, "step" by the steps taken, "epoch" keeps the sum.
    `batch_mean`: the step reports a mean over its batch, so it is weighted by the batch size before summing.
    Over the processes of a DDP run, "sample" sums add up; the others are averaged (ranks.py).
    """

    metric: str
    per: str
    batch_mean: bool = False


def _statistic(metric: str, per: str, batch_mean: bool = False, **options: Any) -> Any:
    return field(metadata={"statistic": Statistic(metric, per, batch_mean)}, **options)


@dataclass
class StepResult:
    """What one step measured; all 0-dim detached device tensors. A new per-step statistic is one field here."""

    loss: Tensor = _statistic("train/loss_seen", "sample", batch_mean=True)  # mean criterion at clean weights
    correct: Tensor = _statistic("train/acc_seen", "sample")  # correct argmax predictions at clean weights
    # global L2 norm of the gradient the base optimizer steps with, before clipping
    grad_norm: Tensor = _statistic("opt/grad_norm", "step")
    perturbed_loss: Tensor | None = _statistic("train/loss_perturbed", "sample", batch_mean=True,
                                               default=None)  # SAM only: mean criterion at w + ε
    perturbed_correct: Tensor | None = _statistic("train/acc_perturbed", "sample", default=None)
    # SAM only: ‖ε‖₂ (mean over micro-batches with m-sharpness)
    perturbation_norm: Tensor | None = _statistic("opt/perturbation_norm", "step", default=None)
    # fp16 only: 1.0 if the GradScaler skipped this step (non-finite grads)
    skipped: Tensor | None = _statistic("opt/skipped_steps", "epoch", default=None)


STATISTICS: dict[str, Statistic] = {item.name: item.metadata["statistic"] for item in fields(StepResult)}


def train_step(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    criterion: Criterion,
    *,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    micro_batch_size: int | None = None,
    accumulate: int = 1,
    loss_weight: float = 1.0,
    clean_pass: Callable[[], AbstractContextManager] = nullcontext,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
) -> StepResult:
    """One optimizer step on (inputs, targets); the two-pass SAM step when `optimizer` is a SAM (LookSAM: on every
    k-th step; the steps between take one pass, `optimizer.perturbs_next_step()` tells).

    autocast_dtype: run forwards under torch.autocast with this dtype (bf16 needs no scaler; fp16 wants one).
    scaler: one GradScaler for the whole step, updated exactly once.
    max_grad_norm: clip the gradient the base optimizer uses (SAM: the second-pass gradient).
    micro_batch_size: SAM's m-sharpness — each chunk of m samples gets its own ε.
    accumulate: gradient accumulation — forward and backward k micro-batches of the batch one at a time, their
        gradients summed weighted by size, so the step is the one-piece step in 1/k of the activation memory
        (SAM: a clean pass over the micro-batches, ε from the whole batch's gradient, a second pass at w + ε).
    loss_weight: multiply every loss by this before backward (the reported losses are not): under DDP, a
        rank's share of an uneven global batch, so that DDP's mean over ranks is the global batch's mean.
    clean_pass: SAM only — a context entered around each clean forward + backward; DDP's `no_sync` keeps
        the gradient that ε is taken from on this rank (per-worker ε, m-sharpness across devices).
    no_sync: entered around every micro-batch of an accumulation pass but the last (DDP's `no_sync`), so the
        gradients are all-reduced once per pass, not once per micro-batch.
    """
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    if not isinstance(optimizer, SAM) and (micro_batch_size is not None or clean_pass is not nullcontext):
        raise ValueError("train_step: micro_batch_size (m-sharpness) and clean_pass apply to SAM only; got a "
                         f"{type(optimizer).__name__}")
    if isinstance(optimizer, LookSAM) and (micro_batch_size is not None or clean_pass is not nullcontext):
        raise ValueError("train_step: LookSAM takes no micro_batch_size (m-sharpness) or clean_pass (DDP local "
                         "mode): its kept component g_v is one per step, from the whole batch's gradients")
    passes = _Passes(model, criterion, autocast_dtype, scaler, loss_weight, no_sync, has_active_dropout(model))
    units = step_pieces(inputs.shape[0], accumulate, micro_batch_size)
    if isinstance(optimizer, ESAM) and optimizer.gamma < 1 and (passes.replay_dropout or len(units) > 1):
        raise ValueError("train_step: ESAM's data selection (gamma < 1) needs a model without active dropout (the "
                         "selected rows' masks cannot be replayed) and no m-sharpness (micro_batch_size)")
    if isinstance(optimizer, SAM) and optimizer.perturbs_next_step():
        return _sam_step(passes, inputs, targets, optimizer, units, max_grad_norm, clean_pass)
    return _one_pass_step(passes, inputs, targets, optimizer, units, max_grad_norm)


Rows = tuple[int, int]  # [start, stop) of a batch's rows


def micro_batches(n: int, accumulate: int) -> list[Rows]:
    """The rows of the `accumulate` micro-batches of an n-sample batch: contiguous, in order, sizes differing by at
    most one (the first n mod k one larger, as torch.tensor_split cuts); n of one sample each when n < k (an
    epoch's last, partial batch)."""
    base, extra = divmod(n, min(accumulate, n))
    bounds = [0]
    for i in range(min(accumulate, n)):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def step_pieces(n: int, accumulate: int = 1, micro_batch_size: int | None = None) -> list[list[Rows]]:
    """What one step on an n-sample batch forwards: per unit that gets its own ε (an m-sharpness chunk, else the
    whole batch), the rows of its pieces (its parts in each micro-batch: a micro-batch is also cut at chunk
    boundaries, so every chunk's gradient is its own whatever `accumulate` is)."""
    m = micro_batch_size or n
    units = [(start, min(start + m, n)) for start in range(0, n, m)]
    cuts = micro_batches(n, accumulate)
    return [[(max(a, s), min(b, t)) for s, t in cuts if max(a, s) < min(b, t)] for a, b in units]


@dataclass
class _Passes:
    """The step's settings for its forward + backward passes, and one accumulation pass over a unit's pieces."""

    model: nn.Module
    criterion: Criterion
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    loss_weight: float
    no_sync: Callable[[], AbstractContextManager]
    replay_dropout: bool

    def run(self, inputs: Tensor, targets: Tensor, pieces: list[Rows], *,
            last: Callable[[], AbstractContextManager] = nullcontext, gate: Tensor | None = None,
            rng_states: list[Tensor] | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Forward + backward of every piece, the gradients summing in `.grad` as the unit's mean loss's gradient
        (each piece's mean loss weighted by its share of the unit).

        Every piece but the last runs under `no_sync` and the last under `last` (forward too: DDP decides at
        forward time whether a backward all-reduces). With `rng_states` (SAM's perturbed pass), each piece
        first puts back the dropout generator state its clean pass started from: the two passes of a piece draw
        the same masks. Returns the unit's mean loss and correct count (detached) and the generator state before
        each piece (empty when the model draws no dropout mask).
        """
        n = pieces[-1][1] - pieces[0][0]
        device = inputs.device
        loss_sum, correct_sum, states = None, None, []
        for i, (start, stop) in enumerate(pieces):
            if rng_states is not None and self.replay_dropout:
                _set_rng_state(device, rng_states[i])
            elif self.replay_dropout:
                states.append(_rng_state(device))
            share = (stop - start) / n
            with last() if i == len(pieces) - 1 else self.no_sync():
                loss, correct = _forward(self.model, inputs[start:stop], targets[start:stop], self.criterion,
                                         self.autocast_dtype)
                _backward(loss, self.scaler, gate, self.loss_weight * share)
            loss = loss.detach() if share == 1 else share * loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            correct_sum = correct if correct_sum is None else correct_sum + correct
        return loss_sum, correct_sum, states


def _one_pass_step(passes: _Passes, inputs: Tensor, targets: Tensor, optimizer: torch.optim.Optimizer,
                   units: list[list[Rows]], max_grad_norm: float | None) -> StepResult:
    """One accumulation pass at w, then the base step: a plain optimizer's step, or a SAM variant's step that
    perturbs nothing (LookSAM between its SAM steps), whose `reuse_gradient` turns the clean gradient into the
    step's before the base optimizer steps with it."""
    optimizer.zero_grad(set_to_none=True)
    (pieces,) = units
    loss, correct, _ = passes.run(inputs, targets, pieces)
    if isinstance(optimizer, SAM):
        optimizer.reuse_gradient()
        optimizer = optimizer.base_optimizer
    grad_norm, skipped = _base_step(optimizer, passes.scaler, max_grad_norm)
    return StepResult(loss, correct, grad_norm, skipped=skipped)


def _sam_step(
    passes: _Passes,
    inputs: Tensor,
    targets: Tensor,
    optimizer: SAM,
    units: list[list[Rows]],
    max_grad_norm: float | None,
    clean_pass: Callable[[], AbstractContextManager],
) -> StepResult:
    """Per unit (an m-sharpness chunk, or the whole batch): a clean accumulation pass over its pieces → ε from
    the unit's gradient → a perturbed accumulation pass at w + ε → restore w; then one base step with the
    unit-size-weighted mean of the perturbed gradients."""
    n, scaler = inputs.shape[0], passes.scaler
    # 1/scale as a tensor (scale(1) = the scale, without a host sync), to unscale the clean-pass gradient
    # by hand: GradScaler allows one unscale_ per optimizer per update, and that one is the second pass's.
    scale = None if scaler is None else scaler.scale(torch.ones((), device=inputs.device))
    inv_scale = None if scale is None else scale.double().reciprocal().float()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    accumulated: dict[Tensor, Tensor] = {}
    totals = dict(loss=0.0, correct=0, perturbed_loss=0.0, perturbed_correct=0, perturbation_norm=0.0)
    selecting = isinstance(optimizer, ESAM) and optimizer.gamma < 1  # ESAM's data selection (one unit: no m)
    for pieces in units:
        weight = (pieces[-1][1] - pieces[0][0]) / n
        optimizer.zero_grad(set_to_none=True)
        clean = replace(passes, criterion=_RowLosses(passes.criterion)) if selecting else passes
        with optimizer.ascent_pass():  # ESAM: the tensors its draw leaves out get no gradient here
            loss, correct, rng_states = clean.run(inputs, targets, pieces, last=clean_pass)
        if inv_scale is not None:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], inv_scale)
        if clean_pass is not nullcontext and passes.loss_weight != 1.0:
            # a rank's own gradient (DDP local mode, under no_sync) carries its share weight of the global batch:
            # ε is taken from its own mean gradient (USAM's ε = ρ·g, and the L2 term of perturb_weight_decay,
            # are not invariant to that weight)
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / passes.loss_weight)
        # w is restored after the perturbed backward, which still needs the perturbed weights
        with optimizer.perturbed(), frozen_batchnorm_stats(passes.model):  # BatchNorm: around backward too
            gate = None
            if scaler is not None:
                # A non-finite clean-pass gradient must skip the whole step. Multiplying the perturbed loss by
                # NaN (else exactly 1) makes the second-pass gradient non-finite, so GradScaler's own check
                # skips the base step and lowers the scale; no host sync needed here.
                gate = torch.where(torch.isfinite(optimizer.last_grad_norm), 1.0, float("nan"))
            if selecting:
                perturbed_loss, perturbed_correct = _selected_pass(passes, inputs, targets, pieces,
                                                                   torch.cat(clean.criterion.rows), optimizer.gamma,
                                                                   gate)
            else:
                perturbed_loss, perturbed_correct, _ = passes.run(inputs, targets, pieces, gate=gate,
                                                                  rng_states=rng_states)
        optimizer.descent_gradient(scale)  # the unit's direction from its two gradients (GSAM; SAM: as it is)
        if len(units) > 1:
            _accumulate(accumulated, params, weight)
        totals["loss"] += weight * loss
        totals["correct"] += correct
        totals["perturbed_loss"] += weight * perturbed_loss
        totals["perturbed_correct"] += perturbed_correct
        totals["perturbation_norm"] += optimizer.last_perturbation_norm / len(units)
    for p, grad in accumulated.items():
        p.grad = grad
    grad_norm, skipped = _base_step(optimizer.base_optimizer, scaler, max_grad_norm)
    return StepResult(grad_norm=grad_norm, skipped=skipped, **totals)


@dataclass
class _RowLosses:
    """The criterion, also keeping each row's loss (detached, `_row_losses`) of every call: ESAM's L_i(w), read from
    the clean pass's own logits (no extra forward)."""

    criterion: Criterion
    rows: list[Tensor] = field(default_factory=list)

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        self.rows.append(_row_losses(self.criterion, logits.detach(), targets))
        return self.criterion(logits, targets)


def _row_losses(criterion: Criterion, logits: Tensor, targets: Tensor) -> Tensor:
    """Each row's loss: the criterion on that row alone (vmapped), so any criterion that averages over its rows works
    (nn.CrossEntropyLoss with label smoothing, F.cross_entropy) without asking it for reduction="none"."""
    return torch.func.vmap(lambda z, y: criterion(z.unsqueeze(0), y.unsqueeze(0)))(logits, targets)


def selected_rows(n: int, gamma: float) -> int:
    """How many of n rows ESAM's perturbed pass takes: ⌈γ·n⌉ with γ as written (0.3 of 10 rows is 3, not the 4 that
    0.3·10 = 3.0000000000000004 would round up to); at least one for γ > 0."""
    return -(-Fraction(repr(gamma)) * n // 1)


def _selected_pass(passes: _Passes, inputs: Tensor, targets: Tensor, pieces: list[Rows], clean_rows: Tensor,
                   gamma: float, gate: Tensor | None) -> tuple[Tensor, Tensor]:
    """ESAM's sharpness-sensitive data selection, at w + ε: a no-grad forward of the whole batch (piece by piece, as
    the clean pass cut it) gives each row's L_i(w + ε); the k = ⌈γ·n⌉ rows (`selected_rows`) with the largest rise
    L_i(w + ε) − L_i(w) (ties: the earlier row) take the perturbed forward + backward, in the batch's order and in
    as many micro-batches as the clean pass, their gradient that of their mean loss. Returns the whole batch's mean
    loss at w + ε and its correct count (the no-grad forward's: the same statistics SAM reports)."""
    after, correct = [], None
    with torch.no_grad():
        for start, stop in pieces:
            rows, right = _forward(passes.model, inputs[start:stop], targets[start:stop],
                                   lambda z, y: _row_losses(passes.criterion, z, y), passes.autocast_dtype)
            after.append(rows)
            correct = right if correct is None else correct + right
    after_rows = torch.cat(after)
    work = torch.promote_types(after_rows.dtype, torch.float32)
    rise = after_rows.to(work) - clean_rows.to(work)
    k = selected_rows(rise.numel(), gamma)
    chosen = torch.sort(rise, descending=True, stable=True).indices[:k].sort().values
    passes.run(inputs[chosen], targets[chosen], micro_batches(k, len(pieces)), gate=gate)
    return after_rows.mean(), correct


def _base_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, max_grad_norm: float | None
               ) -> tuple[Tensor, Tensor | None]:
    """Unscale (fp16), measure and clip the gradient in `.grad`, and step: through the scaler, which skips a
    non-finite step and updates its scale once. Returns the norm before clipping and, with a scaler, `skipped`."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = _norm_and_clip(optimizer, max_grad_norm)
    if scaler is None:
        optimizer.step()
        return grad_norm, None
    scaler.step(optimizer)  # host sync inside: GradScaler reads found_inf to decide whether to step
    scaler.update()
    return grad_norm, _non_finite(grad_norm)


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers (any dimension, SyncBatchNorm too) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Leave BatchNorm running_mean / running_var / num_batches_tracked as they were on entry.

    SAM's perturbed forward must not update them (the clean pass already did). The buffer *values* are
    saved and copied back instead of setting momentum to 0: a Python attribute that flips every step is
    guarded by torch.compile and would force recompiles, while buffer values are invisible to guards.
    Restoring also covers what momentum = 0 does not: num_batches_tracked, momentum=None (cumulative
    average), and 0·NaN when an fp16 batch statistic overflows.
    """
    buffers = [b for m in batchnorm_layers(model) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
               if b is not None]
    saved = [b.clone() for b in buffers]  # three small buffers per BatchNorm layer
    try:
        yield
    finally:
        if buffers:
            torch._foreach_copy_(buffers, saved)


def has_active_dropout(model: nn.Module) -> bool:
    """Whether a forward of `model` draws dropout masks: a dropout module in training mode with p > 0.

    Only modules are seen; a plug-in model calling F.dropout directly is not detected.
    """
    return any(isinstance(m, _DropoutNd) and m.training and m.p > 0 for m in model.modules())


def _rng_state(device: torch.device) -> Tensor:
    """The state of the generator that dropout on `device` draws from (CPU, or that CUDA device's own)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _forward(
    model: nn.Module, x: Tensor, y: Tensor, criterion: Criterion, autocast_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """Loss (with graph) and the number of correct argmax predictions (detached)."""
    autocast = nullcontext() if autocast_dtype is None else torch.autocast(x.device.type, dtype=autocast_dtype)
    with autocast:
        logits = model(x)
        loss = criterion(logits, y)
    return loss, (logits.detach().argmax(dim=-1) == y).sum()


def _backward(loss: Tensor, scaler: torch.amp.GradScaler | None, gate: Tensor | None = None,
              weight: float = 1.0) -> None:
    if scaler is not None:
        loss = scaler.scale(loss)
    if gate is not None:
        loss = loss * gate
    if weight != 1.0:  # skipped at 1 so that a single-process step stays bit for bit what it was
        loss = loss * weight
    loss.backward()


def _accumulate(accumulated: dict[Tensor, Tensor], params: list[Tensor], weight: float) -> None:
    """accumulated[p] += weight · p.grad for every p with a gradient (the first time: weight · p.grad)."""
    with_grad = [p for p in params if p.grad is not None]
    fresh = [p for p in with_grad if p not in accumulated]
    seen = [p for p in with_grad if p in accumulated]
    if fresh:
        grads = [p.grad for p in fresh]
        torch._foreach_mul_(grads, weight)
        accumulated.update(zip(fresh, grads))
    if seen:
        torch._foreach_add_([accumulated[p] for p in seen], [p.grad for p in seen], alpha=weight)


def _norm_and_clip(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> Tensor:
    """Global gradient norm before clipping; clips in place when max_grad_norm is set."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = global_norm([p.grad for p in params])
    if max_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm, foreach=True)
    return norm


def _non_finite(norm: Tensor) -> Tensor:
    """1.0 where GradScaler skipped: its check is "any gradient non-finite", which a non-finite norm shows."""
    return (~torch.isfinite(norm)).float()
