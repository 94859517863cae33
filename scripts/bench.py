"""Training speed of sam-runner against a bare PyTorch loop, SGD and SAM side by side in one process, and the cost
of every SAM variant against SGD.

    python scripts/bench.py --model cnn1d --batch-size 128                        # CPU, MNIST-1D
    python scripts/bench.py --model resnet18 --batch-size 512 --device cuda       # GPU, CIFAR-10 shapes, bf16
    python scripts/bench.py --optimizers sgd,sam,usam,gsam,fsam model.norm=batch  # the variants' cost table

Two measurements, each for SGD and SAM, interleaved round by round so a busy machine slows all of them alike
(the tables give medians over the rounds):
- steps: one device-resident batch, stepped again and again, through `sam_runner.steps.train_step` and through a
  bare loop (`bare_sgd_step`, `bare_sam_step`): the cost of the step alone;
- epochs: whole epochs as `sam-run` trains them (a run built by `run.build.build_run` from the composed config:
  BatchStream's gather and augmentation, the scheduler step, the on-device statistics) against a bare loop over
  the same device-resident batches with the plain step; evaluation and checkpoint seconds apart.
The ratios the issue sets targets for (SAM/SGD step time, runner/bare epoch time) come from these medians.
`--optimizers` adds any optimizer config (a SAM variant: looksam, esam, ...); the bare loop exists for SGD and SAM
only. For each, the forward and backward passes a step makes are counted (hooks on the model, in units of one
batch, over as many steps as a round times) and its step time is given relative to SGD's.
FLOPs are counted once per model with torch.utils.flop_counter (matrix products and convolutions, 2 per
multiply-add, forward and backward); achieved TFLOP/s and the share of the device's dense bf16 peak follow.

Extra arguments are Hydra overrides for the run (e.g. `+optimizer.base.build.fused=true`). CIFAR-shaped models
train on synthetic 3x32x32 data the size of CIFAR-10 (no download), with CIFAR-10's crop, flip and normalization.
`--json PATH` writes everything the tables show. Results go in docs/benchmarks.md with the exact command; never
assert timings in tests.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sam_runner.cli.preflight import CONFIG_DIR
from sam_runner.optim import SAM
from sam_runner.run import checkpoint, loop, measurement, resume
from sam_runner.run.build import Training, build_optimizer, build_run, compile_model
from sam_runner.run.evaluation import generalization
from sam_runner.run.logbook import Stopwatch
from sam_runner.run.progress import Progress
from sam_runner.run.spec import make_spec
from sam_runner.run.stopping import StopRequests
from sam_runner.scale.distributed import World
from sam_runner.scale.ranks import SilentLogbook, Team
from sam_runner.steps import train_step

CIFAR_SHAPED = ["dataset=synthetic", "dataset.name=synthetic_cifar10", "dataset.source.num_train=50000",
                "dataset.source.num_test=10000", "dataset.source.input_shape=[3,32,32]",
                "dataset.augment={crop_padding:4,horizontal_flip:true}",
                "dataset.normalize={mean:[0.4914,0.4822,0.4465],std:[0.2470,0.2435,0.2616]}"]
DATASETS = {"cnn1d": [], "mlp": [], "resnet18": CIFAR_SHAPED, "wrn16_8": CIFAR_SHAPED, "wrn28_10": CIFAR_SHAPED,
            "keskar_c1": CIFAR_SHAPED}  # model config -> dataset overrides (cnn1d, mlp: the default MNIST-1D)
# Dense bf16 tensor-core peak, TFLOP/s (shared/REFERENCE.md section 7): H100 SXM, and H200 (the same GH100 chip).
# Other devices (an H100 PCIe is slower): pass --peak-tflops.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
OPTIMIZERS = "sgd,sam"  # --optimizers' default; SGD is always timed, every ratio is to it


# ----------------------------------------------------------------------------------------------- bare loop


def bare_sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  autocast: Callable[[], Any]) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


def bare_sam_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  autocast: Callable[[], Any], rho: float = 0.05) -> None:
    """The textbook two-pass step, written plainly (no BatchNorm freezing, no foreach)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        F.cross_entropy(model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
        eps = [rho * p.grad / (norm + 1e-12) for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    optimizer.step()


BARE_STEPS = {"sgd": bare_sgd_step, "sam": bare_sam_step}  # optimizer config -> its bare loop's step


# ----------------------------------------------------------------------------------------------- the runner
# The only places that reach into the run's internals (run/), with the build in `Contender`: where their signatures
# change, change these.


def runner_epoch(run: Training, epoch: int) -> dict[str, float]:
    """One training epoch exactly as `loop.fit` runs it (from the epoch's first batch, no checkpoint or measurement
    due, so its logbook is one that writes nothing)."""
    return loop.train_epoch(run, SilentLogbook(run.run_dir), Progress(epoch=epoch), summary={})


def runner_evaluation(run: Training) -> dict[str, float]:
    return generalization(run.model, run.data, run.autocast_dtype)


def runner_checkpoint(run: Training, epoch: int, path: Path) -> None:
    checkpoint.save_atomic(resume.checkpoint_state(run, Progress(epoch=epoch + 1), summary={}), path)


# ----------------------------------------------------------------------------------------------- FLOPs


def training_flops(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward and of one forward + backward (cross-entropy, weights' and activations' gradients)
    on this batch, counted by FlopCounterMode on a copy of the model on the meta device (no compute, no memory).

    FlopCounterMode counts matrix products and convolutions (2 per multiply-add) and nothing elementwise: the
    usual convention for achieved-FLOP/s figures.
    """
    meta = copy.deepcopy(model).to("meta").train()
    x, y = inputs.to("meta"), targets.to("meta")
    with FlopCounterMode(display=False) as forward:
        meta(x)
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(meta(x), y).backward()
    return {"forward": forward.get_total_flops(), "forward_backward": step.get_total_flops()}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name and "PCIe" not in name), None)


# ----------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: the queued kernels belong to the time


def seconds(work: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


class Contender:
    """One optimizer (SGD or SAM) both ways: a run as sam-run builds it, and a bare loop on a copy of its model."""

    def __init__(self, name: str, args: argparse.Namespace, run_dir: Path) -> None:
        self.name = name
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            self.cfg = compose(config_name="config", overrides=[
                *DATASETS[args.model], f"model={args.model}", f"optimizer={name}", f"batch_size={args.batch_size}",
                f"device={args.device}", f"precision={args.precision}", "compile=false", *args.overrides])
        self.spec = make_spec(self.cfg)
        self.settings, self.device = self.spec.settings, self.spec.device
        self.run_dir = run_dir / name
        self.run_dir.mkdir(parents=True, exist_ok=True)  # the checkpoints timed are written here
        self.run = build_run(self.spec, Team(World(device=self.device)), self.run_dir, Stopwatch(), StopRequests())
        self.flops = training_flops(self.run.model, *next(iter(self.run.data.train.epoch(0))))
        self.bare_model = copy.deepcopy(self.run.model)  # the same initial weights
        bare = build_optimizer(self.spec.optimizer, self.settings.rho, self.run.plan.lr, self.bare_model)
        self.bare_optimizer = bare.base_optimizer if isinstance(bare, SAM) else bare
        self.bare_step = BARE_STEPS.get(name)  # None: no bare loop to compare with (a SAM variant)
        dtype = self.run.autocast_dtype
        self.autocast = lambda: torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        if args.channels_last:  # in place: the optimizers keep the same Parameter objects
            self.run.model.to(memory_format=torch.channels_last)
            self.bare_model.to(memory_format=torch.channels_last)
        self.compile_time_s = None
        if args.compile:  # as build_run does with compile=true (here after channels_last, whose strides it guards)
            compile_model(self.run.model, self.run.data, dtype, self.spec.sam, self.run.clock)
            self.compile_time_s = self.run.clock.times()["compile_time_s"]
            self.bare_model.compile()  # compiled by its warm-up below
        # One epoch's batches, made once and kept on the device: what the bare loop trains on.
        self.batches = list(self.run.data.train.epoch(0))
        self.batch = self.batches[0]
        self.times: dict[str, list[float]] = {key: [] for key in
                                              ("runner_step", "bare_step", "runner_epoch", "bare_epoch", "eval",
                                               "checkpoint")}
        self.epoch = 0
        self.passes: dict[str, float] = {}

    def runner_steps(self, steps: int) -> None:
        run = self.run
        run.model.train()
        for _ in range(steps):
            train_step(run.model, *self.batch, run.optimizer, run.criterion, autocast_dtype=run.autocast_dtype,
                       scaler=run.scaler, max_grad_norm=run.settings.max_grad_norm,
                       micro_batch_size=run.micro_batch_size)

    def bare_steps(self, steps: int) -> None:
        self.bare_model.train()
        for _ in range(steps):
            self.bare_step(self.bare_model, self.bare_optimizer, *self.batch, self.autocast)

    def bare_epoch(self) -> None:
        self.bare_model.train()
        for x, y in self.batches:
            self.bare_step(self.bare_model, self.bare_optimizer, x, y, self.autocast)

    def time_steps(self, steps: int) -> None:
        self.times["runner_step"].append(seconds(lambda: self.runner_steps(steps), self.device) / steps)
        if self.bare_step is not None:
            self.times["bare_step"].append(seconds(lambda: self.bare_steps(steps), self.device) / steps)

    def time_epoch(self) -> None:
        self.times["runner_epoch"].append(seconds(lambda: runner_epoch(self.run, self.epoch), self.device))
        self.times["eval"].append(seconds(lambda: runner_evaluation(self.run), self.device))
        self.times["checkpoint"].append(
            seconds(lambda: runner_checkpoint(self.run, self.epoch, self.run_dir / "last.pt"), self.device))
        if self.bare_step is not None:
            self.times["bare_epoch"].append(seconds(self.bare_epoch, self.device))
        self.epoch += 1

    def count_passes(self, steps: int) -> None:
        """Forward and backward passes per step of the runner's step, in units of one batch, over `steps` steps."""
        self.passes = count_passes(self.run.network, self.runner_steps, steps, batch_size=self.batch[1].shape[0])

    def warm_up(self, steps: int) -> None:
        """Allocator, cuDNN autotuning, lazy compiles: everything the first calls pay once."""
        self.runner_steps(steps)
        runner_epoch(self.run, 0)
        runner_evaluation(self.run)
        if self.bare_step is not None:
            self.bare_steps(steps)
            self.bare_epoch()
        synchronize(self.device)


def count_passes(model: nn.Module, train: Callable[[int], Any], steps: int, batch_size: int) -> dict[str, float]:
    """Forward and backward passes per step that `train(steps)` makes through `model`, in units of one batch: a
    forward of n samples counts n / batch_size, and so does the backward through its output when one runs (a
    no-grad forward counts as a forward only). A backward that computes only some parameters' gradients still
    counts whole: this counts samples, not weight-gradient work."""
    counted = {"forward": 0.0, "backward": 0.0}

    def on_forward(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        share = inputs[0].shape[0] / batch_size
        counted["forward"] += share
        if output.requires_grad:
            output.register_hook(lambda grad: counted.__setitem__("backward", counted["backward"] + share))

    handle = model.register_forward_hook(on_forward)
    try:
        train(steps)
    finally:
        handle.remove()
    return {kind: value / steps for kind, value in counted.items()}


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(contenders: dict[str, Contender], args: argparse.Namespace, rounds: int, peak: float | None
           ) -> dict[str, Any]:
    """Medians, rates, ratios and TFLOP/s as one dict: what the tables print and --json writes."""
    first = next(iter(contenders.values()))
    samples = first.run.data.train.num_samples
    result: dict[str, Any] = {
        "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]), "date": date.today().isoformat(),
        "torch": torch.__version__, "device": _device_name(first.device), "precision": first.spec.precision,
        "model": args.model, "batch_size": args.batch_size, "train_samples": samples, "rounds": rounds,
        "steps_per_round": args.steps, "compile": args.compile, "channels_last": args.channels_last,
        "cudnn_benchmark": args.cudnn_benchmark, "torch_threads": torch.get_num_threads(),
        "flops_per_image": {"forward": first.flops["forward"] / args.batch_size,
                            "sgd_step": first.flops["forward_backward"] / args.batch_size,
                            "sam_step": 2 * first.flops["forward_backward"] / args.batch_size},
        "peak_tflops": peak, "optimizers": {},
    }
    for name, c in contenders.items():
        # FLOPs as counted passes: a forward each, and the backward's share (forward_backward − forward) each
        backward_flops = c.flops["forward_backward"] - c.flops["forward"]
        step_flops = c.flops["forward"] * c.passes["forward"] + backward_flops * c.passes["backward"]
        epoch_flops = step_flops * samples / args.batch_size
        row: dict[str, Any] = {key: median(values) if values else None for key, values in c.times.items()}
        bare = c.bare_step is not None
        row.update(forward_passes=c.passes["forward"], backward_passes=c.passes["backward"],
                   runner_step_images_per_s=args.batch_size / row["runner_step"],
                   bare_step_images_per_s=args.batch_size / row["bare_step"] if bare else None,
                   runner_epoch_images_per_s=samples / row["runner_epoch"],
                   bare_epoch_images_per_s=samples / row["bare_epoch"] if bare else None,
                   runner_over_bare_step=row["runner_step"] / row["bare_step"] if bare else None,
                   runner_over_bare_epoch=row["runner_epoch"] / row["bare_epoch"] if bare else None,
                   runner_step_tflops=step_flops / row["runner_step"] / 1e12,
                   runner_epoch_tflops=epoch_flops / row["runner_epoch"] / 1e12,
                   compile_time_s=c.compile_time_s)
        row["runner_epoch_peak_fraction"] = row["runner_epoch_tflops"] / peak if peak else None
        row["runner_step_peak_fraction"] = row["runner_step_tflops"] / peak if peak else None
        result["optimizers"][name] = row
    sgd = result["optimizers"]["sgd"]
    for row in result["optimizers"].values():  # each optimizer's time per step and per epoch over SGD's
        row["over_sgd_step"] = row["runner_step"] / sgd["runner_step"]
        row["over_sgd_epoch"] = row["runner_epoch"] / sgd["runner_epoch"]
    sam = result["optimizers"].get("sam")
    if sam is not None:
        result["sam_over_sgd_step"] = {"runner": sam["over_sgd_step"], "bare": sam["bare_step"] / sgd["bare_step"]}
        result["sam_over_sgd_epoch"] = {"runner": sam["over_sgd_epoch"],
                                        "bare": sam["bare_epoch"] / sgd["bare_epoch"]}
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu (torch threads: {torch.get_num_threads()})"


def print_tables(result: dict[str, Any]) -> None:
    flops = result["flops_per_image"]
    print(f"{result['model']}, batch {result['batch_size']}, {result['train_samples']} training samples, "
          f"{result['device']} ({result['precision']}), torch {result['torch']}, {result['date']}")
    print(f"FLOPs per image (counted): forward {flops['forward'] / 1e9:.4g} G, SGD step "
          f"{flops['sgd_step'] / 1e9:.4g} G, SAM step {flops['sam_step'] / 1e9:.4g} G; bf16 peak: "
          f"{result['peak_tflops'] or 'unknown (--peak-tflops)'}")
    peak = result["peak_tflops"]
    compared = {name: row for name, row in result["optimizers"].items() if row["bare_step"] is not None}
    print(f"\nsteps (one device-resident batch; median of {result['rounds']} rounds of {result['steps_per_round']})")
    print("| optimizer | bare loop img/s | sam-runner img/s | runner/bare time | TFLOP/s | of bf16 peak |")
    print("|---|---|---|---|---|---|")
    for name, row in compared.items():
        share = f"{100 * row['runner_step_peak_fraction']:.1f}%" if peak else "-"
        print(f"| {name.upper()} | {row['bare_step_images_per_s']:,.0f} | {row['runner_step_images_per_s']:,.0f} | "
              f"{row['runner_over_bare_step']:.3f} | {row['runner_step_tflops']:.3g} | {share} |")
    print(f"\nepochs (median of {result['rounds']}; evaluation and checkpoint not in the epoch time)")
    print("| optimizer | bare epoch s | sam-runner epoch s | runner/bare time | sam-runner img/s | TFLOP/s | "
          "of bf16 peak | eval s | checkpoint s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in compared.items():
        share = f"{100 * row['runner_epoch_peak_fraction']:.1f}%" if peak else "-"
        print(f"| {name.upper()} | {row['bare_epoch']:.3f} | {row['runner_epoch']:.3f} | "
              f"{row['runner_over_bare_epoch']:.3f} | {row['runner_epoch_images_per_s']:,.0f} | "
              f"{row['runner_epoch_tflops']:.3g} | {share} | {row['eval']:.3f} | {row['checkpoint']:.3f} |")
    if "sam_over_sgd_step" in result:
        step, epoch = result["sam_over_sgd_step"], result["sam_over_sgd_epoch"]
        print(f"\nSAM/SGD time: step {step['runner']:.3f} (bare loop {step['bare']:.3f}), "
              f"epoch {epoch['runner']:.3f} (bare loop {epoch['bare']:.3f})")
    print("\ncost against SGD (sam-runner; passes counted per step in units of one batch)")
    print("| optimizer | forward passes | backward passes | step time / SGD | epoch time / SGD | sam-runner img/s |")
    print("|---|---|---|---|---|---|")
    for name, row in result["optimizers"].items():
        print(f"| {name} | {row['forward_passes']:.3g} | {row['backward_passes']:.3g} | {row['over_sgd_step']:.3f} | "
              f"{row['over_sgd_epoch']:.3f} | {row['runner_step_images_per_s']:,.0f} |")
    compiled = {name: row["compile_time_s"] for name, row in result["optimizers"].items() if row["compile_time_s"]}
    if compiled:
        print("compile (not in any time above): " + ", ".join(f"{n.upper()} {s:.1f}s" for n, s in compiled.items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn1d", choices=sorted(DATASETS), help="a configs/model/ name")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizers", default=OPTIMIZERS, help="comma-separated optimizer configs to time (sgd is "
                        "always added: every ratio is to it), e.g. sgd,sam,usam,gsam,sam_on,fsam,looksam,esam")
    parser.add_argument("--steps", type=int, default=50, help="steps per round of the step timing")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (steps and epochs); medians are reported")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (compile time apart)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights (tensor-core convolutions)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); on a shared machine 1 "
                        "keeps idle-spinning threads from slowing every operation several-fold")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (known: H100 SXM, H200)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run's config")
    args = parser.parse_args(argv)

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loop.SHOW_PROGRESS = measurement.SHOW_PROGRESS = False  # no progress bars: their host syncs would depend on whether stderr is a terminal
    with tempfile.TemporaryDirectory(prefix="sam-bench-") as scratch:
        names = dict.fromkeys(["sgd", *args.optimizers.split(",")])  # in order, each once
        contenders = {name: Contender(name, args, Path(scratch)) for name in names}
        for contender in contenders.values():
            contender.warm_up(min(args.steps, 10))
        for _ in range(args.rounds):  # interleaved: load on a shared machine hits every contender alike
            for contender in contenders.values():
                contender.time_steps(args.steps)
        for _ in range(args.rounds):
            for contender in contenders.values():
                contender.time_epoch()
        for contender in contenders.values():  # after the timings: the hooks cost time
            contender.count_passes(args.steps)
        device = next(iter(contenders.values())).device
        result = report(contenders, args, args.rounds, peak_tflops(device, args.peak_tflops))
    print_tables(result)
    if args.json is not None:
        checkpoint.write_json_atomic(result, args.json)
    return result


if __name__ == "__main__":
    main()
