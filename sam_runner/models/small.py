"""Small networks: the MNIST-1D CNN (Greydanus 2020), an MLP (Keskar's F1 with hidden=[512]*5), Keskar's C1."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam_runner.errors import ConfigError
from sam_runner.models.resnet import image_channels


def _flat_size(features: nn.Module, input_shape: Sequence[int]) -> int:
    """Features per sample after `features`, from one dummy forward in eval mode (BatchNorm stats untouched)."""
    features.eval()
    with torch.no_grad():
        size = features(torch.zeros(1, *input_shape)).numel()
    features.train()
    return size


NORMS = ("none", "batch")  # cnn1d's `norm`: no normalization layer, or BatchNorm1d after each convolution


def cnn1d(num_classes: int, input_shape: Sequence[int], channels: int = 25, norm: str = "none") -> nn.Sequential:
    """Three Conv1d layers (kernel 5/3/3, stride 2, ReLU) and a linear layer: 94% on MNIST-1D in the paper.

    norm="batch" puts a BatchNorm1d between each convolution (then without its bias, which the normalization
    would cancel) and its ReLU: the same network with normalization layers, for what needs them (SAM-ON).
    """
    if len(input_shape) != 2:
        raise ConfigError(f"model cnn1d needs sequence inputs (C, L), got input_shape={tuple(input_shape)}: "
                          f"use another model for this dataset")
    if norm not in NORMS:
        raise ConfigError(f"model.norm: invalid value {norm!r} for cnn1d, expected one of [{', '.join(NORMS)}]")

    def block(in_channels: int, kernel: int, padding: int) -> list[nn.Module]:
        conv = nn.Conv1d(in_channels, channels, kernel, stride=2, padding=padding, bias=norm == "none")
        return [conv, nn.BatchNorm1d(channels), nn.ReLU()] if norm == "batch" else [conv, nn.ReLU()]

    features = nn.Sequential(*block(input_shape[0], 5, 1), *block(channels, 3, 1), *block(channels, 3, 1),
                             nn.Flatten())
    return nn.Sequential(features, nn.Linear(_flat_size(features, input_shape), num_classes))


def mlp(num_classes: int, input_shape: Sequence[int], hidden: Sequence[int] = (100, 100)) -> nn.Sequential:
    """Flatten, then Linear-ReLU per entry of `hidden`, then a linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for units in hidden:
        layers += [nn.Linear(width, int(units)), nn.ReLU()]
        width = int(units)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SameMaxPool2d(nn.Module):
    """Max-pooling with Keras/TensorFlow 'same' padding, as in Keskar et al.'s code.

    The output has ceil(n / stride) rows (and columns); the padding that needs is split with the odd pixel at
    the bottom/right. PyTorch's symmetric `padding=1` gives the same size on a 32-pixel side but shifts every
    window up-left by one pixel. Padding is -inf, so it never wins the max.
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"


def keskar_c1(num_classes: int, input_shape: Sequence[int]) -> nn.Sequential:
    """Keskar et al.'s C1 (`network_zoo.shallownet` in their code): two [conv 5x5-64 'same', BN, ReLU, max-pool
    3x3/2 'same'] blocks, flatten, then [Dense, BN, ReLU, Dropout 0.5] with 384 and with 192 units, classifier.

    1,757,834 parameters on (3, 32, 32) with 10 classes (64*8*8 = 4096 features after the blocks).
    """
    in_channels = image_channels(input_shape, "keskar_c1")

    def conv_block(in_planes: int) -> list[nn.Module]:
        return [nn.Conv2d(in_planes, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(), SameMaxPool2d(3, stride=2)]

    def dense_block(in_features: int, units: int) -> list[nn.Module]:
        return [nn.Linear(in_features, units), nn.BatchNorm1d(units), nn.ReLU(), nn.Dropout(0.5)]

    features = nn.Sequential(*conv_block(in_channels), *conv_block(64), nn.Flatten())
    return nn.Sequential(features,
                         *dense_block(_flat_size(features, input_shape), 384), *dense_block(384, 192),
                         nn.Linear(192, num_classes))
