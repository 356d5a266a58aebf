"""EfficientNet-Lite (Tan and Le, 2019; the "Lite" variants of the TensorFlow TPU repository).

EfficientNet-Lite is EfficientNet-B0..B4 made for mobile CPUs: no
squeeze-and-excitation, ReLU6 instead of swish, and a stem and head that do
not grow with the width multiplier.  Each network is a 3x3 stride-2 stem,
seven stages of inverted-residual blocks (MBConv: a 1x1 expansion, a
depthwise kxk convolution, a 1x1 projection, a residual connection where the
shape allows), a 1x1 head convolution to 1280 channels, global average
pooling, dropout and a linear classifier.

Any input size works (the network pools globally); ImageNet weights were
trained at 224 (lite0), 240 (lite1) and 260 (lite2) pixels.  The pretrained
weights (:mod:`imgcls.models.pretrained`) expect inputs normalised with mean
0.5 and std 0.5 per channel, as the TensorFlow originals were trained.

Module names: ``features`` holds ``stem``, ``stage1`` ... ``stage7`` and
``head_conv``; ``stages`` are those nine, ``gradcam_layer`` is
``features.head_conv`` (7x7 at 224 px).  ``head`` is ``pool``, ``flatten``,
``dropout``, ``fc``.

Option ``freeze_bn`` keeps every BatchNorm layer in eval mode while the
model trains: the running statistics stay the pretrained ones and each
layer normalises with them (its scale and shift still train, at the
backbone's learning rate).  That is what fine-tuning a pretrained network on
a few hundred images wants: batch statistics of small batches of one
person's photos are noisy estimates of the ImageNet ones the weights were
trained with.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.errors import ConfigError
from imgcls.models.base import ImageClassifier, init_conv_bn, pooled_linear_head
from imgcls.models.registry import register_model

# (repeats, kernel, stride, expansion, output channels) per stage, at width and depth 1 (EfficientNet-B0).
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3  # as the TensorFlow originals (PyTorch's default is 1e-5): the weights depend on it
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay

# name -> (width multiplier, depth multiplier, ImageNet resolution in pixels, dropout before the classifier)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width`` and rounded to a multiple of ``divisor``, never below 90% of the scaled value."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class ConvBN(nn.Sequential):
    """Convolution, BatchNorm and (optionally) ReLU6, with the BatchNorm folded into the convolution when frozen.

    When the BatchNorm layer is in eval mode (prediction, or fine-tuning with
    ``freeze_bn``) the forward pass folds it into the convolution's weights and
    bias on the fly: one convolution instead of three
    passes over the activations.  Eager fp32 inference of EfficientNet-Lite0
    spent 1.3 s of 2 s in BatchNorm and ReLU6 before (one-off, 2-core CPU).
    The folded weights are computed from the parameters each call, so
    gradients reach them as before (Grad-CAM, fine-tuning).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        layers = OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM),
        )
        if act:
            layers["act"] = nn.ReLU6()
        super().__init__(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if bn.training:
            out = bn(conv(x))
        else:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight = conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
            bias = bn.bias - bn.running_mean * scale
            out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        # relu6 rather than clamp(0, 6) or nn.ReLU6 (hardtanh): the same values, and its backward is one fused
        # kernel where clamp's is four (ge, le, and, where). Lite0 at 128 px trains at 58 against 47 images/s
        # (fp32, batch 32, AVX2; benchmarks/README.md).
        return F.relu6(out) if len(self) == 3 else out


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation.

    (N, in_ch, H, W) -> (N, out_ch, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = in_ch * expansion
        self.expand = ConvBN(in_ch, mid, 1) if expansion != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, out_ch, 1, act=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite(ImageClassifier):
    """EfficientNet-Lite at a width and depth multiplier.

    Args:
        in_chans, num_classes, img_size: see :class:`ImageClassifier`.
        width, depth: multipliers of the channels and of the blocks per stage.
        dropout: dropout before the classifier.
        freeze_bn: keep BatchNorm layers in eval mode during training.
        head_stages: how many of the last ``stages`` the classifier reads: 1 (the original) reads the head
            convolution's pooled output; ``k`` reads the pooled outputs of the last ``k`` stages concatenated
            (7: stage 2 to the head convolution, 2,048 features for Lite0).
    """

    gradcam_layer = "features.head_conv"
    stages = tuple(f"features.stage{i}" for i in range(1, 8)) + ("features.head_conv",)

    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int], width: float = 1.0,
                 depth: float = 1.0, dropout: float = 0.2, freeze_bn: bool = False, head_stages: int = 1):
        super().__init__(in_chans, num_classes, img_size)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(head_stages, bool) or not isinstance(head_stages, int) or \
                not 1 <= head_stages <= len(self.stages):
            raise ConfigError(f"head_stages must be a whole number from 1 (the head convolution alone) to "
                              f"{len(self.stages)} (every stage), got {head_stages!r}")
        self.head_stages = head_stages
        self.freeze_bn = bool(freeze_bn)
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=ConvBN(in_chans, STEM_CHANNELS, 3, 2))
        channels = STEM_CHANNELS
        last = len(_STAGES) - 1
        for i, (repeats, kernel, stride, expansion, out) in enumerate(_STAGES):
            out = round_channels(out, width)
            # Lite keeps the first and last stages at one block whatever the depth multiplier.
            n = repeats if i in (0, last) else int(math.ceil(repeats * depth))
            blocks = []
            for j in range(n):
                blocks.append(MBConv(channels, out, kernel, stride if j == 0 else 1, expansion))
                channels = out
            layers[f"stage{i + 1}"] = nn.Sequential(*blocks)
        layers["head_conv"] = ConvBN(channels, HEAD_CHANNELS, 1)
        self.features = nn.Sequential(layers)
        widths = [stage[-1].project.conv.out_channels for name, stage in layers.items() if name.startswith("stage")]
        self.stage_widths = tuple(widths) + (HEAD_CHANNELS,)  # channels of each of ``stages``
        self.num_features = sum(self.stage_widths[-head_stages:])
        self.head = pooled_linear_head(self.num_features, num_classes, dropout)
        # As the TensorFlow originals: fan-out normal convolutions, uniform 1/sqrt(classes) for the classifier.
        init_conv_bn(self)
        bound = 1.0 / math.sqrt(self.num_classes)
        nn.init.uniform_(self.head.fc.weight, -bound, bound)
        nn.init.zeros_(self.head.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> the head convolution's (N, 1280, h, w) map; with ``head_stages`` k > 1, the
        pooled outputs of the last k stages concatenated, as an (N, num_features, 1, 1) map."""
        if self.head_stages == 1:
            return self.features(x)
        first = len(self.features) - self.head_stages
        pooled = []
        for i, module in enumerate(self.features):
            x = module(x)
            if i >= first:
                pooled.append(x.mean((2, 3), keepdim=True))
        return torch.cat(pooled, 1)

    def train(self, mode: bool = True) -> EfficientNetLite:
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


def _builder(name: str):
    width, depth, resolution, dropout = VARIANTS[name]

    def build(in_chans: int, num_classes: int, img_size: tuple[int, int], dropout: float = dropout,
              freeze_bn: bool = False, head_stages: int = 1) -> EfficientNetLite:
        model = EfficientNetLite(in_chans, num_classes, img_size, width=width, depth=depth, dropout=dropout,
                                 freeze_bn=freeze_bn, head_stages=head_stages)
        model.arch, model.arch_kwargs = name, {"dropout": dropout, "freeze_bn": bool(freeze_bn)}
        if head_stages != 1:  # only when set, so that older checkpoints' arch_kwargs read the same
            model.arch_kwargs["head_stages"] = head_stages
        return model

    build.__name__ = name
    build.__doc__ = (f"EfficientNet-Lite{name[-1]}: width {width}, depth {depth}, ImageNet at {resolution} px; "
                     f"ImageNet weights with --pretrained imagenet")
    return build


efficientnet_lite0 = register_model(_builder("efficientnet_lite0"))
efficientnet_lite1 = register_model(_builder("efficientnet_lite1"))
efficientnet_lite2 = register_model(_builder("efficientnet_lite2"))
