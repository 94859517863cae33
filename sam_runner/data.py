"""Datasets -> tensors -> seeded, device-resident, batched-augmented batches.

Dataset builders (the `dataset.source._target_`s) return `(train, test)` Datasets of `(float tensor, int label)`
with images in [0, 1], unnormalized. The trainer `materialize`s them once into two tensors, and `BatchStream`
keeps those on the device and does shuffling, augmentation and normalization there, per batch, so the hot loop
never waits on a DataLoader and an epoch's batches are a pure function of `(seed, epoch)` (exact resume).
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sam_runner.errors import ConfigError, DataError


class TensorPairs(Dataset):
    """In-memory `(inputs, targets)` whose items follow the contract `(float tensor, int label)`.

    Exposes `.tensors` like `TensorDataset`, so `materialize` takes the fast path.
    """

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.tensors = (inputs.float(), targets.long())

    def __len__(self) -> int:
        return len(self.tensors[1])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.tensors[0][index], int(self.tensors[1][index])


# ----------------------------------------------------------------------------------------------- CIFAR


def _cifar(dataset_cls: type, title: str, root: str, download: bool) -> tuple[TensorPairs, TensorPairs]:
    """Load through torchvision's own reader, then take its uint8 `.data` array whole (no per-image PIL)."""
    root = os.path.expanduser(str(root))
    folder = os.path.join(root, dataset_cls.base_folder)
    archive, elsewhere = dataset_cls.filename, "set data_dir=<folder that holds it>"
    try:
        splits = [dataset_cls(root, train=train, download=download and train) for train in (True, False)]
    except (OSError, RuntimeError) as exc:
        if download:
            raise DataError(f"{title} not found under {root}/ and could not be downloaded ({exc}): copy {archive} "
                            f"or the extracted {dataset_cls.base_folder}/ into {root}/, or {elsewhere}") from exc
        raise DataError(f"{title} not found or incomplete in {folder}/ (download is off): copy the extracted "
                        f"folder there, or {elsewhere}, or set dataset.source.download=true (which also "
                        f"extracts a copied {archive})") from exc

    def to_tensors(split) -> TensorPairs:
        pixels = torch.from_numpy(np.ascontiguousarray(split.data)).permute(0, 3, 1, 2).float().div_(255)
        return TensorPairs(pixels.contiguous(), torch.as_tensor(split.targets, dtype=torch.long))

    return to_tensors(splits[0]), to_tensors(splits[1])


def cifar10(root: str, download: bool = True) -> tuple[TensorPairs, TensorPairs]:
    """CIFAR-10: 50k train / 10k test 3x32x32 images in [0, 1], 10 classes."""
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, "CIFAR-10", root, download)


def cifar100(root: str, download: bool = True) -> tuple[TensorPairs, TensorPairs]:
    """CIFAR-100: 50k train / 10k test 3x32x32 images in [0, 1], 100 fine classes."""
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, "CIFAR-100", root, download)


# ----------------------------------------------------------------------------------------------- MNIST-1D


def mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42,
            cache_dir: str | None = None) -> tuple[TensorPairs, TensorPairs]:
    """MNIST-1D (Greydanus 2020), generated offline: items (1, 40), 10 classes.

    `make_dataset` takes about 1.5 s per 5000 samples, so the tensors are cached in `cache_dir` under a name
    derived from its arguments and the mnist1d version (`_mnist1d_cache_name`). Its global NumPy / `random`
    seeding is undone afterwards so that building the data does not change the run's random streams.
    """
    check_mnist1d(num_samples, train_split)
    cache = Path(cache_dir, _mnist1d_cache_name(num_samples, train_split, seed)) if cache_dir else None
    arrays = _read_cache(cache) if cache is not None and cache.is_file() else None
    if arrays is None:
        arrays = _generate_mnist1d(num_samples, train_split, seed)
        if cache is not None:
            _write_cache(arrays, cache)
    return (TensorPairs(arrays["x"].float().unsqueeze(1), arrays["y"]),
            TensorPairs(arrays["x_test"].float().unsqueeze(1), arrays["y_test"]))


def check_mnist1d(num_samples: int, train_split: float, **_: object) -> None:
    """The sizes MNIST-1D's generator accepts; checked again by the pre-flight, before any directory is made."""
    if not (isinstance(num_samples, int) and num_samples >= 10 and 0 < train_split < 1):
        raise DataError(f"mnist1d needs num_samples >= 10 and 0 < train_split < 1 "
                        f"(got {num_samples}, {train_split}): fix dataset.source.num_samples / train_split")


