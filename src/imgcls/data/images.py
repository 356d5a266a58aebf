"""Decoding one image file into a uint8 array.

Shared by training-data loading (:mod:`imgcls.data.decode`) and prediction, so
that an image is turned into pixels the same way in both places.

The two steps are kept apart:

* :func:`decode_image` turns bytes into a fully decoded :class:`PIL.Image.Image`
  (format found from the content, EXIF orientation applied, decompression
  bombs refused).
* :func:`to_array` turns any PIL mode into uint8 grayscale or RGB at the
  requested size.

:func:`decode_jpeg_array` is a shortcut for the commonest training file, a
plain JPEG already at the wanted size and channel count: libjpeg-turbo
(through simplejpeg) decodes it straight into an array, with the same pixels
as the two steps above (the same library underneath; 0 of 20,000 CIFAR-10
images differ) in about a sixth of the time (10.6 against 61.5 us a 32x32
image on the 2-core CPU).  :func:`decode_png_array` does the same for a plain
PNG (8-bit grayscale or RGB, not interlaced, no palette, transparency or EXIF):
unfiltered rows are the pixels themselves once inflated, and filtered ones go
to PIL's own PNG decoder without its Python plugin (5 and 12 against 25 us a
28x28 MNIST image).  Anything else goes the PIL way.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.errors import ConfigError, DataError

IMAGE_EXTENSIONS = [
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".jp2", ".j2k",
]  # fmt: skip
"""Extensions (lower case, with the dot) of the files considered to be images."""

RESIZE_MODES = ("stretch", "crop", "pad")
"""Accepted values of ``resize``: stretch to the size, centre-crop, or letterbox."""

# Modes that hold one channel of intensity (no colour).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION = 0x0112
_WHITE = 255


class BadImageError(DataError):
    """An image file that cannot be decoded (corrupt, truncated, too large)."""


class NotAnImageError(BadImageError):
    """Bytes that no image format recognises."""


class TooManyPixelsError(BadImageError):
    """An image whose header declares more pixels than PIL's guard against decompression bombs lets open."""


