"""Model factories: small CNNs for 8x8 digits and 28x28 MNIST, and the paper's TinyResNet and SimpleCNN for 32x32 RGB.

Every factory takes ``in_channels`` and ``num_classes`` (filled in from the dataset) and returns an
``nn.Module`` whose last Linear layer reads a penultimate representation exposed by ``features``.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .registry import MODELS


class FeatureModel(nn.Module):
    """A classifier split into `body` (to penultimate features) and `head` (the last Linear)."""

    body: nn.Module
    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@MODELS.register("digits-cnn")
class DigitsCNN(FeatureModel):
    """Two 3x3 convs and an MLP head for 8x8 greyscale digits (no BatchNorm: train and eval agree)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 16, hidden), nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)


@MODELS.register("mnist-cnn")
class MnistCNN(FeatureModel):
    """Two conv+pool blocks and a 64-unit hidden layer for 28x28 greyscale (MNIST); no BatchNorm.
    `size` is the input's side (divisible by 4)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 64,
                 size: int = 28):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * (size // 4) ** 2, hidden), nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("tiny-resnet")
class TinyResNet(FeatureModel):
    """The paper's CIFAR-10 TinyResNet (308,650 parameters): stem, blocks 32-32-64-128, GAP, Linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            _ResidualBlock(32, 32, 1), _ResidualBlock(32, 64, 2), _ResidualBlock(64, 128, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, num_classes)


@MODELS.register("simple-cnn")
class SimpleCNN(FeatureModel):
    """The paper's SimpleCNN: three [conv-BN-ReLU-conv-BN-ReLU-maxpool] blocks (32/64/128), GAP, Linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (32, 64, 128):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, num_classes)


def build_model(spec, **dims) -> nn.Module:
    """Instantiate a model plugin (or a user's ``package.module:callable``) from a PluginSpec; `dims` are
    what the data fixes (images: in_channels, num_classes; text: vocab_size, max_length)."""
    factory = MODELS.get(spec.name)
    try:
        model = factory(**dims, **spec.params)
    except TypeError as exc:
        raise UserError(f"model {spec.name!r}: bad params {spec.params} for {dims}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model {spec.name!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
