"""Attribution maps: which pixels drove a prediction.

Interface (stable; the implementation may grow):

    attribute(model, x, target, method, layer=None) -> Tensor (N, H, W) float32

``x`` is a normalised float batch (N, C, H, W) as the model takes it, ``target``
the class index per image (N,).  Maps are at the input's resolution, one value
per pixel, larger = more evidence for ``target``; they are NOT normalised per
image (see :func:`normalize_maps`).

The methods:

* ``gradcam``: Grad-CAM (Selvaraju et al. 2017), Captum's ``LayerGradCam`` on
  the model's ``gradcam_layer`` (or ``layer``), ReLU, upsampled bilinearly.
* ``gradcam++``: Grad-CAM++ (Chattopadhay et al. 2018), written here (Captum has
  none), same layer and upsampling.
* ``integrated-gradients``: Captum's ``IntegratedGradients`` from the all-zero
  baseline in normalised space, which is the dataset's mean colour (a flat
  "average" image, neither black nor white: black would be an extreme input
  for a model trained on normalised data), summed over channels; only the
  positive part is kept (evidence FOR the target; negative attributions are
  evidence against it, which a heatmap of "where the evidence is" leaves out).
* ``occlusion``: Captum's ``Occlusion``, a window of about 1/8 of each side
  slid with half its size as stride and filled with 0 (the mean colour); the
  value of a pixel is the mean drop of the target logit over the windows that
  cover it, so positive = evidence for the target (logit units).
* ``saliency``: the absolute input gradient, max over channels (Simonyan et al.).

Only ``gradcam`` and ``gradcam++`` look at a layer (:data:`LAYER_METHODS`); the
others work on input pixels and ignore ``layer``, so that code looping over
every method (the sanity checks) can pass one layer to all of them.  The
user-facing entry point, :func:`imgcls.explain.explain_arrays`, refuses a
layer given with a pixel method instead, so a ``--layer`` flag is never
silently dropped.

Every method runs the model in eval mode and fp32 (autocast is switched off,
so bf16 runs explain in fp32 too), on a copy of ``x`` that requires gradients;
the model's training mode, hooks and parameters are left as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imgcls.errors import ConfigError, unknown_name

METHODS = ("gradcam", "gradcam++", "integrated-gradients", "occlusion", "saliency")
LAYER_METHODS = ("gradcam", "gradcam++")  # the methods that read a layer's activations

IG_STEPS = 32  # points on the path from baseline to input (Gauss-Legendre)
IG_IMAGES_PER_PASS = 256  # scaled images per forward pass, bounds the memory of integrated gradients
OCCLUSION_WINDOW_FRACTION = 8  # the occluding window is about 1/8 of each image side
OCCLUSION_IMAGES_PER_PASS = 256  # occluded images per forward pass


def resolve_layer(model, layer: str | None):
    """The module Grad-CAM hooks: the model's own ``gradcam_layer`` or a named one."""
    name = layer if layer not in (None, "auto") else model.gradcam_layer
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        raise ConfigError(f"layer {name!r} is not in model {getattr(model, 'arch', '')!r}; "
                          f"valid layers: {', '.join(names)}")
    return name, model.get_submodule(name)


def attribute(model, x: torch.Tensor, target: torch.Tensor, method: str, layer: str | None = None) -> torch.Tensor:
    """Attribution maps (N, H, W) for ``target`` classes; see the module docstring.

    Args:
        model: an :class:`imgcls.models.ImageClassifier` (any module with
            ``gradcam_layer`` for the layer methods).
        x: normalised float input (N, C, H, W), on the model's device.
        target: class index per image, (N,) (an int is used for every image).
        method: one of :data:`METHODS`.
        layer: module name for ``gradcam``/``gradcam++``; None or ``"auto"``
            means the model's ``gradcam_layer``.  Ignored by the pixel methods.

    Returns:
        float32 (N, H, W) on ``x``'s device, not normalised.

    Raises:
        ConfigError: unknown method, unknown layer (listing the valid ones),
            a layer whose output is not a feature map, or a bad ``target``.
    """
    if method not in METHODS:
        raise unknown_name("method", method, METHODS)
    if x.ndim != 4:
        raise ConfigError(f"attribute needs a batch (N, C, H, W), got shape {tuple(x.shape)}")
    target = _target_tensor(target, len(x), x.device)
    module = resolve_layer(model, layer)[1] if method in LAYER_METHODS else None
    # A fresh leaf that requires gradients: Captum then does not warn that it had to set it.
    x = x.detach().float().clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(x.device.type, enabled=False), torch.enable_grad():
            maps = _ATTRIBUTORS[method](model, x, target, module)
    finally:
        model.train(was_training)
    return maps.detach().float()


