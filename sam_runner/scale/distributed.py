"""One run over several processes (torchrun): the process group, each rank's share of a global batch, and the
SAM step under DistributedDataParallel with a global or a per-worker ε.

The global batch is `batch_size`: every rank draws the same global batch from BatchStream (a pure function of
(seed, epoch)) and trains on its contiguous share, so the samples a step sees are exactly a single-process
run's. Without torchrun (or with one process) the world is the single-process one and every function here is
the identity or plain `train_step`. docs/distributed.md has the why of each choice.
"""

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sam_runner.errors import ConfigError
from sam_runner.optim import SAM
from sam_runner.scale import torchrun_env
from sam_runner.steps import Criterion, StepResult, train_step

SAM_MODES = ("global", "local")  # ε from the all-reduced gradient / from each rank's own shard gradient


@dataclass(frozen=True)
class World:
    """Which process this is among how many, and the device it trains on; the defaults are a lone process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: dist.ProcessGroup | None = None  # the gloo group for decisions and stop flags (None: the default group)

    @property
    def is_main(self) -> bool:
        """The process that writes the run directory, logs and checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the process group torchrun describes in the environment for the body, and leave it afterwards
    whatever raised.

    nccl on CUDA (each rank on GPU LOCAL_RANK of its node), gloo on CPU. Not under torchrun (no WORLD_SIZE), or
    with a single process, it yields the single-process World on `device` and starts nothing.
    """
    world = _world_from_env(device, os.environ)
    if not world.is_distributed:
        yield world
        return
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    # env:// as torchrun intends: under its elastic agent every rank is a client of the agent's store
    dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.world_size,
                            device_id=world.device if backend == "nccl" else None)
    # decisions and stop flags travel on gloo over the CPU: on nccl they would cost a device sync each (ranks.Team)
    world = replace(world, control=dist.new_group(backend="gloo") if backend == "nccl" else None)
    settled = False
    try:
        yield world
    except BaseException:
        settled = _settle(world.control, wait_s=SETTLE_WAIT_AFTER_ERROR_S)
        raise
    else:
        settled = _settle(world.control, wait_s=None)
    finally:
        if settled:  # else a process never came to the last barrier: leaving the group would wait for it, exiting won't
            dist.destroy_process_group()


# The barriers that settled the gloo group at the end of a run, kept for the life of the process: see _settle.
_SETTLED: list[dist.Work] = []
SETTLE_WAIT_AFTER_ERROR_S = 10.0  # s; a process that raised waits this long for the others at the last barrier


def _settle(group: dist.ProcessGroup | None, *, wait_s: float | None) -> bool:
    """A last barrier on the gloo `group` (None: the default group), so that no gloo worker thread frees a tensor
    once this process has begun to exit; whether every process came to it (within `wait_s` seconds; None: as long
    as it takes, since every process ends normally).

    Why: a gloo worker thread lets go of a finished collective (freeing the tensors only it still holds, which
    takes the GIL) a moment after the caller has moved on. Should the interpreter be shutting down by then, the
    thread is killed inside a destructor and the process aborts (SIGABRT, "terminate called without an active
    exception"): torchrun reports a run that completed as failed. A barrier snapshots, under gloo's queue lock,
    the collectives still in flight (any other is freed already) and defers their freeing to its own; kept in
    _SETTLED, it is freed by the main thread at exit, which holds the GIL.
    """
    try:
        barrier = dist.barrier(group, async_op=True)
        _SETTLED.append(barrier)
        if wait_s is None:
            barrier.wait()
        else:
            barrier.wait(timedelta(seconds=wait_s))
    except RuntimeError:  # a process failed or is stuck elsewhere
        return False
    return True


def _world_from_env(device: torch.device, env: Mapping[str, str]) -> World:
    rank, world_size, local_rank = torchrun_env.launched(env)
    if world_size == 1:
        return World(device=device)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node sees {visible} CUDA device(s): use "
                              f"--nproc_per_node <= {visible} (one process per GPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"DDP runs on cuda (nccl) or cpu (gloo), not on {device.type}: set device=cuda or "
                          f"device=cpu")
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# The SAM variants that run under DDP in the global SAM mode only: their name in messages, and why not local.
GLOBAL_MODE_VARIANTS = {
    "gsam": ("GSAM", "its decomposition takes each process's own clean gradient against the all-reduced perturbed "
                     "one, so the processes' updates would differ"),
    "fsam": ("F-SAM", "each process's gradient EMA would be its own and the checkpoint keeps rank 0's only, so a "
                      "resumed run would differ"),
    "looksam": ("LookSAM", "each process's g_v would come from its own clean gradient against the all-reduced "
                           "perturbed one, so the processes would step differently and the checkpoint keeps rank 0's "
                           "only"),
}


def check_setup(world: World, *, batch_size: int, num_samples: int, sam_mode: str,
                micro_batch_size: int | None = None, accumulate: int = 1, sync_batchnorm: bool = False,
                compile: bool = False, sam_variant: str | None = None) -> None:
    """Refuse, before anything is built, what the distributed step cannot do right; nothing for one process.

    Every rank needs at least one sample of every batch (an empty shard has no mean loss and breaks
    BatchNorm); uneven shards are fine (see `shard`), except with micro-batches, where every rank must cut the
    same chunks so the perturbed passes all-reduce in step, and with accumulation, where every rank must cut the same
    number of micro-batches (each pass all-reduces once, at its last micro-batch, with DDP's collectives in step).
    """
    if sam_mode not in SAM_MODES:
        raise ConfigError(f"unknown DDP SAM mode {sam_mode!r}: use one of {', '.join(SAM_MODES)}")
    if not world.is_distributed:
        return
    size = world.world_size
    last = num_samples % batch_size  # the epoch's final, smaller batch (0: none)
    if batch_size < size:
        raise ConfigError(f"batch_size={batch_size} leaves some of the {size} processes without samples: use "
                          f"batch_size >= {size} or fewer processes")
    if 0 < last < size:
        raise ConfigError(f"the last batch of each epoch has {last} samples ({num_samples} mod batch_size="
                          f"{batch_size}), fewer than the {size} processes: pick a batch_size that leaves no "
                          f"remainder or one >= {size}, or use fewer processes")
    if sam_mode == "local" and sam_variant in GLOBAL_MODE_VARIANTS:
        name, why = GLOBAL_MODE_VARIANTS[sam_variant]
        raise ConfigError(f"{name} with the local SAM mode is not supported: {why}; use ddp.sam_mode=global")
    if sam_variant == "esam":
        raise ConfigError("ESAM does not run under DDP: its data selection ranks every sample's loss rise over the "
                          "global batch (an all-gather across processes not implemented), and SWP's tensors without "
                          "a gradient leave DDP's gradient buckets incomplete; run it in one process")
    if micro_batch_size is not None and sam_mode == "global":
        raise ConfigError("micro_batch_size (m-sharpness) with the global SAM mode would perturb with chunks "
                          "pooled across processes: use the local mode (m = batch_size / processes, or "
                          "micro_batch_size within each process) or drop micro_batch_size")
    if micro_batch_size is not None and (batch_size % size or last % size):
        raise ConfigError(f"micro_batch_size needs every batch split evenly over the {size} processes: "
                          f"batch_size={batch_size} and the last batch of {last or batch_size} must be "
                          f"multiples of {size}")
    smallest = (last or batch_size) // size  # the smallest shard of any batch (last < batch_size)
    if accumulate > smallest:
        raise ConfigError(f"accumulate={accumulate} is more micro-batches than the {smallest} samples of the "
                          f"smallest shard ({size} processes): use accumulate <= {smallest} or fewer processes")
    if sync_batchnorm and world.device.type != "cuda":
        raise ConfigError("sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU kernel): set "
                          "sync_batchnorm=false")
    if sync_batchnorm and sam_mode == "local":
        raise ConfigError("sync_batchnorm pools BatchNorm statistics across processes, so the local SAM mode's "
                          "per-process ε would see every shard: use the global mode or sync_batchnorm=false")
    if compile:  # compile_model warms up at the full batch's shapes; a rank's shard would recompile mid-epoch
        raise ConfigError("compile=true is not supported over several processes yet (its warm-up compiles one "
                          "process's batch shapes): set compile=false")


def shard_bounds(n: int, world: World) -> tuple[int, int]:
    """Rows [start, stop) of an n-sample global batch that this rank trains on.

    Contiguous and in rank order, so the ranks' shards concatenate to the global batch; sizes differ by at
    most one (the first n mod world_size ranks take one more).
    """
    base, extra = divmod(n, world.world_size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def shard(inputs: Tensor, targets: Tensor, world: World) -> tuple[Tensor, Tensor, float]:
    """This rank's share of the global batch (views, no copy) and its loss weight n_rank · world_size / n.

    DDP averages gradients over ranks; weighting each rank's mean loss by its share of the batch makes that
    average the global batch's mean gradient when the shards are uneven (the weight is 1 when they are even).
    """
    start, stop = shard_bounds(len(targets), world)
    if stop == start:
        raise ConfigError(f"a batch of {len(targets)} samples leaves rank {world.rank} of {world.world_size} "
                          f"without any: raise batch_size or use fewer processes")
    return inputs[start:stop], targets[start:stop], (stop - start) * world.world_size / len(targets)


def wrap_model(model: nn.Module, world: World, *, sync_batchnorm: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` (after `.to(world.device)`), or `model` itself for one process.

    DDP broadcasts rank 0's parameters and buffers now, and rank 0's buffers (BatchNorm statistics) before
    every forward, so all ranks hold the same model. SyncBatchNorm keeps the same Parameter objects, so an
    optimizer built before or after the wrap steps the same tensors.
    """
    if not world.is_distributed:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP: for evaluation and sharpness (no collectives) and for state_dict (no
    'module.' prefix, so checkpoints load at any world size)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def distributed_step(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: torch.optim.Optimizer,
                     criterion: Criterion, world: World, *, sam_mode: str = "global", **step_options: Any
                     ) -> StepResult:
    """One training step on the global batch (inputs, targets): this rank trains on its shard.

    global: DDP all-reduces the clean-pass gradient, so ε and the update equal single-process SAM on the global
    batch. local: the clean pass runs under `no_sync`, so each rank perturbs with its own shard's gradient, and
    the perturbed gradients are averaged (weighted by shard size): m-sharpness with m = the rank's share. A
    plain optimizer ignores `sam_mode`. step_options go to `train_step` (AMP, clipping, micro-batches,
    accumulation: its micro-batches but the last run under `no_sync`, so each pass all-reduces once).

    The result is this rank's: losses are its shard's means, counts its shard's; `all_reduce_sum` the epoch's
    totals (and the shard sizes) before reading them.
    """
    if not world.is_distributed:
        return train_step(model, inputs, targets, optimizer, criterion, **step_options)
    x, y, weight = shard(inputs, targets, world)
    local = sam_mode == "local" and isinstance(optimizer, SAM)
    return train_step(model, x, y, optimizer, criterion, loss_weight=weight,
                      clean_pass=model.no_sync if local else nullcontext, no_sync=model.no_sync, **step_options)


def all_reduce_sum(tensor: Tensor, world: World) -> Tensor:
    """The sum of `tensor` over all ranks (the same tensor for one process); identical on every rank."""
    if not world.is_distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def broadcast_buffers(model: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics): after a step each rank's hold its own shard's
    update, and DDP syncs them only at the next training forward; call this before evaluating or saving."""
    if world.is_distributed:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


class RankShare:
    """A BatchStream as one rank evaluates it: each batch's contiguous shard (none when a batch is too small).

    `num_samples` stays the whole stream's, so all_reduce_sum(summed loss) / num_samples is the full-set mean.
    """

    def __init__(self, stream: Any, world: World) -> None:
        self.stream, self.world = stream, world

    @property
    def num_samples(self) -> int:
        return self.stream.num_samples

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for inputs, targets in self.stream.epoch(epoch, start_batch):
            start, stop = shard_bounds(len(targets), self.world)
            if stop > start:
                yield inputs[start:stop], targets[start:stop]


def describe_world(world: World, *, sam_mode: str, sync_batchnorm: bool, is_sam: bool) -> dict[str, Any]:
    """What summary.json records about the processes: world_size, the DDP SAM mode (None where there is no
    choice: one process or a plain optimizer) and whether BatchNorm statistics were synchronized."""
    return {"world_size": world.world_size,
            "ddp_sam_mode": sam_mode if world.is_distributed and is_sam else None,
            "sync_batchnorm": bool(sync_batchnorm and world.is_distributed)}
