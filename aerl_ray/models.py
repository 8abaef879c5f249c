"""Model registry.  Every constructor takes ``(in_channels, image_size, num_classes)``;
:func:`build_model` wraps the network behind a :class:`Normalize` layer, so every model
takes images in [0, 1] and returns logits.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from aerl_ray.registry import Registry

ModelCtor = Callable[[int, int, int], nn.Module]
MODELS: Registry[ModelCtor] = Registry("model")


class Normalize(nn.Module):
    """Per-channel (x - mean) / std as a layer, so attacks work in [0, 1] pixel space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))``; ``x`` in [0, 1], NCHW; returns logits."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _pooled(image_size: int, pools: int) -> int:
    s = image_size
    for _ in range(pools):
        s //= 2
    if s < 1:
        raise ValueError(f"image_size={image_size} is too small for {pools} 2x2 poolings")
    return s


def _conv_bn(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding="same"), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@MODELS.register("cnn6")
def cnn6(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The paper's "6-layer CNN" (``CNNModel``): 4x4 'same' convs with BN+ReLU,
    3->264->128, pool, 128->512->128, pool, 128->128->128, pool; dropout 0.2/0.25/0.35;
    FC ->256 (BN1d, ReLU, dropout 0.5) -> classes.  ~1.14 GMAC per 32x32 image."""
    s = _pooled(image_size, 3)
    return nn.Sequential(
        *_conv_bn(in_channels, 264, 4), *_conv_bn(264, 128, 4), nn.MaxPool2d(2), nn.Dropout(0.2),
        *_conv_bn(128, 512, 4), *_conv_bn(512, 128, 4), nn.MaxPool2d(2), nn.Dropout(0.25),
        *_conv_bn(128, 128, 4), *_conv_bn(128, 128, 4), nn.MaxPool2d(2), nn.Dropout(0.35),
        nn.Flatten(), nn.Linear(128 * s * s, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(256, num_classes),
    )


@MODELS.register("cnn4")
def cnn4(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The paper's "4-layer CNN" (``AliCNN``): 3x3 convs 32, 64, pool, 128, pool, 128,
    pool, dropout 0.25, FC ->1024, dropout 0.5 -> classes.  No BatchNorm."""
    s = _pooled(image_size, 3)
    relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), relu(), nn.Conv2d(32, 64, 3, padding=1), relu(),
        nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), relu(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), relu(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(128 * s * s, 1024), relu(), nn.Dropout(0.5),
        nn.Linear(1024, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


@MODELS.register("resnet18")
def resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool, no 224 upsampling),
    so L2 budgets stay comparable with the 32x32 CNNs."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


@MODELS.register("tiny")
def tiny(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A two-layer model for fast tests (conv 16 -> pool -> linear)."""
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 16, num_classes))


def apply_spectral_norm(net: nn.Module) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018, ICLR) on every conv/linear layer."""
    for name, child in list(net.named_children()):
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            setattr(net, name, nn.utils.parametrizations.spectral_norm(child))
        else:
            apply_spectral_norm(child)
    return net


def build_model(name: str, info, spectral_norm: bool = False) -> Classifier:
    """Build a registered model for a :class:`~aerl_ray.data.DatasetInfo`."""
    net = MODELS.get(name)(info.in_channels, info.image_size, info.num_classes)
    if spectral_norm:
        net = apply_spectral_norm(net)
    return Classifier(net, info.mean, info.std)