def _target_tensor(target, n: int, device: torch.device) -> torch.Tensor:
    """Class indices (n,) int64 from a tensor, array, list or a single int."""
    t = torch.as_tensor(target, device=device).long().reshape(-1)
    if t.numel() == 1 and n != 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ConfigError(f"target must hold one class index per image ({n}), got {t.numel()}")
    return t


def _upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """(N, 1, h, w) -> (N, H, W), bilinear."""
    return F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _check_feature_map(name: str, ndim: int) -> None:
    if ndim != 4:
        raise ConfigError(f"layer {name!r} does not output a feature map (N, C, h, w); Grad-CAM needs a "
                          "convolutional layer (the model's default gradcam_layer is its last one)")


def _gradcam(model, x, target, module) -> torch.Tensor:
    from captum.attr import LayerGradCam

    maps = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
    _check_feature_map(_module_name(model, module), maps.ndim)
    return _upsample(maps, x.shape[-2:])


def _gradcam_plus_plus(model, x, target, module) -> torch.Tensor:
    """Grad-CAM++ with the closed form of Chattopadhay et al. (2018), eq. 19.

    Hand-written because Captum (0.9) has no Grad-CAM++.  The class score is
    taken through an exponential, S = exp(Y), so the 2nd and 3rd derivatives of
    S are S*g^2 and S*g^3 (for piecewise-linear layers after A), S cancels, and

        alpha = g^2 / (2 g^2 + sum_ab(A) g^3),  w_k = sum_ab alpha * relu(g),
        map = relu(sum_k w_k A_k),

    with g = dY/dA the gradient of the logit at the layer's output A.
    """
    captured = {}

    def keep(_module, _inputs, output):
        captured["acts"] = output

    handle = module.register_forward_hook(keep)
    try:
        logits = model(x)
    finally:
        handle.remove()
    acts = captured["acts"]
    if not isinstance(acts, torch.Tensor):
        raise ConfigError(f"layer {_module_name(model, module)!r} outputs a {type(acts).__name__}, not a tensor")
    _check_feature_map(_module_name(model, module), acts.ndim)
    # Images are independent in eval mode, so the gradient of the summed scores is each image's own.
    score = logits.float().gather(1, target.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(score, acts)
    acts, grads = acts.detach().float(), grads.float()
    g2 = grads.pow(2)
    denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * grads.pow(3)
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alpha * grads.clamp_min(0)).sum((2, 3), keepdim=True)  # (N, K, 1, 1)
    cam = (weights * acts).sum(1, keepdim=True).clamp_min(0)
    return _upsample(cam, x.shape[-2:])


def _integrated_gradients(model, x, target, _module) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    # Captum splits the N * steps scaled images into passes of internal_batch_size (at least N).
    attrs = IntegratedGradients(model).attribute(
        x, baselines=0.0, target=target, n_steps=IG_STEPS,
        internal_batch_size=max(len(x), IG_IMAGES_PER_PASS))
    return attrs.sum(1).clamp_min(0)


def occlusion_window(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((window_h, window_w), (stride_h, stride_w)) in pixels for an image of that size."""
    window = tuple(max(1, -(-side // OCCLUSION_WINDOW_FRACTION)) for side in (height, width))
    stride = tuple(max(1, w // 2) for w in window)
    return window, stride


def _occlusion(model, x, target, _module) -> torch.Tensor:
    from captum.attr import Occlusion

    (wh, ww), (sh, sw) = occlusion_window(*x.shape[-2:])
    c = x.shape[1]
    attrs = Occlusion(model).attribute(
        x.detach(), sliding_window_shapes=(c, wh, ww), strides=(c, sh, sw), baselines=0.0, target=target,
        perturbations_per_eval=max(1, OCCLUSION_IMAGES_PER_PASS // len(x)))
    # The window spans every channel, so each channel holds the same value: the mean keeps logit units.
    return attrs.mean(1)


def _saliency(model, x, target, _module) -> torch.Tensor:
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=target, abs=True).amax(1)


def _module_name(model, module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


_ATTRIBUTORS = {
    "gradcam": _gradcam,
    "gradcam++": _gradcam_plus_plus,
    "integrated-gradients": _integrated_gradients,
    "occlusion": _occlusion,
    "saliency": _saliency,
}


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] (a constant map becomes all zeros)."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)
