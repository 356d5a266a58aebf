"""benchmarks/multilabel_mosaic.py's mosaics, split and metrics, on a tiny synthetic flower zip (no imgcls training,
no frozen features, no ../shared/data)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "multilabel_mosaic.py"
# Each class's photos are one flat colour, far from each other and from the empty cell's grey (128, 128, 128).
COLOURS = {"daisy": (230, 30, 30), "dandelion": (30, 210, 30), "rose": (30, 30, 230), "sunflower": (230, 230, 30),
           "tulip": (210, 30, 210)}
PER_CLASS = 6  # 30 photos in all
MOSAICS = 40  # about 100 photos: the pool is used three or four times over


@pytest.fixture(scope="module")
def bench():
    """benchmarks/multilabel_mosaic.py as a module, loaded by path (registered while it runs: its dataclasses look
    their module up)."""
    spec = importlib.util.spec_from_file_location("bench_multilabel", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def flowers(tmp_path_factory) -> Path:
    """A flowers.zip look-alike: tiny/<class>/<class>-<i>.jpg, 40x30 flat-colour photos, plus hidden entries."""
    path = tmp_path_factory.mktemp("bench-multilabel") / "flowers.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tiny/.DS_Store", b"\0")
        zf.writestr("__MACOSX/tiny/daisy/._daisy-0.jpg", b"\0")
        for name, colour in COLOURS.items():
            for i in range(PER_CLASS):
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), colour).save(buf, "JPEG", quality=95)
                zf.writestr(f"tiny/{name}/{name}-{i}.jpg", buf.getvalue())
    return path


@pytest.fixture(scope="module")
def built(bench, flowers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("built") / "mosaics"
    return folder, bench.build_mosaics(flowers, folder, MOSAICS, seed=5)


def _rows(folder: Path) -> list[dict]:
    with open(folder / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _nearest(pixels: np.ndarray) -> str:
    """The class (or 'grey') whose colour is nearest the mean of ``pixels``."""
    mean = pixels.reshape(-1, 3).mean(0)
    named = {**COLOURS, "grey": (128, 128, 128)}
    return min(named, key=lambda k: np.abs(mean - np.array(named[k])).sum())


def test_labels_csv_lists_every_mosaic_with_the_classes_its_pictures_show(built):
    folder, manifest = built
    rows = _rows(folder)
    assert list(rows[0]) == ["filename", "labels"]
    assert [r["filename"] for r in rows] == [f"images/{k:05d}.jpg" for k in range(MOSAICS)]
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{k:05d}.jpg" for k in range(MOSAICS)]
    for row, rec in zip(rows, manifest["mosaics"]):
        with Image.open(folder / row["filename"]) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (128, 128))
            pixels = np.asarray(im)
        shown = []
        for box, photo in zip(rec["cells"], rec["photos"]):
            left, top, right, bottom = box
            seen = _nearest(pixels[top + 4:bottom - 4, left + 4:right - 4])  # inside the cell: no JPEG bleed
            assert seen == photo.split("/")[1]  # the cell shows a photo of the class it was drawn from
            shown.append(seen)
        if rec["empty"]:
            left, top, right, bottom = rec["empty"]
            assert _nearest(pixels[top + 4:bottom - 4, left + 4:right - 4]) == "grey"
        assert row["labels"].split() == sorted(set(shown)) == rec["labels"]


def test_layouts_tile_the_mosaic_with_one_to_four_distinct_photos(built):
    _, manifest = built
    counts = Counter()
    for rec in manifest["mosaics"]:
        n = len(rec["photos"])
        counts[n] += 1
        assert 1 <= n <= 4 and len(set(rec["photos"])) == n == len(rec["cells"])
        assert rec["layout"] == {1: "single", 2: rec["layout"], 3: "grid", 4: "grid"}[n]
        assert n != 2 or rec["layout"] in ("side_by_side", "stacked")
        assert (rec["empty"] is not None) == (n == 3)
        boxes = rec["cells"] + ([rec["empty"]] if rec["empty"] else [])
        assert sum((r - left) * (b - t) for left, t, r, b in boxes) == 128 * 128  # the cells cover it, once
        assert all(not p.split("/")[-1].startswith(".") and not p.startswith("__MACOSX") for p in rec["photos"])
    assert set(counts) == {1, 2, 3, 4}  # 40 uniform draws: each count comes up
    stats = manifest["stats"]
    assert stats["photos_per_mosaic"] == {str(k): v for k, v in sorted(counts.items())}
    set_sizes = Counter(len(r["labels"]) for r in manifest["mosaics"])
    assert stats["set_sizes"] == {str(k): v for k, v in sorted(set_sizes.items())}
    assert set(set_sizes) <= {1, 2, 3, 4} and sum(set_sizes.values()) == MOSAICS
    assert stats["labels"] == dict(sorted(Counter(lab for r in manifest["mosaics"] for lab in r["labels"]).items()))


def test_photos_are_reused_only_once_the_pool_is_spent(built, bench):
    _, manifest = built
    uses = Counter(p for r in manifest["mosaics"] for p in r["photos"])
    p = manifest["stats"]["photos"]
    assert p["pool"] == len(COLOURS) * PER_CLASS and p["placed"] == sum(uses.values()) > p["pool"]
    assert p["reused"] == sum(1 for n in uses.values() if n > 1) > 0 and p["max_uses"] == max(uses.values())
    # The first pass deals every photo once before any comes back.
    order = [ph for r in manifest["mosaics"] for ph in r["photos"]]
    assert len(set(order[:p["pool"]])) == p["pool"]
    pool = bench.PhotoPool(30, np.random.default_rng(0))
    first = [i for _ in range(10) for i in pool.draw(3)]
    assert sorted(first) == list(range(30)) and pool.passes == 1  # 30 draws from 30 photos: no repeat
    for _ in range(40):
        drawn = pool.draw(4)
        assert len(set(drawn)) == 4


def test_a_build_repeats_with_its_seed_and_is_reused(bench, flowers, built, tmp_path):
    folder, manifest = built
    again = bench.build_mosaics(flowers, tmp_path / "again", MOSAICS, seed=5)
    assert (tmp_path / "again" / "labels.csv").read_bytes() == (folder / "labels.csv").read_bytes()
    for name in ("00000.jpg", "00017.jpg", "00039.jpg"):
        assert (tmp_path / "again" / "images" / name).read_bytes() == (folder / "images" / name).read_bytes()
    assert again["mosaics"] == manifest["mosaics"]
    other = bench.build_mosaics(flowers, tmp_path / "other", MOSAICS, seed=6)
    assert other["mosaics"] != manifest["mosaics"]
    assert json.loads((tmp_path / "again.json").read_text())["source_sha256"] == bench.file_sha256(flowers)
    assert not list(tmp_path.glob("*.tmp-*"))
    assert bench.reusable(folder, flowers, MOSAICS, 5)["mosaics"] == manifest["mosaics"]
    assert bench.reusable(folder, flowers, MOSAICS, 6) is None  # another seed
    assert bench.reusable(folder, flowers, MOSAICS + 1, 5) is None  # another size
    (tmp_path / "again" / "images" / "00003.jpg").unlink()
    assert bench.reusable(tmp_path / "again", flowers, MOSAICS, 5) is None  # an image missing


def test_read_labels_gives_a_multi_hot_matrix(bench, built):
    folder, manifest = built
    files, y, classes = bench.read_labels(folder)
    assert classes == sorted(COLOURS) and y.shape == (MOSAICS, 5) and y.dtype == bool
    for k, rec in enumerate(manifest["mosaics"]):
        assert files[k] == rec["file"] and [classes[j] for j in np.flatnonzero(y[k])] == rec["labels"]


# ------------------------------------------------------------------------------------------------- split, metrics


def test_iterative_split_is_a_seeded_stratified_partition(bench):
    rng = np.random.default_rng(1)
    y = rng.random((600, 5)) < np.array([0.5, 0.4, 0.3, 0.2, 0.05])
    y[y.sum(1) == 0, 0] = True
    shares = {"train": 0.8, "val": 0.1, "test": 0.1}
    split = bench.iterative_split(y, shares, np.random.default_rng(0))
    joined = np.concatenate(list(split.values()))
    assert len(joined) == len(set(joined.tolist())) == 600
    for name, share in shares.items():
        assert abs(len(split[name]) - share * 600) <= 0.05 * 600
        per_label = y[split[name]].sum(0)
        assert np.all(np.abs(per_label - share * y.sum(0)) <= np.maximum(2, 0.05 * y.sum(0)))
    again = bench.iterative_split(y, shares, np.random.default_rng(0))
    assert all(np.array_equal(split[k], again[k]) for k in shares)
    with pytest.raises(ValueError, match="sum to 1"):
        bench.iterative_split(y, {"train": 0.8, "test": 0.1}, rng)


def test_metrics_by_hand(bench):
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    proba = np.array([[0.9, 0.2, 0.1], [0.6, 0.7, 0.3], [0.8, 0.4, 0.2], [0.1, 0.1, 0.6]])
    m = bench.multilabel_metrics(y, proba, 0.5, ["a", "b", "c"])
    # predicted at 0.5: {a}, {a, b}, {a}, {c}: 1 of 4 sets exact; 3 of 12 entries wrong
    assert m["subset_accuracy"] == 0.25 and m["hamming_loss"] == pytest.approx(3 / 12)
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # tp 3, fp 2, fn 1
    a, b, c = m["per_label"]
    assert (a["precision"], a["recall"], a["support"], a["ap"]) == (pytest.approx(2 / 3), 1.0, 2, 1.0)
    assert (b["precision"], b["recall"], b["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert c["ap"] is None and c["f1"] == 0.0 and c["support"] == 0
    assert m["map"] == pytest.approx((1.0 + 1.0) / 2)  # c has no positive: left out of the mean
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    per = bench.multilabel_metrics(y, proba, [0.95, 0.3, 0.5], ["a", "b", "c"])
    assert per["per_label"][0]["recall"] == 0.0 and per["per_label"][1]["recall"] == 1.0


def test_thresholds_maximise_each_labels_f1_on_val(bench):
    y = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=bool)
    proba = np.array([[0.9, 0.9, 0.9, 0.9], [0.8, 0.5, 0.8, 0.8], [0.3, 0.5, 0.3, 0.3], [0.2, 0.1, 0.2, 0.2]])
    t = bench.fit_thresholds(y, proba)
    assert t[0] == pytest.approx(0.55)  # keep the top 2: F1 1
    assert t[1] == pytest.approx(0.3)  # the two 0.5s go together: keep 3, F1 1
    assert t[2] == pytest.approx(0.1)  # every one kept: F1 6/7 beats 4/5 for the top 2
    assert t[3] == 0.5  # no positive in val
    pred = proba >= t
    assert np.array_equal(pred[:, :2], y[:, :2])


def test_baseline_learns_labels_that_its_features_hold(bench):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    y = x[:, :4] + 0.3 * rng.normal(size=(400, 4)) > 0.4
    split = bench.iterative_split(y, {"train": 0.6, "val": 0.2, "test": 0.2}, np.random.default_rng(0))
    out = bench.evaluate_baseline(x, y, split, ["a", "b", "c", "d"], grid=(0.1, 1.0))
    assert set(out["val_by_C"]) == {"0.1", "1.0"}
    losses = {c: v["val_log_loss"] for c, v in out["val_by_C"].items()}
    assert str(out["C"]) == min(losses, key=losses.get)
    for key in ("at_0.5", "at_val_thresholds"):
        m = out[key]
        assert m["map"] > 0.9 and m["micro_f1"] > 0.8 and m["hamming_loss"] < 0.15
        assert m["n"] == len(split["test"]) and [r["label"] for r in m["per_label"]] == ["a", "b", "c", "d"]
    noise = bench.evaluate_baseline(rng.normal(size=(400, 12)), y, split, ["a", "b", "c", "d"], grid=(1.0,))
    assert noise["at_0.5"]["map"] < 0.75  # features that hold nothing score near the labels' base rates


# ------------------------------------------------------------------------------------------------ imgcls's side


def test_split_paths_map_back_to_labels_csv(bench, tmp_path):
    files = ["images/00000.jpg", "images/00001.jpg", "images/00002.jpg"]
    paths = [str(tmp_path / "images" / "00002.jpg"), "images/00000.jpg"]
    assert bench.indices_of_paths(paths, tmp_path, files).tolist() == [2, 0]
    with pytest.raises(ValueError, match="does not list"):
        bench.indices_of_paths([str(tmp_path / "images" / "00009.jpg")], tmp_path, files)


def _fake_run(tmp_path: Path, folder: Path, sizes: dict) -> Path:
    from imgcls.config import config_from_dict, dump_config

    run = tmp_path / "runs" / "mosaic"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config_from_dict({"data": {"dataset": str(folder)},
                                                                   "train": {"seed": 3}})))
    (run / "dataset.json").write_text(json.dumps({"splits": {k: {"images": n} for k, n in sizes.items()}}))
    return run


def test_the_baseline_reads_imgcls_split_back_and_falls_back_when_it_cannot(bench, built, tmp_path, monkeypatch):
    from imgcls.data import registry
    from imgcls.data.base import ImageDataset, Split

    folder, _ = built
    files, y, _ = bench.read_labels(folder)
    order = np.random.default_rng(0).permutation(MOSAICS)
    parts = {"train": order[:30], "val": order[30:34], "test": order[34:]}
    seen = {}

    def build_dataset(cfg, seed=0, progress=False):  # as a multi-label imgcls would split the folder
        seen.update(dataset=cfg.dataset, seed=seed, cache=cfg.cache)
        splits = {k: Split(np.zeros((len(v), 2, 2, 3), np.uint8), np.zeros(len(v), np.int64),
                           [f"{folder}/{files[i]}" for i in v]) for k, v in parts.items()}
        return ImageDataset(str(folder), ["x"], splits)

    monkeypatch.setattr(registry, "build_dataset", build_dataset)
    run = _fake_run(tmp_path, folder, {k: len(v) for k, v in parts.items()})
    split, record = bench.choose_split(run, folder, y, files, 0)
    assert record == {"source": "imgcls-run", "run": str(run)}
    assert all(sorted(split[k].tolist()) == sorted(parts[k].tolist()) for k in parts)
    assert seen == {"dataset": str(folder), "seed": 3, "cache": False}

    other = _fake_run(tmp_path / "other", folder, {"train": 30, "val": 4, "test": 5})  # dataset.json disagrees
    split, record = bench.choose_split(other, folder, y, files, 0)
    assert record["source"] == "own" and "dataset.json 5" in record["why"]
    assert sum(len(v) for v in split.values()) == MOSAICS
    split, record = bench.choose_split(tmp_path / "nothing", folder, y, files, 0)
    assert record["source"] == "own" and "holds no imgcls run" in record["why"]


def test_imgcls_metrics_follow_the_multilabel_contract(bench, tmp_path):
    contract = {"map": 0.8, "micro_f1": 0.7, "macro_f1": 0.6, "subset_accuracy": 0.4, "hamming_loss": 0.1,
                "per_label": [{"label": "rose", "precision": 1, "recall": 1, "f1": 1, "ap": 1, "support": 3}],
                "n": 300}
    (tmp_path / "eval_test.json").write_text(json.dumps(contract))
    assert bench.read_imgcls_metrics(tmp_path) == contract
    (tmp_path / "eval_test.json").write_text(json.dumps({"accuracy": 0.9, "n": 300, "per_class": []}))
    with pytest.raises(ValueError, match="did not train a multi-label model"):
        bench.read_imgcls_metrics(tmp_path)


def test_the_table_shows_both_sides_and_a_missing_one(bench):
    m = {"map": 0.81, "micro_f1": 0.72, "macro_f1": 0.7, "subset_accuracy": 0.41, "hamming_loss": 0.12}
    base = {"at_0.5": m, "at_val_thresholds": m, "C": 0.1, "val_by_C": {"0.1": {"val_log_loss": 0.3, "val_map": 0.8}},
            "seconds": {"decode": 1.0, "features": 10.0, "fit": 2.0, "from_raw_images": 13.0},
            "features": {"runtime": "onnxruntime fp32", "width": 2120},
            "split": {"source": "own", "train": 240, "val": 30, "test": 30}}
    text = bench.table({"baseline": base, "imgcls": {"error": "boom"}})
    assert "| imgcls, default run: FAILED" in text and "| n/a | n/a | n/a | n/a | n/a | n/a |" in text
    assert "| baseline, threshold 0.5 | 0.8100 | 0.7200 | 0.7000 | 0.4100 | 0.1200 | 13.0 |" in text
    both = bench.table({"baseline": base, "imgcls": {"metrics": m, "wall_seconds": 20.0, "peak_rss_mib": 900,
                                                     "run": "/r"}})
    assert "| imgcls, default run | 0.8100 |" in both and "run the baseline step again" in both
    assert bench.results_name(0, bench.DEFAULT_IMAGES, "avx2") == "multilabel-mosaic-avx2"
    assert bench.results_name(1, 300, "bf16") == "multilabel-mosaic-n300-seed1-bf16"


def test_the_plain_baseline_decodes_with_pil_and_runs_its_backbone_in_pytorch(bench, built, tmp_path):
    # The plain step's own process, in this one: a seeded random resnet8 as its "pretrained" weights.
    import torch
    from safetensors.torch import save_file

    from imgcls.models import create_model

    folder, _ = built
    torch.manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("resnet8", 3, 5, (32, 32)).state_dict().items()},
              str(weights))
    _, y, classes = bench.read_labels(folder)
    split = bench.iterative_split(y, {"train": 0.6, "val": 0.2, "test": 0.2}, np.random.default_rng(0))
    settings = {"model": "resnet8", "pretrained": str(weights), "image_size": [32, 32], "resize": "stretch",
                "options": {}}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"folder": str(folder), "settings": settings,
                                "split": {k: v.tolist() for k, v in split.items()}}))
    bench.plain_child(spec, tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["features"]["decoder"] == "PIL" and out["features"]["runtime"].startswith("torch eager fp32")
    assert out["features"]["width"] == create_model("resnet8", 3, 5, (32, 32)).head.fc.in_features
    assert set(out["seconds_inside"]) == {"imports", "decode", "features", "fit"}
    m = out["at_val_thresholds"]
    assert m["n"] == len(split["test"]) and [r["label"] for r in m["per_label"]] == classes
    assert m["map"] > 0.6  # flat colours: even random convolutions' pooled features tell them apart
