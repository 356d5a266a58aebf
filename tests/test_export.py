"""ONNX export: the exported graph takes raw uint8 pixels, matches PyTorch at any batch size,
carries its metadata, and OnnxClassifier predicts what imgcls.load predicts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import imgcls
from imgcls.checkpoint import find_checkpoint, read_checkpoint, update_meta
from imgcls.errors import CheckpointError, ConfigError, DataError, ImgclsError
from imgcls.export import export, export_onnx, load_onnx
from imgcls.ood import SCORES, entry_record

TEMPERATURE = 2.5
DIGIT_THRESHOLDS = [0.3] * 10


@pytest.fixture(scope="module")
def digits(tmp_path_factory, data_dir_env):
    """A tiny digits run (1x8x8, fastnet_small) with a stored temperature and thresholds, exported."""
    run = imgcls.train(out=str(tmp_path_factory.mktemp("runs")), name="digits", epochs=2, quiet=True, report=False,
                       model_option={"widths": [8, 16, 16]})
    update_meta(find_checkpoint(run.path, "best"), {"temperature": TEMPERATURE, "thresholds": DIGIT_THRESHOLDS})
    return {"run": run.path, "info": export_onnx(run.path)}


@pytest.fixture(scope="module")
def rgb(tmp_path_factory, data_dir_env):
    """Another family and input: seed_tf_tutorial on a generated 3x32x32 folder of 2 colour classes, letterboxed,
    with 6-view test-time augmentation (which the graph must carry)."""
    root = tmp_path_factory.mktemp("rgb") / "photos"
    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    run = imgcls.train(data=str(root), model="seed_tf_tutorial", image_size="32", resize="pad", epochs=2,
                       batch_size=8, out=str(root.parent / "runs"), name="rgb", quiet=True, report=False,
                       tta="flip-translate")
    return {"run": run.path, "root": root, "info": export_onnx(run.path)}


def _real_images(run_path, n: int) -> np.ndarray:
    """n real images of the run's data: its test split, repeated when the split is smaller."""
    splits = imgcls.load(run_path).dataset().splits
    images = splits["test"].images
    if len(images) < n:
        images = np.concatenate([images, splits["train"].images])
    return np.resize(images, (n, *images.shape[1:]))  # repeats whole images: still real pixels


def test_export_writes_the_model_and_a_report_beside_it(digits):
    info = digits["info"]
    folder = digits["run"] / "export"
    assert info["path"] == str(folder / "model.onnx")
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "model.onnx"]  # no temp file left
    assert json.loads((folder / "export.json").read_text()) == info
    assert info["exporter"] in ("dynamo", "torchscript") and info["opset"] >= 17
    assert info["images_checked"] == 64 and info["images_source"] == "test split"
    assert info["max_abs_diff_probabilities"] <= info["tolerance"] == 1e-4
    assert info["seconds"] > 0


@pytest.mark.parametrize("which", ["digits", "rgb"])
def test_onnx_runtime_matches_pytorch_at_batch_sizes_1_7_and_64(which, digits, rgb):
    run = {"digits": digits, "rgb": rgb}[which]["run"]
    torch_clf, onnx_clf = imgcls.load(run), load_onnx(run)
    images = _real_images(run, 64)
    for n in (1, 7, 64):  # the batch dimension is dynamic
        expected = torch_clf.proba_of_arrays(images[:n])
        got = onnx_clf.proba_of_arrays(images[:n])
        assert got.shape == expected.shape == (n, len(torch_clf.classes))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert (onnx_clf.predict(images) == torch_clf.predict(images)).all()
    assert onnx_clf.proba_of_arrays(images[:0]).shape == (0, len(torch_clf.classes))