def has_image_extension(name: str) -> bool:
    """Return whether ``name`` ends with one of :data:`IMAGE_EXTENSIONS`."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def check_resize(resize: str) -> None:
    """Raise :class:`ConfigError` unless ``resize`` is one of :data:`RESIZE_MODES`."""
    if resize not in RESIZE_MODES:
        raise ConfigError(f"unknown resize mode {resize!r}; choose one of: {', '.join(RESIZE_MODES)}")


def check_channels(channels: int) -> None:
    """Raise :class:`ConfigError` unless ``channels`` is 1 or 3."""
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def decode_image(
    data: bytes,
    source: str,
    *,
    target: tuple[int, int] | None = None,
    resize: str = "stretch",
) -> Image.Image:
    """Decode an image file's bytes, whatever its name says it is.

    Args:
        data: the file's content.
        source: where it came from, for error messages.
        target: optional final (height, width) the image will be resized to;
            a JPEG much larger than that is decoded at a reduced DCT scale
            (``Image.draft``): about twice as fast for a 1600x1200 photo
            bound for 64x64.
        resize: how it will be resized (see :func:`to_array`), so that the
            reduced scale never goes below what the resize needs.

    Returns:
        The fully decoded image, EXIF orientation applied.

    Raises:
        BadImageError: the bytes are not a readable image, are truncated, or
            hold more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` allows.
    """
    try:
        img = open_image(data, source)
        _refuse_bomb(img, source)
        orientation = _orientation(img)
        if target is not None and img.format == "JPEG":
            _draft(img, target, resize, swapped=orientation in (5, 6, 7, 8))
        img.load()
        if orientation != 1:
            ImageOps.exif_transpose(img, in_place=True)
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise TooManyPixelsError(f"{source}: refused as a possible decompression bomb ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file can make any PIL plugin fail in its own way
        raise BadImageError(f"{source}: cannot be decoded ({_reason(exc)})") from None
    return img


def decode_jpeg_array(data: bytes, channels: int | None, size: tuple[int, int] | None) -> tuple[np.ndarray, bool] | None:
    """A plain JPEG decoded straight into a uint8 (H, W, C) array, or None where PIL must decode it.

    Taken only where the result is what :func:`decode_image` and
    :func:`to_array` give: a YCbCr or grayscale JPEG with no EXIF block (which
    may hold an orientation), within ``PIL.Image.MAX_IMAGE_PIXELS``, already
    ``size`` (H, W) when a size is given, and asked for its own channel count
    (or ``channels`` None).  A file libjpeg-turbo finds anything wrong with
    returns None too, so that PIL's decode reports it.

    Returns:
        (array, grayscale) or None.
    """
    if data[:2] != b"\xff\xd8" or b"Exif" in data[:65536]:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        gray = colorspace == "Gray"
        limit = Image.MAX_IMAGE_PIXELS
        if (colorspace not in ("Gray", "YCbCr") or (size is not None and tuple(size) != (height, width))
                or (limit is not None and height * width > limit) or (channels is not None and (channels == 1) != gray)):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", strict=True), gray
    except ValueError:
        return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that change no pixel of what decode_image and to_array give (PIL applies neither gamma nor ICC
# profiles); any other (a palette, transparency, EXIF, APNG frames, an unknown one) sends the file to PIL.
_PNG_PLAIN_CHUNKS = frozenset({b"IHDR", b"IDAT", b"IEND", b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"tIME",
                               b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT"})


def decode_png_array(data: bytes, channels: int | None, size: tuple[int, int] | None) -> tuple[np.ndarray, bool] | None:
    """A plain PNG decoded straight into a uint8 (H, W, C) array, or None where PIL must decode it.

    Taken only where the result is what :func:`decode_image` and
    :func:`to_array` give: 8-bit grayscale or RGB, not interlaced, only
    chunks that leave the pixels alone, within ``PIL.Image.MAX_IMAGE_PIXELS``,
    already ``size`` (H, W) when a size is given, and asked for its own
    channel count (or ``channels`` None).  Every chunk's CRC is checked, as
    PIL does; anything wrong returns None, so that PIL's decode reports it.

    Returns:
        (array, grayscale) or None.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, header, idat = len(_PNG_SIGNATURE), None, []
    try:
        while True:
            length, kind = struct.unpack_from(">I4s", data, pos)
            body = data[pos + 8 : pos + 8 + length]
            (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
            if kind not in _PNG_PLAIN_CHUNKS or len(body) != length or zlib.crc32(body, zlib.crc32(kind)) != crc:
                return None
            if kind == b"IHDR" and header is None and pos == len(_PNG_SIGNATURE):
                header = struct.unpack(">IIBBBBB", body)
            elif kind == b"IDAT" and header is not None:
                idat.append(body)
            elif kind == b"IEND":
                break
            elif kind in (b"IHDR", b"IDAT"):  # a second header, or data before the header
                return None
            pos += 12 + length
    except struct.error:  # a chunk cut short
        return None
    if header is None or not idat:
        return None
    width, height, depth, colour, compression, filtering, interlace = header
    gray = colour == 0
    limit = Image.MAX_IMAGE_PIXELS
    if (depth != 8 or colour not in (0, 2) or compression or filtering or interlace or not width or not height
            or (limit is not None and height * width > limit) or (size is not None and tuple(size) != (height, width))
            or (channels is not None and (channels == 1) != gray)):
        return None
    c, stream = 1 if gray else 3, b"".join(idat)
    expected = height * (1 + width * c)  # each row: a filter-type byte, then its pixels
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(stream, expected + 1)
    except zlib.error:
        return None
    if len(raw) != expected or not inflate.eof:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * c)
    if not rows[:, 0].any():  # every row stored unfiltered: the bytes are the pixels
        return rows[:, 1:].reshape(height, width, c).copy(), gray
    mode = "L" if gray else "RGB"
    try:  # PIL's PNG decoder (inflate, then undo the row filters), as its plugin would call it
        img = Image.frombytes(mode, (width, height), stream, "zip", mode, 0)
    except (ValueError, OSError):
        return None
    return np.array(img).reshape(height, width, c), gray


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 to 8); 1 when absent or unreadable."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - damaged EXIF should not cost the pixels
        return 1
    return value if value in range(1, 9) else 1


def open_image(data: bytes, source: str = "image") -> Image.Image:
    """``PIL.Image.open`` of ``data`` (the header read, the pixels not yet): the one way imgcls opens an image.

    Raises BadImageError, naming ``source``, for whatever the header does: NotAnImageError where no format
    recognises it, TooManyPixelsError where it declares more than twice ``PIL.Image.MAX_IMAGE_PIXELS``
    (PIL's DecompressionBombError), BadImageError where a format's plugin fails on it.  PIL's
    DecompressionBombWarning (between once and twice the limit) is not printed: whoever opens an image
    refuses too many pixels in its own words.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise TooManyPixelsError(f"{source}: refused as a possible decompression bomb ({exc})") from None
        except UnidentifiedImageError:
            raise NotAnImageError(f"{source}: not a recognised image format") from None
        except Exception as exc:  # noqa: BLE001 - a damaged header can make any PIL plugin fail in its own way
            raise BadImageError(f"{source}: cannot be decoded ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _refuse_bomb(img: Image.Image, source: str) -> None:
    # PIL raises beyond twice MAX_IMAGE_PIXELS and only warns between once and
    # twice; a training set should never hold such a file, so refuse both.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise BadImageError(
            f"{source}: {img.width}x{img.height} pixels is more than the limit of {limit:,} "
            "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); "
            "raise that limit if the file is trusted"
        )


def _draft(img: Image.Image, target: tuple[int, int], resize: str, *, swapped: bool) -> None:
    th, tw = target
    w, h = (img.height, img.width) if swapped else (img.width, img.height)
    if resize == "crop":
        scale = max(th / h, tw / w)
    elif resize == "pad":
        scale = min(th / h, tw / w)
    else:
        scale = None
    need_w, need_h = (tw, th) if scale is None else (max(1, round(w * scale)), max(1, round(h * scale)))
    if swapped:
        need_w, need_h = need_h, need_w
    # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that keeps both
    # sides at least the requested size, so the resize below still downsamples.
    img.draft(None, (need_w, need_h))


def is_grayscale_mode(img: Image.Image) -> bool:
    """Return whether ``img`` holds no colour (L, LA, 1, I;16, I, F, or a gray palette)."""
    if img.mode in _GRAY_MODES:
        return True
    if img.mode in ("P", "PA"):
        palette = img.getpalette("RGB")
        if palette:
            rgb = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
            return bool((rgb == rgb[:, :1]).all())
    return False


def to_array(
    img: Image.Image,
    channels: int,
    size: tuple[int, int] | None,
    resize: str = "stretch",
) -> np.ndarray:
    """Convert an image of any PIL mode into a uint8 array.

    Transparent pixels are composited on white; 16- and 32-bit images are
    scaled down by their bit depth (65535 becomes 255), float images from
    [0, 1] (or from their own range when outside it).

    Args:
        img: a decoded image, any mode.
        channels: 1 for grayscale, 3 for RGB.
        size: (height, width) of the result, or None to keep the image's size.
        resize: ``"stretch"`` to the size exactly, ``"crop"`` (scale the
            shorter side, then centre-crop) or ``"pad"`` (scale the longer
            side, then letterbox on black).

    Returns:
        uint8 array of shape (H, W, channels).
    """
    check_channels(channels)
    check_resize(resize)
    img = _to_8bit(img, channels)
    if size is not None:
        img = resize_image(img, size, resize)
    arr = np.array(img)  # a writable copy (np.asarray of a PIL image is read-only)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """Return ``img`` in mode L (channels=1) or RGB (channels=3)."""
    want = "L" if channels == 1 else "RGB"
    mode = img.mode
    if mode == want:
        if "transparency" not in img.info:
            return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        img = Image.fromarray(_scale_to_uint8(np.asarray(img)), "L")
    elif mode in _ALPHA_MODES or "transparency" in img.info:
        img = _flatten_alpha(img)
    elif mode == "1":
        img = img.convert("L")
    elif mode not in ("L", "RGB"):
        try:
            img = img.convert(want if mode == "P" else "RGB")
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot convert an image of mode {mode!r} to {want}: {exc}") from None
    return img if img.mode == want else img.convert(want)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with transparency on a white background."""
    gray = img.mode in ("LA", "La", "L")
    with_alpha = "LA" if gray else "RGBA"
    if img.mode != with_alpha:
        img = img.convert(with_alpha)
    arr = np.asarray(img).astype(np.uint16)
    color, alpha = arr[..., :-1], arr[..., -1:]
    out = (color * alpha + _WHITE * (255 - alpha) + 127) // 255
    out = out.astype(np.uint8)
    return Image.fromarray(out[..., 0], "L") if gray else Image.fromarray(out, "RGB")


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16-bit, 32-bit or float array to uint8 by its bit depth."""
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:  # not a [0, 1] image: use its own range
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    wide = arr.astype(np.int64)
    lo, hi = int(wide.min(initial=0)), int(wide.max(initial=0))
    if arr.dtype.itemsize == 2 or (lo >= 0 and hi <= 0xFFFF):
        return ((wide * 255 + 0x7FFF) // 0xFFFF).astype(np.uint8)
    # Signed or wider than 16 bits: no fixed depth to trust, use the range.
    span = max(hi - lo, 1)
    return ((wide - lo) * 255 // span).astype(np.uint8)


def resize_image(img: Image.Image, size: tuple[int, int], resize: str = "stretch") -> Image.Image:
    """Resize an L or RGB image to (height, width) by ``resize`` (see :func:`to_array`)."""
    check_resize(resize)
    th, tw = size
    if th < 1 or tw < 1:
        raise ConfigError(f"image size must be positive, got {th}x{tw}")
    w, h = img.size
    if (h, w) == (th, tw):
        return img
    if resize == "stretch":
        return _resample(img, (tw, th), None)
    if resize == "crop":
        scale = max(th / h, tw / w)
        crop_w, crop_h = tw / scale, th / scale  # source region with the target's aspect
        left, top = (w - crop_w) / 2, (h - crop_h) / 2
        return _resample(img, (tw, th), (left, top, left + crop_w, top + crop_h))
    scale = min(th / h, tw / w)
    new_w, new_h = max(1, min(tw, round(w * scale))), max(1, min(th, round(h * scale)))
    canvas = Image.new(img.mode, (tw, th), 0)
    canvas.paste(_resample(img, (new_w, new_h), None), ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def _resample(img: Image.Image, size_wh: tuple[int, int], box) -> Image.Image:
    src_w, src_h = (img.width, img.height) if box is None else (box[2] - box[0], box[3] - box[1])
    if size_wh[0] < src_w or size_wh[1] < src_h:
        # PIL's bilinear filter widens with the scale (antialiased); the
        # reducing gap first shrinks by whole factors, which is much faster.
        return img.resize(size_wh, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return img.resize(size_wh, Image.Resampling.BICUBIC, box=box)
