"""End-to-end training on the built-in digits: accuracy floor, resume, NaN, early stopping."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import imgcls
from imgcls.checkpoint import read_checkpoint
from imgcls.data.registry import build_dataset
from imgcls.errors import ConfigError, TrainingError

SMALL = {"model_option": {"widths": [8, 16, 16]}}


def test_default_run_reaches_95_percent_on_digits(tmp_path):
    run = imgcls.train(out=str(tmp_path), name="digits", quiet=True, report=False)
    assert run.test_metrics["accuracy"] >= 0.95
    files = {p.relative_to(run.path).as_posix() for p in run.path.rglob("*")}
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/best.safetensors", "checkpoints/last.safetensors",
                 "environment.json", "dataset.json", "train.log", "run.json", "eval_test.json", "eval_test.csv"):
        assert name in files
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 11))
    # The classifier rebuilt from the checkpoint alone reports the same test figures.
    again = imgcls.load(run.path).evaluate()
    assert again["accuracy"] == pytest.approx(run.test_metrics["accuracy"])
    assert again["confusion_matrix"] == run.test_metrics["confusion_matrix"]


def _cli(*args):
    return [sys.executable, "-m", "imgcls.cli", *args]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    common = ["--epochs", "10", "--no-report", "--out", str(tmp_path), "--model-option", "widths=[8,16,16]",
              "--schedule", "cosine", "--augment", "hflip,translate:1", "--optimizer", "sgd", "--lr", "0.05"]
    subprocess.run(_cli("train", "--name", "whole", *common), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cli("train", "--name", "killed", *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.safetensors"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = read_checkpoint(last)[1]["epoch"]
    assert killed_after < 10, "the run finished before it could be killed"
    subprocess.run(_cli("train", "--resume", str(tmp_path / "killed")), check=True, capture_output=True, timeout=600)

    def metrics(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    whole, resumed = metrics("whole"), metrics("killed")
    assert [r["epoch"] for r in resumed] == list(range(1, 11))
    for a, b in zip(whole, resumed):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert a[key] == b[key], (a["epoch"], key)
    wa, _ = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    wb, _ = read_checkpoint(last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = json.loads((tmp_path / "whole" / "eval_test.json").read_text())
    rb = json.loads((tmp_path / "killed" / "eval_test.json").read_text())
    assert ra["accuracy"] == rb["accuracy"] and ra["confusion_matrix"] == rb["confusion_matrix"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import imgcls.training.trainer as trainer

    real = trainer.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 25 else loss  # digits: 20 steps an epoch at batch 64

    monkeypatch.setattr(trainer.F, "cross_entropy", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at epoch 2"):
        imgcls.train(out=str(tmp_path), name="nan", epochs=3, quiet=True, report=False, **SMALL)
    state, meta = read_checkpoint(tmp_path / "nan" / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_early_stopping_stops_and_restores_the_best_epoch(tmp_path):
    # Digits saturate val accuracy within a few epochs, so patience 2 ends the run early.
    run = imgcls.train(out=str(tmp_path), name="es", epochs=30, early_stopping=True, patience=2,
                       monitor="val_accuracy", quiet=True, report=False, **SMALL)
    info = json.loads((run.path / "run.json").read_text())
    assert info["stopped_early"] and info["epochs_run"] < 30
    assert info["epochs_run"] == info["best_epoch"] + 2
    best = max(r["val_accuracy"] for r in run.history)
    _, meta = read_checkpoint(run.path / "checkpoints" / "best.safetensors")
    assert meta["metrics"]["val_accuracy"] == best and meta["epoch"] == info["best_epoch"]


def test_config_yaml_repeats_the_run_in_a_new_folder(tmp_path):
    first = imgcls.train(out=str(tmp_path), name="a", epochs=2, augment="hflip,cutout:2", quiet=True, report=False, **SMALL)
    again = imgcls.train(first.path / "config.yaml", quiet=True, report=False)
    assert again.path.name == "a-2"
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    assert [[r[k] for k in keys] for r in first.history] == [[r[k] for k in keys] for r in again.history]


def test_classifier_accepts_paths_pil_images_and_arrays(tmp_path):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    run = imgcls.train(out=str(tmp_path), name="p", epochs=8, quiet=True, report=False)
    clf = run.load()
    digits = load_digits()
    pixels = np.rint(digits.images * 255 / 16).astype(np.uint8)
    # The run's own seeded split decides which images were held out for testing.
    ds_test = build_dataset(run.config.data, seed=run.config.train.seed).splits["test"]
    array_pred = clf.predict(ds_test.images)
    assert (array_pred == np.array(clf.classes)[ds_test.labels]).mean() >= 0.9
    Image.fromarray(pixels[5]).save(tmp_path / "five.png")
    by_path = clf.predict_proba(tmp_path / "five.png")
    by_pil = clf.predict_proba(Image.fromarray(pixels[5]))
    by_array = clf.predict_proba(pixels[5])
    assert by_path.shape == (1, 10)
    assert np.allclose(by_path, by_pil) and np.allclose(by_pil, by_array)
    assert np.allclose(clf.predict_proba([pixels[5], pixels[5]]).sum(1), 1.0)


def test_a_resumed_run_with_lookahead_tta_and_norm_lr_scale_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    # The airbench pieces keep state beyond the optimiser (the lookahead average) and are resumed exactly,
    # as is Muon's (imgcls's own optimiser: its momentum for the filters and for the rest); the stem's bias
    # is frozen after the resume point (epoch 2 of 3); progressive resizing (6x6 for the first 1.5 epochs)
    # goes on past it.
    import imgcls.training.trainer as trainer

    opts = dict(out=str(tmp_path), quiet=True, report=False, epochs=3, optimizer="muon", nesterov=True, lr=0.2,
                momentum=0.85, muon_lr=0.24, muon_momentum=0.6, weight_decay=1e-3, norm_lr_scale=16.0, lookahead=True, tta="flip", schedule="linear",
                warmup_epochs=1, warmup_start=0.2, min_lr=0.01, batch_size=128, augment="hflip,crop:1",
                model_option={"widths": [8, 16, 16], "whiten": True, "dirac": True, "bn_scale": False,
                              "whiten_bias_epochs": 2}, low_res_scale=0.75, low_res_epochs=1.5)
    bias_grads = []  # whether the stem's bias had a gradient at the end of each epoch
    sides = []  # the side of every batch the model trained on
    real_epoch = trainer.train_one_epoch

    def spy_epoch(s, progress):
        hook = s.model.register_forward_pre_hook(lambda m, args: sides.append(args[0].shape[-1]))
        try:
            return real_epoch(s, progress)
        finally:
            hook.remove()

    monkeypatch.setattr(trainer, "train_one_epoch", spy_epoch)
    whole = imgcls.train(name="whole", on_epoch_end=lambda s, r: bias_grads.append(
        s.model.features.stem.conv.bias.grad is not None), **opts)
    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    steps = len(sides) // 3  # 1,439 training images in batches of 128: 12 steps an epoch
    assert (steps, len(sides)) == (12, 36)
    assert sides == [6] * 18 + [8] * 18
    real = trainer._save_epoch

    def save_then_stop(s, run, record, is_best):
        real(s, run, record, is_best)
        if s.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_epoch", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        imgcls.train(name="cut", **opts)
    monkeypatch.setattr(trainer, "_save_epoch", real)
    resumed = imgcls.train(resume=tmp_path / "cut", quiet=True)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    assert [[r[k] for k in keys] for r in whole.history] == [[r[k] for k in keys] for r in resumed.history]
    wa, meta = read_checkpoint(whole.path / "checkpoints" / "last.safetensors")
    wb, _ = read_checkpoint(resumed.path / "checkpoints" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert meta["tta"] == "flip"
    assert resumed.test_metrics["accuracy"] == whole.test_metrics["accuracy"] >= 0.7  # chance is 0.1
    # The stem's bias trained in epochs 1 and 2 and not in 3.
    assert bias_grads == [True, True, False]


def test_progressive_resizing_refuses_a_model_that_cannot_take_the_smaller_images(tmp_path):
    # seed_tf_tutorial flattens a fixed-size feature map into its dense layer: 24x24 inputs do not fit it.
    with pytest.raises(ConfigError, match=r"low_res_scale 0.75 would train model 'seed_tf_tutorial' on 24x24 "
                                          r"images \(the data is 32x32\), and it cannot take them"):
        imgcls.train(out=str(tmp_path), name="refused", quiet=True, report=False, model="seed_tf_tutorial",
                     image_size=32, epochs=1, low_res_scale=0.75, low_res_epochs=1)
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_two_resumes_at_once_the_second_is_refused_naming_the_first(tmp_path):
    common = ["--no-report", "--out", str(tmp_path), "--model-option", "widths=[8,16,16]"]
    subprocess.run(_cli("train", "--name", "run", "--epochs", "1", *common), check=True, capture_output=True,
                   timeout=600)
    run = tmp_path / "run"
    first = subprocess.Popen(_cli("train", "--resume", str(run), "--epochs", "400"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        lock = run / ".lock"
        while time.time() < deadline and first.poll() is None:
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first resume ended before the second could start"
        second = subprocess.run(_cli("train", "--resume", str(run), "--epochs", "3"), capture_output=True, check=False,
                                text=True, timeout=600)
        assert second.returncode == 2
        assert f"in use by another imgcls process (PID {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first goes on untouched
    finally:
        first.kill()
        first.wait()
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer: no epoch twice
    # The lock died with its holder: the run can be resumed again.
    again = subprocess.run(_cli("train", "--resume", str(run), "--epochs", str(len(epochs) + 1)),
                           capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]


def test_an_epoch_stops_taking_steps_when_the_time_budget_runs_out(tmp_path, monkeypatch):
    import re

    from imgcls.training import trainer

    real_epoch = trainer.train_one_epoch

    def late(s, progress):
        assert s.deadline is not None  # set from the budget before every epoch
        s.deadline = time.perf_counter() - 1.0  # as if the run had gone past its estimate
        return real_epoch(s, progress)

    monkeypatch.setattr(trainer, "train_one_epoch", late)
    run = imgcls.train(out=str(tmp_path), quiet=True, report=False, epochs=3, time_budget="1h", batch_size=64)
    assert [r["epoch"] for r in run.history] == [1] and run.history[0]["steps"] == 1
    assert "val_loss" in run.history[0] and run.test_metrics["accuracy"] > 0
    log = (run.path / "train.log").read_text()
    assert re.search(r"time budget: 1h is spent; epoch 1 stopped after 1 of 2\d steps", log)
    assert json.loads((run.path / "run.json").read_text())["stopped_early"] is True
