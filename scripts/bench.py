"""Training throughput of sam-runner's step against a bare PyTorch loop on the same model and data.

    python scripts/bench.py --model cnn1d --batch-size 128 --steps 200           # CPU, MNIST-1D shape
    python scripts/bench.py --model resnet18 --batch-size 256 --device cuda      # GPU, CIFAR shape, bf16

Prints images/s for SGD and SAM, each as a bare loop and through `sam_runner.steps.train_step`, and the
runner's overhead. Data are random tensors already on the device, so only the step is timed. Results go in
docs/benchmarks.md with the exact command; never assert timings in tests.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sam_runner import models
from sam_runner.build import AUTOCAST_DTYPES, resolve_device, resolve_precision
from sam_runner.optim import SAM
from sam_runner.steps import train_step

INPUT_SHAPES = {"cnn1d": (1, 40), "mlp": (1, 40), "resnet18": (3, 32, 32), "wide_resnet": (3, 32, 32),
                "keskar_c1": (3, 32, 32)}


def bare_sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  autocast: Callable) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


def bare_sam_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  autocast: Callable, rho: float = 0.05) -> None:
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


def images_per_second(step: Callable[[], None], steps: int, batch_size: int, device: torch.device) -> float:
    for _ in range(min(10, steps)):  # warm-up: allocator, cuDNN autotuning
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # host sync: count the queued kernels in the time
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn1d", choices=sorted(INPUT_SHAPES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    dtype = AUTOCAST_DTYPES[precision]
    autocast = partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)
    shape = INPUT_SHAPES[args.model]
    x = torch.rand(args.batch_size, *shape, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    criterion = nn.CrossEntropyLoss()

    def fresh(sam: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = getattr(models, args.model)(num_classes=10, input_shape=shape).to(device)
        base = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        return model, SAM(model.parameters(), base, rho=0.05) if sam else base(model.parameters())

    print(f"{args.model}, batch {args.batch_size}, {args.steps} steps on {device} ({precision})")
    for name, sam in (("SGD", False), ("SAM", True)):
        model, optimizer = fresh(sam)
        bare_optimizer = optimizer.base_optimizer if sam else optimizer
        bare = bare_sam_step if sam else bare_sgd_step
        bare_rate = images_per_second(lambda: bare(model, bare_optimizer, x, y, autocast), args.steps,
                                      args.batch_size, device)
        model, optimizer = fresh(sam)
        runner_rate = images_per_second(
            lambda: train_step(model, x, y, optimizer, criterion, autocast_dtype=dtype), args.steps,
            args.batch_size, device)
        print(f"{name}: bare loop {bare_rate:9.0f} img/s | sam-runner {runner_rate:9.0f} img/s | "
              f"overhead {100 * (bare_rate / runner_rate - 1):+.1f}%")


if __name__ == "__main__":
    main()
