"""A small network that trains fast on 32x32 images, after Keller Jordan's airbench.

Layout (for a 3x32x32 input and the default widths)::

    stem     2x2 conv, no padding, 2 * in_chans * 4 channels, GELU   -> 24 x 31 x 31
    block1   conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU   ->  64 x 15 x 15
    block2   (same)                                                       -> 256 x  7 x  7
    block3   (same)                                                       -> 256 x  3 x  3
    head     global max-pool -> linear (no bias) -> logits * scale

The stem is as wide as the number of values in a 2x2 patch, twice, so that
:func:`whiten_init` can set it to whiten the patches (each eigen-direction
with both signs).  The head pools whatever map is left to 1x1.  The logits
are scaled down (1/9 as in airbench) so that the bias-free linear layer starts
with small outputs.

Options that make ``fastnet`` the airbench94 network (``fastnet_small`` keeps
the plain variant, which takes inputs down to 8x8):

* ``pool="floor"``: max-pools round down, as airbench (31 -> 15 -> 7 -> 3);
  ``"ceil"`` rounds up (8 -> 7 -> 4 -> 2 -> 1) at about 25% more compute.
* ``whiten=True``: :meth:`FastNet.init_from_data` sets the stem to whiten
  the training images' 2x2 patches and freezes its weights; the stem's bias
  trains for the first ``whiten_bias_epochs`` epochs (3, as airbench) and is
  then frozen too, so that no gradient has to flow back into the stem and
  block 1's first convolution skips its input gradient (on the 2-core CPU
  that is about 8% of a training step).
* ``dirac=True``: each 3x3 conv starts with its first ``in_channels`` filters
  as the identity, so every block starts close to passing its input through.
* ``bn_scale=False``: BatchNorm scales stay at 1 (only the shifts learn).

Module names: ``features`` holds ``stem`` (``conv``, ``act``) and
``block1`` ... ``block3`` (``conv1``, ``pool``, ``bn1``, ``act1``, ``conv2``,
``bn2``, ``act2``); ``stages`` are ``("features.stem", "features.block1",
"features.block2", "features.block3")`` and ``gradcam_layer`` is
``"features.block3"``.  ``head`` is ``pool``, ``flatten``, ``fc``, ``scale``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.errors import ConfigError
from imgcls.models.base import ImageClassifier, check_min_size
from imgcls.models.registry import register_model

STEM_KERNEL = 2  # pixels; the stem sees 2x2 patches
# PyTorch convention (weight of the new batch): high, so that the running
# statistics follow the weights closely in runs of a few epochs.
BN_MOMENTUM = 0.4
# Smallest image side (pixels): the 2x2 stem without padding needs 2.
MIN_SIDE = STEM_KERNEL
# Images unfolded at once by whiten_init.
_WHITEN_CHUNK = 256


class Scale(nn.Module):
    """Multiply the input by a constant ``factor`` (no parameters)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def _conv_block(in_channels: int, out_channels: int, ceil: bool, dirac: bool, bn_scale: bool) -> nn.Sequential:
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU; halves H and W."""
    block = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        pool=nn.MaxPool2d(2, ceil_mode=ceil),
        bn1=nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
        act1=nn.GELU(),
        conv2=nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        bn2=nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
        act2=nn.GELU(),
    ))
    if dirac:
        for conv in (block.conv1, block.conv2):
            w = conv.weight.data
            nn.init.dirac_(w[:min(w.shape[0], w.shape[1])])
    if not bn_scale:
        for bn in (block.bn1, block.bn2):
            bn.weight.requires_grad_(False)
    return block


class FastNet(ImageClassifier):
    """airbench-style network: whitening stem, three conv blocks, max-pool, scaled linear.

    Args:
        in_chans, num_classes, img_size: see :class:`ImageClassifier`.
        widths: output channels of the three blocks.
        scale: factor applied to the logits.
        pool, whiten, dirac, bn_scale: see the module docstring.
    """

    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int],
                 widths: tuple[int, int, int], scale: float, pool: str = "ceil", whiten: bool = False,
                 dirac: bool = False, bn_scale: bool = True, whiten_bias_epochs: float | None = None):
        super().__init__(in_chans, num_classes, img_size)
        self.whiten = whiten
        self.whiten_bias_epochs = whiten_bias_epochs
        stem_width = 2 * in_chans * STEM_KERNEL**2
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chans, stem_width, STEM_KERNEL, padding=0, bias=True),
            act=nn.GELU(),
        )))
        channels = stem_width
        for index, width in enumerate(widths, start=1):
            layers[f"block{index}"] = _conv_block(channels, width, pool == "ceil", dirac, bn_scale)
            channels = width
        self.features = nn.Sequential(layers)
        self.head = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveMaxPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(channels, num_classes, bias=False),
            scale=Scale(scale),
        ))
        self.stages = tuple(f"features.{name}" for name in layers)
        self.gradcam_layer = self.stages[-1]

    def init_from_data(self, images: torch.Tensor) -> None:
        """With ``whiten``: whiten the stem on ``images`` (normalised, N x C x H x W) and freeze its weights."""
        if self.whiten:
            whiten_init(self, images)
            self.features.stem.conv.weight.requires_grad_(False)

    def start_epoch(self, epoch: int) -> None:
        """With ``whiten``: the stem's bias trains before epoch ``whiten_bias_epochs`` and is frozen from it on."""
        if self.whiten and self.whiten_bias_epochs is not None:
            self.features.stem.conv.bias.requires_grad_(epoch < self.whiten_bias_epochs)


