"""Attribution maps: which pixels drove a prediction.

Interface (stable; the implementation may grow):

    attribute(model, x, target, method, layer=None) -> Tensor (N, H, W) float32

``x`` is a normalised float batch (N, C, H, W) as the model takes it, ``target``
the class index per image (N,).  Maps are at the input's resolution, one value
per pixel, larger = more evidence for ``target``; they are NOT normalised per
image (see :func:`normalize_maps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imgcls.errors import ConfigError, unknown_name

METHODS = ("gradcam", "gradcam++", "integrated-gradients", "occlusion", "saliency")


def resolve_layer(model, layer: str | None):
    """The module Grad-CAM hooks: the model's own ``gradcam_layer`` or a named one."""
    name = layer if layer not in (None, "auto") else model.gradcam_layer
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        raise ConfigError(f"layer {name!r} is not in model {getattr(model, 'arch', '')!r}; "
                          f"valid layers: {', '.join(names)}")
    return name, model.get_submodule(name)


def attribute(model, x: torch.Tensor, target: torch.Tensor, method: str, layer: str | None = None) -> torch.Tensor:
    """Attribution maps (N, H, W) for ``target`` classes; see the module docstring."""
    if method not in METHODS:
        raise unknown_name("method", method, METHODS)
    model.eval()
    if method == "gradcam":
        from captum.attr import LayerGradCam

        _, module = resolve_layer(model, layer)
        maps = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
        return F.interpolate(maps.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()
    if method == "saliency":
        from captum.attr import Saliency

        return Saliency(model).attribute(x, target=target, abs=True).amax(1).float().detach()
    raise NotImplementedError(method)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] (a constant map becomes all zeros)."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)
