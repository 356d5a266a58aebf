"""Uploads, from bytes to pixels: each file read up to the byte limit, its header checked against the pixel limit,
then decoded by its content (whatever its name says) with the functions that read training data.

Every bad upload is a :class:`~imgcls.serving.errors.ServingError` that names the file: 413 for too many bytes or
pixels, 400 for what is not an image, is damaged, or has a colour mode the model cannot take.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import numpy as np
from fastapi import UploadFile
from PIL import Image

from imgcls.data.images import (
    BadImageError,
    NotAnImageError,
    TooManyPixelsError,
    decode_image,
    open_image,
    to_array,
)
from imgcls.serving.errors import ServingError

if TYPE_CHECKING:
    from imgcls.serving.state import ServingState

log = logging.getLogger("imgcls.serving")

READ_CHUNK = 1 << 20  # bytes read from an upload at a time
ACCEPTED_FORMATS = "PNG, JPEG, GIF, BMP, WebP or TIFF"  # named in error messages; Pillow reads a few more


def describe_bytes(n: int) -> str:
    """A byte count as a person reads it: "3,000 bytes", "10 MB (10,000,000 bytes)"."""
    if n < 1_000_000:
        return f"{n:,} bytes"
    return f"{round(n / 1_000_000, 1):g} MB ({n:,} bytes)"


async def read_upload(upload: UploadFile, max_bytes: int, name: str) -> bytes:
    """The upload's content; 413 as soon as more than ``max_bytes`` have been read."""
    chunks, total = [], 0
    while True:
        chunk = await upload.read(min(READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise ServingError(413, "file_too_large", f"{name} is larger than the server's limit of "
                               f"{describe_bytes(max_bytes)} per file; send a smaller file")
        chunks.append(chunk)
    return b"".join(chunks)


def damaged_image(name: str, reason: BaseException | str) -> ServingError:
    """The 400 for a file that starts like an image but cannot be decoded; the decoder's own words go to the
    server log, not to the person who sent it (they name Python classes and byte offsets)."""
    log.info("%s cannot be decoded: %s", name, reason)
    return ServingError(400, "bad_image", f"{name} could not be read as an image: it is damaged or cut short; "
                        f"send a complete {ACCEPTED_FORMATS} file")


def check_pixels(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse an image whose header announces more than ``max_pixels`` (413), before decoding it."""
    limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, Image.MAX_IMAGE_PIXELS)
    try:
        with open_image(data, name) as img:  # reads the header only
            width, height = img.size
    except TooManyPixelsError:
        raise ServingError(413, "too_many_pixels", f"{name} has more pixels than the server's limit of "
                           f"{limit:,} pixels; send a smaller image") from None
    except NotAnImageError:
        raise ServingError(400, "not_an_image", f"{name} is not an image in a format the server reads; "
                           f"send a {ACCEPTED_FORMATS} file") from None
    except Exception as exc:  # noqa: BLE001 - BadImageError, or the size of a damaged header failing
        raise damaged_image(name, exc) from None
    if width * height > limit:
        raise ServingError(413, "too_many_pixels", f"{name} is {width}x{height}, that is {width * height:,} pixels, "
                           f"more than the server's limit of {limit:,} pixels; send a smaller image")


def decode_upload(data: bytes, name: str, input_shape, resize: str, max_pixels: int) -> np.ndarray:
    """uint8 (H, W, C) at the model's input size from an upload's bytes; ServingError for bad input."""
    c, h, w = input_shape
    check_pixels(data, name, max_pixels)
    try:
        img = decode_image(data, name, target=(h, w), resize=resize)
    except BadImageError as exc:  # check_pixels has answered unknown formats and too many pixels already
        raise damaged_image(name, exc) from None
    try:
        return to_array(img, c, (h, w), resize)
    except Exception as exc:  # noqa: BLE001 - a decoded but odd image (mode, depth) is still the client's input
        log.info("%s (mode %s) cannot be converted to the model's input: %s", name, img.mode, exc)
        raise ServingError(400, "bad_image", f"{name} is an image whose colour mode ({img.mode}) the model cannot "
                           f"take; send it as an ordinary RGB or greyscale {ACCEPTED_FORMATS} file") from None


async def decode_uploads(state: ServingState, uploads: list[UploadFile]) -> tuple[list[str], np.ndarray]:
    """Names and uint8 (N, H, W, C) images of the uploads; the first bad one fails the request.

    One file at a time, each decoded in a worker thread: a request holds at most one
    full-size decoded image (up to ``max_pixels``) in memory, whatever its number of files.
    """
    names = [u.filename or f"file {i + 1}" for i, u in enumerate(uploads)]
    resize = state.clf.meta.get("resize", "stretch")
    images = []
    for upload, name in zip(uploads, names):
        data = await read_upload(upload, state.max_bytes, name)
        images.append(await asyncio.to_thread(decode_upload, data, name, state.clf.input_shape, resize,
                                              state.max_pixels))
    return names, np.stack(images)
