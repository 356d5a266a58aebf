"""The seed CNNs: the Keras models of the seed documents, layer for layer.

Each model reproduces a Keras ``Sequential`` model from ``shared/seeds`` with
the same layers, output shapes and parameter counts (for the seed's own input
shape).  The translation rules:

* ``Conv2D(..., activation='relu')`` is ``Conv2d`` followed by ``ReLU``;
  Keras' default padding is 'valid' (no padding);
* ``padding='same'`` is :class:`Conv2dSame`, which pads like TensorFlow (more
  on the bottom/right when the total is odd), so strided layers give the same
  output shapes as Keras;
* the final softmax is left out: models return logits, and the loss or
  ``predict`` applies the softmax;
* weights start as in Keras (Glorot-uniform kernels, zero biases), so the
  seeds train as their reports describe;
* ``kernel_constraint=maxnorm(3)`` becomes the ``max_norm`` option: the
  trainer calls :meth:`SeedCNN.apply_constraints` after each optimiser step.

Module names follow one scheme in every seed model:

* ``features``: ``conv{i}``, ``conv{i}_relu``, ``pool{j}``, ``drop{k}`` (the
  convolution stack up to the last feature map, before Flatten);
* ``head``: ``flatten``, ``dense{j}``, ``dense{j}_relu``, ``dense{j}_drop``,
  ``output`` (the final ``Linear``, producing logits);
* ``stages`` are the activated outputs of the convolutions,
  ``("features.conv1_relu", "features.conv2_relu", ...)`` (what a Keras
  ``Conv2D(activation='relu')`` layer outputs); ``gradcam_layer`` is the last
  of them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.errors import ConfigError
from imgcls.models.base import ImageClassifier, check_min_size
from imgcls.models.registry import register_model

# Largest image side searched when computing a model's minimum input side (pixels).
_MAX_SIDE_SEARCHED = 4096


class Conv2dSame(nn.Conv2d):
    """``Conv2d`` with TensorFlow/Keras ``padding='same'``.

    The output side is ``ceil(input / stride)``.  TensorFlow pads
    ``total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - input, 0)``
    pixels, ``total // 2`` before and the rest after, so an odd total puts
    the extra pixel at the bottom/right (PyTorch's symmetric ``padding``
    cannot).  When the padding is the same for every input size (stride 1
    and an even total) it is applied statically, as in a plain ``Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, bias: bool = True):
        span = (kernel_size - 1) * dilation
        dynamic = stride != 1 or span % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=0 if dynamic else span // 2, dilation=dilation, bias=bias)
        self._dynamic = dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""
        if self._dynamic:
            pad_h = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
            pad_w = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
            if pad_h or pad_w:
                x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total TensorFlow 'same' padding (pixels) along one side of length ``size``."""
    out = math.ceil(size / stride)
    return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


# ---------------------------------------------------------------------------
# Layer recipes: the convolution stack of each seed, in Keras order.


@dataclass(frozen=True)
class _Conv:
    """Conv2D(channels, kernel, strides=stride, padding='same' if same else 'valid') + ReLU."""

    channels: int
    kernel: int
    stride: int = 1
    same: bool = False

    def side(self, size: int) -> int:
        if self.same:
            return math.ceil(size / self.stride)
        return (size - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class _Pool:
    """MaxPooling2D(size): stride = size, 'valid' (floor)."""

    size: int

    def side(self, size: int) -> int:
        return size // self.size


@dataclass(frozen=True)
class _Drop:
    """Dropout in the convolution stack, at the model's ``dropout_conv`` rate."""

    def side(self, size: int) -> int:
        return size


def _final_side(size: int, recipe) -> int:
    """Side of the last feature map for an input side ``size``; 0 if a layer empties it."""
    for layer in recipe:
        size = layer.side(size)
        if size < 1:
            return 0
    return size


def _min_side(recipe) -> int:
    """The smallest input side (pixels) the recipe maps to a non-empty feature map."""
    for size in range(1, _MAX_SIDE_SEARCHED + 1):
        if _final_side(size, recipe) >= 1:
            return size
    raise AssertionError("recipe cannot take any input up to the searched side")


