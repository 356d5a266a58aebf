"""Out-of-distribution rejection: the scores and their AUROC, a run that stores one with its threshold, predict and
serving answering "unknown" for images that are none of the classes, and a bad --ood folder refused up front."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import imgcls
from imgcls.errors import DataError
from imgcls.ood import (
    auroc,
    choose,
    feature_directions,
    knn_score,
    logit_scores,
    threshold_at,
)

SMALL = {"model": "fastnet_small", "model_option": {"widths": [8, 16, 16]}, "quiet": True, "report": False}


def test_auroc_equals_scikit_learns_ties_included():
    rng = np.random.default_rng(0)
    inside, outside = rng.integers(0, 6, 80).astype(float), rng.integers(0, 4, 50).astype(float)
    assert auroc(inside, outside) == pytest.approx(roc_auc_score(np.r_[np.ones(80), np.zeros(50)],
                                                                 np.r_[inside, outside]))


def test_the_threshold_rejects_the_asked_share_and_the_best_score_is_kept():
    rng = np.random.default_rng(1)
    inside = {"msp": rng.normal(1, 1, 400), "knn": rng.normal(3, 1, 400)}
    outside = {"msp": rng.normal(0, 1, 300), "knn": rng.normal(0, 1, 300)}
    assert np.mean(inside["msp"] < threshold_at(inside["msp"], 0.05, margin=0)) == pytest.approx(0.05, abs=0.005)
    share = np.mean(inside["msp"] < threshold_at(inside["msp"], 0.05))  # less a margin of 0.84 standard errors
    assert share == pytest.approx(0.05 - 0.84 * np.sqrt(0.05 * 0.95 / 400), abs=0.003)
    choice = choose(inside, outside, 0.05)
    assert choice["score"] == "knn" and choice["measured"]["knn"]["auroc"] > 0.95 > choice["measured"]["msp"]["auroc"]
    assert choice["measured"]["knn"]["far"] < choice["measured"]["msp"]["far"]


def test_knn_scores_the_kth_nearest_and_logit_scores_are_msp_and_energy():
    bank = feature_directions(np.eye(4, 8) + 0.01)
    query = feature_directions(np.array([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1.0]]))
    near = knn_score(query, bank, k=1)
    assert near[0] > 0.95 and near[1] < 0.3
    assert knn_score(query, bank, k=2)[0] < near[0]  # the second nearest is farther
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    scores = logit_scores(logits)
    assert scores["msp"] == pytest.approx([np.exp(2) / (np.exp(2) + 1), 0.5])
    assert scores["energy"] == pytest.approx(np.log(np.exp(logits).sum(1)))


def _colours(root, n: int = 30, side: int = 24) -> None:
    """Class folders of plain red, green and blue pictures with a little noise."""
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("green", 1), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
            img[..., channel] = rng.integers(170, 256, (side, side), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir_env, one_thread):
    root = tmp_path_factory.mktemp("colours") / "colours"
    _colours(root)
    outside = root.parent / "outside"  # stripes and checks: none of the colours' plain pictures
    outside.mkdir()
    for i in range(40):
        img = np.zeros((24, 24, 3), np.uint8)
        img[:, :: 2 + i % 3] = 255
        img[:: 3 + i % 2] = (i * 37 % 256, 90, 200)
        Image.fromarray(img).save(outside / f"{i}.png")
    finished = imgcls.train(data=str(root), out=str(root.parent / "runs"), name="colours", epochs=3, batch_size=16,
                            val_fraction=0.25, ood=str(outside), **SMALL)
    return finished, root, outside


def test_a_run_stores_the_score_its_threshold_and_what_it_measured(run):
    finished, _, outside = run
    clf = imgcls.load(finished.path)
    ood = clf.ood
    assert ood["score"] in ("msp", "energy", "knn") and np.isfinite(ood["threshold"])
    doc = json.loads((finished.path / "ood.json").read_text())
    assert doc["score"] == ood["score"] and doc["threshold"] == pytest.approx(ood["threshold"])
    assert set(doc["measured"]) == {"msp", "energy", "knn"} and str(outside) in doc["against"]
    kept = doc["measured"][doc["score"]]
    assert kept["auroc"] == max(m["auroc"] for m in doc["measured"].values())
    assert kept["frr"] <= 0.1  # about 5% of val, rounded to whole images
    if ood["score"] == "knn":
        assert ood["bank"].ndim == 2 and doc["bank_images"] == len(ood["bank"])


def test_predict_answers_unknown_for_images_that_are_none_of_the_classes(run, tmp_path):
    finished, root, outside = run
    clf = imgcls.load(finished.path)
    strange = sorted(outside.glob("*.png"))
    answers = clf.predict([str(p) for p in strange], unknown=True)
    kept = json.loads((finished.path / "ood.json").read_text())["measured"][clf.ood["score"]]
    assert np.mean(answers == "unknown") == pytest.approx(1 - kept["far"], abs=0.15)
    own = sorted((root / "red").glob("*.png"))[:10]
    assert np.mean(clf.predict([str(p) for p in own], unknown=True) == "red") >= 0.8
    assert list(clf.predict([str(p) for p in strange[:3]])) != ["unknown"] * 3  # asked for classes: classes
    out = subprocess.run([sys.executable, "-m", "imgcls", "predict", str(finished.path), str(strange[0]),
                          str(own[0]), "--format", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)["predictions"]
    for row in rows:
        known = row["ood_score"] >= clf.ood["threshold"]
        assert row["answer"] == (row["top"][0]["class"] if known else "unknown")


def test_serving_answers_unknown_with_the_score(run):
    from fastapi.testclient import TestClient

    from imgcls.serving.app import create_app

    finished, _, outside = run
    clf = imgcls.load(finished.path)
    files = sorted(outside.glob("*.png"))[:4]
    with TestClient(create_app(finished.path)) as client:
        body = client.post("/v1/predict", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert body.status_code == 200
    rows = body.json()["predictions"]
    assert [r["answer"] for r in rows] == list(clf.predict([str(f) for f in files], unknown=True))
    assert all(isinstance(r["ood_score"], float) for r in rows)
    with TestClient(create_app(finished.path)) as client:
        card = client.get("/v1/model").json()["unknown"]
    doc = json.loads((finished.path / "ood.json").read_text())
    assert card == {"score": doc["score"], "threshold": pytest.approx(doc["threshold"]), "frr_target": 0.05,
                    "auroc": doc["measured"][doc["score"]]["auroc"], "against": doc["against"]}


def test_an_ood_folder_holding_training_images_is_refused_before_training(tmp_path, one_thread):
    root = tmp_path / "colours"
    _colours(root, n=10)
    bad = tmp_path / "outside"
    bad.mkdir()
    for p in sorted((root / "red").glob("*.png"))[:2]:
        (bad / f"copy-{p.name}").write_bytes(p.read_bytes())
    with pytest.raises(DataError, match=r"2 of its 2 images are images of the training data \(\S*copy-0.png"):
        imgcls.train(data=str(root), out=str(tmp_path / "runs"), epochs=1, batch_size=8, ood=str(bad), **SMALL)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    with pytest.raises(Exception, match="no such folder or zip"):
        imgcls.train(data=str(root), out=str(tmp_path / "runs"), epochs=1, batch_size=8, ood=str(tmp_path / "x"),
                     **SMALL)


def test_the_ood_folder_is_decoded_once_a_run(tmp_path, data_dir_env, one_thread, monkeypatch):
    """The check before training and the measurement after it share one decoding of --ood; another run (another
    dataset) decodes it again."""
    from imgcls.training import rejection

    root = tmp_path / "colours"
    _colours(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(6):
        Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(outside / f"{i}.png")
    calls = []
    decode = rejection.load_image_inputs
    monkeypatch.setattr(rejection, "load_image_inputs", lambda *a, **k: calls.append(1) or decode(*a, **k))
    kw = dict(out=str(tmp_path / "runs"), epochs=1, batch_size=8, val_fraction=0.3, ood=str(outside), **SMALL)
    first = imgcls.train(data=str(root), name="a", **kw)
    assert len(calls) == 1 and "6 images of" in json.loads((first.path / "ood.json").read_text())["against"]
    imgcls.train(data=str(root), name="b", **kw)
    assert len(calls) == 2


@pytest.mark.parametrize(("bad", "said"), [
    ({"score": "mahalanobis", "threshold": 0.5}, "must name a score (msp, energy, knn) with a finite threshold"),
    ({"score": "msp", "threshold": float("nan")}, "with a finite threshold"),
    ({"score": "knn", "threshold": 0.5, "k": 10}, "must hold a bank of features"),
    ({"score": "knn", "threshold": 0.5, "k": 0, "bank": torch.ones(4, 3)}, "and k (1 or more)"),
])
def test_a_damaged_ood_entry_is_refused_when_the_checkpoint_is_read(run, tmp_path, bad, said):
    import shutil

    from imgcls.checkpoint import find_checkpoint, update_meta
    from imgcls.errors import CheckpointError

    finished, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(finished.path, copy)
    update_meta(find_checkpoint(copy), {"ood": bad})
    with pytest.raises(CheckpointError, match="damaged or was not written by imgcls: its 'ood' entry") as info:
        imgcls.load(copy)
    assert said in str(info.value)


def test_ood_frr_sets_the_share_of_val_the_threshold_rejects(tmp_path, data_dir_env, one_thread, capsys):
    from imgcls.cli import main

    root = tmp_path / "colours"
    _colours(root)
    finished = imgcls.train(data=str(root), out=str(tmp_path / "runs"), name="frr", epochs=3, batch_size=16,
                            val_fraction=0.25, ood_frr=0.3, **SMALL)
    doc = json.loads((finished.path / "ood.json").read_text())
    kept = doc["measured"][doc["score"]]
    assert doc["frr_target"] == 0.3 and imgcls.load(finished.path).ood["frr_target"] == 0.3
    # 22 val images: the default (5%, less its margin) rejects at most one; 30% less its margin rejects 4 or more.
    assert 0.15 <= kept["frr"] <= 0.3
    for bad in ("0", "0.7", "nan"):
        assert main(["train", "--data", str(root), "--ood-frr", bad, "--out", str(tmp_path / "none")]) == 2
        assert "ood_frr must be a number in (0, 0.5]" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
