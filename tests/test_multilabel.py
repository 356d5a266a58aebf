"""Several labels per image, end to end: a CSV of labels beside a folder trains a sigmoid model whose per-label
thresholds are fitted on val and stored with it; evaluate, predict, explain, export, serve and cv take it.

The data: 32x32 images holding 0 to 3 coloured squares (red, green, blue), labelled with the colours they show.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgcls
from imgcls.checkpoint import find_checkpoint, read_checkpoint
from imgcls.data.registry import build_dataset
from imgcls.errors import DataError

SMALL = {"model": "fastnet_small", "model_option": {"widths": [8, 16, 16]}, "quiet": True, "report": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir_env, one_thread, multilabel_squares):
    root = tmp_path_factory.mktemp("squares") / "squares"
    multilabel_squares.write_folder(root, 300)
    return imgcls.train(data=str(root), out=str(root.parent / "runs"), name="squares", epochs=4, batch_size=16,
                        **SMALL), root


def test_a_csv_beside_the_images_trains_a_multilabel_model_with_thresholds_fitted_on_val(run, multilabel_squares):
    finished, _ = run
    m = finished.test_metrics
    assert m["task"] == "multilabel"
    assert m["map"] >= 0.9  # coloured squares: each label is plain to see
    assert 0.0 <= m["hamming_loss"] <= 0.15
    _, meta = read_checkpoint(find_checkpoint(finished.path))
    assert meta["task"] == "multilabel" and meta["classes"] == sorted(multilabel_squares.COLOURS)
    assert len(meta["thresholds"]) == 3 and all(0.0 < t < 1.0 for t in meta["thresholds"])
    assert m["thresholds"] == meta["thresholds"]  # the test figures decide with the stored thresholds
    doc = json.loads((finished.path / "dataset.json").read_text())
    assert doc["task"] == "multilabel"
    # iterative stratification: every label in every split
    assert all(min(split["per_class"]) > 0 for split in doc["splits"].values())


def test_predict_answers_the_set_of_labels_over_their_thresholds(run, tmp_path, multilabel_squares):
    finished, _ = run
    clf = imgcls.load(finished.path)
    images, labels = multilabel_squares.images(40, seed=7)
    proba = clf.proba_of_arrays(np.stack(images))
    assert proba.shape == (40, 3) and not np.allclose(proba.sum(1), 1.0)  # a sigmoid per label
    paths = []
    for i, img in enumerate(images[:6]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    sets = clf.predict(paths)
    t = np.array(clf.meta["thresholds"])
    for got, p in zip(sets, clf.predict_proba(paths)):
        assert set(got) == {clf.classes[j] for j in np.flatnonzero(p >= t)}
    right = sum(set(s) == set(want) for s, want in zip(sets, labels[:6]))
    assert right >= 4
    out = subprocess.run([sys.executable, "-m", "imgcls", "predict", str(finished.path), *paths[:2],
                          "--format", "json"], capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    assert [set(p["labels"]) for p in doc["predictions"]] == [set(s) for s in sets[:2]]


def test_evaluate_explain_and_onnx_export_take_a_multilabel_run(run, tmp_path, multilabel_squares):
    finished, _ = run
    clf = imgcls.load(finished.path)
    m = clf.evaluate()
    assert m["map"] == pytest.approx(finished.test_metrics["map"])
    images, labels = multilabel_squares.images(20, seed=3)
    both = next(i for i, have in enumerate(labels) if have == ["red", "blue"])  # red and blue squares, no green
    Image.fromarray(images[both]).save(tmp_path / "a.png")
    exp = clf.explain([str(tmp_path / "a.png")], target="red,blue")
    assert len(exp) == 2 and exp.target_names == ["red", "blue"]
    assert [n.rsplit("/", 1)[-1] for n in exp.names] == ["a-red.png", "a-blue.png"]
    assert not np.allclose(exp.maps[0], exp.maps[1])  # a map of its own for each label
    from imgcls.export import export_onnx, load_onnx

    report = export_onnx(finished.path, out=tmp_path / "m.onnx")
    assert report["max_abs_diff_probabilities"] <= 1e-4
    onnx = load_onnx(tmp_path / "m.onnx")
    assert onnx.multilabel and onnx.meta["thresholds"] == clf.meta["thresholds"]
    batch = np.stack(images[:4])
    np.testing.assert_allclose(onnx.proba_of_arrays(batch), clf.proba_of_arrays(batch), atol=1e-4)
    assert list(onnx.predict(batch)) == list(clf.predict(batch))


def test_serving_answers_labels(run):
    from fastapi.testclient import TestClient

    from imgcls.serving.app import create_app

    finished, root = run
    clf = imgcls.load(finished.path)
    files = sorted((root / "images").glob("*.png"))[:3]
    with TestClient(create_app(finished.path)) as client:
        card = client.get("/v1/model").json()
        assert card["task"] == "multilabel" and "map" in card["test_metrics"]
        answer = client.post("/v1/predict", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert answer.status_code == 200
    got = [p["labels"] for p in answer.json()["predictions"]]
    assert got == [list(s) for s in clf.predict([str(f) for f in files])]


def test_split_folders_with_one_csv_and_a_label_seen_only_in_test_is_refused(tmp_path, one_thread, multilabel_squares):
    root = tmp_path / "data"
    train = multilabel_squares.write_folder(root, 60, seed=1, prefix="train/", csv_name="a.csv")
    test = multilabel_squares.write_folder(root, 20, seed=2, prefix="test/", csv_name="b.csv")
    lines = (root / "a.csv").read_text().splitlines() + (root / "b.csv").read_text().splitlines()[1:]
    (root / "a.csv").unlink()
    (root / "b.csv").unlink()
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = build_dataset(imgcls.make_config(data=str(root)).data)
    assert ds.multilabel and set(ds.splits) == {"train", "val", "test"}
    assert len(ds.splits["test"]) == len(test) and len(ds.splits["train"]) + len(ds.splits["val"]) == len(train)
    # "blue" only in test
    text = "\n".join(" ".join(line.replace("blue", "").split()) if line.startswith("train/") else line
                     for line in lines) + "\n"
    (root / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=r"blue appear only in test \(for example line \d+, test/\d{4}\.png\)"):
        build_dataset(imgcls.make_config(data=str(root), cache=False).data)


def test_bad_label_csvs_are_refused_naming_the_row_and_file(tmp_path, multilabel_squares, capsys):
    from imgcls.cli import main

    root = tmp_path / "data"
    multilabel_squares.write_folder(root, 12)
    csv = root / "labels.csv"
    lines = csv.read_text().splitlines()

    def refused(text: str, pattern: str) -> None:
        csv.write_text(text)
        code = main(["train", "--data", str(root), "--no-cache", "--epochs", "1", "--out", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert code != 0 and "Traceback" not in err
        assert pattern in err, err
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-written

    refused("photo,labels\n" + "\n".join(lines[1:]), "no filename column")
    refused("\n".join(lines + [lines[3]]), f"{lines[3].split(',')[0]}")  # the same file twice
    refused("\n".join(lines + ["images/9999.png,red"]), "images/9999.png")  # a row for a file not in the folder
    refused("\n".join(lines[:-1]), lines[-1].split(",")[0])  # an image with no row
    refused("\n".join(lines[:2] + ['images/0001.png,"red,green"'] + lines[3:]), "holds a ','")
    csv.write_bytes("\n".join(lines[:2] + ["images/0001.png,rouge été"] + lines[3:]).encode("latin-1"))
    code = main(["train", "--data", str(root), "--no-cache", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code != 0 and "UTF-8" in err and "line 3" in err
    many = "filename,labels\n" + "\n".join(f"images/{i:04d}.png,{' '.join(f'l{i}_{k}' for k in range(900))}"
                                           for i in range(12))
    refused(many, "10,800")


def test_labels_flag_names_a_csv_outside_the_folder(tmp_path, one_thread, multilabel_squares):
    root = tmp_path / "data"
    labels = multilabel_squares.write_folder(root, 40)
    outside = tmp_path / "tags.csv"
    (root / "labels.csv").rename(outside)
    ds = build_dataset(imgcls.make_config(data=str(root), labels=str(outside)).data)
    assert ds.multilabel and sum(len(s) for s in ds.splits.values()) == 40
    counts = sum(s.labels.sum(0) for s in ds.splits.values())
    assert counts.tolist() == [sum(c in have for have in labels) for c in ds.classes]
    with pytest.raises(DataError, match="no such file"):
        build_dataset(imgcls.make_config(data=str(root), labels=str(tmp_path / "none.csv")).data)


def test_cross_validation_of_a_multilabel_folder_reports_map(tmp_path, one_thread, multilabel_squares):
    root = tmp_path / "data"
    multilabel_squares.write_folder(root, 90)
    track = {"track": "tensorboard"} if importlib.util.find_spec("tensorboard") else {}
    summary = imgcls.cross_validate(data=str(root), folds=2, epochs=1, batch_size=16, out=str(tmp_path / "runs"),
                                    **SMALL, **track)
    assert summary["metrics"][0] == "map" and len(summary["per_fold"]) == 2
    assert 0.0 < summary["mean"]["map"] <= 1.0
    if track:  # every fold tracked, its test mAP among the scalars
        assert len(list((tmp_path / "runs").rglob("events.out.tfevents.*"))) == 2
    from imgcls.reports.compare import compare_runs

    board = compare_runs([Path(summary["path"]) / f"fold-{i}" for i in (1, 2)])
    assert board["ranked_by"] == "test_map"
    maps = [e["test_map"] for e in board["leaderboard"]]
    assert maps == sorted(maps, reverse=True) and set(maps) == {f["map"] for f in summary["per_fold"]}


def test_class_folders_win_over_a_stray_csv_and_say_so(tmp_path):
    root = tmp_path / "data"
    for name, channel in (("red", 0), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(6):
            img = np.zeros((16, 16, 3), np.uint8)
            img[..., channel] = 200
            Image.fromarray(img).save(root / name / f"{i}.png")
    (root / "train.csv").write_text("id,comment\n1,a Kaggle download's own file\n")
    ds = build_dataset(imgcls.make_config(data=str(root), cache=False).data)
    assert not ds.multilabel and ds.classes == ["blue", "red"]
    assert any("train.csv was not read" in n and "--labels" in n for n in ds.notes)


def test_a_zip_and_one_csv_per_split_folder_as_roboflow_exports_them(tmp_path, multilabel_squares):
    import zipfile

    root = tmp_path / "export"
    for split, seed, n in (("train", 1, 60), ("valid", 2, 15), ("test", 3, 15)):
        images, labels = multilabel_squares.images(n, seed)
        (root / split).mkdir(parents=True)
        rows = ["filename, blue, green, red"]  # one-hot columns, a space after each comma
        for i, (img, have) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(root / split / f"{split}{i}.jpg", quality=95)
            rows.append(f"{split}{i}.jpg, {int('blue' in have)}, {int('green' in have)}, {int('red' in have)}")
        (root / split / "_classes.csv").write_text("\n".join(rows) + "\n")
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                z.write(path, f"export/{path.relative_to(root)}")
    for data in (root, archive):
        ds = build_dataset(imgcls.make_config(data=str(data), cache=False).data)
        assert ds.multilabel and ds.classes == ["blue", "green", "red"]
        assert {k: len(v) for k, v in ds.splits.items()} == {"train": 60, "val": 15, "test": 15}
        assert not ds.skipped  # the CSVs are the labels, not skipped files
        _, labels = multilabel_squares.images(15, 3)
        expected = np.array([[c in have for c in ds.classes] for have in labels], np.uint8)
        order = np.argsort([int(p.rsplit("test", 1)[1].split(".")[0]) for p in ds.splits["test"].paths])
        np.testing.assert_array_equal(ds.splits["test"].labels[order], expected)


def test_out_of_distribution_of_several_labels_is_measured_by_knn_alone(run):
    """A low top probability is "none of the labels" there, an answer: only kNN's distance is measured and kept."""
    finished, _ = run
    doc = json.loads((finished.path / "ood.json").read_text())
    assert doc["score"] == "knn" and set(doc["measured"]) == {"knn"}
    assert imgcls.load(finished.path).ood["bank"].ndim == 2
