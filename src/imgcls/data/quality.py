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


def _normalized(v: torch.Tensor) -> torch.Tensor:
    """``v`` with zero mean and unit length along its last dimension: thumbnails compared by their dot product."""
    v = v - v.mean(-1, keepdim=True)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def match_windows(images: np.ndarray) -> torch.Tensor:
    """Per image, its crop windows (see MATCH_CROPS) and their mirror images as grey MATCH_SIDE thumbnails, each
    scaled to zero mean and unit length: float16 (N, windows, MATCH_SIDE**2); window 0 is the whole image."""
    out = []
    for x in _pooled_luma(images):
        _, _, h, w = x.shape
        views = []
        for share, offsets in MATCH_CROPS:
            ch, cw = round(h * share), round(w * share)
            for oy in offsets:
                for ox in offsets:
                    top, left = round((h - ch) * oy), round((w - cw) * ox)
                    views.append(F.adaptive_avg_pool2d(x[:, :, top:top + ch, left:left + cw], MATCH_SIDE))
        views = torch.cat([*views, *(v.flip(-1) for v in views)], 1).flatten(2)
        out.append(_normalized(views).half())  # half: 190 MB for 4,400
    return torch.cat(out)


def window_match(windows: torch.Tensor, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """For pairs (first[k], second[k]): the best correlation of one image whole with a window of the other (either
    way round, mirrored or not), float32 (K,); about 0.9 or more for a resized, re-encoded or cropped copy.

    One product per image with the whole thumbnails of all its partners: gathering every pair's windows instead
    moved 40 times the data (2.2 s against 0.3 s for 21,000 pairs of 4,400 photos)."""
    best = np.full(len(first), -1.0, np.float32)
    whole = windows[:, 0].float()
    for own, other in ((np.asarray(first), np.asarray(second)), (np.asarray(second), np.asarray(first))):
        order = np.argsort(own, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(own[order])) + 1):
            if len(group):
                sims = (windows[own[group[0]]].float() @ whole[torch.from_numpy(other[group])].T).amax(0)
                best[group] = np.maximum(best[group], sims.numpy())
    return best


