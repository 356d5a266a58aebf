"""ImageNet ResNets (He et al., 2016) with torchvision's ImageNet weights.

``resnet18_imagenet`` and ``resnet50_imagenet`` follow table 1 of "Deep
Residual Learning for Image Recognition": a 7x7 stride-2 convolution to 64
channels and a 3x3 stride-2 max-pool, four stages of 64/128/256/512 channels
whose first block halves the resolution (except in the first stage), global
average pooling and a linear layer.  ResNet-18 stacks basic blocks (two 3x3
convolutions) 2-2-2-2; ResNet-50 stacks bottleneck blocks (1x1 down to the
stage's width, 3x3, 1x1 up to 4x the width) 3-4-6-3.  Where a block changes
width or resolution its shortcut is a 1x1 convolution with batch norm (the
paper's option B).  A bottleneck block strides in its 3x3 convolution, not in
its first 1x1 as in the paper ("ResNet v1.5"), because torchvision's weights
were trained that way.

Any input of at least 32x32 pixels works (the network downsamples by 32 and
pools globally); the ImageNet weights were trained at 224 pixels with
torchvision's normalisation (``IMAGENET_NORMALIZE``).

Module names: ``features`` holds ``stem`` (``conv``, ``bn``, ``relu``,
``pool``) then ``layer1`` ... ``layer4``; ``stages`` are those five and
``gradcam_layer`` is ``features.layer4`` (7x7 at 224 px).  ``head`` is
``pool`` (global average), ``flatten``, ``fc``.  Blocks name their layers
``conv1``, ``bn1``, ... and ``shortcut.conv`` / ``shortcut.bn``, so
torchvision's state-dict keys map onto them by renaming prefixes
(:func:`convert_torchvision`).

Weights: torchvision's original files (BSD-3-Clause) are downloaded on first
use from download.pytorch.org into ``<data dir>/weights/original/`` and
checked against the SHA-256 prefix their names carry, as torch.hub checks it;
``$IMGCLS_WEIGHTS_MIRROR`` (a base URL) is tried first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgcls.data.download import WEIGHTS_MIRROR_ENV, fetch_file, join_url
from imgcls.models.base import (
    ImageClassifier,
    check_min_size,
    init_conv_bn,
    pooled_linear_head,
)
from imgcls.models.pretrained import (
    IMAGENET,
    IMAGENET_NORMALIZE,
    Weights,
    register_weights,
    weights_dir,
)
from imgcls.models.registry import register_model
from imgcls.models.resnet import BasicBlock

# Smallest image side (pixels) accepted: the network downsamples by 32, so the last stage is then 1x1.
MIN_SIDE = 32
STEM_CHANNELS = 64
BOTTLENECK_EXPANSION = 4  # a bottleneck block's output channels per channel of its 3x3 convolution


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The shortcut of a block: identity, or a 1x1 convolution with batch norm where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        bn=nn.BatchNorm2d(out_channels),
    ))


class Bottleneck(nn.Module):
    """1x1 convolution down to ``out_channels / 4``, 3x3 (strided), 1x1 back up, each with batch norm; a residual.

    (N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        mid = out_channels // BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


# name -> (block, output channels of each stage, blocks per stage)
VARIANTS: dict[str, tuple[type[nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "resnet18_imagenet": (BasicBlock, (64, 128, 256, 512), (2, 2, 2, 2)),
    "resnet50_imagenet": (Bottleneck, (256, 512, 1024, 2048), (3, 4, 6, 3)),
}


class ImageNetResNet(ImageClassifier):
    """A 7x7 stem with max-pool, four stages of residual blocks, global average pooling and a linear layer.

    Args:
        in_chans, num_classes, img_size: see :class:`ImageClassifier`.
        block: ``BasicBlock`` or ``Bottleneck``, built as ``block(in_channels, out_channels, stride)``.
        widths: output channels of each stage.
        depths: blocks per stage; every stage after the first halves the resolution.
    """

    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int], block: type[nn.Module],
                 widths: tuple[int, ...], depths: tuple[int, ...]):
        super().__init__(in_chans, num_classes, img_size)
        stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chans, STEM_CHANNELS, 7, stride=2, padding=3, bias=False),
            bn=nn.BatchNorm2d(STEM_CHANNELS),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        ))
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        channels = STEM_CHANNELS
        for index, (width, depth) in enumerate(zip(widths, depths), start=1):
            stride = 1 if index == 1 else 2
            blocks = [block(channels, width, stride)] + [block(width, width) for _ in range(depth - 1)]
            layers[f"layer{index}"] = nn.Sequential(*blocks)
            channels = width
        self.features = nn.Sequential(layers)
        self.num_features = channels
        self.head = pooled_linear_head(channels, num_classes)
        self.stages = tuple(f"features.{name}" for name in layers)
        self.gradcam_layer = self.stages[-1]
        init_conv_bn(self)


