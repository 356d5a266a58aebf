"""Tests for batch augmentation on the training device (imgcls.data.augment)."""

import pytest
import torch
import torch.nn.functional as F

from imgcls.data.augment import (
    AUGMENT_NAMES,
    Augment,
    Cutout,
    HFlip,
    Translate,
    affine_warp,
    build_augment,
    cut_holes,
    resize_batch,
    shift_batch,
)
from imgcls.errors import ConfigError

FULL_SPEC = ["hflip", "rotate:20", "zoom:0.2", "crop:4", "cutout:8"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 16, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=_gen(seed))


def _marker_batch(n: int, h: int, w: int, row: int, col: int) -> torch.Tensor:
    """Zero images (N, 1, H, W) with a single 1 at (row, col)."""
    x = torch.zeros(n, 1, h, w)
    x[:, :, row, col] = 1.0
    return x


# -- the whole pipeline --------------------------------------------------------


@pytest.mark.parametrize("spec", [["hflip"], ["rotate"], ["zoom"], ["translate"], ["crop"], ["cutout"], FULL_SPEC])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_kept_and_input_untouched(spec, dtype):
    x = _batch().to(dtype)
    before = x.clone()
    out = build_augment(spec, (32, 32))(x, _gen(1))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()


def test_same_seed_repeats_and_other_seed_differs():
    augment = build_augment(FULL_SPEC, (32, 32))
    x = _batch()
    a, b, c = augment(x, _gen(7)), augment(x, _gen(7)), augment(x, _gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_order_is_fixed_whatever_the_spec_order():
    x = _batch()
    a = build_augment("cutout:6, crop:3, hflip", (32, 32))(x, _gen(3))
    b = build_augment(["hflip", "crop:3", "cutout:6"], (32, 32))(x, _gen(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("reflect", [True, False])
def test_fused_flip_and_shift_equals_steps_run_one_by_one(reflect):
    x = _batch(n=64).contiguous(memory_format=torch.channels_last)
    name = "crop" if reflect else "translate"
    fused = build_augment(["hflip", f"{name}:3", "cutout:5"], (32, 32))
    assert len(fused) == 2  # flip and shift became one step
    apart = Augment([HFlip(0.5), Translate(3, reflect=reflect), Cutout(5)], (32, 32))
    assert fused.names == apart.names and fused.spec() == apart.spec()
    assert torch.equal(fused(x, _gen(4)), apart(x, _gen(4)))


def test_no_augmentation_returns_input():
    x = _batch()
    for spec in (None, [], "none", "", ["none"], "hflip:0", "rotate:0,zoom:0", "cutout:0,crop:0"):
        augment = build_augment(spec, (32, 32))
        assert augment.names == () and len(augment) == 0
        assert augment(x, _gen(0)) is x
    assert str(build_augment(None, (32, 32))) == "Augment(none)"


def test_channels_last_gives_same_values_and_keeps_format():
    augment = build_augment(FULL_SPEC, (32, 32))
    x = _batch()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out, out_cl = augment(x, _gen(5)), augment(x_cl, _gen(5))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous()
    torch.testing.assert_close(out_cl, out)


def test_wrong_image_size_or_dtype_is_refused():
    augment = build_augment(["hflip"], (32, 32))
    with pytest.raises(ValueError, match="32"):
        augment(_batch(h=28, w=28), _gen(0))
    with pytest.raises(ValueError, match="float"):
        augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), _gen(0))


# -- flip ------------------------------------------------------------------------


def test_hflip_p1_is_flip_and_default_flips_about_half():
    x = _batch(n=400)
    assert torch.equal(build_augment("hflip:1", (32, 32))(x, _gen(0)), x.flip(-1))
    out = build_augment("hflip", (32, 32))(x, _gen(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)  # each image is either flipped or untouched
    assert 140 < int(flipped.sum()) < 260  # p = 0.5 of 400 images


# -- rotate and zoom -------------------------------------------------------------


def test_rotate_90_moves_marked_pixel_counter_clockwise():
    x = _marker_batch(1, 8, 8, row=1, col=6)  # near the top-right corner
    out = affine_warp(x, torch.tensor([90.0]), torch.tensor([1.0]))
    # Counter-clockwise on screen: top-right goes to top-left, (r, c) -> (W-1-c, r).
    assert out[0, 0, 1, 1] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_rotate_180_on_non_square_image_is_double_flip():
    x = _batch(n=2, h=12, w=20)
    out = affine_warp(x, torch.tensor([180.0, -180.0]), torch.ones(2))
    torch.testing.assert_close(out, x.flip(-1).flip(-2), atol=1e-4, rtol=0)


def test_zero_angle_unit_scale_is_identity_and_zoom_in_enlarges():
    x = _batch(n=2)
    torch.testing.assert_close(affine_warp(x, torch.zeros(2), torch.ones(2)), x, atol=1e-5, rtol=0)
    # A centred 2x2 square of ones grows to about 4x4 when zoomed in by 2.
    sq = torch.zeros(1, 1, 16, 16)
    sq[..., 7:9, 7:9] = 1.0
    out = affine_warp(sq, torch.zeros(1), torch.tensor([2.0]))
    assert out.sum() == pytest.approx(16.0, rel=0.05)


def test_random_rotation_stays_within_range():
    # A point 10 px right of centre moves along a circle; at most 15 degrees up or down.
    x = _marker_batch(64, 33, 33, row=16, col=26)
    out = build_augment("rotate:15", (33, 33))(x, _gen(0))
    rows = out[:, 0].sum(2).argmax(1).float()  # row holding most of the marker, per image
    assert (rows - 16).abs().max() <= 10 * torch.sin(torch.deg2rad(torch.tensor(15.0))) + 1
    assert (rows != 16).any()


# -- translate and crop ----------------------------------------------------------


@pytest.mark.parametrize("name", ["translate", "crop"])
def test_shift_moves_marker_by_at_most_max(name):
    x = _marker_batch(128, 32, 32, row=16, col=16)
    out = build_augment(f"{name}:4", (32, 32))(x, _gen(2))
    assert torch.all((out == 1).flatten(1).sum(1) == 1)  # the marker survives once per image
    where = (out[:, 0] == 1).nonzero()[:, 1:]  # (N, 2) row, col
    assert (where - 16).abs().max() <= 4
    assert len(torch.unique(where, dim=0)) > 20  # many different shifts were drawn


def test_shift_batch_matches_pad_then_slice():
    x = _batch(n=10, h=9, w=11)
    dy = torch.tensor([-3, -2, -1, 0, 1, 2, 3, 3, -3, 0])
    dx = torch.tensor([3, -3, 0, 2, -1, 1, -2, 3, -3, 0])
    for reflect in (True, False):
        padded = F.pad(x, (3, 3, 3, 3), mode="reflect" if reflect else "constant")
        want = torch.stack([padded[i, :, 3 - dy[i]:12 - dy[i], 3 - dx[i]:14 - dx[i]] for i in range(10)])
        assert torch.equal(shift_batch(x, dy, dx, reflect), want)


def test_crop_fills_with_reflection_translate_with_zero():
    x = torch.rand(64, 3, 32, 32) + 1.0  # no zero anywhere
    assert (build_augment("crop:4", (32, 32))(x, _gen(0)) != 0).all()
    assert (build_augment("translate:4", (32, 32))(x, _gen(0)) == 0).any()


# -- cutout ----------------------------------------------------------------------


def test_cut_holes_zeroes_exact_square_inside_and_clips_at_border():
    x = torch.ones(3, 2, 16, 16)
    out = cut_holes(x, torch.tensor([4, -3, 13]), torch.tensor([5, -3, 10]), size=6)
    zeros = (out == 0).flatten(1).sum(1)
    assert zeros.tolist() == [6 * 6 * 2, 3 * 3 * 2, 3 * 6 * 2]  # times 2 channels
    assert (out[0, :, 4:10, 5:11] == 0).all()


def test_random_cutout_zeroes_at_most_one_square_per_image():
    x = torch.ones(256, 3, 32, 32)
    out = build_augment("cutout", (32, 32))(x, _gen(0))  # default: 8 px on 32x32
    zeros = (out[:, 0] == 0).flatten(1).sum(1)
    assert zeros.max() == 64 and zeros.min() > 0
    assert (zeros == 64).float().mean() > 0.4  # the holes fully inside
    assert torch.equal(out[:, 0], out[:, 2])  # the same hole in every channel
    hole = out[:, 0] == 0
    rows, cols = hole.any(2).sum(1), hole.any(1).sum(1)
    assert torch.equal(rows * cols, zeros)  # each hole is one rectangle


# -- parsing the spec ------------------------------------------------------------


def test_spec_forms_and_names():
    augment = build_augment(" crop:4,hflip , cutout:0.25,zoom,rotate ", (32, 32))
    assert isinstance(augment, Augment)
    assert augment.names == ("hflip", "rotate", "zoom", "crop", "cutout")
    assert augment.spec() == ["hflip:0.5", "rotate:15", "zoom:0.1", "crop:4", "cutout:8"]
    assert build_augment(augment.spec(), (32, 32)).spec() == augment.spec()
    text = str(augment)
    for word in ("hflip", "rotate", "15", "zoom", "crop", "4px", "cutout", "8px"):
        assert word in text
    assert set(AUGMENT_NAMES) == {"hflip", "altflip", "rotate", "zoom", "translate", "crop", "jitter", "cutout"}


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_augment(["hflip", "mixup"], (32, 32))
    message = str(err.value)
    assert "mixup" in message
    for name in AUGMENT_NAMES:
        assert name in message


@pytest.mark.parametrize(
    "spec, words",
    [
        ("rotate:200", ["rotate", "200", "[0, 180]"]),
        ("rotate:-5", ["rotate", "-5", "[0, 180]"]),
        ("hflip:1.5", ["hflip", "[0, 1]"]),
        ("zoom:abc", ["zoom", "abc"]),
        ("translate:2.5", ["translate", "integer"]),
        ("crop:-1", ["crop", "-1"]),
        ("crop:32", ["crop", "[0, 31]"]),
        ("cutout:40", ["cutout", "40", "[0, 32]"]),
        ("cutout:nan", ["cutout", "nan"]),
        ("hflip,hflip", ["hflip", "twice"]),
        ("translate,crop", ["translate", "crop"]),
    ],
)
def test_bad_values_name_the_value_and_range(spec, words):
    with pytest.raises(ConfigError) as err:
        build_augment(spec, (32, 32))
    for word in words:
        assert word in str(err.value)


# -- CUDA ------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_same_seed():
    augment = build_augment(FULL_SPEC, (32, 32))
    x = _batch(n=64)
    cpu = augment(x, _gen(11))
    for fmt in (torch.contiguous_format, torch.channels_last):
        gpu = augment(x.cuda().contiguous(memory_format=fmt), _gen(11))
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_altflip_mirrors_exactly_the_images_it_is_told_to_and_refuses_hflip_beside_it():
    from imgcls.data.augment import build_augment

    x = torch.randn(6, 3, 8, 8)
    flip = torch.tensor([True, False, True, False, False, True])
    for spec in ("altflip", "altflip,crop:2"):
        aug = build_augment(spec, (8, 8))
        assert aug.alternating_flip and aug.spec()[0] == "altflip"
        if spec == "altflip":
            out = aug(x, torch.Generator().manual_seed(0), flip)
            expected = torch.where(flip[:, None, None, None], x.flip(-1), x)
            assert torch.equal(out, expected)
        else:  # the fused flip + crop flips the same images as flipping first, then cropping
            a = aug(x, torch.Generator().manual_seed(1), flip)
            b = build_augment("crop:2", (8, 8))(torch.where(flip[:, None, None, None], x.flip(-1), x),
                                                 torch.Generator().manual_seed(1))
            assert torch.equal(a, b)
    assert not build_augment("hflip", (8, 8)).alternating_flip
    with pytest.raises(ConfigError, match="not both"):
        build_augment("hflip,altflip", (8, 8))


def test_resize_batch_shrinks_in_the_same_memory_format_and_keeps_a_flat_colour():
    x = torch.zeros(4, 3, 32, 32)
    x[:, 0], x[:, 1], x[:, 2] = 0.5, -1.0, 2.0  # a flat colour per channel
    x[1, :, :16] = 3.0  # one image: top half bright
    x = x.contiguous(memory_format=torch.channels_last)
    out = resize_batch(x, (24, 24))
    assert out.shape == (4, 3, 24, 24) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.5, -1.0, 2.0]), atol=1e-5)
    assert torch.allclose(out[0], out[0, :, :1, :1].expand(3, 24, 24), atol=1e-5)
    assert torch.allclose(out[1, :, :11], torch.tensor(3.0), atol=1e-5)  # the bright half stays the top half
    assert torch.allclose(out[1, 0, 13:], torch.tensor(0.5), atol=1e-5)
    assert resize_batch(x, (32, 32)) is x


