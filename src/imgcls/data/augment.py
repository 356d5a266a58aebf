"""Augmentation of whole batches on the training device.

Every augmentation works on a float batch ``x`` of shape (N, C, H, W) that is
already normalised, in either memory format, on CPU or CUDA, and returns a new
tensor of the same shape, dtype, device and memory format; the input is never
changed in place.  All randomness comes from a ``torch.Generator``: random
numbers are drawn on the generator's device (normally the CPU) and then moved
to ``x.device``, so one seed gives the same augmentation on CPU and on CUDA.

Build a pipeline from a spec with :func:`build_augment`::

    augment = build_augment(["hflip", "crop:4", "cutout:8"], img_size=(32, 32))
    x_aug = augment(x, generator)

The steps always run in this order, whatever the order of the spec:
flip, affine warp (rotate and zoom share one warp), translate or crop, colour
jitter, cutout.
Areas that an augmentation leaves empty are filled with zero, which in
normalised space is the dataset's mean colour: a neutral grey, not black.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imgcls.errors import ConfigError, unknown_name

AUGMENT_NAMES = ("hflip", "altflip", "rotate", "zoom", "translate", "crop", "jitter", "cutout")

_NONE = "none"  # the spec word for "no augmentation"


# --------------------------------------------------------------------------
# Helpers shared by the augmentations
# --------------------------------------------------------------------------


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Draw ``n`` floats uniform in [low, high) on the generator's device, shape (n,)."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return low + (high - low) * u


def _randint(n: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``n`` int64 values uniform in [low, high] (inclusive) on the generator's device."""
    return torch.randint(low, high + 1, (n,), generator=generator, device=generator.device)


def _keep_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``out`` in the memory format of ``like`` (channels_last or contiguous)."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def resize_batch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a batch to ``size`` (H, W): bilinear, antialiased when shrinking, in ``x``'s memory format.

    Used by progressive resizing (``--low-res-scale``): early steps train on
    smaller copies of the augmented batch.  The resampling is separable, so it
    runs as two matrix products, (out_h, H) @ x @ (W, out_w), with matrices
    read off ``F.interpolate`` itself: the same result to float rounding, in
    half the time on the CPU (1.0 against 2.0 ms for 384 CIFAR-10 images to
    24x24, 7% of a training step).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    rows, cols = _resampling_matrices(x.shape[-2], x.shape[-1], int(size[0]), int(size[1]), x.dtype, x.device)
    return _keep_format(torch.matmul(torch.matmul(rows, x), cols), x)


@functools.lru_cache(maxsize=16)
def _resampling_matrices(h: int, w: int, out_h: int, out_w: int, dtype: torch.dtype, device: torch.device):
    """(out_h, h) and (w, out_w) matrices of antialiased bilinear resampling: resized one-hot rows and columns."""
    kwargs = {"mode": "bilinear", "antialias": True, "align_corners": False}
    one_hot_rows = torch.eye(h, dtype=dtype, device=device)[:, None, :, None].expand(h, 1, h, w)
    rows = F.interpolate(one_hot_rows, size=(out_h, w), **kwargs)[:, 0, :, 0].T.contiguous()
    one_hot_cols = torch.eye(w, dtype=dtype, device=device)[:, None, None, :].expand(w, 1, h, w)
    cols = F.interpolate(one_hot_cols, size=(h, out_w), **kwargs)[:, 0, 0, :].contiguous()
    return rows, cols


# --------------------------------------------------------------------------
# Horizontal flip
# --------------------------------------------------------------------------


