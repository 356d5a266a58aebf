"""`imgcls train --update RUN --data FOLDER`: a head-first run's classifier refitted on its data and a folder of new
photos, on the cached frozen features, into a new run folder; the refusals, which write nothing.

The runs are head-first on a small ResNet whose "pretrained" weights are a file of seeded random weights: its
frozen, pooled features tell coloured squares apart, and a run's stage 1 takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import imgcls
from imgcls import cli, rundir
from imgcls.checkpoint import load_model
from imgcls.data.registry import build_dataset
from imgcls.driver import make_config
from imgcls.errors import CheckpointError, ConfigError, DataError
from imgcls.models import create_model
from imgcls.training import transfer

SIDE = 32  # px
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
PER_CLASS = 40  # images of each class in the parent's data: 4 of them tested, 3 or 4 validated


def _write_class(root: Path, name: str, n: int, seed: int, colour: str | None = None) -> list[Path]:
    """``n`` PNGs in ``root/name``: a square of ``colour`` (default: the class's own) on dark noise."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = rng.integers(0, 60, (SIDE, SIDE, 3), dtype=np.uint8)
        side = int(rng.integers(12, 20))
        y, x = rng.integers(0, SIDE - side, 2)
        rgb = np.array(COLOURS[colour or name]) + rng.integers(-20, 21, 3)
        img[y:y + side, x:x + side] = np.clip(rgb, 0, 255).astype(np.uint8)
        paths.append(root / name / f"{name}-{seed}-{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = create_model("resnet8", in_chans=3, num_classes=3, img_size=(SIDE, SIDE), width=0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _train(data: Path, out: Path, name: str, weights: Path, **extra) -> Path:
    options = {"model": "resnet8", "model_option": {"width": 0.5}, "pretrained": str(weights), "head_first": True,
               "epochs": 0, "report": False, "eval_batch_size": 64, **extra}
    return imgcls.train(data=str(data), out=str(out), name=name, quiet=True, **options).path


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir_env, one_thread):
    """The parent's data (red, green, blue), its head-first run, and a folder adding yellow and more green."""
    root = tmp_path_factory.mktemp("update")
    for seed, colour in enumerate(("red", "green", "blue")):
        _write_class(root / "parent-data", colour, PER_CLASS, seed)
    weights = _weights(root / "weights.safetensors")
    parent = _train(root / "parent-data", root / "runs", "parent", weights)
    _write_class(root / "new", "yellow", 30, 10)
    _write_class(root / "new", "green", 10, 11)
    return {"root": root, "parent": parent, "weights": weights, "runs": root / "runs"}


@pytest.fixture(scope="module")
def updated(world):
    """The update of the parent with ``new``, the images the backbone saw while it ran, and the parent's files."""
    before = _snapshot(world["parent"])
    seen = []
    original = transfer.compute_features
    with pytest.MonkeyPatch.context() as mp:
        def counting(runner, images, view="none"):
            seen.append((len(images), view))
            return original(runner, images, view)

        mp.setattr(transfer, "compute_features", counting)
        run = imgcls.train(update=world["parent"], data=str(world["root"] / "new"), quiet=True)
    return {"run": run, "seen": seen, "before": before}


def test_the_update_adds_the_new_class_after_the_old_ones_and_predicts_it(world, updated):
    run = updated["run"]
    assert run.path == world["runs"] / "parent-update"
    model, meta = load_model(run.path)
    # The parent's classes keep their order (and so their rows of the classifier); the new one comes after.
    assert meta["classes"] == ["blue", "green", "red", "yellow"]
    assert model.head.fc.weight.shape[0] == 4
    fresh = _write_class(world["root"] / "unseen", "yellow", 20, 99) + _write_class(world["root"] / "unseen", "red",
                                                                                     10, 98)
    predicted = imgcls.load(run.path).predict([str(p) for p in fresh])
    assert (predicted[:20] == "yellow").mean() >= 0.9 and (predicted[20:] == "red").mean() >= 0.9
    assert run.test_metrics["accuracy"] >= 0.9


def test_the_new_run_names_its_parent_and_what_was_added(world, updated):
    path = updated["run"].path
    info = json.loads((path / rundir.RUN).read_text())
    assert info["parent"] == str(world["parent"]) and info["epochs_run"] == 0
    assert info["added"]["new_classes"] == ["yellow"] and info["added"]["more_photos_of"] == ["green"]
    assert sum(info["added"]["images"].values()) == 40
    config = yaml.safe_load((path / rundir.CONFIG).read_text())
    assert config["data"]["added"] == [str(world["root"] / "new")]
    assert config["data"]["dataset"] == str(world["root"] / "parent-data")
    assert (path / "eval_test.json").is_file() and (path / "checkpoints" / "best.safetensors").is_file()
    assert "the parent's test images" in (path / rundir.LOG).read_text()


def test_only_the_new_images_go_through_the_backbone(updated):
    # tta none and no flip augmentation: one view, so each new image passes once; none of the parent's does.
    assert sum(n for n, _ in updated["seen"]) == 40
    assert {view for _, view in updated["seen"]} == {"none"}
    assert json.loads((updated["run"].path / rundir.RUN).read_text())["update"]["frozen_passes"] == 40


def test_the_old_test_images_are_scored_as_before(world, updated):
    parent_info = json.loads((world["parent"] / rundir.RUN).read_text())
    rows = json.loads((updated["run"].path / rundir.RUN).read_text())["update"]["comparison"]
    old, new, every = rows
    assert old["images"] == "the parent's test images" and old["count"] == 12
    assert old["parent"] == pytest.approx(parent_info["test_accuracy"])
    assert new["count"] == 4 and new["parent"] is None  # three of them are yellow, a class the parent never saw
    # The new run's own data (its config.yaml: the parent's data and the folder added) rebuilds the same test split,
    # the parent's test images first, and the model scores it as the frozen features did.
    clf = imgcls.load(updated["run"].path)
    ds = clf.dataset()
    parent_ds = imgcls.load(world["parent"]).dataset()
    n = len(parent_ds.splits["test"])
    assert np.array_equal(ds.splits["test"].images[:n], parent_ds.splits["test"].images)
    assert np.array_equal(ds.splits["test"].labels[:n], parent_ds.splits["test"].labels)
    assert clf.evaluate()["accuracy"] == pytest.approx(every["updated"])
    assert every["updated"] == pytest.approx(updated["run"].test_metrics["accuracy"])


def test_the_parent_folder_is_untouched(world, updated):
    assert _snapshot(world["parent"]) == updated["before"]


def test_a_second_update_of_the_same_folder_finds_every_feature_in_the_cache_and_takes_a_new_name(world, updated,
                                                                                                 monkeypatch):
    monkeypatch.setattr(transfer, "compute_features", lambda *a, **k: pytest.fail("the backbone ran"))
    again = imgcls.train(update=world["parent"], data=str(world["root"] / "new"), quiet=True)
    assert again.path.name == "parent-update-2"
    assert again.test_metrics["accuracy"] == updated["run"].test_metrics["accuracy"]
    shutil.rmtree(again.path)


def test_an_updated_run_updates_again_and_its_data_is_rebuilt_from_its_config(world, updated, tmp_path):
    _write_class(tmp_path / "more", "red", 8, 20)
    run = imgcls.train(update=updated["run"].path, data=str(tmp_path / "more"), quiet=True)
    assert run.path.name == "parent-update-2" or run.path.name.startswith("parent-update")
    cfg = make_config(run.path / rundir.CONFIG)
    assert cfg.data.added == [str(world["root"] / "new"), str(tmp_path / "more")]
    ds = build_dataset(cfg.data, seed=cfg.train.seed)
    assert ds.classes == ["blue", "green", "red", "yellow"] and sum(len(s) for s in ds.splits.values()) == 168
    # More photos of classes the parent knows: it is scored on the new test images too.
    rows = json.loads((run.path / rundir.RUN).read_text())["update"]["comparison"]
    assert rows[1]["count"] == 1 and all(r["parent"] is not None for r in rows)
    shutil.rmtree(run.path)


def test_a_failure_while_the_new_run_is_written_removes_it(world, monkeypatch):
    from imgcls import update

    def broken(*args, **kwargs):
        raise OSError("disk full, say")

    monkeypatch.setattr(update, "evaluate_model", broken)
    _refused(world, OSError, "disk full, say", data=world["root"] / "new")


# ----------------------------------------------------------------------------
# Refusals: each names its input, and leaves no run folder


def _refused(world, error, match, run=None, data=None, **extra):
    runs = world["runs"]
    before = sorted(p.name for p in runs.iterdir())
    parent_files = _snapshot(world["parent"])
    with pytest.raises(error, match=match):
        imgcls.train(update=run or world["parent"], data=None if data is None else str(data), quiet=True, **extra)
    assert sorted(p.name for p in runs.iterdir()) == before
    assert _snapshot(world["parent"]) == parent_files


def test_a_fine_tuned_run_is_refused(world, tmp_path):
    tuned = _train(world["root"] / "parent-data", tmp_path, "tuned", world["weights"], epochs=1, batch_size=32)
    _write_class(tmp_path / "new", "yellow", 6, 30)
    before = _snapshot(tuned)
    with pytest.raises(CheckpointError, match=r"was fine-tuned \(1 epochs after stage 1\): its backbone moved"):
        imgcls.train(update=tuned, data=str(tmp_path / "new"), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "tuned"] and _snapshot(tuned) == before


def test_a_class_renamed_is_refused_naming_its_images(world, tmp_path):
    # The parent's red squares, copied into a folder of another name: a class renamed.
    (tmp_path / "new" / "crimson").mkdir(parents=True)
    for path in sorted((world["root"] / "parent-data" / "red").iterdir())[:5]:
        shutil.copy(path, tmp_path / "new" / "crimson" / f"copy-{path.name}")
    _write_class(tmp_path / "new", "yellow", 6, 31)
    _refused(world, DataError, r"new: class crimson holds images that .*parent-data has under another class \(5 "
                               r"images in all\), as a class renamed would: .*crimson/copy-red-0-00\d\.png \(crimson\) "
                               r"is .*red-0-00\d\.png \(red\)", data=tmp_path / "new")


def test_a_photo_the_run_has_under_another_class_is_left_out_with_a_warning(world, tmp_path):
    _write_class(tmp_path / "new", "yellow", 12, 33)
    stray = min((world["root"] / "parent-data" / "red").iterdir())
    shutil.copy(stray, tmp_path / "new" / "yellow" / "filed-twice.png")  # as flowers.zip has a rose among its tulips
    run = imgcls.train(update=world["parent"], data=str(tmp_path / "new"), out=str(tmp_path / "runs"), quiet=True)
    log = (run.path / rundir.LOG).read_text()
    assert "warning: 1 image of" in log and "filed-twice.png (yellow) is" in log and "(red)" in log
    info = json.loads((run.path / rundir.RUN).read_text())
    assert info["added"]["left_out_already_in_parent"] == 1 and sum(info["added"]["images"].values()) == 13


def test_photos_already_in_the_run_as_the_same_class_are_left_out_and_a_folder_of_only_them_adds_nothing(world,
                                                                                                       tmp_path):
    (tmp_path / "new" / "red").mkdir(parents=True)
    for path in sorted((world["root"] / "parent-data" / "red").iterdir())[:3]:
        shutil.copy(path, tmp_path / "new" / "red" / path.name)
    _refused(world, DataError, r"adds no image: all 3 images in it are already in .*parent-data",
             data=tmp_path / "new")


def test_a_backbone_that_is_not_the_weights_the_config_names_is_refused(world, tmp_path):
    run = tmp_path / "runs" / "copy"
    shutil.copytree(world["parent"], run)
    config = yaml.safe_load((run / rundir.CONFIG).read_text())
    config["model"]["pretrained"] = str(_weights(tmp_path / "other.safetensors", seed=1))  # the file changed
    (run / rundir.CONFIG).write_text(yaml.safe_dump(config))
    _write_class(tmp_path / "new", "yellow", 6, 32)
    with pytest.raises(CheckpointError, match=r"the backbone of run .*copy differs from the weights its config names "
                                              r"\(.*other\.safetensors\)"):
        imgcls.train(update=run, data=str(tmp_path / "new"), quiet=True)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["copy"]


def test_an_empty_or_missing_folder_is_refused(world, tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(world, DataError, r"empty: found no class folders in the top folder; at least 1 needed", data=tmp_path / "empty")
    (tmp_path / "hollow" / "yellow").mkdir(parents=True)
    (tmp_path / "hollow" / "yellow" / "notes.txt").write_text("no image here")
    _refused(world, DataError, r"hollow: class folder yellow/ holds no image", data=tmp_path / "hollow")
    _refused(world, DataError, r"the folder to add, .*nowhere, does not exist", data=tmp_path / "nowhere")


def test_a_folder_that_is_not_a_finished_run_is_refused(world, tmp_path):
    _refused(world, CheckpointError, r"--update .*parent-data is not a run folder \(no config.yaml\)",
             run=world["root"] / "parent-data", data=world["root"] / "new")
    _refused(world, CheckpointError, r"--update .*nothing does not exist", run=tmp_path / "nothing",
             data=world["root"] / "new")


def test_settings_beside_the_folder_are_refused(world):
    _refused(world, ConfigError, r"it takes only --data .*\(got --lr\)", data=world["root"] / "new", lr=0.1)
    _refused(world, ConfigError, r"needs --data FOLDER")


def test_the_command_line_prints_the_comparison_and_refuses_with_one_line(world, updated, tmp_path, capsys):
    assert cli.main(["train", "--update", str(world["parent"]), "--data", str(world["root"] / "new"),
                     "--out", str(tmp_path), "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "the parent's test images" in out and "all test images" in out and (tmp_path / "cli").is_dir()
    assert cli.main(["train", "--update", str(world["parent"]), "--data", str(world["root"] / "new"),
                     "--epochs", "3"]) == 2
    assert "error: an update keeps the settings of the run it updates" in capsys.readouterr().err


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_a_head_first_run_scores_outside_images_on_cached_features_as_its_model_does(world, tta):
    # Stage 1 measures the out-of-distribution scores of images from outside the classes on their frozen features
    # (cached) and the classifier alone; the whole model, as a fine-tuned run does, must give the same.
    from imgcls.training.rejection import logits_and_features

    clf = imgcls.load(world["parent"], device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (20, SIDE, SIDE, 3), dtype=np.uint8)
    runner = transfer.FeatureRunner.create(clf.model, clf.runtime, (SIDE, SIDE), clf.meta["normalize"])
    store = transfer.FeatureStore(runner, None, "backbone", say=lambda _: None)
    logits, pooled = logits_and_features(clf.model, images, tta, clf.meta["normalize"], store, clf.runtime, 64)
    assert store.computed == 20 * (2 if tta == "flip" else 1)
    whole_logits, whole_pooled = logits_and_features(clf.model, images, tta, clf.meta["normalize"], None, clf.runtime, 64)
    assert torch.allclose(logits, whole_logits, atol=1e-4) and np.allclose(pooled, whole_pooled, atol=1e-4)
    assert not torch.allclose(logits, logits_and_features(clf.model, images[:, :, ::-1].copy(), "none",
                                                          clf.meta["normalize"], None, clf.runtime, 64)[0], atol=1e-2)


def test_a_head_first_run_exports_its_backbone_to_onnx_runtime_once(world, tmp_path, monkeypatch):
    # Stage 1's frozen pass and the out-of-distribution measurement after it share one runner: its ONNX Runtime
    # export (1-2 s of a photo run) is made once.
    from imgcls.training import rejection

    monkeypatch.setattr(transfer, "ORT_MIN_IMAGES", 1)  # ONNX Runtime for the few images here
    monkeypatch.setattr(rejection, "MIN_VAL", 5)  # a score fitted on this run's 12 val images
    exports = []
    original = transfer._ort_session
    monkeypatch.setattr(transfer, "_ort_session", lambda *a, **k: exports.append(1) or original(*a, **k))
    run = _train(world["root"] / "parent-data", tmp_path / "runs", "once", world["weights"], cache=False)
    assert load_model(run)[1]["ood"]["score"] in ("msp", "energy", "knn") and len(exports) == 1
