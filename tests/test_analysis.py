"""Analyses of a run folder: calibration and thresholds stored with the model and used by predict."""

import json

import numpy as np
import pytest
import torch

import imgcls
from imgcls import analysis
from imgcls.checkpoint import read_checkpoint
from imgcls.cli import main
from imgcls.evaluation.calibration import expected_calibration_error


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run = imgcls.train(out=str(out), name="d", epochs=6, quiet=True, report=False)
    return run.path


def test_temperature_scaling_fixes_a_deliberately_over_confident_model(tmp_path):
    # A half-trained model (digits are too easy for calibration to matter once a model is right 98% of the time)
    run = imgcls.train(out=str(tmp_path), name="weak", epochs=2, quiet=True, report=False,
                       model_option={"widths": [4, 8, 8]})
    run_dir = run.path
    clf, ds = analysis.load_run(run_dir)
    with torch.no_grad():
        clf.model.head.fc.weight.mul_(6.0)  # logits six times too large: an over-confident model
    result = analysis.calibrate(run_dir, (clf, ds))
    assert result["temperature"] > 1.5  # it divides the inflated logits back down
    assert result["val"]["ece_after"] < result["val"]["ece_before"]
    assert result["test"]["nll_after"] < result["test"]["nll_before"]  # ECE on 179 test images is too noisy
    _, meta = read_checkpoint(run_dir / "checkpoints" / "best.safetensors")
    assert meta["temperature"] == result["temperature"]
    # predict divides by the stored temperature: the loaded classifier is less confident than raw softmax.
    loaded = imgcls.load(run_dir)
    assert loaded.meta["temperature"] == result["temperature"]


def test_thresholds_are_stored_and_predict_declines_below_them(run_dir, tmp_path, capsys):
    result = analysis.tune(run_dir, "precision=0.9")
    assert json.loads((run_dir / "thresholds.json").read_text())["thresholds"] == result["thresholds"]
    for row in result["per_class"]:
        if row["met"]:
            assert row["precision"] >= 0.9
    clf = imgcls.load(run_dir)
    assert clf.meta["thresholds"] == result["thresholds"]
    noise = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(noise).save(tmp_path / "noise.png")
    assert main(["predict", str(run_dir), str(tmp_path / "noise.png"), "--thresholds", "--format", "json",
                 "--top-k", "10"]) == 0
    doc = json.loads(capsys.readouterr().out)["predictions"][0]
    clearing = [t for t in doc["top"] if t["probability"] >= result["thresholds"][clf.classes.index(t["class"])]]
    # The most probable class among those that clear their own threshold, else unknown.
    assert doc["answer"] == (max(clearing, key=lambda t: t["probability"])["class"] if clearing else "unknown")
    from imgcls.checkpoint import update_meta

    update_meta(run_dir / "checkpoints" / "best.safetensors", {"thresholds": [1.01] * 10})
    assert main(["predict", str(run_dir), str(tmp_path / "noise.png"), "--thresholds", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["answer"] == "unknown"


def test_predict_thresholds_needs_tuned_thresholds(tmp_path, capsys):
    run = imgcls.train(out=str(tmp_path), name="plain", epochs=1, quiet=True, report=False,
                       model_option={"widths": [8, 16, 16]})
    assert main(["predict", str(run.path), "x.png", "--thresholds"]) == 2
    assert "no thresholds stored" in capsys.readouterr().err


def test_calibration_does_not_change_the_predicted_class(run_dir):
    analysis.calibrate(run_dir)
    clf, ds = analysis.load_run(run_dir)
    test = ds.splits["test"]
    raw = clf.proba_of_arrays(test.images)
    assert clf.meta["temperature"] != 1.0
    clf.meta["temperature"] = 1.0
    assert (clf.proba_of_arrays(test.images).argmax(1) == raw.argmax(1)).all()
    assert expected_calibration_error(raw, test.labels) >= 0.0