def flip_batch(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images of ``x`` (N, C, H, W) where ``flip`` (N,) is True.

    Done as one gather of pixels (cheaper than ``torch.where`` over a flipped
    copy).  Returns (N, C, H, W).
    """
    n, _, h, w = x.shape
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip.to(x.device)[:, None], w - 1 - cols, cols)  # (N, W)
    rows = torch.arange(h, device=x.device)[None, :, None] * w  # (1, H, 1)
    return _keep_format(_gather_pixels(x, (rows + cols[:, None, :]).expand(n, h, w)), x)


class HFlip:
    """Mirror each image left-right with probability ``p``.

    With ``alternate`` (spec ``altflip``, after airbench) the trainer decides
    instead: each image is mirrored in every other epoch (a fixed random half
    of the images in even epochs, the other half in odd ones), so every two
    epochs see each image both ways.  Called without the trainer's ``flip``
    mask it flips at random like ``hflip``.
    """

    def __init__(self, p: float = 0.5, alternate: bool = False) -> None:
        self.p = p  # probability per image, in [0, 1]
        self.alternate = alternate
        self.names = ("altflip",) if alternate else ("hflip",)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Choose the images to flip: (n,) bool on the generator's device."""
        return _uniform(n, 0.0, 1.0, generator) < self.p

    def __call__(self, x: torch.Tensor, generator: torch.Generator, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Flip a random subset of ``x`` (N, C, H, W), or those where ``flip`` (N,) is True."""
        return flip_batch(x, self.draw(len(x), generator) if flip is None else flip)

    def spec(self) -> list[str]:
        """The spec items that rebuild this step."""
        return ["altflip"] if self.alternate else [f"hflip:{self.p:g}"]

    def __str__(self) -> str:
        return "altflip (every other epoch)" if self.alternate else f"hflip p={self.p:g}"


# --------------------------------------------------------------------------
# Rotation and zoom: one batched affine warp
# --------------------------------------------------------------------------


def affine_theta(angles_deg: torch.Tensor, scales: torch.Tensor, img_size: tuple[int, int]) -> torch.Tensor:
    """Build the (N, 2, 3) sampling matrices for ``F.affine_grid``.

    Args:
        angles_deg: (N,) rotation in degrees; positive turns the picture
            counter-clockwise as seen on screen (row 0 at the top).
        scales: (N,) zoom factor; above 1 enlarges the content (zoom in).
        img_size: (H, W) of the images, so that rotation is a true rotation in
            pixels even when the image is not square.

    ``affine_grid`` works in coordinates normalised to [-1, 1] on each axis;
    the H/W terms convert to pixel units and back, and the matrix maps an
    output position to the input position it samples (the inverse transform).
    """
    h, w = img_size
    rad = torch.deg2rad(angles_deg.float())
    cos = torch.cos(rad) / scales
    sin = torch.sin(rad) / scales
    zero = torch.zeros_like(cos)
    row_x = torch.stack([cos, -sin * (h / w), zero], dim=-1)  # input x from output (x, y)
    row_y = torch.stack([sin * (w / h), cos, zero], dim=-1)  # input y from output (x, y)
    return torch.stack([row_x, row_y], dim=1)


def affine_warp(x: torch.Tensor, angles_deg: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rotate and zoom every image of ``x`` (N, C, H, W) by its own angle and scale.

    ``angles_deg`` and ``scales`` have shape (N,) and may live on any device.
    Sampling is bilinear; pixels that come from outside the image are zero
    (the mean colour, since ``x`` is normalised).  Returns (N, C, H, W).
    """
    theta = affine_theta(angles_deg, scales, tuple(x.shape[-2:]))
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _keep_format(out, x)


class Affine:
    """Random rotation and zoom per image, done as one warp."""

    def __init__(self, max_degrees: float = 0.0, zoom: float = 0.0) -> None:
        self.max_degrees = max_degrees  # degrees; angle uniform in [-max, max]
        self.zoom = zoom  # scale uniform in [1 - zoom, 1 + zoom]; 0 turns it off

    @property
    def names(self) -> tuple[str, ...]:
        """The spec names this step stands for (``rotate``, ``zoom`` or both)."""
        return tuple(n for n, v in (("rotate", self.max_degrees), ("zoom", self.zoom)) if v > 0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Warp ``x`` (N, C, H, W); returns (N, C, H, W)."""
        n = len(x)
        angles = _uniform(n, -self.max_degrees, self.max_degrees, generator) if self.max_degrees > 0 else None
        scales = _uniform(n, 1.0 - self.zoom, 1.0 + self.zoom, generator) if self.zoom > 0 else None
        device = generator.device
        angles = angles if angles is not None else torch.zeros(n, device=device)
        scales = scales if scales is not None else torch.ones(n, device=device)
        return affine_warp(x, angles, scales)

    def spec(self) -> list[str]:
        """The spec items that rebuild this step."""
        items = [f"rotate:{self.max_degrees:g}"] if self.max_degrees > 0 else []
        return items + ([f"zoom:{self.zoom:g}"] if self.zoom > 0 else [])

    def __str__(self) -> str:
        parts = [f"rotate ±{self.max_degrees:g}°"] if self.max_degrees > 0 else []
        if self.zoom > 0:
            parts.append(f"zoom {1 - self.zoom:g}..{1 + self.zoom:g}")
        return ", ".join(parts)


# --------------------------------------------------------------------------
# Translate (zero fill) and crop (reflect padding)
# --------------------------------------------------------------------------


def _source_index(pos: torch.Tensor, size: int, reflect: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map wanted source positions (any shape, int64) into [0, size).

    With ``reflect`` the image is mirrored about its edge pixels (as
    ``F.pad(mode="reflect")`` does; valid for positions within ``size - 1`` of
    the image).  Otherwise positions are clamped and a mask of the positions
    that really lie inside the image is returned too; the rest become zero.
    """
    if reflect:
        last = size - 1
        return last - (last - pos.abs()).abs(), None
    return pos.clamp(0, size - 1), (pos >= 0) & (pos < size)


def _gather_pixels(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Pick pixels of ``x`` (N, C, H, W) by flat index ``flat`` (N, H, W) in [0, H*W).

    Gathers in whichever memory format ``x`` has, so no copy is made first.
    """
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: one row per pixel
        first = torch.arange(n, device=x.device).view(n, 1, 1) * (h * w)  # image offsets
        out = pixels.index_select(0, (flat + first).view(-1))  # (N*H*W, C)
        return out.view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last (N, C, H, W)
    planes = x.reshape(n, c, h * w)  # (N, C, H*W)
    out = planes.gather(2, flat.view(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w)


def shift_batch(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, reflect: bool, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Shift each image of ``x`` (N, C, H, W) by its own whole-pixel offset.

    Args:
        dy, dx: (N,) int64 shifts in pixels, on any device; positive moves the
            content down / right.  With ``reflect`` they must be below H and W.
        reflect: True mirrors the image into the uncovered border, which is the
            pad-and-random-crop of the CIFAR ResNet papers (padding by the
            maximum shift, then cropping); False fills it with zero (translate).
        flip: optional (N,) bool; those images are mirrored left-right before
            the shift, in the same gather (so a flip costs nothing extra).

    Every output pixel is gathered from its source pixel with index
    arithmetic, so there is neither a loop over images nor a padded copy.
    Returns (N, C, H, W).
    """
    n, _, h, w = x.shape
    dy, dx = dy.to(x.device), dx.to(x.device)
    rows, row_ok = _source_index(torch.arange(h, device=x.device) - dy[:, None], h, reflect)  # (N, H)
    cols, col_ok = _source_index(torch.arange(w, device=x.device) - dx[:, None], w, reflect)  # (N, W)
    if flip is not None:
        cols = torch.where(flip.to(x.device)[:, None], w - 1 - cols, cols)
    out = _gather_pixels(x, rows[:, :, None] * w + cols[:, None, :])
    if not reflect:
        inside = row_ok[:, None, :, None] & col_ok[:, None, None, :]  # (N, 1, H, W)
        out = out * inside.to(x.dtype)  # a multiply is several times faster than masked_fill
    return _keep_format(out, x)


class Translate:
    """Random whole-pixel shift per image, by at most ``max_shift`` on each axis."""

    def __init__(self, max_shift: int = 4, reflect: bool = False) -> None:
        self.max_shift = max_shift  # pixels, on each axis
        self.reflect = reflect  # True: pad-and-crop with reflect padding ("crop")

    @property
    def names(self) -> tuple[str, ...]:
        """The spec name of this step (``crop`` or ``translate``)."""
        return ("crop",) if self.reflect else ("translate",)

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the shifts dy, dx: two (n,) int64 on the generator's device."""
        m = self.max_shift
        return _randint(n, -m, m, generator), _randint(n, -m, m, generator)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Shift ``x`` (N, C, H, W); returns (N, C, H, W)."""
        dy, dx = self.draw(len(x), generator)
        return shift_batch(x, dy, dx, self.reflect)

    def spec(self) -> list[str]:
        """The spec items that rebuild this step."""
        return [f"{self.names[0]}:{self.max_shift}"]

    def __str__(self) -> str:
        how = "reflect-pad crop" if self.reflect else "zero fill"
        return f"{self.names[0]} ±{self.max_shift}px ({how})"


class FlipShift:
    """A flip followed directly by a translate or crop, done as one gather.

    It draws the same random numbers in the same order as running the two
    steps one after the other, so the result is identical, at half the cost.
    """

    def __init__(self, flip: HFlip, shift: Translate) -> None:
        self.flip = flip
        self.shift = shift

    @property
    def names(self) -> tuple[str, ...]:
        """The spec names of the two fused steps."""
        return self.flip.names + self.shift.names

    def __call__(self, x: torch.Tensor, generator: torch.Generator, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Flip (at random, or where ``flip`` is True) and shift ``x`` (N, C, H, W); returns (N, C, H, W)."""
        flip = self.flip.draw(len(x), generator) if flip is None else flip
        dy, dx = self.shift.draw(len(x), generator)
        return shift_batch(x, dy, dx, self.shift.reflect, flip=flip)

    def spec(self) -> list[str]:
        """The spec items that rebuild this step."""
        return self.flip.spec() + self.shift.spec()

    def __str__(self) -> str:
        return f"{self.flip}; {self.shift}"


# --------------------------------------------------------------------------
# Cutout
# --------------------------------------------------------------------------


def cut_holes(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image of ``x`` (N, C, H, W).

    ``top`` and ``left`` are (N,) int64 corners in pixels, on any device; they
    may lie outside the image, in which case only the overlap is zeroed.
    Returns (N, C, H, W).
    """
    _, _, h, w = x.shape
    top, left = top.to(x.device)[:, None], left.to(x.device)[:, None]
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size)  # (N, H)
    in_cols = (cols >= left) & (cols < left + size)  # (N, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    return _keep_format(x * (~hole).to(x.dtype), x)  # multiply: faster than masked_fill


class Jitter:
    """Mild colour jitter for photos: per image, a contrast factor and a brightness shift.

    Contrast scales each channel about the image's own mean of that channel
    by a factor uniform in [1 - strength, 1 + strength]; brightness adds one
    shift uniform in [-strength, strength] to every channel.  Both act on the
    normalised image, where a shift of 0.2 is about a twentieth of the pixel
    range for the usual standard deviations (0.23-0.5 of it).
    """

    names = ("jitter",)

    def __init__(self, strength: float = 0.2) -> None:
        self.strength = strength

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Jitter ``x`` (N, C, H, W); returns (N, C, H, W)."""
        n, s = len(x), self.strength
        contrast = _uniform(n, 1.0 - s, 1.0 + s, generator).to(x.device, x.dtype).view(n, 1, 1, 1)
        shift = _uniform(n, -s, s, generator).to(x.device, x.dtype).view(n, 1, 1, 1)
        mean = x.mean((2, 3), keepdim=True)
        return _keep_format((x - mean) * contrast + mean + shift, x)

    def spec(self) -> list[str]:
        """The spec items that rebuild this step."""
        return [f"jitter:{self.strength:g}"]

    def __str__(self) -> str:
        return f"jitter {self.strength:g}"


class Cutout:
    """Zero one square hole per image (DeVries & Taylor, 2017).

    The hole's centre is uniform over the image, so near the borders part of
    the hole falls outside and fewer than ``size * size`` pixels are zeroed.
    """

    names = ("cutout",)

    def __init__(self, size: int = 8) -> None:
        self.size = size  # side of the square hole, pixels

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cut holes in ``x`` (N, C, H, W); returns (N, C, H, W)."""
        _, _, h, w = x.shape
        top = _randint(len(x), 0, h - 1, generator) - self.size // 2
        left = _randint(len(x), 0, w - 1, generator) - self.size // 2
        return cut_holes(x, top, left, self.size)

    def spec(self) -> list[str]:
        """The spec items that rebuild this step."""
        return [f"cutout:{self.size}"]

    def __str__(self) -> str:
        return f"cutout {self.size}px"


# --------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------


class Augment:
    """A fixed sequence of batch augmentations for images of one size.

    Call it as ``augment(x, generator)`` with ``x`` of shape (N, C, H, W); the
    result has the same shape, dtype, device and memory format, and ``x`` is
    left unchanged.  With no steps the input itself is returned.
    """

    def __init__(self, steps: list, img_size: tuple[int, int]) -> None:
        self.steps = list(steps)  # run in this order
        self.img_size = tuple(img_size)  # (H, W) in pixels

    @property
    def names(self) -> tuple[str, ...]:
        """The active augmentations, in the order they run."""
        return tuple(name for step in self.steps for name in step.names)

    def spec(self) -> list[str]:
        """A spec that :func:`build_augment` turns back into this pipeline."""
        return [item for step in self.steps for item in step.spec()]

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def alternating_flip(self) -> bool:
        """True when the flip is ``altflip``: the caller passes which images to mirror."""
        return "altflip" in self.names

    def __call__(self, x: torch.Tensor, generator: torch.Generator, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Augment the batch ``x`` (N, C, H, W); returns a new (N, C, H, W) tensor.

        ``flip`` (N,) bool, optional: the images the flip step mirrors (for
        ``altflip``); by default it draws them at random.
        """
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"augment expects a float batch (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"augment was built for {self.img_size} images, got {tuple(x.shape[-2:])}")
        for step in self.steps:
            x = step(x, generator, flip) if isinstance(step, (HFlip, FlipShift)) else step(x, generator)
        return x

    def __str__(self) -> str:
        return "Augment(" + ("; ".join(str(s) for s in self.steps) or _NONE) + ")"

    __repr__ = __str__


# --------------------------------------------------------------------------
# Parsing a spec
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """The one numeric option of an augmentation, with its accepted range."""

    meaning: str  # what the value is, with its unit, for error messages
    default: float
    low: float
    high: float
    integer: bool = False

    def accepted(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{self.meaning}, {kind} in [{self.low:g}, {self.high:g}]"


def _options(img_size: tuple[int, int]) -> dict[str, _Option]:
    """The option of each augmentation name, for images of ``img_size`` (H, W)."""
    side = min(img_size)  # pixels
    return {
        "hflip": _Option("the flip probability per image", 0.5, 0.0, 1.0),
        "altflip": _Option("no value (half the images each epoch, alternating)", 0.5, 0.5, 0.5),
        "rotate": _Option("the maximum rotation in degrees", 15.0, 0.0, 180.0),
        "zoom": _Option("the zoom range around 1 (0.1 means 0.9..1.1)", 0.1, 0.0, 0.99),
        "translate": _Option("the maximum shift in pixels", 4, 0, side - 1, integer=True),
        "crop": _Option("the padding in pixels", 4, 0, side - 1, integer=True),
        "jitter": _Option("the contrast and brightness range (0.2: contrast 0.8..1.2, shift up to 0.2 normalised "
                          "units)", 0.2, 0.0, 1.0),
        # The default hole is a quarter of the side: 8 pixels on 32x32 images.
        "cutout": _Option("the hole side in pixels (below 1: a fraction of the shorter side)",
                          max(1, round(side / 4)), 0, side, integer=True),
    }


def _split_spec(spec: list[str] | str | None) -> list[str]:
    """Turn any accepted spec form into a list of non-empty items."""
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = spec.split(",")
    items = [str(item).strip() for item in spec]
    items = [item for item in items if item]
    if [item.lower() for item in items] == [_NONE]:
        return []
    return items


def _parse_value(name: str, text: str, option: _Option, img_size: tuple[int, int]) -> float:
    """Read and check the value of one spec item; raise ConfigError when it is bad."""
    bad = ConfigError(f"bad augmentation value {name + ':' + text!r}; {name} takes {option.accepted()}")
    try:
        value = float(text)
    except ValueError:
        raise bad from None
    if not math.isfinite(value):
        raise bad
    if name == "cutout" and 0 < value < 1:
        value = float(max(1, round(value * min(img_size))))  # fraction of the shorter side
    if not option.low <= value <= option.high or (option.integer and not value.is_integer()):
        raise bad
    return int(value) if option.integer else value


def _parse_items(items: list[str], img_size: tuple[int, int]) -> dict[str, float]:
    """Map each named augmentation to its checked value."""
    options = _options(img_size)
    values: dict[str, float] = {}
    for item in items:
        name, _, text = item.partition(":")
        name = name.strip().lower()
        if name not in options:
            raise unknown_name("augmentation", name, AUGMENT_NAMES + (_NONE,))
        if name in values:
            raise ConfigError(f"augmentation {name!r} is given twice in {items}")
        text = text.strip()
        values[name] = _parse_value(name, text, options[name], img_size) if text else options[name].default
    if "hflip" in values and "altflip" in values:
        raise ConfigError("give either 'hflip' (random flips) or 'altflip' (alternating flips), not both")
    if "translate" in values and "crop" in values:
        raise ConfigError("give either 'translate' (zero fill) or 'crop' (reflect padding), not both")
    return values


def _build_steps(values: dict[str, float]) -> list:
    """Create the steps in their fixed order, leaving out those set to zero.

    A flip directly followed by a shift (no warp between) is fused into one
    :class:`FlipShift`, which gives the same result faster.
    """
    steps: list = []
    if values.get("hflip", 0) > 0:
        steps.append(HFlip(values["hflip"]))
    if "altflip" in values:
        steps.append(HFlip(0.5, alternate=True))
    if values.get("rotate", 0) > 0 or values.get("zoom", 0) > 0:
        steps.append(Affine(values.get("rotate", 0.0), values.get("zoom", 0.0)))
    for name in ("translate", "crop"):
        if values.get(name, 0) > 0:
            steps.append(Translate(values[name], reflect=name == "crop"))
    if values.get("jitter", 0) > 0:
        steps.append(Jitter(values["jitter"]))
    if values.get("cutout", 0) > 0:
        steps.append(Cutout(values["cutout"]))
    if len(steps) >= 2 and isinstance(steps[0], HFlip) and isinstance(steps[1], Translate):
        steps[:2] = [FlipShift(steps[0], steps[1])]
    return steps


def build_augment(spec: list[str] | str | None, img_size: tuple[int, int]) -> Augment:
    """Build the augmentation pipeline described by ``spec``.

    Args:
        spec: items such as ``"hflip"``, ``"rotate:15"``, ``"zoom:0.1"``,
            ``"translate:4"``, ``"crop:4"``, ``"jitter:0.2"``, ``"cutout:8"`` (a name, optionally
            ``:value``), as a list or one comma-separated string.  ``None``,
            ``[]`` or ``"none"`` means no augmentation.  A value of 0 turns an
            augmentation off.
        img_size: (H, W) of the images in pixels, used to check the values.

    Raises:
        ConfigError: for an unknown name (the message lists the valid ones), a
            name given twice, both ``translate`` and ``crop``, or a value out of
            range (the message names it and the accepted range).
    """
    img_size = (int(img_size[0]), int(img_size[1]))
    return Augment(_build_steps(_parse_items(_split_spec(spec), img_size)), img_size)
