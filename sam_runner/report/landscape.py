"""Pictures of flatness read from saved runs (docs/landscape.md): one PNG and one CSV per picture.

- `directions`: train and test loss along a filter-normalized random direction (Li et al., NeurIPS 2018), one
  curve pair per run, several runs overlaid.
- `interpolation`: Keskar et al.'s (ICLR 2017) parametric plot, loss and accuracy along
  w(alpha) = alpha * w_B + (1 - alpha) * w_A.

Both evaluate a run's network at other weights through one path (`_evaluate_at`): load a state dict, recompute
BatchNorm statistics where asked, then eval-mode fp32 cross-entropy and accuracy on the train and test streams.
"""

from __future__ import annotations

import csv
import math
import os
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from sam_runner.data import BatchStream, seeded_subset
from sam_runner.errors import SamRunnerError
from sam_runner.report import saved_run
from sam_runner.report.saved_run import SavedRun
from sam_runner.run.evaluation import evaluate
from sam_runner.run.rundir import read_summary
from sam_runner.steps import batchnorm_layers

__all__ = ["BN_STATS", "METRICS", "LandscapeError", "filter_normalized_direction", "recompute_batchnorm", "run_labels",
           "directions", "interpolation"]

BN_STATS = ("recompute", "interpolate")  # what BatchNorm's running statistics are along an interpolation
# summary.json keys that name a run in a legend (those that differ) or in a caption (those shared by all runs)
LABEL_KEYS = ("dataset", "model", "optimizer", "rho", "batch_size", "lr", "epochs", "seed")
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")

Streams = tuple[BatchStream, BatchStream]  # (train, test), both unaugmented


class LandscapeError(SamRunnerError):
    """Runs that cannot be drawn together, or a bad range, point count or sample count."""


# --- the two pictures -------------------------------------------------------------------------------------

def directions(run_dirs: Sequence[Path], out_dir: Path | None = None, *, seed: int = 0,
               span: tuple[float, float] = (-1.0, 1.0), points: int = 41, num_samples: int | None = None,
               device: str | None = None) -> list[Path]:
    """L(w + t d) for each run, d its own filter-normalized direction drawn with `seed`; returns the PNG and CSV."""
    ts = _grid(span, points)
    _check_num_samples(num_samples)
    out = _out_dir(run_dirs[0], out_dir)
    labels, caption = run_labels(run_dirs)
    rows: list[dict[str, Any]] = []
    for run_dir, label in zip(run_dirs, labels):
        run = _load(run_dir, device)
        origin = _state(run.model)
        direction = filter_normalized_direction(run.model, seed)

        def shifted(t: float) -> dict[str, Tensor]:
            return {**origin, **{name: origin[name] + t * step for name, step in direction.items()}}

        curve = _sweep(run.model, ts, shifted, _streams(run, num_samples, seed), desc=label)
        rows += [{"run": str(run_dir), "label": label, "t": t, **point} for t, point in zip(ts, curve)]
        del run  # one run's data and model in memory at a time
    title = f"Loss along a filter-normalized random direction (direction seed {seed})"
    return [_plot_directions(rows, f"{title}\n{caption}", out / "direction.png"),
            _write_curve_csv(rows, out / "direction.csv")]


def interpolation(run_a: Path, run_b: Path, out_dir: Path | None = None, *, span: tuple[float, float] = (-1.0, 2.0),
                  points: int = 25, bn_stats: str = "recompute", num_samples: int | None = None, seed: int = 0,
                  device: str | None = None) -> list[Path]:
    """Loss and accuracy at w(alpha) = alpha w_B + (1 - alpha) w_A on A's data; returns the PNG and CSV.

    BatchNorm running statistics are recomputed on the training stream at every alpha (`bn_stats="recompute"`)
    or interpolated like the weights (`"interpolate"`, what Keskar's Keras code did); docs/landscape.md says why
    recompute is the default.
    """
    if bn_stats not in BN_STATS:
        raise LandscapeError(f"bn_stats must be one of {', '.join(BN_STATS)} (got {bn_stats!r})")
    alphas = _grid(span, points)
    _check_num_samples(num_samples)
    out = _out_dir(run_a, out_dir)
    a = _load(run_a, device)
    b = _load(run_b, device)
    _check_same_network(a, b)
    state_a, state_b = _state(a.model), _state(b.model)
    del b  # only its weights are needed; the path is evaluated on A's data

    def between(alpha: float) -> dict[str, Tensor]:
        # torch.lerp is exact at both ends (alpha = 0 gives A's tensors, 1 gives B's); integer buffers stay A's
        return {name: torch.lerp(value, state_b[name], alpha) if value.is_floating_point() else value
                for name, value in state_a.items()}

    streams = _streams(a, num_samples, seed)
    bn_stream = streams[0] if bn_stats == "recompute" else None
    hint = ("; an interpolated BatchNorm variance below zero does this: recompute the statistics instead "
            "(--bn-stats recompute)") if bn_stream is None else ""
    curve = _sweep(a.model, alphas, between, streams, bn_stream=bn_stream, desc="interpolation", hint=hint)
    rows = [{"alpha": alpha, **point} for alpha, point in zip(alphas, curve)]
    (label_a, label_b), caption = run_labels([run_a, run_b])
    if batchnorm_layers(a.model):
        caption = f"BatchNorm statistics: {bn_stats}; {caption}"
    title = f"Linear path from A ({label_a}) to B ({label_b})\n{caption}"
    return [_plot_interpolation(rows, title, out / "interpolation.png"),
            _write_curve_csv(rows, out / "interpolation.csv")]


