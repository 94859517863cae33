"""Small networks: the MNIST-1D CNN (Greydanus 2020), an MLP (Keskar's F1 with hidden=[512]*5), Keskar's C1."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sam_runner.errors import ConfigError
from sam_runner.models.resnet import image_channels


def _flat_size(features: nn.Module, input_shape: Sequence[int]) -> int:
    """Features per sample after `features`, from one dummy forward in eval mode (BatchNorm stats untouched)."""
    features.eval()
    with torch.no_grad():
        size = features(torch.zeros(1, *input_shape)).numel()
    features.train()
    return size


def cnn1d(num_classes: int, input_shape: Sequence[int], channels: int = 25) -> nn.Sequential:
    """Three Conv1d layers (kernel 5/3/3, stride 2, ReLU) and a linear layer: 94% on MNIST-1D in the paper."""
    if len(input_shape) != 2:
        raise ConfigError(f"model cnn1d needs sequence inputs (C, L), got input_shape={tuple(input_shape)}: "
                          f"use another model for this dataset")
    features = nn.Sequential(
        nn.Conv1d(input_shape[0], channels, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
    )
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


def keskar_c1(num_classes: int, input_shape: Sequence[int]) -> nn.Sequential:
    """Keskar et al.'s C1: two [conv5x5-64, BN, ReLU, max-pool 3x3/2] blocks, then FC 384, FC 192, classifier."""
    in_channels = image_channels(input_shape, "keskar_c1")

    def block(in_planes: int) -> list[nn.Module]:
        return [nn.Conv2d(in_planes, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1)]

    features = nn.Sequential(*block(in_channels), *block(64), nn.Flatten())
    return nn.Sequential(features,
                         nn.Linear(_flat_size(features, input_shape), 384), nn.ReLU(),
                         nn.Linear(384, 192), nn.ReLU(),
                         nn.Linear(192, num_classes))
