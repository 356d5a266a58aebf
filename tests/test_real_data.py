"""Accuracy floors on the real MNIST and CIFAR-10 zips in ../shared/data (skipped when absent)."""

from pathlib import Path

import pytest

import imgcls
from imgcls.config import DataConfig
from imgcls.data import registry

pytestmark = pytest.mark.slow
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_zip(name: str) -> Path:
    """Path of a real dataset zip in ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not present (real datasets live in ../shared/data beside the checkout)")
    return path


def test_seed_mnist_model_one_epoch_on_the_mnist_zip(tmp_path):
    path = shared_zip("mnist-png.zip")
    run = imgcls.train(data=str(path), model="seed_mnist_oneconv", optimizer="sgd", lr=0.01, momentum=0.9,
                       batch_size=32, epochs=1, out=str(tmp_path), name="mnist", quiet=True, report=False)
    assert run.test_metrics["n"] == 10_000
    assert run.test_metrics["accuracy"] >= 0.97


def test_cifar10_zip_decodes_once_then_comes_from_the_cache(tmp_path, monkeypatch):
    path = shared_zip("cifar10-jpg.zip")
    first = registry.build_dataset(DataConfig(dataset=str(path)))
    assert [len(s) for s in first.splits.values()] == [45_000, 5_000, 10_000]
    assert first.classes[:3] == ["airplane", "automobile", "bird"] and first.image_shape == (3, 32, 32)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load decoded the zip again")

    monkeypatch.setattr(registry, "load_folder", no_decoding)  # what build_dataset calls
    second = registry.build_dataset(DataConfig(dataset=str(path)))
    assert (second.splits["train"].images == first.splits["train"].images).all()


def test_seed_tf_tutorial_one_epoch_on_the_cifar10_zip(tmp_path):
    path = shared_zip("cifar10-jpg.zip")
    run = imgcls.train(data=str(path), model="seed_tf_tutorial", epochs=1, batch_size=64,
                       out=str(tmp_path), name="cifar", quiet=True, report=False)
    assert run.test_metrics["accuracy"] >= 0.45


def test_flowers_zip_with_no_flags_gets_pretrained_transfer_and_beats_random_weights(tmp_path):
    """The own-photos default on the real flowers.zip: the layout found, the auto choice, an accuracy floor.

    EfficientNet-Lite2's ImageNet features, pooled from stage 2 to the head and with the flip chosen on val,
    score 77.9% here (seed 0, 430 test images; the head convolution alone of Lite0, the default before, 75.1%);
    the same network with random weights gives the classifier nothing to work with, which shows the weights are
    real and mapped right.
    """
    path = shared_zip("flowers.zip")
    run = imgcls.train(data=str(path), out=str(tmp_path), name="flowers", quiet=True, report=False)
    cfg = run.config
    assert cfg.model.name == "efficientnet_lite2" and cfg.model.pretrained == "imagenet" and cfg.train.head_first
    assert cfg.model.options["head_stages"] == 7 and cfg.train.tta == "auto"
    assert "4,317 photos" in cfg.auto
    record = __import__("json").loads((run.path / "dataset.json").read_text())
    assert record["layout"].startswith("one folder per class (5 classes, 4,317 images) under flowers/")
    assert run.test_metrics["n"] == 430
    assert run.test_metrics["accuracy"] >= 0.77

    from imgcls.inference import resolve_runtime
    from imgcls.models import create_model
    from imgcls.models.pretrained import HALF_NORMALIZE
    from imgcls.training.transfer import (
        FeatureRunner,
        compute_features,
        fit_linear_head,
    )

    ds = registry.build_dataset(cfg.data, seed=0)
    random_model = create_model(cfg.model.name, 3, 5, (128, 128), **cfg.model.options)
    runner = FeatureRunner.create(random_model, resolve_runtime("cpu", "fp32", "on"), (128, 128), HALF_NORMALIZE,
                                  images=10_000)
    train, val, test = (ds.splits[s] for s in ("train", "val", "test"))
    head = fit_linear_head(compute_features(runner, train.images), train.labels, 5,
                           compute_features(runner, val.images), val.labels)
    logits = compute_features(runner, test.images) @ head.weight.numpy().T + head.bias.numpy()
    random_accuracy = float((logits.argmax(1) == test.labels).mean())
    assert random_accuracy <= run.test_metrics["accuracy"] - 0.2
