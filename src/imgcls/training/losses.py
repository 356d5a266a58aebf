"""The training objective, for one label per image and for several.

One label per image (``y`` int64 (N,)): softmax cross-entropy, with optional
class weights and label smoothing.  Several labels per image (``y`` a 0/1
matrix (N, L)): an independent sigmoid per label with binary cross-entropy,
averaged over labels, with an optional weight on each label's positives
(``pos_weight``: a rare label's positives count more) and label smoothing
that moves every target ``eps / 2`` towards one half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                        label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """The loss of (N, K) ``logits`` against ``y``: int64 (N,) classes, or a 0/1 (N, K) label matrix.

    ``weight``: (K,) class weights (one label per image) or positive weights per label (several);
    ``reduction``: ``mean``, ``sum`` (over images) or ``none`` (one value per image).  With several labels
    an image's loss is the mean over its K labels, so ``mean`` is the mean over every (image, label) pair.
    """
    if y.ndim == 1:
        return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=label_smoothing, reduction=reduction)
    target = y.float()
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + 0.5 * label_smoothing
    per_image = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=weight,
                                                   reduction="none").mean(1)
    if reduction == "none":
        return per_image
    return per_image.sum() if reduction == "sum" else per_image.mean()


def loss_denominator(y_global: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | int:
    """What a batch's summed loss is divided by for its mean: images, or (one label per image, with class
    weights) the sum of the weights of their classes, as ``F.cross_entropy``'s weighted mean does."""
    if weight is None or y_global.ndim == 2:
        return len(y_global)
    return weight[y_global].sum()


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Images whose prediction is right (a 0-dim int64 tensor): the top class, or with several labels the
    exact set of labels whose logit is above 0 (probability above one half)."""
    if y.ndim == 1:
        return (logits.argmax(1) == y).sum()
    return ((logits > 0) == (y > 0)).all(1).sum()