_TF_TUTORIAL = (_Conv(32, 3), _Pool(2), _Conv(64, 3), _Pool(2), _Conv(64, 3))
_NAMED_DROPOUT = (_Conv(32, 3), _Pool(2), _Conv(64, 3), _Pool(2), _Conv(128, 3))
# Seed 003, model 1: 32x32 -> 16 ('same', stride 2) -> 6 (valid, stride 2) -> 3 (pool 2).
_CIFAR_MODEL1 = (_Conv(32, 5, 2, same=True), _Conv(32, 5, 2), _Pool(2), _Drop())
# Seed 003, model 2: the Keras cifar10_cnn example.
_CIFAR_MODEL2 = (_Conv(32, 3, same=True), _Conv(32, 3), _Pool(2), _Drop(),
                 _Conv(64, 3, same=True), _Conv(64, 3), _Pool(2), _Drop())
# Seed 003, model 3: the classic max-norm tutorial model.
_CIFAR_MODEL3 = (_Conv(32, 3, same=True), _Drop(), _Conv(32, 3, same=True), _Pool(2))
_MNIST_ONECONV = (_Conv(32, 3), _Pool(2))


class SeedCNN(ImageClassifier):
    """A Keras-style plain CNN: a conv/pool stack, Flatten, dense layers, logits.

    Args:
        name: registry name (used in error messages).
        recipe: the convolution stack, a sequence of ``_Conv``/``_Pool``/``_Drop``.
        hidden: widths of the hidden dense layers (each followed by ReLU and,
            if ``dropout`` > 0, Dropout).
        in_chans, num_classes, img_size: see :class:`ImageClassifier`.
        dropout: rate of the Dropout after each hidden dense layer.
        dropout_conv: rate of the ``_Drop`` layers in the convolution stack.
        max_norm: if set, the largest L2 norm of each output unit's incoming
            weights in the convolutions and hidden dense layers, enforced by
            :meth:`apply_constraints`.

    Raises:
        ConfigError: an image too small for the stack, or a rate out of range.
    """

    def __init__(self, name: str, recipe, hidden: tuple[int, ...], in_chans: int, num_classes: int,
                 img_size: tuple[int, int], dropout: float = 0.0, dropout_conv: float = 0.0,
                 max_norm: float | None = None):
        super().__init__(in_chans, num_classes, img_size)
        check_min_size(name, self.img_size, _min_side(recipe))
        _check_rate("dropout", dropout)
        _check_rate("dropout_conv", dropout_conv)
        if max_norm is not None and not max_norm > 0:
            raise ConfigError(f"max_norm must be a positive number or None, got {max_norm!r}")
        self.max_norm = max_norm

        layers, channels, stages = _conv_stack(recipe, in_chans, dropout_conv)
        self.features = nn.Sequential(layers)
        flat = channels * _final_side(self.img_size[0], recipe) * _final_side(self.img_size[1], recipe)
        self.head = nn.Sequential(_dense_head(flat, hidden, num_classes, dropout))
        self.stages = tuple(f"features.{stage}" for stage in stages)
        self.gradcam_layer = self.stages[-1]
        _init_like_keras(self)
        self.apply_constraints()

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Enforce ``max_norm`` on the kernel weights (call after each optimiser step).

        Each output unit's incoming weight vector (a whole filter for a
        convolution, a row of the weight for a dense layer) is scaled down to
        L2 norm ``max_norm`` if it is longer; the output layer is left free, as
        in the seed.  Keras' ``MaxNorm`` default axis applies to Dense kernels
        exactly this way; for Conv2D kernels Keras recommends, and this takes,
        the norm over the whole filter.  A no-op when ``max_norm`` is None.
        """
        if self.max_norm is None:
            return
        for module in self.modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)) or module is self.head.output:
                continue
            module.weight.copy_(torch.renorm(module.weight, p=2, dim=0, maxnorm=self.max_norm))


def _check_rate(option: str, rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"{option} must be in [0, 1), got {rate!r}")


def _conv_stack(recipe, in_chans: int, dropout_conv: float):
    """Named layers of the convolution stack, its output channels and its stage names."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    stages: list[str] = []
    channels = in_chans
    counts = {"conv": 0, "pool": 0, "drop": 0}
    for layer in recipe:
        if isinstance(layer, _Conv):
            counts["conv"] += 1
            name = f"conv{counts['conv']}"
            conv_cls = Conv2dSame if layer.same else nn.Conv2d
            layers[name] = conv_cls(channels, layer.channels, layer.kernel, stride=layer.stride)
            layers[f"{name}_relu"] = nn.ReLU()
            stages.append(f"{name}_relu")
            channels = layer.channels
        elif isinstance(layer, _Pool):
            counts["pool"] += 1
            layers[f"pool{counts['pool']}"] = nn.MaxPool2d(layer.size)
        elif dropout_conv > 0:
            counts["drop"] += 1
            layers[f"drop{counts['drop']}"] = nn.Dropout(dropout_conv)
    return layers, channels, stages


