"""ResNet-18, CIFAR variant (He et al. 2016): 3x3 stem, no max-pool; about 11.2M parameters for 10 classes."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from sam_runner.errors import ConfigError


def image_channels(input_shape: Sequence[int], model: str) -> int:
    """Channels of an image input (C, H, W); the 2-D networks reject anything else with a fix."""
    if len(input_shape) != 3:
        raise ConfigError(f"model {model} needs image inputs (C, H, W), got input_shape={tuple(input_shape)}: "
                          f"use model=cnn1d or model=mlp for this dataset")
    return int(input_shape[0])


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; a 1x1 projection on the shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: Sequence[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        layers, in_planes = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            for j in range(count):
                layers.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(num_classes: int, input_shape: Sequence[int]) -> ResNet:
    """ResNet-18 for small images: BasicBlocks [2, 2, 2, 2] at widths 64-128-256-512."""
    return ResNet((2, 2, 2, 2), num_classes, image_channels(input_shape, "resnet18"))