def test_the_graph_carries_the_models_test_time_augmentation(rgb):
    from imgcls.export import _session
    from imgcls.inference import predict_logits

    torch_clf, onnx_clf = imgcls.load(rgb["run"]), load_onnx(rgb["run"])
    assert torch_clf.meta["tta"] == "flip-translate" and onnx_clf.meta["tta"] == "flip-translate"
    images = _real_images(rgb["run"], 16)
    args = (torch_clf.model, images, torch_clf.meta["normalize"], torch_clf.runtime)
    with_tta, plain = predict_logits(*args, tta="flip-translate").numpy(), predict_logits(*args).numpy()
    got = _session(rgb["info"]["path"]).run(["logits"], {"images": images})[0]
    np.testing.assert_allclose(got, with_tta, rtol=0, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-2  # without the six views the logits differ


def test_metadata_round_trips_and_the_graph_applies_the_stored_temperature(digits):
    _, meta = read_checkpoint(find_checkpoint(digits["run"], "best"))
    model = onnx.load(digits["info"]["path"])
    props = {p.key: p.value for p in model.metadata_props}
    doc = json.loads(props["imgcls_meta"])
    assert json.loads(props["class_names"]) == doc["classes"] == meta["classes"]
    assert doc["input_shape"] == [8, 8, 1] and doc["input_dtype"] == "uint8" and doc["layout"] == "NHWC"
    assert doc["normalize"]["mean"] == meta["normalize"]["mean"] and doc["normalize"]["std"] == meta["normalize"]["std"]
    assert doc["temperature"] == TEMPERATURE and doc["thresholds"] == DIGIT_THRESHOLDS
    assert doc["arch"] == "fastnet_small" and doc["resize"] == "stretch"
    assert "pixels / 255 - mean) / std" in doc["preprocessing"]
    (graph_input,) = model.graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # Training stored an out-of-distribution score: the graph computes it, the metadata holds it without a bank.
    assert [o.name for o in model.graph.output] == ["logits", "probabilities", "ood_score"]
    assert doc["ood"] == json.loads(json.dumps(entry_record(meta["ood"]))) and "bank" not in doc["ood"]
    assert "ood_score" in doc["outputs"] and f"{meta['ood']['threshold']:.6g}" in doc["outputs"]["ood_score"]

    clf = load_onnx(digits["info"]["path"])
    for key in ("arch", "arch_kwargs", "classes", "input_shape", "normalize", "temperature", "thresholds", "resize"):
        assert clf.meta[key] == meta[key], key
    assert clf.ood == doc["ood"] and clf.ood["threshold"] == meta["ood"]["threshold"]
    assert clf.input_shape == (1, 8, 8) and clf.classes == meta["classes"]

    # probabilities = softmax(logits / stored temperature), computed in the graph.
    images = _real_images(digits["run"], 16)
    logits, proba = clf.session.run(["logits", "probabilities"], {"images": images})
    np.testing.assert_allclose(proba, torch.softmax(torch.from_numpy(logits) / TEMPERATURE, 1).numpy(), atol=1e-6)
    assert not np.allclose(proba, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-3)


def test_predicting_files_matches_the_torch_classifier(rgb, tmp_path):
    # Images of another size and aspect: load_inputs letterboxes them as the run's data was.
    rng = np.random.default_rng(1)
    paths = []
    for i, colour in enumerate([(210, 30, 30), (30, 30, 210), (180, 60, 60), (60, 60, 180)]):
        pixels = np.clip(rng.normal(colour, 30, (40, 24 + 8 * i, 3)), 0, 255).astype(np.uint8)
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    torch_clf, onnx_clf = imgcls.load(rgb["run"]), load_onnx(rgb["run"] / "export" / "model.onnx")
    assert onnx_clf.meta["resize"] == "pad" and onnx_clf.input_shape == (3, 32, 32)
    assert list(onnx_clf.predict(paths)) == list(torch_clf.predict(paths))
    np.testing.assert_allclose(onnx_clf.predict_proba(paths), torch_clf.predict_proba(paths), rtol=0, atol=1e-4)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read"):
        onnx_clf.predict_proba([paths[0], tmp_path / "broken.png"])


def test_an_impossible_tolerance_raises_and_leaves_the_earlier_file(digits, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"earlier export")
    # ORT's float32 probabilities never equal PyTorch's float64 ones to the last bit.
    with pytest.raises(ImgclsError, match=r"max abs difference of probabilities .* > tolerance 0"):
        export_onnx(digits["run"], out=out, tolerance=0.0)
    assert out.read_bytes() == b"earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file, no export.json
    with pytest.raises(ConfigError, match="tolerance"):
        export_onnx(digits["run"], out=out, tolerance=-1.0)


def test_a_checkpoint_file_away_from_its_run_is_exported(rgb, tmp_path):
    ckpt = tmp_path / "colours.safetensors"
    shutil.copy(find_checkpoint(rgb["run"]), ckpt)
    info = export_onnx(ckpt)
    assert info["path"] == str(tmp_path / "export" / "model.onnx")
    assert info["images_source"] == "random pixels"  # no run folder: no data to check on
    images = _real_images(rgb["run"], 7)
    np.testing.assert_allclose(load_onnx(info["path"]).proba_of_arrays(images), imgcls.load(ckpt).proba_of_arrays(images),
                               rtol=0, atol=1e-4)


def test_the_torchscript_exporter_is_the_fallback(digits, tmp_path, monkeypatch):
    info = export_onnx(digits["run"], out=tmp_path / "ts" / "model.onnx", exporter="torchscript")
    assert info["exporter"] == "torchscript" and info["max_abs_diff_probabilities"] <= 1e-4

    real_export = torch.onnx.export

    def dynamo_broken(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("unsupported operator")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    info = export_onnx(digits["run"], out=tmp_path / "auto" / "model.onnx")
    assert info["exporter"] == "torchscript" and "unsupported operator" in info["dynamo_error"]
    with pytest.raises(ImgclsError, match="dynamo ONNX exporter failed"):
        export_onnx(digits["run"], out=tmp_path / "dynamo" / "model.onnx", exporter="dynamo")


def test_bad_inputs_get_clear_errors(digits, tmp_path):
    with pytest.raises(ConfigError, match="choose one of: onnx"):
        export(digits["run"], format="tflite")
    with pytest.raises(ConfigError, match="choose one of: auto, dynamo, torchscript"):
        export_onnx(digits["run"], exporter="jit")
    with pytest.raises(DataError, match=r"uint8 array \(N, 8, 8, 1\)"):
        export_onnx(digits["run"], out=tmp_path / "m.onnx", check_images=np.zeros((4, 8, 8, 3), np.uint8))
    clf = load_onnx(digits["run"])
    with pytest.raises(DataError, match="uint8"):
        clf.proba_of_arrays(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_onnx(tmp_path / "none.onnx")
    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9), foreign)
    with pytest.raises(CheckpointError, match="not exported by imgcls"):
        load_onnx(foreign)


# ----------------------------------------------------------------------------
# The out-of-distribution score in the graph


SCORED_RUNS = {"msp": "digits", "energy": "digits", "knn": "rgb", "none": "rgb"}  # kNN with the rgb run's 6 views


@pytest.fixture(scope="module")
def scored(digits, rgb, tmp_path_factory, ood_entry):
    """A copy of a run per score, storing that score (or none, as a run of before), exported and checked on 48
    images, some of its own and some random pixels: {score or "none": {"run", "info", "entry", "images"}}.  The
    rgb run is too sure of its 2 classes for MSP to vary (0.9997 to 0.9999), hence digits for the logit scores."""
    out = {}
    for score, source in SCORED_RUNS.items():
        run_of = {"digits": digits, "rgb": rgb}[source]["run"]
        clf = imgcls.load(run_of)
        splits = clf.dataset().splits
        own = np.concatenate([s.images for s in splits.values()])[::7][:40]
        noise = np.random.default_rng(3).integers(0, 256, (8, *own.shape[1:]), np.uint8)
        images = np.concatenate([own, noise])
        run = tmp_path_factory.mktemp("scored") / score
        shutil.copytree(run_of, run, ignore=shutil.ignore_patterns("export"))
        entry = None if score == "none" else ood_entry(clf, score, images, splits["train"].images)
        update_meta(find_checkpoint(run), {"ood": entry})
        out[score] = {"run": run, "entry": entry, "images": images, "info": export_onnx(run, check_images=images)}
    return out


@pytest.mark.parametrize("score", SCORES)
def test_the_graph_computes_the_stored_score_as_pytorch_does(score, scored):
    run, info, images = scored[score]["run"], scored[score]["info"], scored[score]["images"]
    assert [o.name for o in onnx.load(info["path"]).graph.output] == ["logits", "probabilities", "ood_score"]
    assert info["ood_score"] == score and info["max_abs_diff_ood_score"] <= info["ood_score_tolerance"]
    assert info["ood_score_tolerance"] >= info["tolerance"] == 1e-4  # energy's is relative to its scale
    torch_clf, onnx_clf = imgcls.load(run), load_onnx(run)
    for n in (1, 5, len(images)):
        proba, scores = onnx_clf.scored_arrays(images[:n])
        expected_proba, expected = torch_clf.scored_arrays(images[:n])
        assert scores.shape == (n,)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=info["ood_score_tolerance"])
        np.testing.assert_allclose(proba, expected_proba, rtol=0, atol=1e-4)
    assert np.ptp(expected) > 100 * info["ood_score_tolerance"]  # the scores differ from image to image
    answers = onnx_clf.predict(images, unknown=True)
    assert list(answers) == list(torch_clf.predict(images, unknown=True))
    assert 0.2 < np.mean(answers == "unknown") < 0.8  # the threshold splits them: both answers are tested
    assert "unknown" not in onnx_clf.predict(images)  # asked for classes: classes


