"""Decoding one image and converting every PIL mode to uint8 L or RGB."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imgcls.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    decode_image,
    decode_jpeg_array,
    decode_png_array,
    is_grayscale_mode,
    to_array,
)
from imgcls.errors import ConfigError, DataError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def roundtrip(img: Image.Image, fmt: str = "PNG", **kwargs) -> Image.Image:
    return decode_image(encode(img, fmt, **kwargs), f"test.{fmt.lower()}")


def test_extensions_cover_common_formats():
    for ext in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".ico"):
        assert ext in IMAGE_EXTENSIONS


def test_rgb_png_is_exact():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    arr = to_array(roundtrip(Image.fromarray(pixels)), 3, None)
    assert arr.dtype == np.uint8 and arr.shape == (5, 7, 3)
    np.testing.assert_array_equal(arr, pixels)


def test_gray_to_one_or_three_channels():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    img = roundtrip(Image.fromarray(pixels, "L"))
    np.testing.assert_array_equal(to_array(img, 1, None)[..., 0], pixels)
    three = to_array(img, 3, None)
    assert three.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(three[..., c], pixels)


def test_rgb_to_gray_uses_luma():
    arr = to_array(Image.new("RGB", (2, 2), GREEN), 1, None)
    assert arr.shape == (2, 2, 1) and arr[0, 0, 0] == 150  # 0.587 * 255


def test_rgba_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    arr = to_array(roundtrip(img), 3, None)
    assert tuple(arr[0, 0]) == WHITE
    assert tuple(arr[0, 1]) == (127, 127, 127)
    assert tuple(arr[3, 3]) == RED


def test_la_transparent_pixels_become_white():
    img = Image.new("LA", (2, 2), (0, 255))
    img.putpixel((1, 1), (0, 0))
    arr = to_array(roundtrip(img), 1, None)
    assert arr[0, 0, 0] == 0 and arr[1, 1, 0] == 255


def test_palette_image():
    img = Image.new("P", (3, 1))
    img.putpalette(list(RED + GREEN + BLUE) + [0] * (253 * 3))
    img.putdata([0, 1, 2])
    arr = to_array(roundtrip(img), 3, None)
    assert [tuple(p) for p in arr[0]] == [RED, GREEN, BLUE]


def test_palette_transparency_becomes_white():
    img = Image.new("P", (2, 1))
    img.putpalette(list(RED + (0, 0, 0)) + [0] * (254 * 3))
    img.putdata([0, 1])
    decoded = roundtrip(img, transparency=1)  # palette entry 1 is transparent
    assert decoded.mode == "P" and "transparency" in decoded.info
    arr = to_array(decoded, 3, None)
    assert tuple(arr[0, 0]) == RED and tuple(arr[0, 1]) == WHITE
    gif = decode_image(encode(img, "GIF", transparency=1), "t.gif")
    assert tuple(to_array(gif, 3, None)[0, 1]) == WHITE


def test_cmyk_and_ycbcr():
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    cmyk.putpixel((1, 1), (255, 0, 0, 0))  # pure cyan ink
    arr = to_array(roundtrip(cmyk, "TIFF"), 3, None)
    assert tuple(arr[0, 0]) == WHITE and tuple(arr[1, 1]) == (0, 255, 255)
    ycbcr = Image.new("RGB", (2, 2), RED).convert("YCbCr")
    got = to_array(ycbcr, 3, None)[0, 0].astype(int)
    assert np.abs(got - RED).max() <= 3


def test_bilevel():
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    arr = to_array(roundtrip(img), 1, None)
    assert arr[0, :, 0].tolist() == [0, 255]


def test_sixteen_bit_scaled_by_bit_depth():
    pixels = np.array([[0, 32768, 65535, 255]], dtype=np.uint16)
    img = roundtrip(Image.fromarray(pixels))
    assert img.mode.startswith("I;16")
    arr = to_array(img, 1, None)[0, :, 0]
    assert arr[0] == 0 and arr[2] == 255 and abs(int(arr[1]) - 128) <= 1
    assert arr[3] == 1  # 255 of 65535 is dark, not clipped to white
    big_endian = Image.frombytes("I;16B", (4, 1), pixels.astype(">u2").tobytes())
    np.testing.assert_array_equal(to_array(big_endian, 1, None)[0, :, 0], arr)


def test_thirty_two_bit_and_float():
    as_i = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    assert to_array(as_i, 1, None)[0, :, 0].tolist() == [0, 255]
    wide = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32), "I")
    assert to_array(wide, 1, None)[0, :, 0].tolist() == [0, 127, 255]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert to_array(as_f, 3, None)[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_6_is_applied():
    # 4 wide, 2 tall, red top-left; orientation 6 means "rotate 90 degrees
    # clockwise to display": it becomes 2 wide, 4 tall, red top-right.
    img = Image.new("RGB", (4, 2), BLUE)
    img.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = to_array(roundtrip(img, "PNG", exif=exif), 3, None)
    assert arr.shape == (4, 2, 3)
    assert tuple(arr[0, 1]) == RED and tuple(arr[0, 0]) == BLUE and tuple(arr[3, 0]) == BLUE


def test_exif_orientation_in_jpeg():
    img = Image.new("RGB", (64, 32), BLUE)
    img.paste(RED, (0, 0, 16, 16))  # a red block top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = to_array(roundtrip(img, "JPEG", exif=exif, quality=95), 3, None).astype(int)
    assert arr.shape == (64, 32, 3)
    assert arr[4, 28, 0] > 200 and arr[4, 28, 2] < 60  # top-right is red
    assert arr[4, 4, 2] > 200  # top-left is blue


def test_decoded_by_content_not_extension():
    png = encode(Image.new("RGB", (3, 3), GREEN), "PNG")
    img = decode_image(png, "photo.jpg")
    assert img.format == "PNG" and tuple(to_array(img, 3, None)[1, 1]) == GREEN


def test_truncated_jpeg_is_a_bad_image():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(BadImageError, match="broken.jpg"):
        decode_image(data[: len(data) // 2], "broken.jpg")


def test_random_bytes_are_a_bad_image():
    data = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(BadImageError, match=r"noise\.png.*not a recognised image"):
        decode_image(data, "noise.png")
    assert issubclass(BadImageError, DataError)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warn_size = encode(Image.new("L", (12, 12)))  # 144 pixels: PIL only warns
    with pytest.raises(BadImageError, match="bomb.png.*limit"):
        decode_image(warn_size, "bomb.png")
    error_size = encode(Image.new("L", (30, 30)))  # 900 pixels: PIL raises
    with pytest.raises(BadImageError, match="bomb2.png.*decompression bomb"):
        decode_image(error_size, "bomb2.png")


def test_jpeg_draft_keeps_enough_resolution():
    data = encode(Image.new("RGB", (400, 200), RED), "JPEG")
    img = decode_image(data, "big.jpg", target=(32, 32), resize="stretch")
    assert img.width >= 32 and img.height >= 32 and img.width < 400
    cropped = decode_image(data, "big.jpg", target=(32, 32), resize="crop")
    assert cropped.height >= 32 and cropped.width >= 64
    assert to_array(cropped, 3, (32, 32), "crop").shape == (32, 32, 3)


def three_bands() -> Image.Image:
    """40 wide, 20 tall: red left quarter, green middle half, blue right quarter."""
    img = Image.new("RGB", (40, 20), GREEN)
    img.paste(RED, (0, 0, 10, 20))
    img.paste(BLUE, (30, 0, 40, 20))
    return img


def test_resize_stretch():
    arr = to_array(three_bands(), 3, (10, 12), "stretch")
    assert arr.shape == (10, 12, 3)
    assert arr[5, 0, 0] > 200 and arr[5, -1, 2] > 200


def test_resize_crop_keeps_the_centre():
    arr = to_array(three_bands(), 3, (20, 20), "crop")
    assert arr.shape == (20, 20, 3)
    assert (arr[..., 1] == 255).all() and (arr[..., 0] == 0).all()


def test_resize_pad_letterboxes_on_black():
    arr = to_array(three_bands(), 3, (40, 40), "pad")
    assert arr.shape == (40, 40, 3)
    assert (arr[:10] == 0).all() and (arr[30:] == 0).all()
    assert tuple(arr[20, 20]) == GREEN and tuple(arr[20, 2]) == RED


def test_size_none_keeps_size_and_bad_options_are_refused():
    assert to_array(three_bands(), 3, None).shape == (20, 40, 3)
    with pytest.raises(ConfigError, match="squash.*stretch, crop, pad"):
        to_array(three_bands(), 3, (8, 8), "squash")
    with pytest.raises(ConfigError, match="channels"):
        to_array(three_bands(), 2, None)


def test_is_grayscale_mode():
    for mode in ("L", "LA", "1", "I;16", "I", "F"):
        assert is_grayscale_mode(Image.new(mode, (1, 1)))
    for mode in ("RGB", "RGBA", "CMYK"):
        assert not is_grayscale_mode(Image.new(mode, (1, 1)))
    gray_palette = Image.new("P", (1, 1))
    gray_palette.putpalette([v for i in range(256) for v in (i, i, i)])
    assert is_grayscale_mode(gray_palette)
    colour_palette = Image.new("P", (1, 1))
    colour_palette.putpalette(list(RED) * 256)
    assert not is_grayscale_mode(colour_palette)


def _pil_way(data: bytes, channels: int) -> np.ndarray:
    return to_array(decode_image(data, "x.jpg"), channels, None)


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_plain_jpeg_shortcut_gives_the_same_pixels_as_pil(mode, channels):
    rng = np.random.default_rng(0)
    for quality, subsampling in ((75, 2), (95, 0), (50, 1)):
        pixels = rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)
        data = encode(Image.fromarray(pixels).convert(mode), "JPEG", quality=quality, subsampling=subsampling)
        for wanted in (channels, None):
            arr, gray = decode_jpeg_array(data, wanted, None)
            assert gray == (mode == "L") and arr.dtype == np.uint8 and arr.shape == (37, 29, channels)
            assert np.array_equal(arr, _pil_way(data, channels))
        assert decode_jpeg_array(data, channels, (37, 29)) is not None


def _exif_rotated(fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", (16, 12), RED), fmt, exif=exif)


def _assert_declined(decode, rgb: bytes, gray: bytes, other_format: bytes, cases: dict, monkeypatch) -> None:
    """``decode`` returns None for the shared cases and ``cases``, and for a file over PIL's pixel limit."""
    cases = {
        "another size": (rgb, 3, (32, 32)),
        "colour to gray (PIL's luma)": (rgb, 1, None),
        "gray to colour": (gray, 3, None),
        "truncated": (rgb[: len(rgb) // 2], 3, None),
        "another format": (other_format, 3, None),
        **cases,
    }
    for why, (data, channels, size) in cases.items():
        assert decode(data, channels, size) is None, why
    assert decode(rgb, 3, None) is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x12 = 192 pixels: PIL refuses it, so must this
    assert decode(rgb, 3, None) is None


def test_jpeg_shortcut_leaves_to_pil_what_it_cannot_do_the_same_way(monkeypatch):
    rgb = encode(Image.effect_noise((16, 12), 40).convert("RGB"), "JPEG")
    gray = encode(Image.effect_noise((16, 12), 40), "JPEG")
    cases = {
        "an EXIF orientation": (_exif_rotated("JPEG"), 3, None),
        "CMYK": (encode(Image.new("CMYK", (16, 12), (0, 255, 0, 0)), "JPEG"), 3, None),
    }
    _assert_declined(decode_jpeg_array, rgb, gray, encode(Image.new("RGB", (16, 12), RED), "PNG"), cases, monkeypatch)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def unfiltered_png(pixels: np.ndarray, extra: tuple[bytes, ...] = ()) -> bytes:
    """A PNG of 8-bit ``pixels`` (H, W) or (H, W, 3) whose rows are all stored unfiltered, as some writers do."""
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    rows = b"".join(b"\0" + row.tobytes() for row in pixels.reshape(h, -1))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + b"".join(extra) + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_plain_png_shortcut_gives_the_same_pixels_as_pil(mode, channels):
    rng = np.random.default_rng(1)
    for trial in range(4):
        pixels = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
        pixels[: 5 * trial] = pixels[0]  # repeated rows: PIL's encoder then picks other row filters
        img = Image.fromarray(pixels).convert(mode)
        encoded = {
            "PIL's adaptive row filters": encode(img, "PNG"),
            "PIL, optimised": encode(img, "PNG", optimize=True),
            "rows unfiltered, with text and gamma chunks": unfiltered_png(
                np.asarray(img), (_png_chunk(b"tEXt", b"Title\0x"), _png_chunk(b"gAMA", struct.pack(">I", 45455)))),
        }
        for how, data in encoded.items():
            for wanted in (channels, None):
                arr, gray = decode_png_array(data, wanted, None)
                assert gray == (mode == "L") and arr.dtype == np.uint8 and arr.shape == (23, 17, channels), how
                assert arr.flags.writeable and np.array_equal(arr, to_array(decode_image(data, "x.png"), channels, None)), how
            assert decode_png_array(data, channels, (23, 17)) is not None


def test_png_shortcut_leaves_to_pil_what_it_cannot_do_the_same_way(monkeypatch):
    pixels = np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    rgb, gray = unfiltered_png(pixels), unfiltered_png(pixels[..., 0])
    bad_crc = bytearray(rgb)
    bad_crc[-20] ^= 1  # a byte of the IDAT chunk
    cases = {
        "a palette": (encode(Image.fromarray(pixels).convert("P"), "PNG"), 3, None),
        "transparency (composited on white)": (unfiltered_png(pixels, (_png_chunk(b"tRNS", b"\0" * 6),)), 3, None),
        "an alpha channel": (encode(Image.fromarray(pixels).convert("RGBA"), "PNG"), 3, None),
        "16 bits": (encode(Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), "PNG"), 1, None),
        "an EXIF orientation": (_exif_rotated("PNG"), 3, None),
        "a damaged chunk": (bytes(bad_crc), 3, None),
    }
    _assert_declined(decode_png_array, rgb, gray, encode(Image.fromarray(pixels), "JPEG"), cases, monkeypatch)
