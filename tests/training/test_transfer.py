"""Transfer learning's tensor parts: the linear head's fit, frozen features through ONNX Runtime, their cache,
and the parameter groups of fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgcls.config import TrainConfig
from imgcls.inference import resolve_runtime
from imgcls.models import create_model
from imgcls.models.pretrained import load_weights
from imgcls.tensorfile import load_checked
from imgcls.training import transfer
from imgcls.training.optim import LRSchedule, build_optimizer, param_groups
from imgcls.training.transfer import (
    FEATURE_BATCH,
    L2_GRID,
    FeatureRunner,
    FeatureStore,
    cached_features,
    compute_features,
    fit_linear_head,
    fit_stage_head,
)

SIDE = 64  # pixels
# Not the weights' own (0.5, 0.5): a per-channel normalisation shows whether each channel gets its own.
NORM = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}


# ----------------------------------------------------------------------------
# fit_linear_head


def _blobs(rng, n_per_class: int, centres: np.ndarray, spread: float, offset: float = 5.0, scale: float = 3.0):
    """Gaussian blobs around ``centres`` (K, F), shifted and scaled away from zero mean and unit variance,
    as raw backbone features are."""
    k, f = centres.shape
    y = np.repeat(np.arange(k), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), f))
    return (offset + scale * x).astype(np.float32), y


def _logits(fit, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x) @ fit.weight.T + fit.bias


def test_the_head_separates_separable_features_and_its_weights_apply_to_raw_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16)) * 3
    x_train, y_train = _blobs(rng, 40, centres, 1.0)
    x_val, y_val = _blobs(rng, 20, centres, 1.0)
    fit = fit_linear_head(x_train, y_train, 3, x_val, y_val)
    assert fit.weight.shape == (3, 16) and fit.bias.shape == (3,)
    assert fit.val_accuracy >= 0.95 and fit.train_accuracy >= 0.95
    assert fit.l2 in fit.tried and fit.l2 in L2_GRID


def test_the_reported_metrics_are_those_of_the_returned_weight_and_bias_on_raw_features():
    # Overlapping classes, so that the accuracies are not 1 and a wrongly folded scaling shows.
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (3, 8))
    x_train, y_train = _blobs(rng, 40, centres, 1.0)
    x_val, y_val = _blobs(rng, 30, centres, 1.0)
    fit = fit_linear_head(x_train, y_train, 3, x_val, y_val)
    assert 0.4 < fit.val_accuracy < 1.0 and 0.4 < fit.train_accuracy < 1.0
    train_logits, val_logits = _logits(fit, x_train), _logits(fit, x_val)
    assert (train_logits.argmax(1).numpy() == y_train).mean() == pytest.approx(fit.train_accuracy, abs=1e-6)
    assert (val_logits.argmax(1).numpy() == y_val).mean() == pytest.approx(fit.val_accuracy, abs=1e-6)
    assert F.cross_entropy(train_logits, torch.from_numpy(y_train)).item() == pytest.approx(fit.train_loss, abs=1e-5)
    assert F.cross_entropy(val_logits, torch.from_numpy(y_val)).item() == pytest.approx(fit.val_loss, abs=1e-5)
    # The search records the val loss of the chosen strength (rounded to 5 decimals).
    assert fit.tried[fit.l2] == pytest.approx(fit.val_loss, abs=1e-4)


def _label_matrix(rng, n: int, f: int = 12):
    """Features of images carrying any of 3 labels at once: label j adds its own direction, rare label 2
    (a fifth of the images) included; returns (features, 0/1 labels (n, 3))."""
    y = (rng.random((n, 3)) < [0.5, 0.4, 0.2]).astype(np.uint8)
    directions = np.eye(3, f) * 4.0
    x = y @ directions + rng.normal(0, 1.0, (n, f))
    return (5.0 + 3.0 * x).astype(np.float32), y


def test_with_several_labels_per_image_the_head_is_one_vs_rest_logistic_regression():
    rng = np.random.default_rng(3)
    (x, y), (xv, yv) = _label_matrix(rng, 300), _label_matrix(rng, 150)
    fit = fit_linear_head(x, y, 3, xv, yv)
    logits = _logits(fit, xv)
    exact = ((logits > 0).numpy() == (yv > 0)).all(1).mean()
    assert fit.val_accuracy == pytest.approx(exact, abs=1e-6) and exact >= 0.85  # exact sets at one half
    bce = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(yv).float())
    assert fit.val_loss == pytest.approx(bce.item(), abs=1e-5)
    # every label learned on its own: the rare one too
    for j in range(3):
        assert ((logits[:, j] > 0).numpy() == (yv[:, j] > 0)).mean() >= 0.9
    # the positives' weight per label moves the decisions towards the positives
    weighted = fit_linear_head(x, y, 3, xv, yv, class_weights=torch.tensor([1.0, 1.0, 8.0]))
    assert (_logits(weighted, xv)[:, 2] > 0).sum() > (logits[:, 2] > 0).sum()
    choice = fit_stage_head(x, y, 3, (4, 8), xv, yv)  # and over several stages' features
    assert choice.fit.weight.shape == (3, 12) and choice.fit.val_accuracy >= 0.8


def test_the_l2_search_stops_after_two_worse_strengths_and_keeps_the_best():
    # Random labels on many noise features: the weaker the L2, the more the head overfits, so the val
    # loss rises from the strongest strength on.
    rng = np.random.default_rng(2)
    x_train = rng.normal(0, 1, (60, 50)).astype(np.float32)
    y_train = rng.integers(0, 3, 60)
    x_val = rng.normal(0, 1, (60, 50)).astype(np.float32)
    y_val = rng.integers(0, 3, 60)
    fit = fit_linear_head(x_train, y_train, 3, x_val, y_val)
    tried = list(fit.tried)
    assert len(tried) < len(L2_GRID)
    assert tried == list(L2_GRID[:len(tried)])  # strongest first, in the grid's order
    best = min(fit.tried, key=fit.tried.get)
    assert fit.l2 == best
    after = tried[tried.index(best) + 1:]
    assert len(after) == 2 and all(fit.tried[l2] > fit.tried[best] for l2 in after)


def test_the_l2_search_picks_an_inner_minimum_given_its_own_grid():
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1, (3, 8))
    x_train, y_train = _blobs(rng, 40, centres, 1.0)
    x_val, y_val = _blobs(rng, 30, centres, 1.0)
    grid = (1e-5, 10.0, 1.0, 0.1, 1e-3)  # given in any order: tried strongest first
    fit = fit_linear_head(x_train, y_train, 3, x_val, y_val, grid=grid)
    assert list(fit.tried)[:2] == [10.0, 1.0]
    assert fit.l2 == min(fit.tried, key=fit.tried.get)
    assert fit.val_loss == pytest.approx(fit.tried[fit.l2], abs=1e-4)


def _inner_minimum_problem():
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1, (3, 8))
    return _blobs(rng, 40, centres, 1.0), _blobs(rng, 30, centres, 1.0)


@pytest.mark.parametrize("start", ["best", 0.3, 1e-4])
def test_a_search_started_at_a_strength_walks_to_the_same_minimum_as_the_full_search(start):
    (x, y), (xv, yv) = _inner_minimum_problem()
    full = fit_linear_head(x, y, 3, xv, yv)
    walked = fit_linear_head(x, y, 3, xv, yv, start=full.l2 if start == "best" else start)
    assert walked.l2 == full.l2 and walked.val_loss == pytest.approx(full.val_loss, abs=1e-3)
    if start == "best":  # the start, then one strength each way, both worse
        assert next(iter(walked.tried)) == full.l2 and len(walked.tried) == 3 < len(full.tried)
        assert all(loss > walked.tried[full.l2] for loss in list(walked.tried.values())[1:])


def test_a_fit_started_from_a_head_of_fewer_classes_ends_where_one_from_zero_does():
    (x, y), (xv, yv) = _inner_minimum_problem()
    y, yv = np.where(y == 2, 3, y), np.where(yv == 2, 3, yv)  # a fourth class, after a third with no image
    old = fit_linear_head(x[y < 2], y[y < 2], 2, grid=(0.01,))  # a head of the first two classes
    cold = fit_linear_head(x, y, 4, xv, yv, grid=(0.01,))
    warm = fit_linear_head(x, y, 4, xv, yv, grid=(0.01,), init=(old.weight, old.bias))
    assert warm.val_loss == pytest.approx(cold.val_loss, abs=1e-3)
    # The biases are free to shift together (the L2 penalty is on the weight alone): compare probabilities.
    np.testing.assert_allclose(torch.softmax(_logits(warm, xv), 1).numpy(), torch.softmax(_logits(cold, xv), 1).numpy(),
                               atol=0.01)
    with pytest.raises(ValueError, match="a head of shape \\(2, 8\\) cannot start a fit of 1 classes"):
        fit_linear_head(x, y, 1, init=(old.weight, old.bias))


def test_a_small_head_fit_runs_in_one_thread_and_gives_the_threads_back(monkeypatch):
    (x, y), (xv, yv) = _inner_minimum_problem()
    seen = []
    lbfgs = transfer._lbfgs
    monkeypatch.setattr(transfer, "_lbfgs", lambda *a: (seen.append(torch.get_num_threads()), lbfgs(*a)))
    threads = torch.get_num_threads()
    fit_linear_head(x, y, 3, xv, yv, grid=(0.01,))
    assert seen == [1] and torch.get_num_threads() == threads
    monkeypatch.setattr(transfer, "ONE_THREAD_MACS", 0)  # every fit counts as large
    fit_linear_head(x, y, 3, xv, yv, grid=(0.01,))
    assert seen == [1, threads]


def test_stage_head_keeps_the_reading_it_is_given_and_starts_from_its_columns_of_the_init():
    rng = np.random.default_rng(6)
    centres = rng.normal(0, 1, (3, 12))
    x, y = _blobs(rng, 40, centres, 1.0)
    xv, yv = _blobs(rng, 30, centres, 1.0)
    every = fit_stage_head(x, y, 3, (4, 8), xv, yv)
    last = fit_stage_head(x, y, 3, (4, 8), xv, yv, stages=1, init=(every.fit.weight, every.fit.bias))
    assert last.stages == 1 and list(last.tried) == [1]
    assert torch.all(last.fit.weight[:, :4] == 0)
    alone = fit_stage_head(x, y, 3, (4, 8), xv, yv, stages=1)  # from zero: the same fit (the loss is convex)
    assert last.fit.l2 == alone.fit.l2 and last.fit.val_loss == pytest.approx(alone.fit.val_loss, abs=1e-3)
    with pytest.raises(ValueError, match="stages 3 is not a reading of 2 stages"):
        fit_stage_head(x, y, 3, (4, 8), xv, yv, stages=3)


@pytest.mark.parametrize("val", [None, "empty"])
def test_without_val_the_head_is_fitted_once_at_the_middle_of_the_grid(val):
    rng = np.random.default_rng(4)
    centres = rng.normal(0, 1, (3, 8)) * 3
    x_train, y_train = _blobs(rng, 30, centres, 1.0)
    x_val = None if val is None else np.zeros((0, 8), np.float32)
    y_val = None if val is None else np.zeros(0, np.int64)
    fit = fit_linear_head(x_train, y_train, 3, x_val, y_val)
    assert list(fit.tried) == [L2_GRID[len(L2_GRID) // 2]] == [fit.l2]
    assert fit.val_loss is None and fit.val_accuracy is None
    assert fit.tried[fit.l2] == pytest.approx(fit.train_loss, abs=1e-4)  # scored on train without val
    assert fit.train_accuracy >= 0.95


# ----------------------------------------------------------------------------
# FeatureRunner, compute_features and cached_features


# ----------------------------------------------------------------------------
# fit_stage_head: the classifier over several stages' pooled features, or the last alone


def _stage_blobs(rng, n_per_class: int, informative: str, noise_width: int = 0):
    """Features of two 'stages' of 8 and 16 columns, 3 classes; the class shows only in the ``informative`` one
    (``early`` or ``last``), the other is noise (``noise_width`` columns of it in place of the first stage's 8)."""
    y = np.repeat(np.arange(3), n_per_class)
    centres = np.eye(3, 8) * 4 if informative == "early" else np.eye(3, 16) * 4
    signal = centres[y] + rng.normal(0, 1, (len(y), centres.shape[1]))
    noise = rng.normal(0, 1, (len(y), 16 if informative == "early" else noise_width or 8))
    x = np.concatenate([signal, noise] if informative == "early" else [noise, signal], 1)
    return (2.0 + 3.0 * x).astype(np.float32), y


def test_stage_head_reads_every_stage_when_only_an_early_one_tells_the_classes():
    rng = np.random.default_rng(0)
    (x, y), (xv, yv) = _stage_blobs(rng, 40, "early"), _stage_blobs(rng, 20, "early")
    choice = fit_stage_head(x, y, 3, (8, 16), xv, yv)
    assert choice.stages == 2 and set(choice.tried) == {1, 2} and choice.tried[2] < choice.tried[1]
    assert choice.fit.weight.shape == (3, 24) and choice.fit.val_accuracy >= 0.95
    assert choice.fit.weight[:, :8].abs().sum() > 0


def test_stage_head_keeps_the_last_stage_alone_when_val_clearly_prefers_it_and_zeroes_the_rest():
    rng = np.random.default_rng(1)  # 128 columns of noise before the last stage: reading them overfits
    (x, y), (xv, yv) = _stage_blobs(rng, 12, "last", 128), _stage_blobs(rng, 40, "last", 128)
    choice = fit_stage_head(x, y, 3, (128, 16), xv, yv)
    assert choice.tried[1] < choice.tried[2] / 3 and choice.stages == 1
    assert torch.count_nonzero(choice.fit.weight[:, :128]) == 0 and choice.fit.weight.shape == (3, 144)
    logits = torch.from_numpy(xv) @ choice.fit.weight.T + choice.fit.bias  # applies to every column as they are
    assert (logits.argmax(1).numpy() == yv).mean() == pytest.approx(choice.fit.val_accuracy)


def test_stage_head_reads_every_stage_when_the_last_wins_on_val_by_less_than_the_noise():
    rng = np.random.default_rng(0)
    (x, y), (xv, yv) = _stage_blobs(rng, 12, "last"), _stage_blobs(rng, 40, "last")
    choice = fit_stage_head(x, y, 3, (8, 16), xv, yv)
    assert choice.tried[1] < choice.tried[2] and choice.stages == 2  # lower, within 2 standard errors
    assert fit_stage_head(x, y, 3, (8, 16), xv, yv, margin=0.0).stages == 1  # the lower loss alone


def test_stage_head_without_val_reads_every_stage_and_refuses_features_of_another_width():
    rng = np.random.default_rng(2)
    x, y = _stage_blobs(rng, 10, "early")
    choice = fit_stage_head(x, y, 3, (8, 16))
    assert choice.stages == 2 and list(choice.tried) == [2]
    with pytest.raises(ValueError, match="24 features given for stages of 20 channels"):
        fit_stage_head(x, y, 3, (8, 12))


@pytest.fixture(scope="module")
def backbone(data_dir_env):
    """EfficientNet-Lite0 at 64x64 with its ImageNet weights.

    Weights rather than a random initialisation: a freshly initialised Lite0's pooled features are about
    1e-9 (its activations shrink through the 16 blocks), so any two runtimes would agree to 1e-4.
    """
    model = create_model("efficientnet_lite0", in_chans=3, num_classes=3, img_size=(SIDE, SIDE))
    load_weights(model, "imagenet")
    return model.eval()


@pytest.fixture(scope="module")
def runner(backbone):
    return FeatureRunner.create(backbone, resolve_runtime("cpu", "fp32", "off"), (SIDE, SIDE), NORM)


@pytest.fixture(scope="module")
def images():
    # More than one batch of the frozen pass, and not a whole number of them.
    return np.random.default_rng(5).integers(0, 256, (FEATURE_BATCH + 6, SIDE, SIDE, 3), dtype=np.uint8)


def _eager_features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    mean, std = torch.tensor(NORM["mean"]), torch.tensor(NORM["std"])
    x = ((torch.from_numpy(np.ascontiguousarray(images)).float() / 255 - mean) / std).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.eval().forward_features(x).mean((2, 3)).numpy()


def test_onnx_runtime_features_equal_pytorch_eager(backbone, runner, images):
    assert runner.name == "onnxruntime fp32" and runner.session is not None
    expected = _eager_features(backbone, images)
    assert expected.shape == (len(images), backbone.num_features) and expected.std() > 0.1  # not vanishing
    got = compute_features(runner, images)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_the_hflip_view_is_the_features_of_the_mirrored_images(backbone, runner, images):
    flipped = compute_features(runner, images, "hflip")
    np.testing.assert_allclose(flipped, _eager_features(backbone, images[:, :, ::-1]), rtol=0, atol=1e-4)
    assert np.abs(flipped - compute_features(runner, images)).max() > 0.1  # the view changed something


def test_pytorch_eager_is_the_fallback_when_the_export_fails(backbone, images, monkeypatch):
    monkeypatch.setattr(transfer, "_ort_session", lambda module, size, *kept: None)
    eager = FeatureRunner.create(backbone, resolve_runtime("cpu", "fp32", "off"), (SIDE, SIDE), NORM)
    assert eager.session is None and eager.name == "torch fp32"
    np.testing.assert_allclose(compute_features(eager, images[:5]), _eager_features(backbone, images[:5]),
                               rtol=0, atol=1e-5)


def test_a_lazy_runner_exports_at_its_first_call_and_files_features_under_the_runtime_that_computed_them(
        backbone, images, tmp_path, monkeypatch):
    exports = []
    session = transfer._ort_session
    monkeypatch.setattr(transfer, "_ort_session",
                        lambda module, size, *kept: (exports.append(size), session(module, size))[1])
    lazy = FeatureRunner.create(backbone, resolve_runtime("cpu", "fp32", "off"), (SIDE, SIDE), NORM, lazy=True)
    assert exports == [] and lazy.name == "onnxruntime fp32" and lazy.session is None
    cache = tmp_path / "features"
    cached_features(lazy, images[:4], "none", cache, "backbone-a")
    assert exports == [(SIDE, SIDE)] and lazy.session is not None
    again = FeatureRunner.create(backbone, resolve_runtime("cpu", "fp32", "off"), (SIDE, SIDE), NORM, lazy=True)
    assert cached_features(again, images[:4], "none", cache, "backbone-a")[1] and exports == [(SIDE, SIDE)]
    # An export that fails at the first call: PyTorch computes, and the features are filed under its name.
    monkeypatch.setattr(transfer, "_ort_session", lambda module, size, *kept: None)
    failing = FeatureRunner.create(backbone, resolve_runtime("cpu", "fp32", "off"), (SIDE, SIDE), NORM, lazy=True)
    cached_features(failing, images[4:8], "none", cache, "backbone-a")
    assert failing.name == "torch fp32"
    eager = FeatureRunner.create(backbone, resolve_runtime("cpu", "fp32", "off"), (SIDE, SIDE), NORM)
    assert eager.name == "torch fp32" and cached_features(eager, images[4:8], "none", cache, "backbone-a")[1]


def test_an_exported_graph_is_kept_read_back_checked_and_serves_fewer_images(backbone, images, tmp_path,
                                                                             monkeypatch):
    graphs, cpu = tmp_path / "graphs", resolve_runtime("cpu", "fp32", "off")
    first = FeatureRunner.create(backbone, cpu, (SIDE, SIDE), NORM, graphs=graphs)
    assert first.name == "onnxruntime fp32" and len(list(graphs.glob("*.safetensors"))) == 1
    expected = compute_features(first, images[:6])
    real_export = torch.onnx.export

    def no_export(*args, **kwargs):
        raise AssertionError("exported a graph that was kept")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    # Kept: read back, and ONNX Runtime serves a run too small to pay for an export.
    few = transfer.ORT_CACHED_MIN_IMAGES
    again = FeatureRunner.create(backbone, cpu, (SIDE, SIDE), NORM, few, graphs=graphs)
    assert again.name == "onnxruntime fp32" and again.session is not None
    np.testing.assert_array_equal(compute_features(again, images[:6]), expected)
    assert FeatureRunner.create(backbone, cpu, (SIDE, SIDE), NORM, few - 1, graphs=graphs).name == "torch fp32"
    assert FeatureRunner.create(backbone, cpu, (SIDE, SIDE), NORM, few).name == "torch fp32"  # no folder given
    # A damaged graph fails its checksum: it is removed and the graph exported again.
    kept = next(graphs.glob("*.safetensors"))
    data = bytearray(kept.read_bytes())
    data[len(data) // 2] ^= 0xFF
    kept.write_bytes(bytes(data))
    monkeypatch.setattr(torch.onnx, "export", real_export)
    fresh = FeatureRunner.create(backbone, cpu, (SIDE, SIDE), NORM, graphs=graphs)
    np.testing.assert_array_equal(compute_features(fresh, images[:6]), expected)
    assert [p.read_bytes() for p in graphs.glob("*.safetensors")] != [bytes(data)]
    # Another size is another graph.
    FeatureRunner.create(backbone, cpu, (SIDE + 8, SIDE + 8), NORM, graphs=graphs)
    assert len(list(graphs.glob("*.safetensors"))) == 2


def test_few_images_go_through_pytorch_without_an_export(backbone, images, monkeypatch):
    def no_export(module, size, *kept):
        raise AssertionError("exported a graph for fewer than ORT_MIN_IMAGES images")

    monkeypatch.setattr(transfer, "_ort_session", no_export)
    small = FeatureRunner.create(backbone, resolve_runtime("cpu", "fp32", "off"), (SIDE, SIDE), NORM,
                                 transfer.ORT_MIN_IMAGES - 1)
    assert small.session is None and small.name == "torch fp32"
    np.testing.assert_allclose(compute_features(small, images[:3]), _eager_features(backbone, images[:3]),
                               rtol=0, atol=1e-5)


def test_no_images_give_no_features(runner, images):
    assert compute_features(runner, images[:0]).shape == (0, 1280)


def test_cached_features_are_read_back_and_a_damaged_file_is_computed_again(runner, images, tmp_path):
    cache = tmp_path / "features"
    notes = []
    first, hit = cached_features(runner, images, "none", cache, "backbone-a", notes.append)
    assert not hit
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    again, hit = cached_features(runner, images, "none", cache, "backbone-a", notes.append)
    assert hit and np.array_equal(again, first) and notes == []

    # Flip the last bytes of the tensor data (the header comes first): the checksum no longer matches.
    data = bytearray(files[0].read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])
    files[0].write_bytes(bytes(data))
    redone, hit = cached_features(runner, images, "none", cache, "backbone-a", notes.append)
    assert not hit
    assert len(notes) == 1 and notes[0].startswith(f"note: cached features {files[0]} were computed again")
    assert "does not match its checksum" in notes[0]
    np.testing.assert_allclose(redone, first, rtol=0, atol=1e-6)
    tensors, meta = load_checked(files[0])  # rewritten, and good
    assert np.array_equal(tensors["features"].numpy(), redone) and meta["view"] == "none"
    assert cached_features(runner, images, "none", cache, "backbone-a", notes.append)[1]
    assert len(notes) == 1


def test_features_of_other_images_copied_under_a_key_are_computed_again(runner, images, tmp_path):
    cache = tmp_path / "features"
    notes = []
    mine, _ = cached_features(runner, images[:8], "none", cache, "backbone-a", notes.append)
    cached_features(runner, images[8:16], "none", cache, "backbone-a", notes.append)
    (a, b) = sorted(cache.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    b.replace(a)  # another dataset's features, checksum and all, under the first key
    again, hit = cached_features(runner, images[:8], "none", cache, "backbone-a", notes.append)
    assert not hit and np.allclose(again, mine, atol=1e-6)
    assert len(notes) == 1 and "computed for other images or another backbone" in notes[0]


def test_the_cache_key_holds_the_view_and_the_backbone(runner, images, tmp_path):
    cache = tmp_path / "features"
    plain, _ = cached_features(runner, images, "none", cache, "backbone-a")
    flipped, hit = cached_features(runner, images, "hflip", cache, "backbone-a")
    assert not hit and not np.allclose(flipped, plain)
    _, hit = cached_features(runner, images, "none", cache, "backbone-b")
    assert not hit
    _, hit = cached_features(runner, images[:10], "none", cache, "backbone-a")  # other images
    assert not hit
    assert len(list(cache.iterdir())) == 4


def test_without_a_cache_dir_nothing_is_written(runner, images, tmp_path, monkeypatch):
    def no_writes(*args, **kwargs):
        raise AssertionError("cached_features wrote a file with cache_dir=None")

    monkeypatch.setattr(transfer, "save_checked", no_writes)
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    features, hit = cached_features(runner, images[:4], "none", None, "backbone-a")
    assert not hit and features.shape == (4, 1280)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_written_is_said_and_the_features_still_returned(runner, images, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    notes = []
    features, hit = cached_features(runner, images[:4], "none", blocked, "backbone-a", notes.append)
    assert not hit and features.shape == (4, 1280)
    assert len(notes) == 1 and notes[0].startswith(f"note: the features could not be cached in {blocked}")


def test_a_store_with_blocks_finds_the_old_blocks_cached_and_passes_only_the_new_one(runner, images, tmp_path,
                                                                                      monkeypatch):
    cache = tmp_path / "features"
    old = FeatureStore(runner, cache, "backbone-a", blocks={})
    first, hit = old.features("train", images[:40])
    assert not hit and old.computed == 40
    seen = []
    compute = transfer.compute_features
    monkeypatch.setattr(transfer, "compute_features", lambda r, x, view="none": (seen.append(len(x)),
                                                                                 compute(r, x, view))[1])
    new = FeatureStore(runner, cache, "backbone-a", blocks={"train": [40]})
    both, hit = new.features("train", images)
    assert not hit and seen == [len(images) - 40] and new.computed == len(images) - 40
    assert np.array_equal(both[:40], first)
    np.testing.assert_allclose(both, compute_features(runner, images), rtol=0, atol=1e-5)
    assert new.features("train", images)[1] and new.features("val", images[:40])[1]  # a block as another split's
    assert seen == [len(images) - 40]


# ----------------------------------------------------------------------------
# param_groups for fine-tuning


def test_backbone_lr_scale_puts_every_backbone_parameter_in_a_group_of_its_own():
    model = create_model("efficientnet_lite0", in_chans=3, num_classes=3, img_size=(SIDE, SIDE))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, TrainConfig(backbone_lr_scale=0.1))
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    backbone = {names[id(p)] for p in groups[0]["params"]}
    classifier = {names[id(p)] for p in groups[1]["params"]}
    assert classifier == {"head.fc.weight", "head.fc.bias"}
    assert backbone == set(names.values()) - classifier
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)  # each parameter once
    # The schedule sets each group's learning rate from its scale.
    t = TrainConfig(backbone_lr_scale=0.1, lr=1e-3)
    optimizer = build_optimizer(groups, t)
    LRSchedule(t, 10).apply(optimizer, 0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    # Without the scale, one group holds everything.
    plain = param_groups(model, TrainConfig())
    assert len(plain) == 1 and len(plain[0]["params"]) == len(names)