def test_knn_keeps_its_bank_float16_in_the_graph_and_out_of_the_metadata(scored):
    info, bank = scored["knn"]["info"], scored["knn"]["entry"]["bank"]
    model = onnx.load(info["path"])
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert [sorted(t.dims) for t in halves] == [sorted(bank.shape)]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(halves[0]).T, bank.numpy())
    assert not any(t.data_type == onnx.TensorProto.FLOAT and sorted(t.dims) == sorted(bank.shape)
                   for t in model.graph.initializer)  # no float32 copy beside it
    assert info["ood_bank"] == {"images": bank.shape[0], "features": bank.shape[1], "dtype": "float16",
                                "bytes": bank.numel() * 2}
    doc = json.loads({p.key: p.value for p in model.metadata_props}["imgcls_meta"])
    assert "bank" not in doc["ood"] and doc["ood"]["bank_images"] == bank.shape[0] and doc["ood"]["k"] == 5
    assert load_onnx(info["path"]).ood == doc["ood"]


def test_a_run_without_a_score_exports_two_outputs_and_answers_as_before(scored):
    info, images = scored["none"]["info"], scored["none"]["images"]
    assert [o.name for o in onnx.load(info["path"]).graph.output] == ["logits", "probabilities"]
    assert "max_abs_diff_ood_score" not in info and "ood_score" not in info
    clf = load_onnx(info["path"])
    assert clf.ood is None and "ood" not in clf.meta
    proba, scores = clf.scored_arrays(images)
    assert scores is None and proba.shape == (len(images), 2)
    assert list(clf.predict(images, unknown=True)) == list(clf.predict(images))