_CACHE_KEYS = ("x", "y", "x_test", "y_test")


def _mnist1d_cache_name(num_samples: int, train_split: float, seed: int) -> str:
    """The cache file of one generator call: named by its arguments and the mnist1d version, which fixes every
    other generator default, so a cached run never imports mnist1d (it pulls in matplotlib and scipy: ~1.5 s)."""
    return f"mnist1d_n{num_samples}_split{train_split}_seed{seed}_v{metadata.version('mnist1d')}.pt"


def _generate_mnist1d(num_samples: int, train_split: float, seed: int) -> dict[str, Tensor]:
    """MNIST-1D's arrays from its own generator, with its global NumPy / `random` seeding undone afterwards."""
    from mnist1d.data import get_dataset_args, make_dataset  # slow to import (see _mnist1d_cache_name): lazily
    from mnist1d.utils import ObjectView

    args = get_dataset_args(as_dict=True)
    args.update(num_samples=int(num_samples), train_split=float(train_split), seed=int(seed))
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        generated = make_dataset(ObjectView(args))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {key: torch.as_tensor(generated[key]) for key in _CACHE_KEYS}


def _write_cache(arrays: dict[str, Tensor], cache: Path) -> None:
    """Saved under a temporary name, then renamed: a run reading the cache never sees half a file (a crash that
    leaves one behind costs a regeneration, as `_read_cache` falls back to generating)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    torch.save(arrays, temporary)
    os.replace(temporary, cache)


def _read_cache(cache: Path) -> dict[str, Tensor] | None:
    """The cached MNIST-1D tensors, or None (with a warning) when the file is corrupt: it is then regenerated."""
    try:
        arrays = torch.load(cache, weights_only=True)
        if isinstance(arrays, dict) and all(isinstance(arrays.get(key), Tensor) for key in _CACHE_KEYS):
            return arrays
        reason = "it holds other data"
    except Exception as error:  # torch raises many types for truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    warnings.warn(f"MNIST-1D cache {cache} is unreadable ({reason}); generating the data again", RuntimeWarning)
    return None


# ----------------------------------------------------------------------------------------------- synthetic


def synthetic(num_train: int = 512, num_test: int = 256, input_shape: Sequence[int] = (1, 40),
              num_classes: int = 10, seed: int = 0) -> tuple[TensorPairs, TensorPairs]:
    """Gaussian classes (a random mean per class + unit noise): tiny, learnable and deterministic given seed."""
    check_synthetic(num_train, num_test, num_classes)
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(int(d) for d in input_shape)
    means = torch.randn(num_classes, *shape, generator=generator)
    total = num_train + num_test
    labels = (torch.arange(total) % num_classes)[torch.randperm(total, generator=generator)]
    inputs = means[labels] + torch.randn(total, *shape, generator=generator)
    return TensorPairs(inputs[:num_train], labels[:num_train]), TensorPairs(inputs[num_train:], labels[num_train:])


def check_synthetic(num_train: int, num_test: int, num_classes: int, **_: object) -> None:
    """Positive sizes; checked again by the pre-flight, before any directory is made."""
    for name, value in {"num_train": num_train, "num_test": num_test, "num_classes": num_classes}.items():
        if not (isinstance(value, int) and value > 0):
            raise DataError(f"dataset.source.{name} must be a positive integer (got {value})")


# The size checks of the built-in dataset sources, keyed by the source, so the pre-flight runs them without data.
SOURCE_CHECKS = {mnist1d: check_mnist1d, synthetic: check_synthetic}


# ----------------------------------------------------------------------------------------------- tensors

_CONTRACT = "dataset items must be (float tensor, int label) pairs"


def _check_item(item: object) -> None:
    """Fail on the first item with a message that states the plug-in contract."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{_CONTRACT}; got an item of type {type(item).__name__}: "
                        f"return (x, y) from your Dataset's __getitem__")
    x, y = item
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        raise DataError(f"{_CONTRACT}; got inputs of type {getattr(x, 'dtype', type(x).__name__)}: "
                        f"return x as a float tensor (images scaled to [0, 1])")
    label_ok = isinstance(y, numbers.Integral) or (isinstance(y, Tensor) and y.numel() == 1
                                                   and not y.is_floating_point() and not y.is_complex())
    if not label_ok:
        raise DataError(f"{_CONTRACT}; got a label of type {getattr(y, 'dtype', type(y).__name__)}: "
                        f"return the class index as an int")