@torch.no_grad()
def whiten_init(model: FastNet, images: torch.Tensor, eps: float = 5e-4) -> FastNet:
    """Set the stem convolution to whiten the 2x2 patches of ``images``.

    The patch second-moment matrix (D x D, D = in_chans * 4) is diagonalised;
    the stem's 2D filters become its eigenvectors divided by the square root
    of their eigenvalues (plus ``eps``), once with each sign, so the stem's
    outputs have unit variance along every direction of patch space.

    Args:
        model: a :class:`FastNet` (its stem must still have 2 * D filters).
        images: (N, in_chans, H, W) float training images, normalised as the
            model will see them; a few thousand are plenty.
        eps: added to the eigenvalues, in squared input units.

    Returns:
        The model, changed in place.
    """
    if not isinstance(model, FastNet):
        raise ConfigError(f"whiten_init needs a fastnet model, got {type(model).__name__}")
    conv = model.features.stem.conv
    if images.ndim != 4 or images.shape[1] != model.in_chans or len(images) == 0:
        raise ConfigError(f"whiten_init needs images of shape (N, {model.in_chans}, H, W) with N >= 1, "
                          f"got {tuple(images.shape)}")
    k = STEM_KERNEL
    d = model.in_chans * k * k
    # Summed per image in float32 (h*w terms), across images in float64: 2.7x faster than one float64 product.
    # The patches are unfolded a few hundred images at a time: all 5,000 at once would be a 230 MB buffer.
    per_image = torch.empty(len(images), d, d, dtype=torch.float64)
    for start in range(0, len(images), _WHITEN_CHUNK):
        patches = F.unfold(images[start:start + _WHITEN_CHUNK].float().contiguous(), k)  # (n, d, h*w), (C, k, k)
        per_image[start:start + _WHITEN_CHUNK] = torch.bmm(patches, patches.transpose(1, 2))
    moment = per_image.sum(0) / (len(images) * patches.shape[2])
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
    filters = filters.reshape(-1, model.in_chans, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
    return model


def _build(arch: str, in_chans: int, num_classes: int, img_size: tuple[int, int], widths, scale: float,
           pool: str, whiten: bool, dirac: bool, bn_scale: bool, whiten_bias_epochs=None) -> FastNet:
    widths = tuple(int(w) for w in widths)
    if len(widths) != 3 or min(widths) < 1:
        raise ConfigError(f"widths must be three positive channel counts, got {widths!r}")
    if pool not in ("ceil", "floor"):
        raise ConfigError(f"pool must be 'ceil' or 'floor', got {pool!r}")
    number = isinstance(whiten_bias_epochs, (int, float)) and not isinstance(whiten_bias_epochs, bool)
    if whiten_bias_epochs is not None and not (number and whiten_bias_epochs >= 0):
        raise ConfigError(f"whiten_bias_epochs must be a number of epochs >= 0 or null (the bias always trains), "
                          f"got {whiten_bias_epochs!r}")
    # The stem takes one pixel off; with floor pooling three halvings must leave at least 1x1.
    check_min_size(arch, tuple(img_size), MIN_SIDE if pool == "ceil" else STEM_KERNEL - 1 + 8)
    model = FastNet(in_chans, num_classes, img_size, widths, scale, pool=pool, whiten=bool(whiten),
                    dirac=bool(dirac), bn_scale=bool(bn_scale), whiten_bias_epochs=whiten_bias_epochs)
    model.arch = arch
    model.arch_kwargs = {"widths": list(widths), "scale": scale, "pool": pool, "whiten": bool(whiten),
                         "dirac": bool(dirac), "bn_scale": bool(bn_scale), "whiten_bias_epochs": whiten_bias_epochs}
    return model


@register_model
def fastnet(*, in_chans: int, num_classes: int, img_size: tuple[int, int], widths=(64, 256, 256),
            scale: float = 1 / 9, pool: str = "floor", whiten: bool = True, dirac: bool = True,
            bn_scale: bool = False, whiten_bias_epochs: float | None = 3) -> FastNet:
    """airbench94's network: 2x2 whitening stem, 3 conv blocks 64/256/256, dirac init, scaled linear."""
    return _build("fastnet", in_chans, num_classes, img_size, widths, scale, pool, whiten, dirac, bn_scale,
                  whiten_bias_epochs)


@register_model
def fastnet_small(*, in_chans: int, num_classes: int, img_size: tuple[int, int], widths=(32, 64, 128),
                  scale: float = 1.0, pool: str = "ceil", whiten: bool = False, dirac: bool = False,
                  bn_scale: bool = True, whiten_bias_epochs: float | None = None) -> FastNet:
    """fastnet with blocks of 32/64/128 channels, for tiny datasets and quick runs (the default model)."""
    # Unscaled logits: with Adam at default settings this gives well-calibrated
    # probabilities within a few epochs; the 1/9 scale suits fastnet's SGD recipes.
    return _build("fastnet_small", in_chans, num_classes, img_size, widths, scale, pool, whiten, dirac, bn_scale,
                  whiten_bias_epochs)