# --- directions, BatchNorm and evaluation -----------------------------------------------------------------

def filter_normalized_direction(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """d ~ N(0, I) shaped like the parameters, each filter rescaled to the norm of the same filter of w.

    A filter is one slice along dim 0 of a weight with >= 2 dims (an output channel of a convolution, an output
    unit of a linear layer). 1-D parameters (biases, BatchNorm scale and shift) get zeros, as in Li et al. The
    draw comes from a CPU generator in parameter order, so one seed gives one raw draw on every device and for
    every run of an architecture; each run's own weights then set the scale of its filters.
    """
    generator = torch.Generator().manual_seed(seed)
    direction = {}
    for name, weight in model.named_parameters():
        draw = torch.randn(weight.shape, generator=generator).to(device=weight.device, dtype=weight.dtype)
        if weight.dim() < 2:
            direction[name] = torch.zeros_like(weight)
            continue
        filters, weight_filters = draw.flatten(1), weight.detach().flatten(1)
        scale = weight_filters.norm(dim=1, keepdim=True) / filters.norm(dim=1, keepdim=True)
        direction[name] = (filters * scale).view_as(weight)
    return direction


def recompute_batchnorm(model: nn.Module, stream: BatchStream) -> None:
    """Set BatchNorm running statistics to those of the current weights on `stream`.

    Only the BatchNorm layers run in training mode (dropout stays off), so the statistics describe the network
    as it is evaluated; momentum=None makes each statistic the plain mean over the stream's batches (as
    torch.optim.swa_utils.update_bn does).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return
    model.eval()
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    with torch.no_grad():
        for inputs, _ in stream.epoch(0):
            if len(inputs) > 1:  # a batch of one has no variance (BatchNorm1d refuses it in training mode)
                model(inputs)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
        layer.eval()


def _evaluate_at(model: nn.Module, state: dict[str, Tensor], streams: Streams,
                 bn_stream: BatchStream | None = None) -> dict[str, float]:
    """Train and test cross-entropy and accuracy of `model` holding `state` (eval mode, fp32, no augmentation).

    fp32 even for runs trained under bf16: its rounding would show as noise on a flat curve.
    """
    model.load_state_dict(state)
    if bn_stream is not None:
        recompute_batchnorm(model, bn_stream)
    result = {}
    for split, stream in zip(("train", "test"), streams):
        loss, accuracy = evaluate(model, stream, None)
        # where the loss is not finite the logits hold NaN, and their argmax is no prediction
        result |= {f"{split}_loss": loss, f"{split}_acc": accuracy if math.isfinite(loss) else math.nan}
    return result


def _sweep(model: nn.Module, xs: list[float], state_at: Callable[[float], dict[str, Tensor]], streams: Streams, *,
           bn_stream: BatchStream | None = None, desc: str, hint: str = "") -> list[dict[str, float]]:
    curve = [_evaluate_at(model, state_at(x), streams, bn_stream) for x in tqdm(xs, desc=desc, disable=None)]
    broken = [x for x, point in zip(xs, curve) if not all(math.isfinite(point[key]) for key in METRICS)]
    if broken:
        where = ", ".join(f"{x:g}" for x in broken)
        warnings.warn(f"{desc}: the loss is not finite at {len(broken)} of {len(xs)} points ({where}){hint}",
                      RuntimeWarning, stacklevel=3)
    return curve


# --- runs, streams and checks -----------------------------------------------------------------------------

def _load(run_dir: Path, device: str | None) -> SavedRun:
    return saved_run.load(run_dir, overrides={"device": device})


def _state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the weights and buffers (state_dict() aliases them, and they are overwritten along a curve)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _streams(run: SavedRun, num_samples: int | None, seed: int) -> Streams:
    """The run's eval-mode train and test streams, or a fixed subset of `num_samples` of each, chosen by `seed`."""
    train, test = run.data.train_eval, run.data.test
    if num_samples is None:
        return train, test
    return _subset(train, num_samples, seed, run), _subset(test, num_samples, seed, run)


def _subset(stream: BatchStream, size: int, seed: int, run: SavedRun) -> BatchStream:
    if size >= stream.num_samples:
        return stream
    inputs, targets = seeded_subset(stream.inputs, stream.targets, size, seed)
    return BatchStream(inputs, targets, batch_size=stream.batch_size, shuffle=False, seed=stream.seed,
                       device=stream.inputs.device, normalize=run.spec.dataset.normalize)


def _grid(span: Sequence[float], points: int) -> list[float]:
    low, high = float(span[0]), float(span[1])
    if not low < high or points < 2:
        raise LandscapeError(f"need a range LOW < HIGH and at least 2 points (got range {low:g} {high:g}, "
                             f"{points} points)")
    # (high - low) * i / (points - 1) rather than a step times i: 0 and 1 land exactly on the grid where they
    # belong to it (t = 0 of [-1, 1] at 41 points, alpha = 0 and 1 of [-1, 2] at 25), so there the run itself
    # is evaluated; torch.linspace gives -5.6e-17 for that t = 0
    return [low + (high - low) * i / (points - 1) for i in range(points - 1)] + [high]


def _check_num_samples(num_samples: int | None) -> None:
    if num_samples is not None and num_samples < 1:
        raise LandscapeError(f"the sample count (--num-samples) must be >= 1 (got {num_samples}); leave it out to "
                             f"use every sample")


def _describe_network(run: SavedRun) -> str:
    node = OmegaConf.to_container(run.spec.model, resolve=True)
    name = str(node.pop("_target_")).rpartition(".")[2]
    arguments = ", ".join(f"{key}={value}" for key, value in node.items())
    count = sum(p.numel() for p in run.model.parameters())
    return f"{name}({arguments}) with {count:,} parameters"


def _check_same_network(a: SavedRun, b: SavedRun) -> None:
    """Interpolating needs one architecture; a different seed is allowed but makes the path less meaningful."""
    shapes_a = {name: value.shape for name, value in a.model.state_dict().items()}
    shapes_b = {name: value.shape for name, value in b.model.state_dict().items()}
    if shapes_a != shapes_b or OmegaConf.to_container(a.spec.model) != OmegaConf.to_container(b.spec.model):
        raise LandscapeError(f"cannot interpolate between different networks: {a.run_dir} is "
                             f"{_describe_network(a)}, {b.run_dir} is {_describe_network(b)}; pass two runs of "
                             f"the same model and dataset")
    if _dataset_of(a) != _dataset_of(b):
        raise LandscapeError(f"cannot interpolate between runs on different data: {a.run_dir} trained on "
                             f"{_dataset_of(a)}, {b.run_dir} on {_dataset_of(b)}; pass two runs of the same model "
                             f"and dataset")
    if a.settings.seed != b.settings.seed:
        warnings.warn(f"{a.run_dir} has seed {a.settings.seed} and {b.run_dir} seed {b.settings.seed}: they did not "
                      f"start from the same initial weights, so the path between them is not Keskar's",
                      stacklevel=3)


LOCATION_KEYS = ("root", "cache_dir", "download")  # where a dataset source reads its files, not what it reads


def _dataset_of(run: SavedRun) -> dict[str, Any]:
    """The run's dataset config, less where its files lie (the same data may sit in two folders)."""
    dataset = OmegaConf.to_container(run.spec.dataset, resolve=True)
    dataset["source"] = {key: value for key, value in dataset["source"].items() if key not in LOCATION_KEYS}
    return dataset


def run_labels(run_dirs: Sequence[Path]) -> tuple[list[str], str]:
    """Name each run by the summary.json hyper-parameters that tell it apart; the ones all share make a caption.

    A run without summary.json, or one that differs from the others in none of them, is named by its directory.
    """
    summaries = [read_summary(Path(run_dir)) or {} for run_dir in run_dirs]
    differing = [key for key in LABEL_KEYS if len({repr(summary.get(key)) for summary in summaries}) > 1]
    labels = [", ".join(f"{key}={_format(summary[key])}" for key in differing if summary.get(key) is not None)
              or Path(run_dir).name for summary, run_dir in zip(summaries, run_dirs)]
    shared = [key for key in LABEL_KEYS if key not in differing and summaries[0].get(key) is not None]
    return labels, ", ".join(f"{key}={_format(summaries[0][key])}" for key in shared)


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- files ------------------------------------------------------------------------------------------------

def _out_dir(first_run: Path, out_dir: Path | None) -> Path:
    """Where the pictures go (`--out`, else FIRST_RUN/landscape), checked before minutes of evaluation are spent;
    created only when there is something to write."""
    out = Path(out_dir) if out_dir is not None else Path(first_run) / "landscape"
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not writable"
        raise LandscapeError(f"cannot write the pictures under {out}: {existing} {problem}; choose another --out")
    return out


def _written(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(path)` into the output folder, made first; a file system's refusal becomes one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as error:
        raise LandscapeError(f"cannot write {path}: {error.strerror or error}; choose another --out") from None
    return path


def _write_curve_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    def write(target: Path) -> None:
        with target.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    return _written(path, write)


def _wrap(title: str) -> str:
    return "\n".join(textwrap.fill(line, width=100) for line in title.splitlines())


def _whole_range(axes: Any, xs: list[float]) -> None:
    """The x axis spans every requested point, also where the curves have gaps (non-finite losses)."""
    low, high = min(xs), max(xs)
    axes.set_xlim(low - 0.02 * (high - low), high + 0.02 * (high - low))


def _loss_axis(axes: Any, losses: list[float]) -> None:
    """Log scale where the losses span more than a decade (a blow-up beside a near-zero minimum), else linear."""
    finite = [loss for loss in losses if math.isfinite(loss) and loss > 0]
    wide = bool(finite) and max(finite) > 10 * min(finite)
    axes.set_yscale("log" if wide else "linear")
    axes.set_ylabel("cross-entropy (nats, log scale)" if wide else "cross-entropy (nats)")


def _plot_directions(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    handles = []
    for index, run in enumerate(dict.fromkeys(row["run"] for row in rows)):
        color = f"C{index % 10}"
        curve = [row for row in rows if row["run"] == run]
        ts = [row["t"] for row in curve]
        axes.plot(ts, [row["train_loss"] for row in curve], color=color, linestyle="-")
        axes.plot(ts, [row["test_loss"] for row in curve], color=color, linestyle="--")
        handles.append(Line2D([], [], color=color, label=curve[0]["label"]))
    handles += [Line2D([], [], color="black", linestyle="-", label="train"),
                Line2D([], [], color="black", linestyle="--", label="test")]
    axes.axvline(0.0, color="grey", linestyle=":", linewidth=1)  # t = 0: each run's trained weights
    _loss_axis(axes, [row[f"{split}_loss"] for row in rows for split in ("train", "test")])
    _whole_range(axes, [row["t"] for row in rows])
    axes.set_xlabel("t (step along d; |t| = 1 moves every filter by its own norm)")
    axes.set_title(_wrap(title), fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(handles=handles, fontsize=8)
    return _written(path, lambda target: figure.savefig(target, dpi=150))


def _plot_interpolation(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    figure = Figure(figsize=(8, 5), layout="constrained")
    loss_axes = figure.add_subplot()
    accuracy_axes = loss_axes.twinx()
    alphas = [row["alpha"] for row in rows]
    handles = []
    for split, color in (("train", "C0"), ("test", "C3")):
        handles += loss_axes.plot(alphas, [row[f"{split}_loss"] for row in rows], color=color, marker=".",
                                  label=f"{split} cross-entropy")
        handles += accuracy_axes.plot(alphas, [100 * row[f"{split}_acc"] for row in rows], color=color,
                                      linestyle="--", marker=".", label=f"{split} accuracy")
    for alpha, name in ((0.0, "A"), (1.0, "B")):
        loss_axes.axvline(alpha, color="grey", linestyle=":", linewidth=1)
        loss_axes.text(alpha, 1.01, name, transform=loss_axes.get_xaxis_transform(), ha="center")
    _loss_axis(loss_axes, [row[f"{split}_loss"] for row in rows for split in ("train", "test")])
    _whole_range(loss_axes, alphas)
    loss_axes.set_xlabel("alpha (w = alpha * w_B + (1 - alpha) * w_A)")
    accuracy_axes.set_ylabel("accuracy (%, dashed)")
    accuracy_axes.set_ylim(0, 100)
    loss_axes.set_title(_wrap(title), fontsize=10, pad=16)
    figure.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=4)
    return _written(path, lambda target: figure.savefig(target, dpi=150))
