"""What the pixels of a dataset say about its images: exact and near copies (with the features a network sees),
and simple quality measures (brightness, contrast, sharpness, colour).

Every function takes the dataset's own uint8 arrays, (N, H, W, C) at one size, and works in batches, so a few
thousand photos take a second or two.  ``imgcls inspect`` turns these into findings; training's stage 1 uses
:func:`copy_pairs` to warn when test images have copies among the images it trains on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_BATCH = 512  # images converted to float at a time
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 weights


def pixel_digests(images: np.ndarray) -> list[bytes]:
    """A digest of each image's decoded pixels: equal digests are identical images (16 bytes of BLAKE2b)."""
    return [hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest() for image in images]


def _luma_batches(images: np.ndarray, with_colour: bool = False):
    """(start, luminance in [0, 1], float32 (n, 1, H, W), colour) per batch of images; ``colour`` is None unless
    ``with_colour``: then the mean absolute difference between the colour channels of each image, in levels of
    255 (0 for grey images; None for one-channel images too)."""
    for lo in range(0, len(images), _BATCH):
        x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + _BATCH])).float()
        spread = None
        if x.shape[-1] == 3:
            if with_colour:
                spread = ((x[..., 0] - x[..., 1]).abs_() + (x[..., 1] - x[..., 2]).abs_()).mean((1, 2)) / 2
            x = x @ torch.from_numpy(_LUMA / 255.0)
        else:
            x = x[..., 0] / 255.0
        yield lo, x.unsqueeze(1), spread


