"""The project's own model zoo (mlp, cnn, CIFAR-style resnet): feature extractors built from validated specs."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [64], "dropout": 0.0},
    "cnn": {"channels": [32, 64], "hidden": [], "dropout": 0.0},
    "resnet": {"depth": 8, "width": 1},
}


def _dense_stack(in_features: int, hidden: list[int], dropout: float) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    return layers, in_features


def _mlp(spec: dict, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    layers, out = _dense_stack(math.prod(input_shape), spec["hidden"], spec["dropout"])
    return nn.Sequential(nn.Flatten(1), *layers), out


def _cnn(spec: dict, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    in_ch, h, w = input_shape
    layers: list[nn.Module] = []
    for ch in spec["channels"]:
        # No conv bias: BatchNorm's shift makes it redundant.
        layers += [nn.Conv2d(in_ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        if min(h, w) > 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        in_ch = ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if spec["dropout"] > 0 and not spec["hidden"]:
        layers.append(nn.Dropout(spec["dropout"]))
    dense, out = _dense_stack(in_ch, spec["hidden"], spec["dropout"])
    return nn.Sequential(*layers, *dense), out


class BasicBlock(nn.Module):
    """He et al. 2016 basic block; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet(spec: dict, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    # CIFAR ResNet (He et al. 2016, sec. 4.2): stem 16k channels, three stages of n basic
    # blocks at 16k, 32k, 64k channels (strides 1, 2, 2), depth = 6n + 2, k = width.
    # resnet8x4 / resnet32x4 of CRD/torchdistill are close: depth 8 / 32, width 4.
    n = (spec["depth"] - 2) // 6
    k = spec["width"]
    stem = 16 * k
    layers: list[nn.Module] = [
        nn.Conv2d(input_shape[0], stem, 3, padding=1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(inplace=True),
    ]
    in_ch = stem
    for stage, ch in enumerate((16 * k, 32 * k, 64 * k)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(BasicBlock(in_ch, ch, stride))
            in_ch = ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*layers), in_ch


BUILDERS = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet}
