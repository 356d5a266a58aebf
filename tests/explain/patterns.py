"""A synthetic localisation task for testing explanations: the class is a small shape at a random place.

Test data, not product: the explanation tests and ``benchmarks/explain_trust.py``
import it from here (the benchmark puts this folder on its path).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.errors import ConfigError
from imgcls.models import create_model

# Class -> shape drawn in a PATTERN_SIZE box.
PATTERN_CLASSES = ("cross", "ring", "diagonal", "square")
DISTRACTORS = ("corner", "dots")  # shapes of no class
PATTERN_SIZE = 8  # pixels per side


def _shape_mask(kind: str, size: int) -> np.ndarray:
    """(size, size) bool mask of a class shape or a distractor, strokes 2 pixels wide."""
    mask = np.zeros((size, size), dtype=bool)
    mid = size // 2
    if kind == "cross":
        mask[mid - 1:mid + 1, :] = True
        mask[:, mid - 1:mid + 1] = True
    elif kind == "ring":
        mask[:, :] = True
        mask[2:-2, 2:-2] = False
    elif kind == "diagonal":
        idx = np.arange(size)
        mask[idx, idx] = True
        mask[idx[:-1], idx[:-1] + 1] = True
    elif kind == "square":
        mask[1:-1, 1:-1] = True
    elif kind == "corner":  # distractor: an L
        mask[:, :2] = True
        mask[-2:, :] = True
    elif kind == "dots":  # distractor: a checkerboard of 2x2 dots
        blocks = (np.arange(size) // 2)
        mask[:, :] = (blocks[:, None] + blocks[None, :]) % 2 == 0
    else:
        raise ConfigError(f"unknown shape {kind!r}; choose one of: "
                          f"{', '.join(PATTERN_CLASSES + DISTRACTORS)}")
    return mask


def _free_corner(rng, size: int, taken: list[tuple[int, int]]) -> tuple[int, int]:
    """A random top-left corner whose PATTERN_SIZE box overlaps none in ``taken``."""
    for _ in range(1000):
        top, left = (int(v) for v in rng.integers(0, size - PATTERN_SIZE + 1, 2))
        if all(abs(top - t) >= PATTERN_SIZE or abs(left - l) >= PATTERN_SIZE for t, l in taken):
            return top, left
    raise ConfigError(f"cannot fit {len(taken) + 1} shapes of {PATTERN_SIZE} pixels in a {size}-pixel image")


def make_pattern_dataset(n: int, size: int = 32, seed: int = 0, num_classes: int = 4,
                         distractors: int = 1, noise: float = 24.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images whose class is decided only by a small shape at a random place.

    Each image is grey noise (std ``noise``, 0..255 units) with one class
    shape (cross, ring, diagonal, filled square: the first ``num_classes``)
    and ``distractors`` shapes of no class (an L, a checkerboard), all 8x8,
    bright, of random colour and at random places that do not overlap.  So
    colour, brightness and position carry no information: a map that simply
    follows bright pixels finds the class shape only about 1 time in
    ``distractors + 1``.

    Returns:
        images: (n, size, size, 3) uint8.
        labels: (n,) int64 class indices.
        boxes: (n, 4) int64 ``(top, left, bottom, right)`` of the class shape,
            bottom and right exclusive.
    """
    if not 2 <= num_classes <= len(PATTERN_CLASSES):
        raise ConfigError(f"num_classes must be 2..{len(PATTERN_CLASSES)}, got {num_classes}")
    if size < PATTERN_SIZE + 2:
        raise ConfigError(f"size must be at least {PATTERN_SIZE + 2} pixels, got {size}")
    rng = np.random.default_rng(seed)
    masks = [_shape_mask(kind, PATTERN_SIZE) for kind in PATTERN_CLASSES[:num_classes]]
    distractor_masks = [_shape_mask(kind, PATTERN_SIZE) for kind in DISTRACTORS]
    images = np.clip(rng.normal(110.0, noise, (n, size, size, 3)), 0, 255)
    labels = rng.integers(0, num_classes, n)
    boxes = np.zeros((n, 4), dtype=np.int64)
    for i in range(n):
        taken: list[tuple[int, int]] = []
        for k in range(distractors + 1):
            top, left = _free_corner(rng, size, taken)
            taken.append((top, left))
            mask = masks[labels[i]] if k == 0 else distractor_masks[rng.integers(len(DISTRACTORS))]
            images[i, top:top + PATTERN_SIZE, left:left + PATTERN_SIZE][mask] = rng.uniform(170, 255, 3)
        boxes[i] = (taken[0][0], taken[0][1], taken[0][0] + PATTERN_SIZE, taken[0][1] + PATTERN_SIZE)
    return images.round().astype(np.uint8), labels.astype(np.int64), boxes


def train_pattern_model(x: torch.Tensor, y: torch.Tensor, seed: int = 0, steps: int = 300, batch: int = 64,
                        lr: float = 2e-3) -> torch.nn.Module:
    """A ResNet-8 trained on :func:`make_pattern_dataset` images (normalised x, labels y), in eval mode.

    Args:
        steps: Adam steps; batch: images per step; lr: Adam learning rate.
    """
    torch.manual_seed(seed)
    model = create_model("resnet8", in_chans=x.shape[1], num_classes=int(y.max()) + 1, img_size=tuple(x.shape[-2:]))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=batches)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
