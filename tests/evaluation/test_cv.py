"""Stratified k-fold cross-validation on the built-in digits."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from imgcls.api import cross_validate, make_config
from imgcls.data.registry import build_dataset
from imgcls.errors import ConfigError
from imgcls.evaluation.cv import (
    METRICS,
    format_cv,
    load_folds,
    make_folds,
    pool_splits,
)

TINY = {"model_option": {"widths": [8, 16, 16]}, "epochs": 2, "lr": 0.003}


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    cfg = make_config(**TINY, seed=3)
    result = cross_validate(cfg, 3, console=Console(quiet=True), out_dir=out / "digits-cv")
    return cfg, result


def test_folds_partition_the_pooled_images_and_are_stratified(cv):
    cfg, result = cv
    ds = build_dataset(cfg.data, seed=cfg.train.seed)
    pooled = pool_splits(ds)
    assert result["pooled_images"] == len(pooled) == len(ds.splits["train"]) + len(ds.splits["val"])
    assert result["test_split_images"] == len(ds.splits["test"])
    folds = load_folds(result["path"])
    assert len(folds) == 3
    held = np.concatenate([f["test"] for f in folds])
    # Every pooled image is held out exactly once.
    assert np.array_equal(np.sort(held), np.arange(len(pooled)))
    counts = []
    for f in folds:
        trained_on = np.concatenate([f["train"], f["val"]])
        assert len(np.intersect1d(trained_on, f["test"])) == 0
        assert len(trained_on) + len(f["test"]) == len(pooled)
        assert len(np.unique(trained_on)) == len(trained_on)
        counts.append(np.bincount(pooled.labels[f["test"]], minlength=ds.num_classes))
    counts = np.array(counts)  # (folds, classes)
    assert (counts.max(0) - counts.min(0)).max() <= 1
    # Each fold's run folder trained and tested on exactly those splits.
    for i, f in enumerate(folds, start=1):
        record = json.loads((Path(result["path"]) / f"fold-{i}" / "dataset.json").read_text())
        for name in ("train", "val", "test"):
            assert record["splits"][name]["per_class"] == np.bincount(
                pooled.labels[f[name]], minlength=ds.num_classes).tolist()


def test_summary_matches_the_folds_and_their_run_folders(cv):
    _, result = cv
    folder = Path(result["path"])
    assert [f["fold"] for f in result["per_fold"]] == [1, 2, 3]
    for m in METRICS:
        values = [f[m] for f in result["per_fold"]]
        assert result["mean"][m] == pytest.approx(np.mean(values))
        assert result["std"][m] == pytest.approx(np.std(values))
    for f in result["per_fold"]:
        run_json = json.loads((folder / f["run"] / "run.json").read_text())
        eval_test = json.loads((folder / f["run"] / "eval_test.json").read_text())
        assert f["accuracy"] == run_json["test_accuracy"] == eval_test["accuracy"]
        assert f["macro_f1"] == run_json["test_macro_f1"]
        assert f["weighted_f1"] == eval_test["weighted_avg"]["f1"]
        assert f["held_out_images"] == eval_test["n"]
        assert f["epochs"] == 2
        # A tiny model after 2 epochs is well above chance (0.1) on every fold (0.77 to 0.88 measured).
        assert f["accuracy"] > 0.6


def test_cv_files_are_written(cv):
    _, result = cv
    folder = Path(result["path"])
    assert json.loads((folder / "cv.json").read_text())["mean"] == result["mean"]
    rows = list(csv.DictReader((folder / "cv.csv").read_text().splitlines()))
    assert [r["fold"] for r in rows] == ["1", "2", "3", "mean", "std"]
    assert float(rows[3]["accuracy"]) == pytest.approx(result["mean"]["accuracy"])
    page = (folder / "report.html").read_text()
    assert page.count("<img") == 1 and "mean ± std" in page
    assert (folder / "cv_folds.png").is_file()
    text = format_cv(result)
    assert len(text.splitlines()) == 2 + 3 + 1 and "±" in text


def test_fold_counts_out_of_range_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"from 2 to .* got 1"):
        cross_validate(make_config(**TINY), 1, console=Console(quiet=True), out_dir=tmp_path / "cv")
    labels = np.array([0] * 5 + [1] * 3)
    with pytest.raises(ConfigError, match=r"from 2 to 3 .* got 4"):
        make_folds(labels, 4, seed=0)
    assert not (tmp_path / "cv").exists()


def test_folds_partition_the_images_each_class_spread_evenly():
    """Classes of 7, 12 and 3 images in 3 folds: every image held out once, a class's count per fold within one
    of its others, the folds' sizes within one; in a process of its own, without importing scikit-learn."""
    labels = np.array([0] * 7 + [1] * 12 + [2] * 3)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    parts = make_folds(labels, 3, seed=4)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    for c in range(3):
        counts = [int((labels[p] == c).sum()) for p in parts]
        assert max(counts) - min(counts) <= 1, (c, counts)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1, sizes
    code = ("import sys, numpy as np; from imgcls.evaluation.cv import make_folds; "
            "make_folds(np.repeat(np.arange(3), 5), 5, 0); print('sklearn' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_folds_are_seeded():
    labels = np.repeat(np.arange(4), 10)
    a, b, c = make_folds(labels, 5, 0), make_folds(labels, 5, 0), make_folds(labels, 5, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_a_fold_run_folder_rebuilds_its_own_splits(cv):
    import json

    import imgcls

    _, result = cv
    fold_dir = Path(result["path"]) / "fold-2"
    clf = imgcls.load(fold_dir)
    ds = clf.dataset()
    held_out = json.loads((fold_dir / "eval_test.json").read_text())["n"]
    assert len(ds.splits["test"]) == held_out
    # Evaluating the fold's model on the rebuilt split gives exactly the figures fit reported.
    metrics = clf.evaluate()
    assert metrics["accuracy"] == result["per_fold"][1]["accuracy"]
