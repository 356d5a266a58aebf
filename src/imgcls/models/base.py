"""The contract every model follows.

* ``in_chans``, ``num_classes`` and ``img_size`` are constructor arguments;
* ``forward_features(x)`` returns the last convolutional feature map
  (N, C, h, w) and ``forward_head(f)`` turns it into logits (N, num_classes),
  so features and head can be used apart (probes, transfer);
* ``gradcam_layer`` names the module whose output Grad-CAM should use;
* ``stages`` names the modules whose outputs are the convolutional stages
  (for layer-wise probes), in order;
* ``arch`` and ``arch_kwargs`` rebuild the model from a checkpoint;
* ``init_from_data(x)`` may set weights from a sample of normalised training
  images before training starts (a data-dependent initialisation); the
  default does nothing;
* ``start_epoch(epoch)`` is called before each training epoch (0-based) and
  may change which parameters train (freeze some after a few epochs); the
  default does nothing.  It depends only on ``epoch``, so a resumed run
  trains the same parameters as an uninterrupted one;
* ``apply_constraints()`` is called after every optimiser step and may
  project the weights back into a constraint set (a max-norm on each unit's
  weights, as Keras' kernel constraints do); the default does nothing.  The
  trainer calls it only on models that override it.

Models see only tensors: they know nothing of data, training or serving.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from imgcls.errors import ConfigError


class ImageClassifier(nn.Module):
    """Base class: subclasses set ``features``, ``head``, ``gradcam_layer``, ``stages``."""

    gradcam_layer: str = ""
    stages: tuple[str, ...] = ()

    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int]):
        super().__init__()
        if in_chans < 1:
            raise ConfigError(f"in_chans must be at least 1, got {in_chans}")
        if len(img_size) != 2 or min(img_size) < 1:
            raise ConfigError(f"img_size must be (H, W) with positive sides, got {img_size}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.arch = ""
        self.arch_kwargs: dict = {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) float -> (N, C, h, w) feature map."""
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) feature map -> (N, num_classes) logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation from (N, in_chans, H, W) normalised training images; none by default."""

    def start_epoch(self, epoch: int) -> None:
        """Called before training epoch ``epoch`` (0-based); nothing by default."""

    def apply_constraints(self) -> None:
        """Called after every optimiser step to project the weights into a constraint set; nothing by default."""


def pooled_linear_head(channels: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """The usual head: global average ``pool``, ``flatten``, ``dropout`` (when above 0) and the ``fc`` classifier."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)
    layers["fc"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


def init_conv_bn(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), unit/zero batch norm (He et al. 2015; the ResNet and EfficientNet papers)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight.is_meta:
            continue  # counted, not computed (see registry._refuse_too_large): normal_ on meta imports torch._dynamo
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def check_min_size(name: str, img_size: tuple[int, int], minimum: int) -> None:
    """Refuse an input smaller than a fixed architecture can take."""
    if min(img_size) < minimum:
        raise ConfigError(
            f"model {name!r} needs images of at least {minimum}x{minimum}, got "
            f"{img_size[0]}x{img_size[1]}; resize the data (--image-size) or pick another model"
        )