def _build(arch: str, in_chans: int, num_classes: int, img_size: tuple[int, int]) -> ImageNetResNet:
    check_min_size(arch, tuple(img_size), MIN_SIDE)
    block, widths, depths = VARIANTS[arch]
    model = ImageNetResNet(in_chans, num_classes, img_size, block, widths, depths)
    model.arch = arch
    model.arch_kwargs = {}
    return model


@register_model
def resnet18_imagenet(*, in_chans: int, num_classes: int, img_size: tuple[int, int]) -> ImageNetResNet:
    """ResNet-18, ImageNet layout (7x7 stem, max-pool, 11.7M params); ImageNet weights with --pretrained imagenet."""
    return _build("resnet18_imagenet", in_chans, num_classes, img_size)


@register_model
def resnet50_imagenet(*, in_chans: int, num_classes: int, img_size: tuple[int, int]) -> ImageNetResNet:
    """ResNet-50, ImageNet layout (bottleneck blocks, 25.6M params); ImageNet weights with --pretrained imagenet."""
    return _build("resnet50_imagenet", in_chans, num_classes, img_size)


# ----------------------------------------------------------------------------
# torchvision's ImageNet weights

TORCHVISION_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class TorchvisionFile:
    """One of torchvision's original weights files, ``<base_url>/<stem>-<sha256_prefix>.pth``.

    Attributes:
        stem: the file name before the hash (``resnet18``).
        sha256_prefix: the first 8 hex digits of the file's SHA-256, as its name carries them.
        base_url: where the file is published.
    """

    stem: str
    sha256_prefix: str
    base_url: str = TORCHVISION_URL

    @property
    def name(self) -> str:
        return f"{self.stem}-{self.sha256_prefix}.pth"

    @property
    def url(self) -> str:
        return join_url(self.base_url, self.name)

    @property
    def checksum(self) -> str:
        """For :func:`imgcls.data.download.fetch_file`."""
        return f"sha256:{self.sha256_prefix}"


# The original file of each model's ImageNet weights.  ``fetch`` looks its entry
# up when it is called, so a test can point it at a file of its own.
ORIGINALS: dict[str, TorchvisionFile] = {
    "resnet18_imagenet": TorchvisionFile("resnet18", "f37072fd"),
    "resnet50_imagenet": TorchvisionFile("resnet50", "0676ba61"),
}


def download_original(model: str) -> Path:
    """The path of ``model``'s original weights file in ``<data dir>/weights/original/``, downloaded if needed.

    Raises:
        DownloadError: neither ``$IMGCLS_WEIGHTS_MIRROR`` nor the official URL
            gave a file with the right checksum; the message says where to put
            the file by hand.
    """
    original = ORIGINALS[model]
    dest = weights_dir() / "original" / original.name
    return fetch_file(original.name, [original.url], dest, original.checksum, mirror_env=WEIGHTS_MIRROR_ENV)


def _fetcher(model: str) -> Callable[[], Path]:
    def fetch() -> Path:
        return download_original(model)

    return fetch


# torchvision's top-level names -> imgcls's; blocks keep their names but for the shortcut.
_TOP_LEVEL = (("conv1.", "features.stem.conv."), ("bn1.", "features.stem.bn."), ("layer", "features.layer"),
              ("fc.", "head.fc."))
_SHORTCUT = ((".downsample.0.", ".shortcut.conv."), (".downsample.1.", ".shortcut.bn."))


def convert_torchvision(state: dict, model: torch.nn.Module) -> dict:
    """torchvision's ResNet names -> imgcls's.

    ``conv1.weight`` -> ``features.stem.conv.weight``,
    ``layer2.0.downsample.1.running_mean`` -> ``features.layer2.0.shortcut.bn.running_mean``,
    ``fc.bias`` -> ``head.fc.bias``; other names are kept (the load report calls them unexpected).
    """
    out = {}
    for key, value in state.items():
        name = key
        for old, new in _TOP_LEVEL:
            if key.startswith(old):
                name = new + key[len(old):]
                break
        for old, new in _SHORTCUT:
            name = name.replace(old, new)
        out[name] = value
    return out


for _arch in VARIANTS:
    register_weights(Weights(
        model=_arch, tag=IMAGENET, fetch=_fetcher(_arch), convert=convert_torchvision,
        normalize=IMAGENET_NORMALIZE, resolution=224,
        source=f"ImageNet-1k, torchvision's {ORIGINALS[_arch].url}", license="BSD-3-Clause",
        install=f"download {ORIGINALS[_arch].url} into <data dir>/weights/original/ "
                f"(SHA-256 starting {ORIGINALS[_arch].sha256_prefix}), or set ${WEIGHTS_MIRROR_ENV} to a base URL "
                f"that serves it",
    ))
