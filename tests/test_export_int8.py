"""int8 ONNX export: a static quantization of the exported graph, calibrated on the run's train images,
checked on its test split against fp32 and refused (nothing written) when it loses more than allowed;
served by --runtime onnx-int8 through the same OnnxClassifier."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import imgcls
from imgcls.checkpoint import find_checkpoint, update_meta
from imgcls.cli import main
from imgcls.errors import ConfigError, DataError, ImgclsError
from imgcls.export import _session, check_summary, export_onnx, int8_figures, load_onnx
from imgcls.quantize import (
    CALIBRATIONS,
    SCORE_WHY,
    _name_nodes,
    plan,
    quantize_graph,
    require_quantization,
    upstream_nodes,
)
from imgcls.serving.app import create_app

TEMPERATURE = 8.0
COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 50, 200)}


@pytest.fixture(scope="module")
def colours(tmp_path_factory, data_dir_env, ood_entry):
    """seed_tf_tutorial (about 120,000 weights, most in two convolutions and a hidden dense layer) on a generated
    3x32x32 folder of three colours, with flip TTA, a stored temperature and a stored kNN score (its bank
    MatMul comes after the classifier in the graph), exported as int8."""
    root = tmp_path_factory.mktemp("colours") / "photos"
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(40):
            pixels = np.clip(rng.normal(colour, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    run = imgcls.train(data=str(root), model="seed_tf_tutorial", image_size="32", epochs=3, batch_size=16,
                       out=str(root.parent / "runs"), name="colours", quiet=True, report=False, tta="flip")
    update_meta(find_checkpoint(run.path, "best"), {"temperature": TEMPERATURE})
    clf = imgcls.load(run.path)
    splits = clf.dataset().splits
    knn = ood_entry(clf, "knn", splits["test"].images, splits["train"].images)  # half the test split below it
    update_meta(find_checkpoint(run.path), {"ood": knn})
    return {"run": run.path, "root": root, "info": export_onnx(run.path, int8=True)}


def _images(run, splits=("test", "train")) -> tuple[np.ndarray, np.ndarray]:
    ds = imgcls.load(run).dataset()
    return (np.concatenate([ds.splits[s].images for s in splits]), np.concatenate([ds.splits[s].labels for s in splits]))


def test_the_int8_model_is_written_beside_its_report_and_is_several_times_smaller(colours):
    info, folder = colours["info"], colours["run"] / "export"
    assert info["path"] == str(folder / "model-int8.onnx")
    assert sorted(p.name for p in folder.iterdir()) == ["export-int8.json", "model-int8.onnx"]  # no temp file left
    assert json.loads((folder / "export-int8.json").read_text()) == info
    assert info["bytes"] == (folder / "model-int8.onnx").stat().st_size
    assert info["bytes"] * 3 < info["fp32_bytes"] and info["times_smaller"] > 3
    q = info["quantization"]
    assert q["calibration"] == "percentile" and q["calibration_images"] > 0 and "train split" in q["calibration_source"]
    assert sum(q["layers_int8"].values()) >= 2  # the second and third convolutions, the hidden dense layer
    assert {k["why"].split(":")[0] for k in q["kept_fp32"] if k["node"] != "*"} == {
        "the first convolution", "the classifier", "the out-of-distribution score"}
    assert info["fp32_check"]["max_abs_diff_probabilities"] <= 1e-4  # the graph quantized was checked first


def test_export_json_records_agreement_and_both_accuracies_on_the_whole_test_split(colours):
    check = colours["info"]["check"]
    x, y = _images(colours["run"], ("test",))
    assert check["split"] == "test" and check["images"] == len(x)
    torch_top = imgcls.load(colours["run"]).proba_of_arrays(x).argmax(1)
    assert check["accuracy_fp32"] == pytest.approx((torch_top == y).mean())
    int8_top = load_onnx(colours["run"], int8=True).proba_of_arrays(x).argmax(1)
    assert check["accuracy_int8"] == pytest.approx((int8_top == y).mean())
    assert check["top1_agreement"] == pytest.approx((int8_top == torch_top).mean())
    assert check["drop"] == pytest.approx(check["accuracy_fp32"] - check["accuracy_int8"])
    assert check["passed"] and check["drop"] <= check["max_drop"] == 0.01


def test_onnx_classifier_loads_the_int8_model_and_agrees_with_fp32(colours):
    x, _ = _images(colours["run"])
    torch_clf, int8 = imgcls.load(colours["run"]), load_onnx(colours["run"], int8=True)
    assert int8.path.name == "model-int8.onnx" and int8.meta["quantization"]["calibration"] == "percentile"
    assert int8.meta["tta"] == "flip" and int8.meta["temperature"] == TEMPERATURE
    expected, got = torch_clf.proba_of_arrays(x), int8.proba_of_arrays(x)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert np.abs(got - expected).mean() < 0.05
    assert list(int8.predict(x[:8])) == [int8.classes[i] for i in got[:8].argmax(1)]
    # The temperature is inside the int8 graph: probabilities = softmax(logits / T), not softmax(logits).
    logits, proba = int8.session.run(["logits", "probabilities"], {"images": x[:16]})
    np.testing.assert_allclose(proba, torch.softmax(torch.from_numpy(logits) / TEMPERATURE, 1).numpy(), atol=1e-5)
    assert not np.allclose(proba, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-3)
    # int8 weights: the graph holds int8 initialisers and DequantizeLinear nodes.
    model = onnx.load(int8.path)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert json.loads({p.key: p.value for p in model.metadata_props}["class_names"]) == torch_clf.classes


def test_a_drop_over_max_drop_exits_1_with_the_figures_and_writes_nothing(colours, tmp_path, capsys):
    # The data moved: --data names where it is now (and a negative margin asks int8 to beat fp32 by 100 points).
    moved = tmp_path / "moved"
    shutil.copytree(colours["root"], moved)
    out = tmp_path / "out" / "model-int8.onnx"
    out.parent.mkdir()
    out.write_bytes(b"earlier export")
    code = main(["export", str(colours["run"]), "--int8", "--max-drop", "-1", "--data", str(moved), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "loses too much" in err and "accuracy" in err and "top-1 agreement" in err and "was not written" in err
    assert "with 8-bit weights a drop of" in err and "with 7-bit weights" in err  # both tried before refusing
    assert out.read_bytes() == b"earlier export"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model-int8.onnx"]  # no temp file, no report
    assert main(["export", str(colours["run"]), "--max-drop", "0.5"]) == 2  # --max-drop without --int8
    assert "add --int8" in capsys.readouterr().err


def test_8_bit_weights_that_lose_too_much_are_tried_again_in_7_bits(colours, tmp_path, monkeypatch, capsys):
    # On a CPU without VNNI, 8-bit weights can saturate ONNX Runtime's int16 pair sums; 7 bits cannot.
    from imgcls import export

    original, verdicts = export._check_int8, iter([False, True])

    def first_fails(*args, **kwargs):
        return {**original(*args, **kwargs), "passed": next(verdicts)}

    monkeypatch.setattr(export, "_check_int8", first_fails)
    assert main(["export", str(colours["run"]), "--int8", "--out", str(tmp_path / "model-int8.onnx")]) == 0
    assert "int8 with 7-bit weights (8-bit ones lost" in capsys.readouterr().out
    q = json.loads((tmp_path / "export-int8.json").read_text())["quantization"]
    assert [t["reduce_range"] for t in q["tried"]] == [False, True] and q["reduce_range"] is True
    assert "7-bit" in q["weights"] and "7-bit" not in colours["info"]["quantization"]["weights"]
    model = onnx.load(str(tmp_path / "model-int8.onnx"))
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(w.min() >= -64 and w.max() <= 64 for w in weights)  # 2 x 255 x 64 < 32,767
    eight = onnx.load(colours["info"]["path"])
    assert max(np.abs(onnx.numpy_helper.to_array(t)).max() for t in eight.graph.initializer
               if t.data_type == onnx.TensorProto.INT8) > 64


def test_serve_runtime_onnx_int8_answers_predict(colours, tmp_path):
    paths = []
    rng = np.random.default_rng(1)
    for i, colour in enumerate(COLOURS.values()):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.clip(rng.normal(colour, 20, (40, 48, 3)), 0, 255).astype(np.uint8)).save(paths[-1])
    x, _ = _images(colours["run"], ("test",))
    paths.append(tmp_path / "test-image.png")  # the test image most like the training images: known
    Image.fromarray(x[np.argmax(imgcls.load(colours["run"]).scored_arrays(x)[1])]).save(paths[-1])
    paths.append(tmp_path / "stripes.png")  # none of the colours: unknown
    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[::4], stripes[:, ::3] = 255, (0, 255, 0)
    Image.fromarray(stripes).save(paths[-1])
    with TestClient(create_app(colours["run"], runtime="onnx-int8")) as c:
        r = c.post("/v1/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths])
        card = c.get("/v1/model").json()
    assert r.status_code == 200, r.text
    assert card["runtime"] == "onnx-int8"
    rows = r.json()["predictions"]
    got = [p["top"][0]["class"] for p in rows]
    assert got == list(imgcls.load(colours["run"]).predict([str(p) for p in paths]))
    # The int8 graph's out-of-distribution score answers "unknown" below the stored threshold.
    int8 = load_onnx(colours["run"], int8=True)
    assert [p["answer"] for p in rows] == list(int8.predict(paths, unknown=True))
    assert rows[-1]["answer"] == "unknown" and rows[-2]["answer"] == rows[-2]["top"][0]["class"]
    np.testing.assert_allclose([p["ood_score"] for p in rows], int8.scored_arrays(int8.readable_arrays(paths))[1],
                               atol=1e-6)
    assert rows[-1]["ood_score"] < int8.ood["threshold"] <= rows[-2]["ood_score"]


def test_serving_without_the_int8_file_says_how_to_write_it(colours, tmp_path):
    run = tmp_path / "no-int8"
    shutil.copytree(colours["run"], run, ignore=shutil.ignore_patterns("export"))
    with pytest.raises(ConfigError, match=r"model-int8.onnx does not exist.*`imgcls export .* --int8`"), \
            TestClient(create_app(run, runtime="onnx-int8")):
        pass
    with pytest.raises(ImgclsError, match=r"export RUN --format onnx --int8"):
        load_onnx(run, int8=True)


def test_the_score_path_stays_fp32_and_the_check_reports_what_the_threshold_rejects(colours):
    info = colours["info"]
    kept = {k["why"].split(":")[0]: k for k in info["quantization"]["kept_fp32"]}
    model = onnx.load(info["path"])
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}

    def upstream(name: str) -> set[str]:
        return upstream_nodes(list(model.graph.node), [name])

    score, classifier = kept["the out-of-distribution score"]["node"], kept["the classifier"]["node"]
    assert nodes[score].op_type == "MatMul" and score not in upstream("logits") and score in upstream("ood_score")
    assert classifier in upstream("logits")  # the real classifier, not the bank's MatMul after it
    # Both stay fp32: no int8 weight (DequantizeLinear) feeds them.
    for name in (score, classifier):
        assert not any(producer[i].op_type == "DequantizeLinear" for i in nodes[name].input[1:] if i in producer)
    bank = imgcls.load(colours["run"]).ood["bank"]
    assert [sorted(t.dims) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16] == \
        [sorted(bank.shape)]  # the int8 file keeps the bank float16 too

    x, _ = _images(colours["run"], ("test",))
    torch_clf, int8 = imgcls.load(colours["run"]), load_onnx(colours["run"], int8=True)
    threshold = torch_clf.ood["threshold"]
    r32, r8 = torch_clf.scored_arrays(x)[1] < threshold, int8.scored_arrays(x)[1] < threshold
    ood = info["check"]["ood"]
    assert ood["score"] == "knn" and ood["threshold"] == threshold and "fp32" in ood["threshold_fitted_on"]
    assert ood["rejected_fp32"] == pytest.approx(r32.mean()) and 0.2 < ood["rejected_fp32"] < 0.8
    assert ood["rejected_int8"] == pytest.approx(r8.mean())
    assert ood["rejected_by_one_only"] == pytest.approx((r32 != r8).mean())
    assert "out-of-distribution threshold rejects" in check_summary(info["check"])
    assert int8.ood["threshold"] == threshold and "bank" not in int8.ood
    assert info["fp32_check"]["max_abs_diff_ood_score"] <= info["fp32_check"]["ood_score_tolerance"] == 1e-4


def test_plan_keeps_a_bank_matmul_after_the_classifier_fp32_and_finds_the_real_classifier():
    rng = np.random.default_rng(0)
    model = onnx.load_from_string(_tiny_graph(3))
    bank = onnx.numpy_helper.from_array(rng.normal(size=(4 * 6 * 6, 20)).astype(np.float32), "bank")
    k = onnx.numpy_helper.from_array(np.array([5], np.int64), "k")
    model.graph.initializer.extend([bank, k])
    model.graph.node.extend([onnx.helper.make_node("MatMul", ["f", "bank"], ["sim"], name="bank_matmul"),
                             onnx.helper.make_node("TopK", ["sim", "k"], ["top", "top_i"], name="topk")])
    model.graph.output.append(onnx.helper.make_tensor_value_info("top", onnx.TensorProto.FLOAT, ["N", 5]))
    _name_nodes(model)
    gemm = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    blind = plan(model)  # without knowing the score's output, the last dense layer is the bank's MatMul
    assert {k["node"]: k["why"] for k in blind["keep"]}["bank_matmul"].startswith("the classifier")
    assert gemm in blind["quantize"]
    told = plan(model, ("top",))
    why = {k["node"]: k["why"] for k in told["keep"]}
    assert why["bank_matmul"] == SCORE_WHY and why[gemm].startswith("the classifier")
    assert told["counts"] == {"Conv": 2} and "bank_matmul" in told["exclude"] and gemm not in told["quantize"]


def test_unreadable_calibration_images_name_the_data_and_the_fix(colours, tmp_path):
    run = tmp_path / "gone"
    shutil.copytree(colours["run"], run, ignore=shutil.ignore_patterns("export"))
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(colours["root"]), str(tmp_path / "photos-gone")))
    with pytest.raises(DataError, match=r"photos-gone.*cannot be read.*Put it back there.*--data"):
        export_onnx(run, int8=True)
    assert not (run / "export").exists()
    lone = tmp_path / "lone.safetensors"
    shutil.copy(find_checkpoint(colours["run"]), lone)
    with pytest.raises(DataError, match="run folder rather than a lone checkpoint"):
        export_onnx(lone, int8=True)
    assert not (tmp_path / "export").exists()


def _tiny_graph(convs: int) -> bytes:
    """float (N, 3, 8, 8) -> ``convs`` 3x3 / 1x1 convolutions -> flatten -> one dense layer -> (N, 2)."""
    rng = np.random.default_rng(0)
    init = [onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w0")]
    nodes = [onnx.helper.make_node("Conv", ["x", "w0"], ["c0"])]
    for i in range(1, convs):
        init.append(onnx.numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), f"w{i}"))
        nodes.append(onnx.helper.make_node("Conv", [f"c{i - 1}", f"w{i}"], [f"c{i}"]))
    init.append(onnx.numpy_helper.from_array(rng.normal(size=(4 * 6 * 6, 2)).astype(np.float32), "fc"))
    nodes += [onnx.helper.make_node("Flatten", [f"c{convs - 1}"], ["f"]), onnx.helper.make_node("Gemm", ["f", "fc"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes, "tiny", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])], init)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def test_a_graph_with_nothing_to_quantize_is_refused_clearly():
    images = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    # One convolution (the first, kept fp32) and one dense layer (the classifier, kept fp32): nothing left.
    with pytest.raises(ImgclsError, match=r"no layer to quantize.*first convolution.*classifier.*without --int8"):
        quantize_graph(_tiny_graph(1), images, input_name="x")
    # With a second convolution, that one is quantized.
    int8, info = quantize_graph(_tiny_graph(2), images, "minmax", "x")
    assert info["layers_int8"] == {"Conv": 1} and info["calibration"] == "minmax"
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load_from_string(int8).graph.node)
    assert _session(int8).run(None, {"x": images})[0].shape == (4, 2)


def test_missing_onnxruntime_quantization_names_the_package(colours, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # makes the import fail
    with pytest.raises(ImgclsError, match="pip install onnxruntime"):
        require_quantization()
    with pytest.raises(ImgclsError, match=r"onnxruntime\.quantization.*pip install onnxruntime"):
        export_onnx(colours["run"], int8=True, out=tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_bad_options_get_clear_errors(colours, tmp_path):
    with pytest.raises(ConfigError, match="choose one of: " + ", ".join(sorted(CALIBRATIONS))):
        export_onnx(colours["run"], int8=True, calibration="kl")
    for bad in (2.0, float("nan"), "1", True):
        with pytest.raises(ConfigError, match="max_drop must be a fraction between -1 and 1"):
            export_onnx(colours["run"], int8=True, max_drop=bad)
    with pytest.raises(ConfigError, match=r"calibration applies to an int8 export: add int8=True"):
        export_onnx(colours["run"], calibration="minmax")
    assert not list(tmp_path.iterdir())


def test_int8_figures_single_label_and_multilabel():
    p32 = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    same = int8_figures(p32, p32 + 0.01, y)
    assert same["top1_agreement"] == 1 and same["drop"] == 0 and same["passed"]
    flipped = int8_figures(p32, p32[:, ::-1], y)  # every prediction changes: accuracy 0.75 -> 0.25
    assert flipped["top1_agreement"] == 0 and flipped["drop"] == pytest.approx(0.5) and not flipped["passed"]
    assert int8_figures(p32, p32[:, ::-1], y, max_drop=0.5)["passed"]  # a drop of exactly max_drop passes

    sets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    ml = int8_figures(p32, p32, sets, multilabel=True, thresholds=[0.5, 0.5])
    assert ml["metric"] == "map" and ml["exact_set_agreement"] == 1 and ml["drop"] == 0 and ml["passed"]
    worse = int8_figures(p32, 1 - p32, sets, multilabel=True)
    assert worse["map_int8"] < worse["map_fp32"] and worse["exact_set_agreement"] == 0 and not worse["passed"]
    no_positive = int8_figures(p32, p32, np.zeros_like(sets), multilabel=True)
    assert no_positive["metric"] == "exact_set_accuracy" and no_positive["passed"]

    # The out-of-distribution threshold's rejections are reported, and do not decide the verdict.
    scored = int8_figures(p32, p32, y, ood=(np.array([0.9, 0.2, 0.1, 0.8]), np.array([0.1, 0.2, 0.9, 0.8]), 0.5))
    assert scored["passed"] and "ood" not in same
    assert scored["ood"]["rejected_fp32"] == 0.5 and scored["ood"]["rejected_int8"] == 0.5
    assert scored["ood"]["rejected_by_one_only"] == 0.5 and scored["ood"]["max_abs_diff_ood_score"] == pytest.approx(0.8)


def test_a_multilabel_run_is_checked_on_map_and_exact_sets(tmp_path, data_dir_env, multilabel_squares, ood_entry):
    root = tmp_path / "squares"
    multilabel_squares.write_folder(root, 160)
    run = imgcls.train(data=str(root), model="seed_tf_tutorial", image_size="32", epochs=4, batch_size=16,
                       out=str(tmp_path / "runs"), name="squares", quiet=True, report=False).path
    clf = imgcls.load(run)  # too few val images for training to fit a score: one is stored here, MSP of sigmoids
    update_meta(find_checkpoint(run), {"ood": ood_entry(clf, "msp", clf.dataset().splits["test"].images)})
    info = export_onnx(run, int8=True, max_drop=0.05)
    check = info["check"]
    assert check["metric"] == "map" and "top1_agreement" not in check
    assert check["map_fp32"] > 0.8 and abs(check["drop"]) <= 0.05 and check["exact_set_agreement"] >= 0.8
    assert info["fp32_check"]["max_abs_diff_ood_score"] <= info["fp32_check"]["ood_score_tolerance"] == 1e-4
    assert check["ood"]["score"] == "msp" and 0 < check["ood"]["rejected_fp32"] < 1
    torch_clf, int8 = imgcls.load(run), load_onnx(run, int8=True)
    assert int8.multilabel and int8.meta["thresholds"] == torch_clf.meta["thresholds"]
    images, _ = multilabel_squares.images(40, seed=7)
    got, expected = int8.proba_of_arrays(np.stack(images)), torch_clf.proba_of_arrays(np.stack(images))
    assert not np.allclose(got.sum(1), 1.0, atol=0.05)  # a sigmoid per label inside the graph, not a softmax
    assert np.abs(got - expected).mean() < 0.05
    same = [a == b for a, b in zip(int8.predict(np.stack(images)), torch_clf.predict(np.stack(images)))]
    assert np.mean(same) >= 0.8