def _pooled_luma(images: np.ndarray):
    """The luminance of each batch of ``images`` (:func:`_luma_batches`), averaged down to about twice MATCH_SIDE
    on its shorter side, float32 (n, 1, h, w): the thumbnails copies are matched on come out the same to within a
    pixel's rounding, at a fraction of the work."""
    for _, x, _ in _luma_batches(images):
        factor = max(1, min(x.shape[-2:]) // (2 * MATCH_SIDE))
        yield F.avg_pool2d(x, factor) if factor > 1 else x


def _window(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Grey (P, 1, H, W) images -> one MATCH_SIDE window each, bilinear, zero mean and unit length: (P, SIDE**2).
    ``at`` (P, 5): the window's width and height as shares of the image's, its centre's x and y offsets (-1 to 1
    are the image's edges) and 1 or -1 (mirrored)."""
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = at[:, 0] * at[:, 4]
    theta[:, 0, 2] = at[:, 2]
    theta[:, 1, 1] = at[:, 1]
    theta[:, 1, 2] = at[:, 3]
    grid = F.affine_grid(theta, (len(x), 1, MATCH_SIDE, MATCH_SIDE), align_corners=False)
    return _normalized(F.grid_sample(x, grid, mode="bilinear", align_corners=False).flatten(1))


def _start_windows() -> torch.Tensor:
    """The windows the search of :func:`aligned_match` starts from: MATCH_CROPS's (the whole image and 91% and 82%
    crops at 9 places), each also mirrored, as rows of ``_window``'s ``at``."""
    rows = [(share, (2 * ox - 1) * (1 - share), (2 * oy - 1) * (1 - share))
            for share, offsets in MATCH_CROPS for oy in offsets for ox in offsets]
    return torch.tensor([(r[0], r[0], r[1], r[2], m) for r in rows for m in (1.0, -1.0)])


ALIGN_ROUNDS = 5  # rounds of the search; the steps start at 5% of the side in scale and 10% in place, and halve
ALIGN_STARTS = 3  # the search from the best start window alone stopped at 0.973 for a crop of 0.987 (one-off)
_NEIGHBOURS = torch.tensor([(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)])


def _moved(at: torch.Tensor, scale: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
    """``at`` (P, 5) with its width and height shares moved by ``scale`` (2,) and its centre by ``place`` (2,),
    kept inside the image (shares 0.7 to 1)."""
    share = (at[:, :2] + scale).clamp(0.7, 1.0)
    room = 1.0 - share
    centre = torch.maximum(torch.minimum(at[:, 2:4] + place, room), -room)
    return torch.cat([share, centre, at[:, 4:]], 1)


def aligned_match(images: np.ndarray, first: np.ndarray, second: np.ndarray, chunk: int = 512) -> np.ndarray:
    """For pairs (first[k], second[k]) of rows of ``images`` (uint8 (n, H, W, C)): the correlation of one image's
    grey MATCH_SIDE thumbnail with the best window of the other, either way round, float32 (K,).

    The window (its width and height each 70% to 100% of the image's, its place, mirrored or not) is searched
    for: from each of the ALIGN_STARTS best of :func:`_start_windows`, ALIGN_ROUNDS rounds, each trying the 9
    neighbours of the best so far in width and height, then the 9 in place, the steps halving each round. A
    copy resized, re-encoded, cropped to 80-100% on each side anywhere and mirrored scores about 0.98 or more;
    two photos of one scene taken a moment apart, less.
    """
    out = np.zeros(len(first), np.float32)
    if not len(first):
        return out
    involved = np.unique(np.concatenate([first, second]))
    grey = torch.cat(list(_pooled_luma(images[involved])))
    starts, zero = _start_windows(), torch.zeros(2)
    for lo in range(0, len(first), chunk):
        a = torch.from_numpy(np.searchsorted(involved, first[lo:lo + chunk]))
        b = torch.from_numpy(np.searchsorted(involved, second[lo:lo + chunk]))
        best = torch.full((len(a),), -1.0)
        for whole, other in ((grey[a], grey[b]), (grey[b], grey[a])):
            target = _normalized(F.adaptive_avg_pool2d(whole, MATCH_SIDE).flatten(1))
            scores = torch.stack([(_window(other, at.expand(len(a), 5)) * target).sum(1) for at in starts], 1)
            # The search runs from each of the ALIGN_STARTS best windows (rows pair by pair, start by start).
            at = starts[scores.topk(min(ALIGN_STARTS, len(starts)), 1).indices].reshape(-1, 5)
            n = len(at) // len(a)
            other, target = other.repeat_interleave(n, 0), target.repeat_interleave(n, 0)
            rows = torch.arange(len(at))
            scale_step, place_step = 0.05, 0.1
            for _ in range(ALIGN_ROUNDS):
                for in_scale in (True, False):
                    tries = [_moved(at, m * scale_step, zero) if in_scale else _moved(at, zero, m * place_step)
                             for m in _NEIGHBOURS]
                    scores = torch.stack([(_window(other, t) * target).sum(1) for t in tries], 1)
                    at, score = torch.stack(tries, 1)[rows, scores.argmax(1)], scores.amax(1)
                scale_step, place_step = scale_step / 2, place_step / 2
            best = torch.maximum(best, score.view(len(a), n).amax(1))
        out[lo:lo + chunk] = best.numpy()
    return out


# Copies: pairs whose unit feature vectors have a cosine of CANDIDATE_COSINE or more are candidates (0.82 found
# mirrored copies that 0.85 missed, at 0.3 s more on 4,400 photos); those whose cosine plus best thumbnail
# correlation over the fixed windows (window_match) reaches SHORTLIST_SCORE are aligned (aligned_match), and are
# one picture when the better of the aligned and the fixed windows' correlation reaches COPY_CORRELATION (the
# fixed windows are area-averaged, which suits images not much larger than the thumbnail). On three planted
# folders (benchmarks/inspect_folder.py: copies rescaled 0.5-1.5x, JPEG 40-90, cropped to 85-95%, mirrored) the
# fixed windows scored the copies 1.79 to 2 and the aligned correlation 0.980 to 1; the folders' own copies,
# judged by eye, scored 0.978 or more aligned, and different photos of one wide scene (fields) up to 0.976
# (benchmarks/README.md).
CANDIDATE_COSINE = 0.82
SHORTLIST_SCORE = 1.75
COPY_CORRELATION = 0.977


@dataclass
class Copy:
    """Images ``first`` < ``second`` (rows of the arrays given to :func:`copy_pairs`) that are one picture."""

    first: int
    second: int
    score: float  # 1 for identical pixels, else the aligned thumbnail correlation
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
        pixels = np.stack([parts[k][i - starts[k]] for k, i in zip(part, involved)])
        windows = match_windows(pixels)
        coarse = window_match(windows, np.searchsorted(involved, a), np.searchsorted(involved, b))
        del windows
        short = cosine + coarse >= SHORTLIST_SCORE
        a, b, cosine = a[short], b[short], cosine[short]
        # The better of the two: the fixed windows are area-averaged, and for an image not much larger than the
        # thumbnail an exact crop or mirror image matches them better than the search's bilinear samples.
        match = np.maximum(aligned_match(pixels, np.searchsorted(involved, a), np.searchsorted(involved, b)),
                           coarse[short])
        for i, j, cos, m in zip(*(v[match >= COPY_CORRELATION].tolist() for v in (a, b, cosine, match))):
            pairs.setdefault((i, j), Copy(i, j, m, f"feature cosine {cos:.3f}, aligned thumbnail correlation "
                                                    f"{m:.3f}", False))
    return [pairs[k] for k in sorted(pairs)]
