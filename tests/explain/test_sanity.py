"""Unit tests of the deletion metric, the randomisation check and the pattern data, on hand-made models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from patterns import PATTERN_SIZE, make_pattern_dataset
from torch import nn

from imgcls.errors import ConfigError
from imgcls.explain.sanity import (
    deletion_auc,
    deletion_curve,
    edge_map,
    peak_in_box,
    random_deletion_auc,
    randomisation_check,
    randomise_weights,
    score_methods,
    spearman_per_image,
)
from imgcls.models import create_model

SIDE = 16  # pixels
REGION = (slice(4, 12), slice(2, 10))  # the 8x8 region the hand-made model reads


class RegionModel(nn.Module):
    """Two logits: ``gain`` times the mean of ``REGION`` (all channels), and 0."""

    def __init__(self, gain: float = 2.0):
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = self.gain * x[:, :, REGION[0], REGION[1]].mean((1, 2, 3))
        return torch.stack([evidence, torch.zeros_like(evidence)], 1)


def _region_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise with the region raised to +2: class 0 is likely; plus the perfect map (the region mask)."""
    gen = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(n, 3, SIDE, SIDE, generator=gen)
    x[:, :, REGION[0], REGION[1]] += 2.0
    mask = torch.zeros(n, SIDE, SIDE)
    mask[:, REGION[0], REGION[1]] = 1.0
    return x, torch.zeros(n, dtype=torch.long), mask


def test_deletion_curve_starts_at_the_unmodified_probability():
    model, (x, y, mask) = RegionModel(), _region_batch()
    curve = deletion_curve(model, x, y, mask, steps=8)
    assert curve.shape == (len(x), 9)
    expected = F.softmax(model(x), 1)[:, 0].double().numpy()
    np.testing.assert_allclose(curve[:, 0], expected, rtol=1e-6)
    # Everything removed: the region is all baseline (0), both logits 0.
    np.testing.assert_allclose(curve[:, -1], 0.5, rtol=1e-6)


def test_perfect_map_deletes_faster_than_random_order():
    model, (x, y, mask) = RegionModel(), _region_batch()
    curve = deletion_curve(model, x, y, mask, steps=8)
    # The region is 64 of 256 pixels: two chunks of 32 remove it all.
    np.testing.assert_allclose(curve[:, 2:], 0.5, rtol=1e-6)
    assert np.all(np.diff(curve, axis=1) <= 1e-9)
    perfect = deletion_auc(curve)
    random = random_deletion_auc(model, x, y, steps=8, seed=0)
    inverted = deletion_auc(deletion_curve(model, x, y, 1.0 - mask, steps=8))
    assert np.all(perfect < random - 0.05)
    assert np.all(random < inverted)


def test_deletion_auc_is_the_area_over_the_fraction_removed():
    np.testing.assert_allclose(deletion_auc(np.full((2, 11), 0.3)), [0.3, 0.3])
    np.testing.assert_allclose(deletion_auc(np.linspace(1, 0, 21)[None]), [0.5])


def test_random_deletion_is_seeded():
    model, (x, y, _) = RegionModel(), _region_batch()
    a = random_deletion_auc(model, x, y, steps=8, seed=3)
    np.testing.assert_array_equal(a, random_deletion_auc(model, x, y, steps=8, seed=3))
    assert not np.array_equal(a, random_deletion_auc(model, x, y, steps=8, seed=4))


def test_deletion_curve_keeps_the_model_mode_and_rejects_bad_maps():
    model, (x, y, mask) = RegionModel(), _region_batch()
    model.train()
    deletion_curve(model, x, y, mask, steps=4)
    assert model.training
    with pytest.raises(ConfigError, match="maps must have shape"):
        deletion_curve(model, x, y, mask[:, :8], steps=4)
    with pytest.raises(ConfigError, match="steps"):
        deletion_curve(model, x, y, mask, steps=0)


def _small_cnn() -> nn.Module:
    # Not seed 0: randomise_weights(seed=0) would redraw an untrained model's own linear layer.
    torch.manual_seed(100)
    return create_model("resnet8", in_chans=3, num_classes=3, img_size=(SIDE, SIDE), width=0.5)


def test_randomisation_leaves_the_original_model_unchanged():
    model = _small_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    clone = randomise_weights(model, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's random stream is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    # Every conv and linear weight of the copy is new.
    for name, param in clone.named_parameters():
        if param.ndim > 1:
            assert not torch.equal(param, before[name]), name
    x = torch.randn(4, 3, SIDE, SIDE)
    check = randomisation_check(model, x, torch.zeros(4, dtype=torch.long), "saliency")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(check) == {"correlations", "mean", "threshold", "passed"}


def test_randomisation_is_seeded():
    model = _small_cnn()
    a, b, c = (randomise_weights(model, seed=s) for s in (1, 1, 2))
    w = "features.stem.conv.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_spearman_handles_constant_maps():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(4, 5, 5, generator=gen)
    b = a.clone()
    b[1] = -a[1]  # reversed ranking
    b[2] = 0.0  # constant (Grad-CAM with everything below zero)
    a[3] = 7.0
    rho = spearman_per_image(a, b)
    assert not np.isnan(rho).any()
    np.testing.assert_allclose(rho, [1.0, -1.0, 0.0, 0.0], atol=1e-12)


def test_randomisation_check_flags_a_weight_independent_map():
    model = _small_cnn()
    x = torch.randn(4, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    check = randomisation_check(model, x, torch.zeros(4, dtype=torch.long), edge_map)
    np.testing.assert_allclose(check["correlations"], 1.0)
    assert not check["passed"]


def test_score_methods_reports_every_method():
    model = _small_cnn()
    x = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    rows = score_methods(model.eval(), x, torch.tensor([0, 1, 2]), methods=("gradcam", "saliency", edge_map), steps=4)
    assert [r["method"] for r in rows] == ["gradcam", "saliency", "edge_map"]
    for row in rows:
        assert set(row) == {"method", "deletion_auc", "random_deletion_auc", "randomisation_correlation",
                            "passed", "seconds"}
        assert 0.0 <= row["deletion_auc"] <= 1.0 and row["seconds"] >= 0.0
    assert rows[-1]["passed"] is False


def test_pattern_dataset_puts_the_class_shape_in_its_box():
    images, labels, boxes = make_pattern_dataset(40, size=32, seed=5)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(labels) <= {0, 1, 2, 3}
    assert np.all(boxes[:, 2] - boxes[:, 0] == PATTERN_SIZE) and np.all(boxes[:, 3] - boxes[:, 1] == PATTERN_SIZE)
    assert boxes.min() >= 0 and boxes.max() <= 32
    again = make_pattern_dataset(40, size=32, seed=5)
    assert np.array_equal(images, again[0]) and np.array_equal(labels, again[1])
    # The shape is bright (170..255 in every channel) against noise around 110.
    for image, (top, left, bottom, right) in zip(images, boxes):
        assert (image[top:bottom, left:right].min(-1) >= 170).sum() >= 12
    with pytest.raises(ConfigError, match="num_classes"):
        make_pattern_dataset(4, num_classes=5)


def test_peak_in_box_allows_the_margin():
    maps = torch.zeros(3, 10, 10)
    maps[0, 4, 4] = 1.0  # inside
    maps[1, 1, 4] = 1.0  # one pixel above the box
    maps[2, 9, 9] = 1.0  # far away
    boxes = np.array([[2, 2, 6, 6]] * 3)
    assert peak_in_box(maps, boxes, margin=0).tolist() == [True, False, False]
    assert peak_in_box(maps, boxes, margin=1).tolist() == [True, True, False]
