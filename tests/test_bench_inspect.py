"""benchmarks/inspect_folder.py's planting and scoring, on a tiny synthetic zip (no imgcls.inspect, no ../shared/data)."""

from __future__ import annotations

import importlib.util
import io
import re
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "inspect_folder.py"
CLASSES = ("c0", "c1", "c2")
PER_CLASS = 20
SMALL = {"flip_fraction": 0.1, "near_duplicates": 6, "off_topic": 4, "dark": 2, "blurred": 2,
         "off_topic_size": (20, 30)}


@pytest.fixture(scope="module")
def bench():
    """benchmarks/inspect_folder.py as a module, loaded by path."""
    spec = importlib.util.spec_from_file_location("bench_inspect", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A flowers-like zip (tiny/<class>/<n>.jpg, 3 x 20 random 24 px photos, a .DS_Store) and a digits-like zip."""
    root = tmp_path_factory.mktemp("bench-inspect")
    rng = np.random.default_rng(0)
    photos = root / "tiny.zip"
    with zipfile.ZipFile(photos, "w") as zf:
        zf.writestr("tiny/.DS_Store", b"\0")
        for c in CLASSES:
            for i in range(PER_CLASS):
                arr = rng.integers(40, 216, size=(24, 24, 3), dtype=np.uint8)
                zf.writestr(f"tiny/{c}/{c}-{i:03d}.jpg", _jpeg(arr))
    digits = root / "digits.zip"
    with zipfile.ZipFile(digits, "w") as zf:
        for i in range(10):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8), "L").save(buf, "PNG")
            zf.writestr(f"train/{i % 3}/{i}.png", buf.getvalue())
    return photos, digits


@pytest.fixture(scope="module")
def planted(bench, sources, tmp_path_factory):
    photos, digits = sources
    dest = tmp_path_factory.mktemp("planted") / "planted.zip"
    truth = bench.plant(photos, dest, 3, off_topic_sources=[digits], **SMALL)
    return dest, truth


def _read(zip_path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def test_planted_zip_has_the_split_layout_and_the_truth_names_every_file(planted):
    dest, truth = planted
    members = _read(dest)
    assert not dest.with_name(dest.name + ".tmp").exists()
    assert all(re.fullmatch(r"(train|val|test)/c[012]/[^/]+\.jpg", n) for n in members)
    assert set(members) == set(truth["files"])
    for path, rec in truth["files"].items():
        assert path.split("/")[:2] == [rec["split"], rec["label"]]
    n = len(CLASSES) * PER_CLASS
    assert truth["counts"]["originals"] == n
    assert truth["counts"]["images"] == n + 6 + 4 == len(members)
    assert sum(truth["counts"][s] for s in ("train", "val", "test")) == len(members)
    # 80/10/10 stratified by the original class: 16/2/2 of each
    originals = [r for r in truth["files"].values() if r["planted"] not in ("near_duplicate", "off_topic")]
    by = Counter((r["origin"].split("/")[1], r["split"]) for r in originals)
    assert by == {(c, s): k for c in CLASSES for s, k in (("train", 16), ("val", 2), ("test", 2))}


def test_the_planted_counts_are_the_requested_ones_on_disjoint_photos(planted):
    _, truth = planted
    assert len(truth["flipped"]) == 6  # 10% of 60
    assert len(truth["near_duplicates"]) == 6
    assert sum(d["across_splits"] for d in truth["near_duplicates"]) == 3  # half
    assert len(truth["off_topic"]) == 4 and len(truth["dark"]) == 2 and len(truth["blurred"]) == 2
    kinds = Counter(r["planted"] for r in truth["files"].values())
    assert kinds == {None: 60 - 6 - 2 - 2, "flipped": 6, "near_duplicate": 6, "off_topic": 4, "dark": 2,
                     "blurred": 2}
    dup_originals = {d["original"] for d in truth["near_duplicates"]}
    assert len(dup_originals) == 6
    assert all(truth["files"][f]["planted"] is None for f in dup_originals)  # untouched photos


def test_flipped_files_sit_in_another_class_folder_with_their_own_bytes(planted, sources):
    dest, truth = planted
    members, source = _read(dest), _read(sources[0])
    for r in truth["flipped"]:
        rec = truth["files"][r["file"]]
        assert r["label"] == rec["label"] == r["file"].split("/")[1] != r["original_label"]
        assert rec["origin"].split("/")[1] == r["original_label"]
        assert r["file"].rsplit("/", 1)[1] == rec["origin"].rsplit("/", 1)[1]  # the file name is kept
        assert members[r["file"]] == source[rec["origin"]]
    for path, rec in truth["files"].items():  # untouched photos are the source's bytes
        if rec["planted"] is None:
            assert members[path] == source[rec["origin"]]
            assert path.split("/")[1] == rec["origin"].split("/")[1]


def test_near_duplicate_copies_stay_in_the_class_and_cross_splits_against_train(planted):
    dest, truth = planted
    members = _read(dest)
    for d in truth["near_duplicates"]:
        assert d["original"].split("/")[1] == d["copy"].split("/")[1] == d["label"]
        assert truth["files"][d["copy"]]["origin"] == truth["files"][d["original"]]["origin"]
        assert d["split"] == d["original"].split("/")[0] and d["copy_split"] == d["copy"].split("/")[0]
        if d["across_splits"]:
            assert d["copy_split"] != d["split"] and "train" in (d["split"], d["copy_split"])
        else:
            assert d["copy_split"] == d["split"]
        assert 0.5 <= d["scale"] <= 1.5 and 0.85 <= d["crop"] <= 0.95 and 40 <= d["quality"] <= 90
        h, w, _ = _pixels(members[d["copy"]]).shape
        assert round(24 * 0.85 * 0.5) - 1 <= w <= round(24 * 0.95 * 1.5) + 1 and h == w


def test_off_topic_dark_and_blurred_images(planted, sources):
    dest, truth = planted
    members, source = _read(dest), _read(sources[0])
    for r in truth["off_topic"]:
        assert r["origin"].startswith("digits.zip:train/")
        assert _pixels(members[r["file"]]).shape == (r["size"], r["size"], 3) and 20 <= r["size"] <= 30
    for r in truth["dark"]:
        before, after = _pixels(source[truth["files"][r["file"]]["origin"]]), _pixels(members[r["file"]])
        assert 0.03 <= r["brightness"] <= 0.10
        assert after.mean() <= 0.11 * before.mean() + 2
    for r in truth["blurred"]:
        before, after = _pixels(source[truth["files"][r["file"]]["origin"]]), _pixels(members[r["file"]])
        assert 4 <= r["radius"] <= 8 and after.std() < 0.5 * before.std()


def test_planting_repeats_with_its_seed(bench, sources, planted, tmp_path):
    dest, truth = planted
    photos, digits = sources
    again = bench.plant(photos, tmp_path / "again.zip", 3, off_topic_sources=[digits], **SMALL)
    assert (tmp_path / "again.zip").read_bytes() == dest.read_bytes()
    assert {k: v for k, v in again.items() if k != "zip"} == {k: v for k, v in truth.items() if k != "zip"}
    other = bench.plant(photos, tmp_path / "other.zip", 4, off_topic_sources=[digits], **SMALL)
    assert other["files"] != truth["files"]


def test_a_taken_name_gets_a_number(bench):
    taken = {"train/a/x.jpg", "train/a/x-1.jpg"}
    assert bench._place("train/a", "x.jpg", taken) == "train/a/x-2.jpg" and "train/a/x-2.jpg" in taken
    assert bench._place("train/b", "x.jpg", taken) == "train/b/x.jpg"


def test_planting_refuses_more_problems_than_photos(bench, sources, tmp_path):
    photos, digits = sources
    with pytest.raises(ValueError, match="photos to plant problems in"):
        bench.plant(photos, tmp_path / "x.zip", 0, off_topic_sources=[digits], near_duplicates=60)
    assert not (tmp_path / "x.zip").exists()


# ---------------------------------------------------------------------------------------------------- scoring

def _truth() -> dict:
    def rec(path, planted=None):
        split, label, _ = path.split("/")
        return {"split": split, "label": label, "origin": path, "planted": planted}

    clean = ["train/a/1.jpg", "train/a/2.jpg", "train/b/3.jpg", "train/b/4.jpg", "test/a/5.jpg"]
    planted = {"train/b/f1.jpg": "flipped", "train/a/f2.jpg": "flipped", "val/b/f3.jpg": "flipped",
               "train/a/o1.jpg": "off_topic", "test/b/o2.jpg": "off_topic", "train/a/d1.jpg": "dark",
               "train/b/b1.jpg": "blurred", "train/a/c1.jpg": "near_duplicate", "test/b/c2.jpg": "near_duplicate",
               "val/a/c3.jpg": "near_duplicate"}
    files = {p: rec(p) for p in clean} | {p: rec(p, k) for p, k in planted.items()}
    return {
        "files": files,
        "flipped": [{"file": "train/b/f1.jpg", "split": "train", "label": "b", "original_label": "a"},
                    {"file": "train/a/f2.jpg", "split": "train", "label": "a", "original_label": "b"},
                    {"file": "val/b/f3.jpg", "split": "val", "label": "b", "original_label": "a"}],
        "near_duplicates": [
            {"original": "train/a/1.jpg", "copy": "train/a/c1.jpg", "across_splits": False},
            {"original": "train/b/3.jpg", "copy": "test/b/c2.jpg", "across_splits": True},
            {"original": "train/a/2.jpg", "copy": "val/a/c3.jpg", "across_splits": True}],
        "off_topic": [{"file": "train/a/o1.jpg"}, {"file": "test/b/o2.jpg"}],
        "dark": [{"file": "train/a/d1.jpg"}], "blurred": [{"file": "train/b/b1.jpg"}],
    }


def _finding(problem, file, suggested=None, paired=None):
    return {"problem": problem, "file": file, "split": file.split("/")[0], "label": file.split("/")[1],
            "score": 0.5, "suggested_label": suggested, "paired_file": paired}


FINDINGS = [
    _finding("label_error", "train/b/f1.jpg", "a"),  # found, suggestion right
    _finding("label_error", "train/a/f2.jpg", "a"),  # found, suggestion wrong (it was b)
    _finding("label_error", "train/a/2.jpg", "b"),  # false: a clean photo
    _finding("label_error", "train/a/o1.jpg", "b"),  # neutral: off-topic
    _finding("label_error", "train/a/d1.jpg", "b"),  # false: a dark photo of its own class
    _finding("label_error", "val/a/c3.jpg", "b"),  # false: a planted copy, its label right
    _finding("outlier", "train/a/o1.jpg"),  # found
    _finding("outlier", "train/a/d1.jpg"),  # neutral: dark
    _finding("outlier", "train/b/4.jpg"),  # false
    _finding("dark", "train/a/d1.jpg"),  # found
    _finding("dark", "test/b/o2.jpg"),  # neutral: off-topic
    _finding("near_duplicate", "train/a/c1.jpg", paired="train/a/1.jpg"),  # planted pair
    _finding("exact_duplicate", "train/a/1.jpg", paired="train/a/c1.jpg"),  # the same pair again, reversed
    _finding("leakage", "train/b/3.jpg", paired="test/b/c2.jpg"),  # planted, reversed, across splits
    _finding("near_duplicate", "train/b/4.jpg", paired="train/b/3.jpg"),  # unplanted: two photos
    _finding("leakage", "test/b/c2.jpg", paired="train/b/4.jpg"),  # via the unplanted pair: 3 ~ 4
    _finding("exact_duplicate", "train/a/o1.jpg", paired="train/a/2.jpg"),  # false
    _finding("low_contrast", "flowers/a/x.jpg"),  # not in the planted zip
]


def test_score_per_problem(bench):
    s = bench.score(_truth(), {"findings": FINDINGS})
    f = s["flipped"]
    assert (f["planted"], f["flagged"], f["tp"], f["fp"], f["fn"], f["neutral"]) == (3, 6, 2, 3, 1, 1)
    assert f["precision"] == pytest.approx(0.4) and f["recall"] == pytest.approx(2 / 3)
    assert f["f1"] == pytest.approx(0.5) and f["suggested_right"] == 1
    assert f["false_files"] == ["train/a/2.jpg", "train/a/d1.jpg", "val/a/c3.jpg"]
    assert f["missed_files"] == ["val/b/f3.jpg"]
    o = s["off_topic"]
    assert (o["tp"], o["fp"], o["neutral"], o["precision"], o["recall"]) == (1, 1, 1, 0.5, 0.5)
    assert o["flagged_as"] == {"dark": 1, "exact_duplicate": 1, "label_error": 1, "outlier": 1}
    assert o["flagged_as_anything"] == 2
    d = s["dark"]
    assert (d["tp"], d["fp"], d["neutral"], d["precision"], d["recall"], d["f1"]) == (1, 0, 1, 1.0, 1.0, 1.0)
    b = s["blurred"]
    assert (b["flagged"], b["precision"], b["recall"], b["f1"]) == (0, None, 0.0, None)


def test_score_near_duplicate_pairs(bench):
    d = bench.score(_truth(), {"findings": FINDINGS})["near_duplicates"]
    assert (d["planted"], d["found"], d["reported_pairs"]) == (3, 2, 5)
    assert (d["false_pairs"], d["unplanted_pairs"], d["via_unplanted"]) == (1, 1, 1)
    assert d["precision"] == pytest.approx(2 / 3) and d["recall"] == pytest.approx(2 / 3)
    assert d["false_share"] == pytest.approx(1 / 5)
    assert (d["across_planted"], d["across_found"], d["across_as_leakage"]) == (2, 1, 1)
    assert d["unplanted"] == [["train/b/3.jpg", "train/b/4.jpg"]]
    assert d["via"] == [["test/b/c2.jpg", "train/b/4.jpg"]]
    assert d["false"] == [["train/a/2.jpg", "train/a/o1.jpg"]]
    assert d["missed"] == [["train/a/2.jpg", "val/a/c3.jpg"]]


def test_score_false_alarms_and_unknown_files(bench):
    s = bench.score(_truth(), {"findings": FINDINGS})
    fa = s["false_alarms"]
    assert (fa["unplanted_images"], fa["flagged"], fa["rate"]) == (5, 2, 0.4)
    assert fa["by_problem"] == {"label_error": 1, "outlier": 1}
    assert fa["planted_copies_flagged"] == 1 and fa["files"] == ["train/a/2.jpg", "train/b/4.jpg"]
    assert s["unknown_files"] == {"count": 1, "files": ["flowers/a/x.jpg"]}


def test_score_flags_restricted_to_the_covered_images(bench):
    # a peer's flags over the images its probabilities cover: f3 is flagged but not covered, so not counted
    r = bench.score_flags(_truth(), ["train/b/f1.jpg", "val/b/f3.jpg", "test/a/5.jpg"], "flipped",
                          among=["train/b/f1.jpg", "train/a/f2.jpg", "test/a/5.jpg", "train/a/1.jpg"])
    assert (r["planted"], r["flagged"], r["tp"], r["fp"], r["fn"]) == (2, 2, 1, 1, 1)
    assert r["precision"] == r["recall"] == r["f1"] == 0.5


def test_nothing_found_scores_zero_recall(bench):
    s = bench.score(_truth(), {"findings": []})
    assert s["flipped"]["recall"] == 0 and s["flipped"]["precision"] is None
    assert s["near_duplicates"]["found"] == 0 and s["near_duplicates"]["false_share"] is None
    assert s["false_alarms"]["rate"] == 0
