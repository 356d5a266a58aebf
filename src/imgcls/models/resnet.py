"""CIFAR-style residual networks (He et al., 2016).

``resnet8/20/32/56`` follow section 4.2 of "Deep Residual Learning for Image
Recognition": a 3x3 stem with 16 channels, three stages of 16/32/64 channels
with n basic blocks each (depth 6n + 2), global average pooling and a linear
layer.  Where a block changes width or resolution its shortcut is a 1x1
convolution with batch norm (a projection) rather than the paper's zero
padding.  ``resnet18`` is the common CIFAR variant of the ImageNet ResNet-18:
four stages of 64/128/256/512 channels with two blocks each, a 3x3 stem and
no stem max-pool.

Module names: ``features`` holds ``stem`` then ``layer1`` ... ``layerK``;
``stages`` are ``("features.stem", "features.layer1", ...)`` and
``gradcam_layer`` is the last layer (its blocks end in ReLU).  ``head`` is
``pool`` (global average), ``flatten``, ``fc``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from imgcls.errors import ConfigError
from imgcls.models.base import (
    ImageClassifier,
    check_min_size,
    init_conv_bn,
    pooled_linear_head,
)
from imgcls.models.registry import register_model

# Smallest image side (pixels) accepted; at 8 the last stage of resnet18 is 1x1.
MIN_SIDE = 8


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection.

    (N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(out_channels),
            ))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(ImageClassifier):
    """A stack of stages of basic blocks, global average pooling and a linear layer.

    Args:
        in_chans, num_classes, img_size: see :class:`ImageClassifier`.
        widths: channels of each stage; the stem has ``widths[0]``.
        depths: basic blocks per stage; every stage after the first halves
            the resolution.
    """

    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int],
                 widths: tuple[int, ...], depths: tuple[int, ...]):
        super().__init__(in_chans, num_classes, img_size)
        stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(widths[0]),
            relu=nn.ReLU(),
        ))
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        channels = widths[0]
        for index, (width, depth) in enumerate(zip(widths, depths), start=1):
            stride = 1 if index == 1 else 2
            blocks = [BasicBlock(channels, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
            layers[f"layer{index}"] = nn.Sequential(*blocks)
            channels = width
        self.features = nn.Sequential(layers)
        self.head = pooled_linear_head(channels, num_classes)
        self.stages = tuple(f"features.{name}" for name in layers)
        self.gradcam_layer = self.stages[-1]
        init_conv_bn(self)


def _build(arch: str, widths: tuple[int, ...], depths: tuple[int, ...], in_chans: int,
           num_classes: int, img_size: tuple[int, int], width: float) -> ResNet:
    if not width > 0:
        raise ConfigError(f"width must be a positive multiplier, got {width!r}")
    check_min_size(arch, tuple(img_size), MIN_SIDE)
    scaled = tuple(max(1, round(w * width)) for w in widths)
    model = ResNet(in_chans, num_classes, img_size, scaled, depths)
    model.arch = arch
    model.arch_kwargs = {"width": width}
    return model


_CIFAR_WIDTHS = (16, 32, 64)


@register_model
def resnet8(*, in_chans: int, num_classes: int, img_size: tuple[int, int], width: float = 1.0) -> ResNet:
    """CIFAR ResNet-8 (He et al. 2016, 3 stages of 1 block, 16/32/64 channels)."""
    return _build("resnet8", _CIFAR_WIDTHS, (1, 1, 1), in_chans, num_classes, img_size, width)


@register_model
def resnet20(*, in_chans: int, num_classes: int, img_size: tuple[int, int], width: float = 1.0) -> ResNet:
    """CIFAR ResNet-20 (He et al. 2016, 3 stages of 3 blocks, 0.27M params)."""
    return _build("resnet20", _CIFAR_WIDTHS, (3, 3, 3), in_chans, num_classes, img_size, width)


@register_model
def resnet32(*, in_chans: int, num_classes: int, img_size: tuple[int, int], width: float = 1.0) -> ResNet:
    """CIFAR ResNet-32 (He et al. 2016, 3 stages of 5 blocks, 0.47M params)."""
    return _build("resnet32", _CIFAR_WIDTHS, (5, 5, 5), in_chans, num_classes, img_size, width)


@register_model
def resnet56(*, in_chans: int, num_classes: int, img_size: tuple[int, int], width: float = 1.0) -> ResNet:
    """CIFAR ResNet-56 (He et al. 2016, 3 stages of 9 blocks, 0.86M params)."""
    return _build("resnet56", _CIFAR_WIDTHS, (9, 9, 9), in_chans, num_classes, img_size, width)


@register_model
def resnet18(*, in_chans: int, num_classes: int, img_size: tuple[int, int], width: float = 1.0) -> ResNet:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool, 64-512 channels, 11.2M params)."""
    return _build("resnet18", (64, 128, 256, 512), (2, 2, 2, 2), in_chans, num_classes, img_size, width)