def _dense_head(flat: int, hidden: tuple[int, ...], num_classes: int, dropout: float):
    """Named layers of Flatten -> [Dense + ReLU (+ Dropout)]* -> output."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = flat
    for index, units in enumerate(hidden, start=1):
        layers[f"dense{index}"] = nn.Linear(width, units)
        layers[f"dense{index}_relu"] = nn.ReLU()
        if dropout > 0:
            layers[f"dense{index}_drop"] = nn.Dropout(dropout)
        width = units
    layers["output"] = nn.Linear(width, num_classes)
    return layers


def _init_like_keras(model: nn.Module) -> None:
    """Keras' default initialisation: Glorot-uniform kernels, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _build(arch: str, recipe, hidden: tuple[int, ...], in_chans: int, num_classes: int,
           img_size: tuple[int, int], **options) -> SeedCNN:
    model = SeedCNN(arch, recipe, hidden, in_chans, num_classes, img_size, **options)
    model.arch = arch
    model.arch_kwargs = dict(options)
    return model


# ---------------------------------------------------------------------------
# The registered seeds.  Parameter counts are for 3x32x32 (1x28x28 for MNIST)
# and 10 classes, as in the seeds' Keras summaries.


@register_model
def seed_tf_tutorial(*, in_chans: int, num_classes: int, img_size: tuple[int, int],
                     dropout: float = 0.0) -> SeedCNN:
    """Seed 000, the TensorFlow CNN tutorial: conv32-pool-conv64-pool-conv64-dense64 (122,570 params)."""
    return _build("seed_tf_tutorial", _TF_TUTORIAL, (64,), in_chans, num_classes, img_size,
                  dropout=dropout)


@register_model
def seed_named_dropout(*, in_chans: int, num_classes: int, img_size: tuple[int, int],
                       dropout: float = 0.5) -> SeedCNN:
    """Seed 001: conv1 32, conv2 64, conv3 128, dense1 128, dropout 0.5 (356,810 params)."""
    return _build("seed_named_dropout", _NAMED_DROPOUT, (128,), in_chans, num_classes, img_size,
                  dropout=dropout)


@register_model
def seed_cifar_model1(*, in_chans: int, num_classes: int, img_size: tuple[int, int],
                      dropout_conv: float = 0.25, dropout: float = 0.5) -> SeedCNN:
    """Seed 003 model 1: two 5x5 stride-2 convs, maxpool, dense512 (181,162 params)."""
    return _build("seed_cifar_model1", _CIFAR_MODEL1, (512,), in_chans, num_classes, img_size,
                  dropout_conv=dropout_conv, dropout=dropout)


@register_model
def seed_cifar_model2(*, in_chans: int, num_classes: int, img_size: tuple[int, int],
                      dropout_conv: float = 0.25, dropout: float = 0.5) -> SeedCNN:
    """Seed 003 model 2, the Keras cifar10_cnn example: 4 convs, dense512 (1,250,858 params)."""
    return _build("seed_cifar_model2", _CIFAR_MODEL2, (512,), in_chans, num_classes, img_size,
                  dropout_conv=dropout_conv, dropout=dropout)


@register_model
def seed_cifar_model3(*, in_chans: int, num_classes: int, img_size: tuple[int, int],
                      dropout_conv: float = 0.2, dropout: float = 0.5,
                      max_norm: float | None = 3.0) -> SeedCNN:
    """Seed 003 model 3: two 'same' convs with max-norm 3, dense512 (4,210,090 params)."""
    return _build("seed_cifar_model3", _CIFAR_MODEL3, (512,), in_chans, num_classes, img_size,
                  dropout_conv=dropout_conv, dropout=dropout, max_norm=max_norm)


@register_model
def seed_mnist_oneconv(*, in_chans: int, num_classes: int, img_size: tuple[int, int],
                       dropout: float = 0.0) -> SeedCNN:
    """Seeds 002/004, the MNIST lab model: conv32-pool-dense100 on 1x28x28 (542,230 params)."""
    return _build("seed_mnist_oneconv", _MNIST_ONECONV, (100,), in_chans, num_classes, img_size,
                  dropout=dropout)
