"""Layer-wise linear probes on a small pattern dataset the tests make themselves.

Each 1x16x16 image holds one of three patterns (horizontal stripes, vertical
stripes, a checkerboard), each 2-pixel-periodic with a random phase, at low
contrast under heavy Gaussian noise.  A few hundred Adam steps teach a small
fastnet to tell them apart; the same architecture with random weights should
decode them clearly worse from its last stage.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgcls.data.base import Split
from imgcls.errors import ConfigError
from imgcls.evaluation.probes import (
    format_probes,
    probe_layers,
    stage_features,
    stratified_subsample,
)
from imgcls.inference import (
    channel_stats,
    normalization_tensors,
    resolve_runtime,
    to_input,
)
from imgcls.models import create_model

SIDE = 16  # pixels
NUM_CLASSES = 3
WIDTHS = [16, 32, 32]  # channels of fastnet_small's three blocks
CONTRAST = 40  # grey levels between a pattern's dark and light pixels
NOISE = 60  # grey levels, standard deviation of the added noise
TRAIN_STEPS = 200  # Adam steps of 64 images
RUNTIME = resolve_runtime("cpu", "fp32", "off")


def make_patterns(n: int, seed: int) -> Split:
    """Balanced classes: 0 horizontal stripes, 1 vertical stripes, 2 checkerboard."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    phase = rng.integers(0, 4, size=(n, 1, 1))
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    rows, cols = (yy + phase) // 2 % 2, (xx + phase) // 2 % 2
    checker = (yy // 2 + xx // 2 + phase) % 2
    lab = labels[:, None, None]
    pattern = np.where(lab == 0, rows, np.where(lab == 1, cols, checker))
    pixels = 128 + CONTRAST * (pattern - 0.5) + rng.normal(0, NOISE, size=(n, SIDE, SIDE))
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[..., None]
    return Split(images, labels)


def build_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("fastnet_small", in_chans=1, num_classes=NUM_CLASSES, img_size=(SIDE, SIDE),
                        widths=WIDTHS)


def train_briefly(model: torch.nn.Module, split: Split, norm: dict) -> torch.nn.Module:
    mean, std = normalization_tensors(norm, RUNTIME.device)
    x = to_input(torch.from_numpy(split.images), mean, std, channels_last=False)
    y = torch.from_numpy(split.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(TRAIN_STEPS):
        index = torch.randint(0, len(x), (64,), generator=generator)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    train, held_out = make_patterns(1200, seed=1), make_patterns(600, seed=2)
    return train, held_out, {"normalize": channel_stats(train.images)}


@pytest.fixture(scope="module")
def trained(one_thread, data):
    train, _, meta = data
    return train_briefly(build_model(seed=0), train, meta["normalize"])


@pytest.fixture(scope="module")
def probes(trained, data):
    train, held_out, meta = data
    trained_rows = probe_layers(trained, meta, train, held_out, RUNTIME)
    random_rows = probe_layers(build_model(seed=0), meta, train, held_out, RUNTIME)
    return trained_rows, random_rows


def assert_no_hooks(model):
    for name in model.stages:
        assert len(model.get_submodule(name)._forward_hooks) == 0, name


def test_trained_last_stage_beats_random_weights(probes):
    trained_rows, random_rows = probes
    trained_acc, random_acc = trained_rows[-1]["accuracy"], random_rows[-1]["accuracy"]
    print(f"\nlast-stage probe: trained {trained_acc:.4f}, random weights {random_acc:.4f}")
    print(format_probes(trained_rows))
    print(format_probes(random_rows))
    # Measured: trained 0.93, random 0.53, chance 0.33.
    assert trained_acc >= 0.8
    assert trained_acc >= random_acc + 0.2


def test_rows_follow_stages_and_are_accuracies(probes, trained):
    for rows in probes:
        assert [r["stage"] for r in rows] == list(trained.stages)
        assert [r["channels"] for r in rows] == [2 * 1 * 4] + WIDTHS  # stem: 2 * in_chans * 2x2
        for r in rows:
            assert 0.0 <= r["accuracy"] <= 1.0
            assert 0.0 <= r["cumulative_accuracy"] <= 1.0
            assert r["chance"] == pytest.approx(1 / 3)
        assert rows[0]["cumulative_accuracy"] == rows[0]["accuracy"]
        # All stages together carry at least what the best single stage does.
        assert rows[-1]["cumulative_accuracy"] >= max(r["accuracy"] for r in rows) - 0.05


def test_hooks_removed_after_probing(probes, trained):
    assert_no_hooks(trained)


def test_hooks_removed_when_forward_fails(trained):
    three_channels = np.zeros((4, SIDE, SIDE, 3), np.uint8)  # the model takes one channel
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(RuntimeError):
        stage_features(trained, three_channels, norm, RUNTIME)
    assert_no_hooks(trained)


def test_probes_are_scored_on_held_out_images(trained, data):
    train, held_out, meta = data
    # Labels unrelated to the images: a probe scored where it was fitted would
    # look good; scored on these it can do no better than guessing.
    rng = np.random.default_rng(3)
    shuffled = Split(held_out.images, rng.permutation(held_out.labels))
    rows = probe_layers(trained, meta, train, shuffled, RUNTIME, max_train=600, max_eval=600)
    assert rows[-1]["accuracy"] < 0.45


def test_subsample_sizes_and_chance(trained, data):
    train, held_out, meta = data
    # A held-out split where class 0 is 60% of the images.
    keep = np.concatenate([np.flatnonzero(held_out.labels == 0)[:150],
                           np.flatnonzero(held_out.labels == 1)[:50],
                           np.flatnonzero(held_out.labels == 2)[:50]])
    rows = probe_layers(trained, meta, train, held_out.subset(keep), RUNTIME,
                        max_train=300, max_eval=100, seed=5)
    assert rows[0]["chance"] == pytest.approx(0.6)


def test_stratified_subsample_keeps_proportions():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    index = stratified_subsample(labels, 100, seed=0)
    assert len(index) == len(set(index)) == 100
    assert np.bincount(labels[index]).tolist() == [60, 30, 10]
    assert np.array_equal(index, stratified_subsample(labels, 100, seed=0))
    assert not np.array_equal(index, stratified_subsample(labels, 100, seed=1))
    assert np.array_equal(stratified_subsample(labels, 5000), np.arange(1000))


def test_stage_features_shapes(trained, data):
    _, held_out, meta = data
    features = stage_features(trained, held_out.images[:37], meta["normalize"], RUNTIME, batch_size=16)
    assert list(features) == list(trained.stages)
    for name, channels in zip(trained.stages, [8] + WIDTHS):
        assert features[name].shape == (37, channels)
        assert features[name].dtype == np.float32
        assert np.isfinite(features[name]).all()
    last = stage_features(trained, held_out.images[:37], meta["normalize"], RUNTIME,
                          stages=[trained.stages[-1]])
    # Batching does not change the result.
    np.testing.assert_allclose(last[trained.stages[-1]], features[trained.stages[-1]], rtol=1e-4, atol=1e-5)
    assert_no_hooks(trained)


def test_unknown_stage_is_named(trained, data):
    _, held_out, meta = data
    with pytest.raises(ConfigError, match="features.block9"):
        stage_features(trained, held_out.images[:2], meta["normalize"], RUNTIME, stages=["features.block9"])


def test_table(probes):
    rows = probes[0]
    text = format_probes(rows)
    for r in rows:
        assert r["stage"] in text
    assert f"{rows[-1]['cumulative_accuracy']:.4f}" in text