def image_measures(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, float32 arrays of shape (N,):

    - ``brightness``: mean luminance, 0 (black) to 1 (white);
    - ``dark_end``, ``bright_end``: the 5th and 95th percentiles of the luminance, over a 32x32 grid of cell
      averages (a dark photo has no bright part; a bright flower on a black background does);
    - ``contrast``: standard deviation of the luminance;
    - ``sharpness``: log10 of the variance of the Laplacian of the luminance (blur lowers it);
    - ``colour``: the mean absolute difference between colour channels, in levels of 255 (0: grey stored as RGB).
    """
    n = len(images)
    out = {k: np.zeros(n, np.float32) for k in ("brightness", "dark_end", "bright_end", "contrast", "sharpness",
                                                 "colour")}
    for lo, x, spread in _luma_batches(images, with_colour=True):
        hi = lo + len(x)
        out["brightness"][lo:hi] = x.mean((1, 2, 3)).numpy()
        # The percentiles of a 32x32 average: a dark photo's bright part is larger than a cell.
        cells = F.adaptive_avg_pool2d(x, 32).flatten(1).sort(1).values
        out["dark_end"][lo:hi] = cells[:, round(0.05 * (cells.shape[1] - 1))].numpy()
        out["bright_end"][lo:hi] = cells[:, round(0.95 * (cells.shape[1] - 1))].numpy()
        out["contrast"][lo:hi] = x.std((1, 2, 3)).numpy()
        c = x[:, :, 1:-1, 1:-1]  # the 4-neighbour Laplacian, in levels of 255 (slices: a 1-channel conv is slow)
        edges = (x[:, :, 1:-1, 2:] + x[:, :, 1:-1, :-2] + x[:, :, 2:, 1:-1] + x[:, :, :-2, 1:-1] - 4 * c) * 255.0
        out["sharpness"][lo:hi] = torch.log10(edges.var((1, 2, 3)) + 1e-3).numpy()
        if spread is not None:
            out["colour"][lo:hi] = spread.numpy()
    return out


MATCH_SIDE = 24  # px: the side of the grey thumbnails that copies are matched on
# Windows of each image a copy may have been cut to: (share of the side, offsets of the window as shares of what
# is left), so that a copy cropped to 82-100% of the side anywhere in the image matches one of them.
MATCH_CROPS = ((1.0, (0.5,)), (0.91, (0.0, 0.5, 1.0)), (0.82, (0.0, 0.5, 1.0)))


def match_windows(images: np.ndarray) -> torch.Tensor:
    """Per image, its crop windows (see MATCH_CROPS) and their mirror images as grey MATCH_SIDE thumbnails, each
    scaled to zero mean and unit length: float16 (N, windows, MATCH_SIDE**2); window 0 is the whole image."""
    out = []
    for _, x, _ in _luma_batches(images):
        _, _, h, w = x.shape
        views = []
        for share, offsets in MATCH_CROPS:
            ch, cw = round(h * share), round(w * share)
            for oy in offsets:
                for ox in offsets:
                    top, left = round((h - ch) * oy), round((w - cw) * ox)
                    views.append(F.adaptive_avg_pool2d(x[:, :, top:top + ch, left:left + cw], MATCH_SIDE))
        views = torch.cat([*views, *(v.flip(-1) for v in views)], 1).flatten(2)
        views = views - views.mean(2, keepdim=True)
        out.append((views / views.norm(dim=2, keepdim=True).clamp_min(1e-6)).half())  # half: 190 MB for 4,400
    return torch.cat(out)


def window_match(windows: torch.Tensor, first: np.ndarray, second: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For pairs (first[k], second[k]): the best correlation of one image whole with a window of the other (either
    way round, mirrored or not), float32 (K,); about 0.9 or more for a resized, re-encoded or cropped copy."""
    best = np.zeros(len(first), np.float32)
    for lo in range(0, len(first), chunk):
        a, b = torch.from_numpy(first[lo:lo + chunk]), torch.from_numpy(second[lo:lo + chunk])
        wa, wb = windows[a].float(), windows[b].float()
        one = (wa @ wb[:, 0, :, None]).amax((1, 2))
        other = (wb @ wa[:, 0, :, None]).amax((1, 2))
        best[lo:lo + chunk] = torch.maximum(one, other).numpy()
    return best


# Copies: pairs whose unit feature vectors have a cosine of CANDIDATE_COSINE or more are candidates; one is a copy
# when that cosine plus the best thumbnail correlation (window_match) reaches COPY_SCORE.  Planted copies of
# flowers.zip (rescaled 0.5-1.5x, JPEG 40-90, cropped to 85-95%, mirrored) scored 1.77 to 2; different photos of
# one scene up to about 1.85 (benchmarks/inspect_folder.py).
CANDIDATE_COSINE = 0.85
COPY_SCORE = 1.83


@dataclass
class Copy:
    """Images ``first`` < ``second`` (rows of the arrays given to :func:`copy_pairs`) that are one picture."""

    first: int
    second: int
    score: float  # 1 for identical pixels, else (cosine + correlation) / 2, at most 1
    detail: str
    exact: bool


def _similar_pairs(unit: np.ndarray, floor: float, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) arrays of every pair i < j whose cosine similarity is at least ``floor``."""
    found = []
    for lo in range(0, len(unit), chunk):
        sims = unit[lo:lo + chunk] @ unit.T
        rows, cols = np.nonzero(sims >= floor)
        keep = cols > rows + lo
        found.append((rows[keep] + lo, cols[keep], sims[rows[keep], cols[keep]]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate(parts) for parts in zip(*found))


def copy_pairs(parts: list[np.ndarray], unit: np.ndarray, across: int | None = None) -> list[Copy]:
    """Exact and near copies among the images of ``parts`` (uint8 (n, H, W, C) arrays, taken as one sequence),
    given their features ``unit`` (N, D), each scaled to unit length; each pair once, sorted.

    ``across``: only pairs of an image before this row with one at or after it (a test split after the images a
    run learns from), which spares the rest of the work.
    """
    starts = np.cumsum([0] + [len(p) for p in parts])
    digests = [d for images in parts for d in pixel_digests(images)]
    pairs: dict[tuple[int, int], Copy] = {}
    first: dict[bytes, int] = {}
    for i, d in enumerate(digests):
        if d in first and (across is None or first[d] < across <= i):
            pairs[(first[d], i)] = Copy(first[d], i, 1.0, "identical pixels", True)
        first.setdefault(d, i)
    a, b, cosine = _similar_pairs(unit, CANDIDATE_COSINE)
    if across is not None:
        keep = (a < across) & (b >= across)
        a, b, cosine = a[keep], b[keep], cosine[keep]
    if len(a):
        involved = np.unique(np.concatenate([a, b]))
        part = np.searchsorted(starts, involved, side="right") - 1
        windows = match_windows(np.stack([parts[k][i - starts[k]] for k, i in zip(part, involved)]))
        match = window_match(windows, np.searchsorted(involved, a), np.searchsorted(involved, b))
        for i, j, cos, m in zip(*(v[cosine + match >= COPY_SCORE].tolist() for v in (a, b, cosine, match))):
            pairs.setdefault((i, j), Copy(i, j, min(1.0, (cos + m) / 2),
                                          f"feature cosine {cos:.3f}, thumbnail correlation {m:.3f}", False))
    return [pairs[k] for k in sorted(pairs)]