def materialize(dataset: Dataset, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Stack a whole Dataset into (inputs float32 (N, *shape), targets int64 (N,)), optionally on `device`."""
    try:
        size = len(dataset)
    except TypeError as exc:
        raise DataError(f"{_CONTRACT} in a map-style Dataset with __len__; got {type(dataset).__name__}") from exc
    if size == 0:
        raise DataError(f"the dataset {type(dataset).__name__} is empty: check the dataset source")
    _check_item(dataset[0])
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) == 2:
        inputs, targets = tensors
    else:
        loader = DataLoader(dataset, batch_size=4096, shuffle=False, num_workers=0)
        try:
            batches = list(loader)
        except (RuntimeError, TypeError) as exc:
            raise DataError(f"{_CONTRACT} with the same input shape for every item; stacking failed: {exc}") from exc
        inputs = torch.cat([batch[0] for batch in batches])
        targets = torch.cat([torch.as_tensor(batch[1]).reshape(-1) for batch in batches])
    return inputs.to(device=device, dtype=torch.float32), targets.to(device=device, dtype=torch.long).reshape(-1)


def seeded_subset(inputs: Tensor, targets: Tensor, size: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """`size` samples chosen by `seed` (a CPU generator: the same choice on every device), or all of them."""
    if size is None or size >= len(targets):
        return inputs, targets
    chosen = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:size].to(targets.device)
    return inputs[chosen], targets[chosen]


def infer_num_classes(targets: Tensor) -> int:
    """Number of classes = largest label + 1 (labels must be class indices 0..K-1)."""
    if targets.numel() == 0 or int(targets.min()) < 0:
        raise DataError("labels must be class indices 0..K-1 (found a negative label or none): fix the dataset")
    return int(targets.max()) + 1


def check_labels(num_classes: int, *targets: Tensor) -> None:
    """Every label a class index below `dataset.num_classes`; else the loss fails mid-training on an index."""
    smallest, largest = min(int(labels.min()) for labels in targets), max(int(labels.max()) for labels in targets)
    if smallest < 0 or largest >= num_classes:
        raise DataError(f"dataset.num_classes={num_classes}, but the labels go from {smallest} to {largest}: labels "
                        f"must be class indices 0..{num_classes - 1}; set dataset.num_classes={largest + 1}, or null "
                        f"to infer it from the labels")


# ----------------------------------------------------------------------------------------------- batches


class EpochPlan(NamedTuple):
    """Every random draw of one epoch, made up front so skipping batches changes nothing else."""

    order: Tensor          # (N,) sample indices in the order they are served
    shifts: Tensor | None  # (N, 2) crop offsets (row, column) into the zero-padded image, per served position
    flips: Tensor | None   # (N,) bool: mirror horizontally, per served position


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixed from (seed, epoch), decorrelated from `seed` itself (which also seeds the model)."""
    digest = hashlib.sha256(f"sam_runner.data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_augment(augment: dict) -> tuple[int, bool]:
    """(crop padding, flip) of a `dataset.augment` node; what needs no data is checked here (and in the pre-flight)."""
    unknown = set(augment) - {"crop_padding", "horizontal_flip"}
    if unknown:
        raise ConfigError(f"unknown dataset.augment keys {sorted(unknown)}: use crop_padding and horizontal_flip")
    padding, flip = augment.get("crop_padding") or 0, bool(augment.get("horizontal_flip", False))
    if not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"dataset.augment.crop_padding must be >= 0 pixels (got {padding})")
    return padding, flip


def check_normalize(normalize: dict) -> None:
    """A `dataset.normalize` node divides by its std: every value positive and finite, as many as the means."""
    mean, std = list(normalize.get("mean") or []), list(normalize.get("std") or [])
    if len(mean) != len(std):
        raise ConfigError(f"dataset.normalize needs as many means as stds (one per channel); got {mean} and {std}")
    if not all(isinstance(value, (int, float)) and 0 < value < math.inf for value in std):
        raise ConfigError(f"dataset.normalize.std must be positive; got {std}")


class BatchStream:
    """Device-resident batches; epoch `e`'s order and augmentation depend only on `(seed, e)`.

    Augmentation (`{crop_padding: pixels, horizontal_flip: bool}`) is one gather per batch on the device: a
    random crop from the image zero-padded by `crop_padding` pixels (as torchvision's RandomCrop(32, padding=4)
    in [0, 1] pixel space) and a mirror with p = 0.5. Normalization `{mean: [...], std: [...]}` follows, per
    channel. The random draws come from a CPU generator, so CPU and GPU runs see the same batches.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, *, batch_size: int, shuffle: bool, seed: int,
                 device: torch.device | str, augment: dict | None = None, normalize: dict | None = None,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
        if drop_last and batch_size > len(targets):
            raise ConfigError(f"batch_size={batch_size} exceeds the {len(targets)} training samples, so an epoch "
                              f"has no full batch: lower batch_size")
        self.inputs = inputs.to(device=device, dtype=torch.float32)
        self.targets = targets.to(device=device, dtype=torch.long)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.crop_padding, self.horizontal_flip = self._parse_augment(augment or {})
        self.mean, self.std = self._parse_normalize(normalize)

    def _parse_augment(self, augment: dict) -> tuple[int, bool]:
        padding, flip = check_augment(augment)
        if (padding or flip) and self.inputs.dim() != 4:
            raise ConfigError(f"dataset.augment (crop/flip) needs images (N, C, H, W); the inputs have shape "
                              f"{tuple(self.inputs.shape)}: set dataset.augment=null")
        return padding, flip

    def _parse_normalize(self, normalize: dict | None) -> tuple[Tensor | None, Tensor | None]:
        if not normalize:
            return None, None
        check_normalize(normalize)
        channels = self.inputs.shape[1]
        view = (1, channels) + (1,) * (self.inputs.dim() - 2)
        stats = []
        for key in ("mean", "std"):
            values = list(normalize.get(key) or [])
            if len(values) != channels:
                raise ConfigError(f"dataset.normalize.{key} needs one value per channel ({channels}); got {values}")
            stats.append(torch.tensor(values, dtype=torch.float32, device=self.inputs.device).view(view))
        return stats[0], stats[1]

    @property
    def num_samples(self) -> int:
        return len(self.targets)

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def plan(self, epoch: int) -> EpochPlan:
        """Draw epoch `epoch`'s order and augmentation, on the CPU, in a fixed order."""
        n = self.num_samples
        augmenting = self.crop_padding > 0 or self.horizontal_flip
        if not (self.shuffle or augmenting):
            return EpochPlan(torch.arange(n), None, None)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        shifts = flips = None
        if augmenting:
            shifts = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
            flips = (torch.rand(n, generator=generator) < 0.5 if self.horizontal_flip
                     else torch.zeros(n, dtype=torch.bool))
        return EpochPlan(order, shifts, flips)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield epoch `epoch`'s batches from batch `start_batch` on (resume skips the ones already trained)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        plan = self.plan(epoch)
        device = self.inputs.device
        order = plan.order.to(device)  # small index tensors: one copy per epoch, then sliced per batch
        shifts = plan.shifts.to(device) if plan.shifts is not None else None
        flips = plan.flips.to(device) if plan.flips is not None else None
        for b in range(start_batch, len(self)):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[rows] if self.shuffle else rows  # unshuffled: a view, no copy
            x = self.inputs[index]
            if shifts is not None:
                x = crop_flip(x, shifts[rows], flips[rows], self.crop_padding)
            if self.mean is not None:
                x = (x - self.mean) / self.std
            yield x, self.targets[index]


def crop_flip(images: Tensor, shifts: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Per-sample random crop of the zero-padded images, then optional mirror, as one batched gather.

    Output pixel (i, j) of sample n is padded[n, :, dy + i, dx + j], with j mirrored to W - 1 - j when flipped.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4) if padding else images
    device = images.device
    i, j = torch.arange(h, device=device), torch.arange(w, device=device)
    j = torch.where(flips[:, None], w - 1 - j, j)                            # (N, W)
    rows = (shifts[:, 0:1] + i)[:, None, :, None]                            # (N, 1, H, 1)
    cols = (shifts[:, 1:2] + j)[:, None, None, :]                            # (N, 1, 1, W)
    return padded[torch.arange(n, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None], rows, cols]