@pytest.mark.parametrize("shape,size", [((5, 3, 32, 32), (24, 24)), ((2, 1, 28, 20), (21, 15)), ((3, 3, 9, 12), (16, 8))])
@pytest.mark.parametrize("channels_last", [True, False])
def test_resize_batch_is_torchs_antialiased_bilinear_resize(shape, size, channels_last):
    # Two matrix products stand in for F.interpolate(antialias=True): the same images, shrunk or grown.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    got = resize_batch(x, size)
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_jitter_changes_contrast_and_brightness_per_image_within_its_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    augment = build_augment("jitter:0.3", (16, 16))
    assert augment.names == ("jitter",) and augment.spec() == ["jitter:0.3"]
    out = augment(x, gen)
    mean_in, mean_out = x.mean((2, 3)), out.mean((2, 3))
    centred_in, centred_out = x - x.mean((2, 3), keepdim=True), out - out.mean((2, 3), keepdim=True)
    contrast = (centred_out.flatten(1) * centred_in.flatten(1)).sum(1) / centred_in.flatten(1).square().sum(1)
    shift = mean_out - mean_in  # the same for every channel of an image
    assert torch.allclose(centred_out, centred_in * contrast.view(-1, 1, 1, 1), atol=1e-5)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-5)
    assert contrast.min() >= 0.7 - 1e-5 and contrast.max() <= 1.3 + 1e-5 and contrast.std() > 0.1
    assert shift.abs().max() <= 0.3 + 1e-5 and shift.std() > 0.05
    assert torch.equal(augment(x, torch.Generator().manual_seed(0)), out)  # seeded


def test_jitter_runs_before_cutout_so_the_holes_stay_the_mean_colour():
    x = torch.randn(8, 3, 16, 16)
    augment = build_augment(["cutout:6", "jitter:0.5"], (16, 16))
    assert augment.names == ("jitter", "cutout")
    out = augment(x, torch.Generator().manual_seed(1))
    assert ((out == 0).flatten(1).sum(1) >= 9 * 3).all()  # every image has a zeroed hole (at least 3x3 inside)
