"""Pre-activation Wide ResNet (Zagoruyko & Komodakis 2016), the SAM paper's CIFAR network."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from sam_runner.errors import ConfigError
from sam_runner.models.resnet import image_channels


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3; a changed shape shares the first activation with a 1x1 shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(activated)))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, dropout: float, num_classes: int, in_channels: int) -> None:
        super().__init__()
        blocks_per_group = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        layers, in_planes = [], 16
        for i, planes in enumerate(widths):
            for j in range(blocks_per_group):
                layers.append(WideBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1, dropout=dropout))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():  # He initialization, as in the WRN paper
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wide_resnet(num_classes: int, input_shape: Sequence[int], depth: int = 16, widen_factor: int = 8,
                dropout: float = 0.0) -> WideResNet:
    """WRN-depth-widen_factor: depth = 6n + 4, widths 16, 16k, 32k, 64k (WRN-16-8 ~11.0M, WRN-28-10 ~36.5M params)."""
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"wide_resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}: "
                          f"fix model.depth")
    if widen_factor < 1 or not 0 <= dropout < 1:
        raise ConfigError(f"wide_resnet needs widen_factor >= 1 and 0 <= dropout < 1 "
                          f"(got {widen_factor}, {dropout}): fix model.widen_factor / model.dropout")
    return WideResNet(depth, widen_factor, dropout, num_classes, image_channels(input_shape, "wide_resnet"))