def test_serving_the_onnx_export_answers_unknown_with_the_score(scored, tmp_path):
    from fastapi.testclient import TestClient

    from imgcls.serving.app import create_app

    run, images = scored["knn"]["run"], scored["knn"]["images"]
    torch_clf = imgcls.load(run)
    pick = images[::3]
    paths = []
    for i, img in enumerate(pick):
        paths.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(img).save(paths[-1])
    with TestClient(create_app(run, runtime="onnx")) as client:
        r = client.post("/v1/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    expected = torch_clf.predict(pick, unknown=True)
    assert [row["answer"] for row in rows] == list(expected) and "unknown" in expected
    assert len(set(expected)) > 1  # some answered with a class too
    np.testing.assert_allclose([row["ood_score"] for row in rows], torch_clf.scored_arrays(pick)[1], atol=1e-4)


def test_an_export_whose_score_differs_from_pytorch_is_refused(scored, tmp_path, monkeypatch):
    import imgcls.export as export_module
    from imgcls.ood import score_tensor

    monkeypatch.setattr(export_module, "score_tensor", lambda *args: score_tensor(*args) + 1e-3)  # in the graph only
    out = tmp_path / "model.onnx"
    with pytest.raises(ImgclsError, match=r"max abs difference of ood_score 0\.001.* > tolerance 0\.0001.* was not "
                                          r"written"):
        export_onnx(scored["msp"]["run"], out=out, check_images=scored["msp"]["images"][:4])
    assert not list(tmp_path.iterdir())


def test_a_damaged_score_entry_in_the_metadata_is_refused(scored, tmp_path):
    model = onnx.load(scored["msp"]["info"]["path"])
    props = {p.key: p.value for p in model.metadata_props}
    doc = json.loads(props["imgcls_meta"])
    doc["ood"]["threshold"] = "high"
    onnx.helper.set_model_props(model, {**props, "imgcls_meta": json.dumps(doc)})
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(CheckpointError, match=r"bad.onnx .*'ood' entry .* a finite threshold"):
        load_onnx(tmp_path / "bad.onnx")
    # A score in the metadata without the graph's output (an export of before with a hand-edited document).
    model = onnx.load(scored["none"]["info"]["path"])
    props = {p.key: p.value for p in model.metadata_props}
    doc = json.loads(props["imgcls_meta"])
    doc["ood"] = {"score": "msp", "threshold": 0.5}
    onnx.helper.set_model_props(model, {**props, "imgcls_meta": json.dumps(doc)})
    onnx.save(model, tmp_path / "no-output.onnx")
    with pytest.raises(CheckpointError, match=r"no 'ood_score' output .*logits, probabilities"):
        load_onnx(tmp_path / "no-output.onnx")


def test_the_export_command_says_how_close_the_score_is(scored, tmp_path, capsys):
    from imgcls.cli import main

    assert main(["export", str(scored["energy"]["run"]), "--out", str(tmp_path / "model.onnx")]) == 0
    out = capsys.readouterr().out
    diff = json.loads((tmp_path / "export.json").read_text())["max_abs_diff_ood_score"]
    assert f"its out-of-distribution score (energy) to {diff:.2e}" in out
