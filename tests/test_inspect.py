"""imgcls inspect on a small photo folder with problems planted in it: each one is found, named with the file it
pairs with, and nothing else is flagged; train --exclude leaves the listed images out; --fail-on gates CI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgcls
from imgcls.cli import main
from imgcls.data.base import ImageDataset, Split
from imgcls.data.quality import (
    COPY_CORRELATION,
    aligned_match,
    copy_pairs,
    image_measures,
    match_windows,
    pixel_digests,
    window_match,
)
from imgcls.errors import DataError
from imgcls.evaluation.labels import find_label_issues
from imgcls.inspection import Images, _outliers, likely_label_errors

CLASSES = ("stripes", "checks", "rings")
SMALL = {"model": "efficientnet_lite0", "image_size": [64, 64], "quiet": True}  # Lite0's ImageNet weights


def _photo(c: int, rng: np.random.Generator, side: int = 72) -> np.ndarray:
    """A photo of class ``c``: soft random blobs (each photo its own) in red, green or blue, with some grain."""
    blobs = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC), np.float32)
    tint = np.full(3, 0.35, np.float32)
    tint[c] = 1.0
    pixels = blobs * tint + rng.normal(0, 6, (side, side, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _save(pixels: np.ndarray, path: Path, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=quality)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """train/ + test/ of 3 classes (24 + 6 each), with one problem of each kind planted; the planted files."""
    root = tmp_path_factory.mktemp("inspect") / "photos"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(30):
            _save(_photo(c, rng), root / ("train" if i < 24 else "test") / name / f"{i}.jpg")
    shutil.copy(root / "train/stripes/3.jpg", root / "train/stripes/3-copy.jpg")  # an exact copy
    leaked = Image.open(root / "train/rings/5.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((90, 90))
    leaked.save(root / "test/rings/5-again.jpg", quality=70)  # a mirrored, larger, re-encoded copy in test
    _save(_photo(1, rng), root / "train/stripes/wrong.jpg")  # checks, filed under stripes
    _save((_photo(2, rng) * 0.04).astype(np.uint8), root / "train/rings/dark.jpg")
    grey = Image.fromarray(_photo(0, rng)).convert("L").convert("RGB")
    grey.save(root / "train/stripes/grey.jpg", quality=92)
    text = np.full((72, 72, 3), 255, np.uint8)  # a page of black text: nothing like the photos
    for row in range(6, 66, 9):
        text[row:row + 4, 6:int(rng.integers(30, 66))] = 0
    _save(text, root / "train/checks/page.jpg")
    _save(_photo(1, rng, side=20), root / "train/checks/tiny.jpg")  # 20x20: tiny
    Image.fromarray(np.concatenate([_photo(1, rng)] * 4, axis=1)).save(root / "train/checks/wide.jpg")  # 288x72
    return root


@pytest.fixture(scope="module")
def found(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = imgcls.inspect(planted, out=str(out), **SMALL)
    return result, {(f["problem"], f["file"]) for f in result["findings"]}


def test_every_planted_problem_is_found_with_what_it_pairs_with(found):
    result, flags = found
    by = {(f["problem"], f["file"]): f for f in result["findings"]}
    copy = by[("exact_duplicate", "train/stripes/3.jpg")] if ("exact_duplicate", "train/stripes/3.jpg") in by \
        else by[("exact_duplicate", "train/stripes/3-copy.jpg")]
    assert {copy["file"], copy["paired_file"]} == {"train/stripes/3.jpg", "train/stripes/3-copy.jpg"}
    leak = by[("leakage", "test/rings/5-again.jpg")]
    assert (leak["paired_file"], leak["paired_split"], leak["split"]) == ("train/rings/5.jpg", "train", "test")
    wrong = by[("label_error", "train/stripes/wrong.jpg")]
    assert (wrong["label"], wrong["suggested_label"]) == ("stripes", "checks")
    assert ("dark", "train/rings/dark.jpg") in flags
    assert ("grayscale", "train/stripes/grey.jpg") in flags
    assert ("outlier", "train/checks/page.jpg") in flags
    assert by[("tiny", "train/checks/tiny.jpg")]["detail"] == "20x20 px; under 32 px on the shorter side"
    assert by[("extreme_aspect", "train/checks/wide.jpg")]["detail"] == "288x72 px: 4.0 to 1"


def test_nothing_else_is_flagged(found):
    result, flags = found
    planted = {"train/stripes/3.jpg", "train/stripes/3-copy.jpg", "test/rings/5-again.jpg", "train/rings/5.jpg",
               "train/stripes/wrong.jpg", "train/rings/dark.jpg", "train/stripes/grey.jpg", "train/checks/page.jpg",
               "train/checks/tiny.jpg", "train/checks/wide.jpg"}
    assert not {file for _, file in flags} - planted, sorted(flags)
    counts = result["counts"]
    assert {c: counts["train"][c] + counts["val"][c] for c in CLASSES} == {"stripes": 27, "checks": 27, "rings": 25}
    assert counts["test"] == {"stripes": 6, "checks": 6, "rings": 7}


def test_the_folder_holds_the_records_the_csv_and_the_page(found):
    result, _ = found
    folder = Path(result["path"])
    assert json.loads((folder / "inspect.json").read_text())["findings"] == result["findings"]
    rows = list(csv.DictReader((folder / "issues.csv").open()))
    assert [(r["problem"], r["file"]) for r in rows] == [(f["problem"], f["file"]) for f in result["findings"]]
    assert "data:image/jpeg;base64," in (folder / "inspect.html").read_text()
    with np.load(folder / "oof.npz") as oof:
        assert oof["proba"].shape == (len(oof["files"]), 3)
        np.testing.assert_allclose(oof["proba"].sum(1), 1.0, atol=1e-4)
    assert sorted(p.name for p in folder.iterdir()) == ["inspect.html", "inspect.json", "issues.csv", "oof.npz"]


def test_a_second_inspection_reads_the_features_back(planted, tmp_path, capsys):
    for _ in range(2):
        again = imgcls.inspect(planted, out=str(tmp_path), **{**SMALL, "quiet": False})
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("features:")]
    assert len(said) == 2 and "from the cache" not in said[0] and "3 of 3 splits from the cache" in said[1], said
    assert again["findings"] == json.loads((tmp_path / "photos-inspect" / "inspect.json").read_text())["findings"]


def test_fail_on_exits_1_when_a_named_problem_is_found(planted, tmp_path, capsys):
    args = ["inspect", str(planted), "--out", str(tmp_path), "--model", "efficientnet_lite0", "--image-size", "64",
            "--quiet"]
    assert main([*args, "--fail-on", "bright"]) == 0
    assert main([*args, "--fail-on", "duplicates,leakage"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "inspect: found exact_duplicate (1), leakage (1) (--fail-on duplicates,leakage)"
    assert main([*args, "--fail-on", "typos"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --fail-on 'typos' is not a problem; choose from duplicates, label_errors")
    assert len(list(tmp_path.iterdir())) == 2  # the refused one wrote nothing


def test_train_exclude_leaves_the_listed_images_out_and_records_why(planted, found, tmp_path):
    result, _ = found
    issues = Path(result["path"]) / "issues.csv"
    run = imgcls.train(data=str(planted), exclude=str(issues), epochs=0, report=False, out=str(tmp_path),
                       **SMALL)
    record = json.loads((run.path / "dataset.json").read_text())
    excluded = {e["file"]: e for e in record["excluded"]}
    assert set(excluded) == {f["file"] for f in result["findings"]}
    assert excluded["train/stripes/wrong.jpg"]["reason"] == "label_error"
    assert excluded["test/rings/5-again.jpg"]["split"] == "test"
    kept = sum(s["images"] for s in record["splits"].values())
    assert kept == 30 * 3 + 8 - len(excluded)
    other = tmp_path / "other.txt"
    other.write_text("not/in/this/data.jpg\n")
    with pytest.raises(DataError, match=r"--exclude .*other.txt lists 1 files and none is an image of"):
        imgcls.train(data=str(planted), exclude=str(other), epochs=0, report=False, out=str(tmp_path), **SMALL)


def test_a_class_too_small_for_folds_still_gets_the_other_checks(tmp_path):
    rng = np.random.default_rng(1)
    for c, name in enumerate(CLASSES):
        for i in range(1 if c == 2 else 8):
            _save(_photo(c, rng), tmp_path / "photos" / "train" / name / f"{i}.jpg")
        if c < 2:
            _save(_photo(c, rng), tmp_path / "photos" / "test" / name / "t.jpg")
    shutil.copy(tmp_path / "photos/train/stripes/0.jpg", tmp_path / "photos/train/stripes/0-copy.jpg")
    result = imgcls.inspect(tmp_path / "photos", out=str(tmp_path / "out"), val_fraction=0.0, **SMALL)
    assert ["label errors (class 'rings' has 1 image, and the k-fold check needs 2 or more in every class)"] == \
        [s for s in result["skipped"] if s.startswith("label errors")]
    assert [f["problem"] for f in result["findings"]] == ["exact_duplicate"]


def test_a_mirrored_resized_copy_is_matched_and_measures_find_dark_and_grey():
    rng = np.random.default_rng(2)
    photos = np.stack([_photo(c % 3, rng) for c in range(30)])
    copy = np.asarray(Image.fromarray(photos[4][6:, 4:][:, ::-1]).resize((72, 72)))  # cropped 92%, mirrored
    images = np.concatenate([photos, copy[None], photos[7:8]])
    unit = images.reshape(len(images), -1).astype(np.float32)
    unit = unit - unit.mean(1, keepdims=True)
    unit[:] = 1.0  # every pair a candidate: the thumbnails alone decide
    pairs = copy_pairs([images[:20], images[20:]], unit / np.linalg.norm(unit, axis=1, keepdims=True))
    assert [(p.first, p.second, p.exact) for p in pairs] == [(4, 30, False), (7, 31, True)]
    assert len(set(pixel_digests(images))) == 31
    grey = np.repeat(photos[0].mean(2, keepdims=True).astype(np.uint8), 3, 2)
    m = image_measures(np.stack([photos[0], (photos[0] * 0.04).astype(np.uint8), grey]))
    assert m["bright_end"][1] < 0.1 < m["bright_end"][0]
    assert m["colour"][2] == 0 and m["colour"][0] > 20


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_an_off_grid_crop_is_aligned_into_a_copy_and_another_view_of_the_scene_is_not(name):
    """scikit-learn's sample photos: a copy cropped to 87% away from the fixed windows' places, mirrored and
    re-encoded at JPEG quality 50 passes COPY_CORRELATION only once the window is searched for, as does one cut
    to 85% of the width and 95% of the height; the right 60% of the scene stays well under it."""
    import io
    import os

    import sklearn.datasets

    full = Image.open(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name)).convert("RGB")
    w, h = full.size
    cw, ch = round(w * 0.87), round(h * 0.87)
    left, top = round((w - cw) * 0.3), round((h - ch) * 0.7)
    crop = full.crop((left, top, left + cw, top + ch)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    crop.resize((128, 128), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=50)
    narrow = full.crop((round(w * 0.1), round(h * 0.03), round(w * 0.95), round(h * 0.98)))
    images = np.stack([np.asarray(full.resize((128, 128), Image.Resampling.BILINEAR)), np.asarray(Image.open(buf)),
                       np.asarray(narrow.resize((128, 128), Image.Resampling.BILINEAR)),
                       np.asarray(full.crop((w - round(w * 0.6), 0, w, h)).resize((128, 128)))])
    first, second = np.array([0, 0, 0]), np.array([1, 2, 3])
    aligned = aligned_match(images, first, second)
    fixed = window_match(match_windows(images), first, second)
    assert aligned[0] >= COPY_CORRELATION > fixed[0], (aligned, fixed)
    assert aligned[1] >= COPY_CORRELATION, aligned
    assert aligned[2] < COPY_CORRELATION - 0.1, aligned


def test_the_mirror_image_of_a_small_grey_image_is_a_copy():
    """28x28 one-channel images, near the thumbnail's side: the search's bilinear windows match a mirror image
    less well than the fixed, area-averaged ones, and the better of the two decides."""
    rng = np.random.default_rng(4)
    pattern = np.asarray(Image.fromarray((rng.random((14, 14)) * 255).astype(np.uint8)).resize(
        (28, 28), Image.Resampling.BICUBIC))
    images = np.stack([pattern, pattern[:, ::-1], (rng.random((28, 28)) * 255).astype(np.uint8)])[..., None]
    assert aligned_match(images, np.array([0]), np.array([1]))[0] < COPY_CORRELATION
    pairs = copy_pairs([images], np.full((3, 4), 0.5, np.float32))
    assert [(p.first, p.second, p.exact) for p in pairs] == [(0, 1, False)]


def test_confident_learning_flags_the_flipped_labels_of_confident_probabilities():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 100)
    proba = np.full((300, 3), 0.05)
    proba[np.arange(300), labels] = 0.9
    flipped = rng.choice(300, 15, replace=False)
    given = labels.copy()
    given[flipped] = (labels[flipped] + 1) % 3
    issues = find_label_issues(given, proba)
    assert set(np.flatnonzero(issues.flagged)) == set(flipped)
    np.testing.assert_array_equal(issues.suggested[flipped], labels[flipped])


def test_a_label_is_an_error_where_the_classifier_is_sure_of_another_class_even_spread_over_several():
    """Ten classes: an image whose label has 1% is flagged even where no other class passes confident learning's
    per-class threshold (its probability is spread over nine); a 5% label is not, a 2% one with another pick is."""
    labels = np.repeat(np.arange(10), 20)
    proba = np.full((200, 10), 0.01)
    proba[np.arange(200), labels] = 0.91
    proba[0] = [0.01] + [0.11] * 9  # given class 0, the rest spread: under every per-class threshold (0.9)
    proba[20] = [0.9, 0.05] + [0.05 / 8] * 8  # given class 1 at 5%: the classifier is not sure enough
    proba[40] = np.full(10, 0.1)  # a tie, its own label among the picks
    proba[40, 2] = 0.02
    proba[40, 3] = 0.18  # given class 2 at 2%, class 3 the pick
    issues = find_label_issues(labels, proba)
    assert not issues.flagged[0]  # confident learning's pruning misses it
    assert list(np.flatnonzero(likely_label_errors(labels, proba))) == [0, 40]


def test_an_image_far_from_the_classes_is_an_outlier_sooner_when_the_classifier_cannot_place_it():
    """Two images equally far from both classes, past the plain distance's limit (3.75 deviations): the one the
    out-of-fold classifier is unsure of is flagged (5.4 with its entropy), the one it places is not (1.9); no
    other image reaches 3 either way."""
    n = 200
    labels = np.repeat([0, 1], n // 2)
    theta = np.tile(np.linspace(-0.3, 0.3, n // 2), 2)  # each class spread evenly about its own direction
    theta[:2] = 0.38
    unit = np.zeros((n, 3), np.float32)
    unit[np.arange(n), labels] = np.cos(theta)
    unit[:, 2] = np.sin(theta)
    entropy_like = np.random.default_rng(0).permutation(np.tile(np.linspace(0.1, 0.5, n // 2), 2))
    top = 0.5 + 0.5 * np.sqrt(1 - entropy_like)
    proba = np.stack([np.where(labels == 0, top, 1 - top), np.where(labels == 0, 1 - top, top)], 1)
    proba[0], proba[1] = [0.5, 0.5], [0.995, 0.005]  # image 0: unsure; image 1: placed
    split = Split(np.zeros((n, 2, 2, 3), np.uint8), labels, [f"train/{c}/{i}.jpg" for i, c in enumerate(labels)])
    im = Images.of(ImageDataset("toy", ["a", "b"], {"train": split}), "")
    assert sorted(f["file"] for f in _outliers(im, unit, None)) == ["train/0/0.jpg", "train/0/1.jpg"]
    [found] = _outliers(im, unit, proba)
    assert found["file"] == "train/0/0.jpg" and found["detail"].endswith("the classifier's uncertainty 1.00 of 1")


def test_training_on_photos_says_when_test_images_are_copies_of_training_ones(planted, tmp_path):
    run = imgcls.train(data=str(planted), epochs=0, report=False, out=str(tmp_path), **SMALL)
    log = (run.path / "train.log").read_text()
    assert "warning: 1 of the 19 test images are copies of images this run trains or validates on" in log, log
    assert run.history[0]["test_copies"] == 1
    clean = tmp_path / "clean"
    shutil.copytree(planted, clean)
    (clean / "test/rings/5-again.jpg").unlink()
    run = imgcls.train(data=str(clean), epochs=0, report=False, out=str(tmp_path), **SMALL)
    assert "copies" not in (run.path / "train.log").read_text() and "test_copies" not in run.history[0]


def test_the_report_names_the_test_copies_and_the_images_left_out(planted, found, tmp_path):
    result, _ = found
    issues = Path(result["path"]) / "issues.csv"
    rows = [r for r in csv.DictReader(issues.open()) if r["problem"] == "dark"]
    listed = tmp_path / "dark.csv"
    with listed.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["file", "problem"])
        writer.writeheader()
        writer.writerows({"file": r["file"], "problem": r["problem"]} for r in rows)
    run = imgcls.train(data=str(planted), exclude=str(listed), epochs=0, out=str(tmp_path), **SMALL)
    page = (run.path / "report.html").read_text()
    assert "1 test image is a copy of images the run trained or validated on" in page
    assert "Images left out by --exclude: 1" in page and "train/rings/dark.jpg" in page
