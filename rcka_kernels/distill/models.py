"""Teacher and student networks of the paper's experiments.

- CIFAR ResNets in the style of the CRD repository (resnet8 ... resnet110,
  resnet8x4, resnet32x4): 3 stages of BasicBlocks, (depth - 2) / 6 blocks each.
  Parameter names follow that code (conv1, bn1, layer1.0.conv1, ..., fc), so its
  checkpoints load.
- ImageNet ResNet-18/34 with torchvision's parameter names (conv1, bn1,
  layer1.0.conv1, layer1.0.downsample.0, ..., fc), so torchvision checkpoints load.
- Small MLPs for the embedded scikit-learn digits problem.

Every model's ``forward(x)`` returns logits; ``features(x)`` returns the
penultimate (pooled) features.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "ImageNetResNet", "MLP", "MODELS", "build"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """ResNet for 32 x 32 inputs: conv3x3 -> 3 stages -> global average pool -> fc."""

    def __init__(self, depth: int, widths: List[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6k + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inp = widths[0]
        layers = []
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(inp, w, stride if j == 0 else 1))
                inp = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes)
        _init(self)

    def features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class ImageNetResNet(nn.Module):
    """torchvision-compatible ResNet-18/34 (BasicBlock)."""

    def __init__(self, layers: List[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = 64
        stages = []
        for planes, blocks, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
            mods = []
            for j in range(blocks):
                mods.append(BasicBlock(inp, planes, stride if j == 0 else 1))
                inp = planes
            stages.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init(self)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class MLP(nn.Module):
    """Flatten -> hidden ReLU layers -> linear classifier (the digits problem)."""

    def __init__(self, in_features: int, hidden: List[int], num_classes: int):
        super().__init__()
        dims = [in_features] + list(hidden)
        self.body = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.fc = nn.Linear(dims[-1], num_classes)

    def features(self, x):
        return self.body(torch.flatten(x, 1))

    def forward(self, x):
        return self.fc(self.features(x))


_S = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]

# name -> (dataset family, constructor(num_classes))
MODELS: Dict[str, tuple] = {
    **{f"resnet{d}": ("cifar", (lambda d: lambda k: CifarResNet(d, _S, k))(d)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ("cifar", lambda k: CifarResNet(8, _X4, k)),
    "resnet32x4": ("cifar", lambda k: CifarResNet(32, _X4, k)),
    "resnet18": ("imagenet", lambda k: ImageNetResNet([2, 2, 2, 2], k)),
    "resnet34": ("imagenet", lambda k: ImageNetResNet([3, 4, 6, 3], k)),
    "mlp_teacher": ("digits", lambda k: MLP(64, [256, 256], k)),
    "mlp_student": ("digits", lambda k: MLP(64, [32], k)),
}


def build(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    ctor: Callable = MODELS[name][1]
    return ctor(num_classes)
