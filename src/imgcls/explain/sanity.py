"""Checks that an attribution method can fail: deletion, randomisation, localisation.

* **Deletion** (Petsiuk et al. 2018, "RISE"): remove the pixels a map ranks
  highest first and watch the target probability fall.  A map that finds the
  evidence makes it fall faster than a random pixel order, so its area under
  the curve (:func:`deletion_auc`) is lower than :func:`random_deletion_auc`.
* **Model-parameter randomisation** (Adebayo et al. 2018, "Sanity Checks for
  Saliency Maps"): re-initialise every weight of a copy of the model and
  compare its maps with the trained model's.  A method whose maps survive
  (high rank correlation) explains the image, not the model, and is flagged.
* **Localisation**: where the evidence for the class lies in a known box (the
  synthetic shapes of ``tests/explain/patterns.py``), the map's peak should
  fall inside it (:func:`peak_in_box`).

All maps follow :func:`imgcls.explain.attribution.attribute`: (N, H, W),
larger = more evidence for the target class.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from imgcls.errors import ConfigError
from imgcls.explain.attribution import METHODS, attribute

# Mean Spearman correlation between trained-model and randomised-model maps
# at or above which a method is flagged: its maps keep most of their ranking
# when every weight is destroyed.  A midpoint, not a figure from the paper; on
# benchmarks/explain_trust.py Grad-CAM, integrated gradients, occlusion and
# saliency stay below 0.15, Grad-CAM++ lands at 0.36-0.50, and a model-blind
# edge detector at 1.0.
RANDOMISATION_THRESHOLD = 0.5

# Deletion forward passes are batched; at most this many modified images at once.
DELETION_BATCH = 1024  # images

MapFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def compute_maps(model, x: torch.Tensor, target: torch.Tensor, method: str | MapFn,
                 layer: str | None = None) -> torch.Tensor:
    """Maps (N, H, W) from a method name in ``METHODS`` or a callable ``f(model, x, target)``."""
    if callable(method):
        return method(model, x, target).detach().float()
    return attribute(model, x, target, method, layer=layer)


def edge_map(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sobel edge magnitude of the channel-mean image, (N, H, W): a map that ignores the model.

    The control for :func:`randomisation_check` (Adebayo et al. compare with an
    edge detector too): it looks plausible on an image yet cannot explain any
    model, so the check must flag it.  ``model`` and ``target`` are unused.
    """
    gray = x.detach().float().mean(1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    kernels = torch.stack([sobel, sobel.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    grads = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return grads.pow(2).sum(1).sqrt()


# --- deletion ---------------------------------------------------------------

def _deletion_ranks(maps: torch.Tensor, seed: int) -> torch.Tensor:
    """(N, H*W) rank of every pixel, 0 = most attributed; ties in a seeded random order."""
    flat = maps.detach().flatten(1).float().cpu()
    n, pixels = flat.shape
    gen = torch.Generator().manual_seed(seed)
    # Shuffle first, then sort stably: equal values (Grad-CAM's zeros) are
    # removed in random order rather than top-left first.
    perm = torch.stack([torch.randperm(pixels, generator=gen) for _ in range(n)])
    order = perm.gather(1, torch.argsort(-flat.gather(1, perm), dim=1, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels).expand(n, pixels).contiguous())
    return ranks


@torch.no_grad()
def deletion_curve(model, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor, steps: int = 20,
                   baseline: float = 0.0, seed: int = 0) -> np.ndarray:
    """Target probability as the most-attributed pixels are removed.

    Args:
        model: classifier taking ``x``.
        x: (N, C, H, W) normalised float batch.
        target: (N,) long class indices.
        maps: (N, H, W) attributions, larger = removed earlier.
        steps: the pixels are removed in this many equal chunks.
        baseline: value a removed pixel takes in every channel, in normalised
            units (0.0 = the dataset's mean colour).
        seed: order among pixels with equal attribution.

    Returns:
        (N, steps + 1) float64: column k is the softmax probability of the
        target after removing the top ``round(k / steps * H * W)`` pixels;
        column 0 is the unmodified image.
    """
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if maps.shape != (x.shape[0], *x.shape[-2:]):
        raise ConfigError(f"maps must have shape {(x.shape[0], *x.shape[-2:])} (N, H, W), got {tuple(maps.shape)}")
    target = torch.as_tensor(target, device=x.device).long().view(-1)
    ranks = _deletion_ranks(maps, seed).to(x.device)
    was_training = model.training
    model.eval()
    try:
        return _deletion_probs(model, x, target, ranks, steps, baseline)
    finally:
        model.train(was_training)


def _deletion_probs(model, x, target, ranks, steps: int, baseline: float) -> np.ndarray:
    """(N, steps + 1) target probabilities; ``ranks`` (N, H*W) from :func:`_deletion_ranks`."""
    n, c, h, w = x.shape
    counts = torch.round(torch.linspace(0, h * w, steps + 1)).long().to(x.device)  # pixels removed per step
    per_chunk = max(1, DELETION_BATCH // (steps + 1))  # images per forward pass
    curves = []
    for start in range(0, n, per_chunk):
        xs, rs, ts = x[start:start + per_chunk], ranks[start:start + per_chunk], target[start:start + per_chunk]
        removed = (rs[:, None, :] < counts[None, :, None]).view(len(xs), steps + 1, 1, h, w)  # (n, S+1, 1, H, W)
        batch = torch.where(removed, torch.as_tensor(baseline, dtype=x.dtype, device=x.device), xs[:, None])
        probs = F.softmax(model(batch.view(-1, c, h, w)).float(), dim=1).view(len(xs), steps + 1, -1)
        curves.append(probs.gather(2, ts.view(-1, 1, 1).expand(-1, steps + 1, 1))[..., 0].double().cpu())
    return torch.cat(curves).numpy()


def deletion_auc(curve: np.ndarray) -> np.ndarray:
    """(N, S + 1) deletion curves -> (N,) area over the fraction removed (0..1); lower = better map."""
    curve = np.asarray(curve, dtype=np.float64)
    return np.trapezoid(curve, np.linspace(0.0, 1.0, curve.shape[1]), axis=1)


def random_deletion_auc(model, x: torch.Tensor, target: torch.Tensor, steps: int = 20, seed: int = 0,
                        baseline: float = 0.0) -> np.ndarray:
    """(N,) deletion AUC for a random pixel order: the reference a useful map must beat."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(x.shape[0], *x.shape[-2:], generator=gen).to(x.device)
    return deletion_auc(deletion_curve(model, x, target, maps, steps, baseline, seed))


# --- model-parameter randomisation ------------------------------------------

def randomise_weights(model, seed: int = 0):
    """A deep copy of ``model`` with every ``reset_parameters()`` module re-initialised (seeded).

    Batch norms reset their running statistics too; a parameter held by a module
    without ``reset_parameters`` would keep its value (no registered model has
    one).  The original is untouched.
    """
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        for module in clone.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return clone.eval()


def spearman_per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N,) Spearman rank correlation of flattened maps ``a[i]`` and ``b[i]``.

    A constant map has no ranking to share, so its correlation is 0 (scipy
    would return nan).
    """
    a = a.detach().flatten(1).double().cpu().numpy()
    b = b.detach().flatten(1).double().cpu().numpy()
    out = np.zeros(len(a))
    for i, (u, v) in enumerate(zip(a, b)):
        if np.ptp(u) == 0 or np.ptp(v) == 0 or not (np.isfinite(u).all() and np.isfinite(v).all()):
            continue
        rho = spearmanr(u, v).statistic
        out[i] = 0.0 if np.isnan(rho) else rho
    return out


def randomisation_check(model, x: torch.Tensor, target: torch.Tensor, method: str | MapFn,
                        layer: str | None = None, seed: int = 0,
                        threshold: float = RANDOMISATION_THRESHOLD) -> dict:
    """Adebayo et al.'s model-parameter randomisation test, all layers at once.

    Args:
        model: the trained classifier (not modified).
        x, target: (N, C, H, W) normalised batch and (N,) classes.
        method: a name in ``METHODS`` or a callable ``f(model, x, target) -> (N, H, W)``.
        layer: Grad-CAM layer (see :func:`imgcls.explain.attribution.attribute`).
        seed: seeds the re-initialisation.
        threshold: ``passed`` when the mean correlation is below it.

    Returns:
        ``{"correlations": (N,) ndarray, "mean": float, "threshold": float,
        "passed": bool}``; ``passed`` False means the maps hardly change when
        the weights are destroyed, so they do not explain the model.
    """
    randomised = randomise_weights(model, seed)
    trained_maps = compute_maps(model, x, target, method, layer)
    random_maps = compute_maps(randomised, x, target, method, layer)
    rho = spearman_per_image(trained_maps, random_maps)
    mean = float(rho.mean()) if len(rho) else float("nan")
    return {"correlations": rho, "mean": mean, "threshold": threshold, "passed": bool(mean < threshold)}


# --- scoring ------------------------------------------------------------------

def score_methods(model, x: torch.Tensor, target: torch.Tensor, methods=METHODS, layer: str | None = None,
                  steps: int = 20, seed: int = 0) -> list[dict]:
    """Deletion and randomisation scores for each method, on one batch.

    Returns one dict per method: ``method``; ``deletion_auc`` (mean over the
    batch, lower = better); ``random_deletion_auc`` (the same for a random
    pixel order, identical for every method); ``randomisation_correlation``
    (mean Spearman, lower = better) and ``passed``; ``seconds`` (wall time
    to compute the trained model's maps for the batch).
    """
    random_auc = float(random_deletion_auc(model, x, target, steps, seed).mean())
    rows = []
    for method in methods:
        start = time.perf_counter()
        maps = compute_maps(model, x, target, method, layer)
        seconds = time.perf_counter() - start
        auc = float(deletion_auc(deletion_curve(model, x, target, maps, steps, seed=seed)).mean())
        check = randomisation_check(model, x, target, method, layer, seed)
        rows.append({"method": method if isinstance(method, str) else getattr(method, "__name__", "custom"),
                     "deletion_auc": auc, "random_deletion_auc": random_auc,
                     "randomisation_correlation": check["mean"], "passed": check["passed"],
                     "seconds": seconds})
    return rows


# --- localisation -----------------------------------------------------------


def peak_in_box(maps: torch.Tensor, boxes, margin: int = 2) -> np.ndarray:
    """(N,) bool: whether each map's argmax lies in its box grown by ``margin`` pixels.

    Args:
        maps: (N, H, W) attributions.
        boxes: (N, 4) ``(top, left, bottom, right)``, bottom and right exclusive.
        margin: pixels of slack on every side, for maps upsampled from a
            coarse layer (Grad-CAM on a stride-4 layer blurs over 4 pixels).
    """
    maps = maps.detach().cpu()
    width = maps.shape[-1]
    peak = maps.flatten(1).argmax(1).numpy()
    rows, cols = peak // width, peak % width
    boxes = np.asarray(boxes)
    return ((rows >= boxes[:, 0] - margin) & (rows < boxes[:, 2] + margin)
            & (cols >= boxes[:, 1] - margin) & (cols < boxes[:, 3] + margin))
