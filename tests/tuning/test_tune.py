"""imgcls tune on the built-in digits: a study of tiny trials, its files, and bad input refused before any trial."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imgcls

optuna = pytest.importorskip("optuna")

from imgcls import api
from imgcls.cli import main
from imgcls.errors import ConfigError
from imgcls.rundir import read_history
from imgcls.tuning.space import read_space

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[2] / "src"

TINY = {"epochs": 2, "model": "fastnet_small", "model_option": {"widths": [8, 8, 8]}}
TINY_FLAGS = ["--epochs", "2", "--model", "fastnet_small", "--model-option", "widths=[8,8,8]"]


def _write(path, text: str):
    path.write_text(text)
    return path


def _study(path) -> dict:
    return json.loads((path / "study.json").read_text())


def _images(page: str) -> dict[str, bytes]:
    """tune.html's embedded figures: alt text -> PNG bytes."""
    found = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'>", page)
    return {alt: base64.b64decode(data) for alt, data in found}


def _section(page: str, title: str) -> str:
    """The HTML of the page's section titled ``title``."""
    match = re.search(rf"<section id='s\d+'><h2>{title}</h2>(.*?)</section>", page)
    assert match, f"no section {title!r}"
    return match.group(1)


@pytest.mark.slow  # several seconds: the default run stays under 5 minutes
def test_a_study_runs_its_trials_and_its_best_config_trains_again(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["tune", *TINY_FLAGS, "--trials", "3", "--out", str(out), "--study", "s", "--sampler", "random",
                 "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    folder = out / "s"
    summary = _study(folder)
    assert summary["finished"] == 3 and sorted(t["trial"] for t in summary["trials"]) == [0, 1, 2]
    assert sum(summary["counts"].values()) == 3
    assert summary["counts"]["complete"] >= 1
    for line in ("leaderboard of study s", "trial   0", "trial   1", "trial   2", "best: trial"):
        assert line in printed
    # Every trial is an ordinary run folder; trials.csv has a row per trial with the searched fields.
    for t in summary["trials"]:
        assert (folder / f"trial-{t['trial']}" / "config.yaml").is_file()
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert {"lr", "weight_decay", "batch_size", "optimizer", "augment"} <= set(rows[0])
    page = (folder / "tune.html").read_text()
    assert "Leaderboard" in page and (folder / "study.db").is_file()
    # The parameters' section: parallel coordinates of the complete trials and one slice plot per parameter.
    figures = _images(_section(page, "Parameters"))
    assert set(figures) == {"tune_parallel", *(f"tune_slice_{name}" for name in summary["space"])}
    assert all(png.startswith(b"\x89PNG") and len(png) > 5_000 for png in figures.values())
    assert "tune_history" in _images(_section(page, "Study"))
    # best/config.yaml holds the best trial's values and repeats its run exactly.
    best = folder / "best" / "config.yaml"
    cfg = api.make_config(best)
    for key, value in summary["best_params"].items():
        got = getattr(cfg.train, key)
        assert (",".join(got) if key == "augment" else got) == value, key
    assert main(["train", "--config", str(best), "--out", str(tmp_path / "again"), "--name", "again", "--quiet",
                 "--no-report"]) == 0
    trial = read_history(summary["best_run"])
    again = read_history(tmp_path / "again" / "again")
    assert [r["val_loss"] for r in again] == pytest.approx([r["val_loss"] for r in trial], abs=1e-6)
    # The trial's value is the metric of the weights it ended with (the best checkpoint's epoch).
    best_epoch = json.loads((tmp_path / summary["best_run"] / "run.json").read_text())["best_epoch"]
    assert summary["best_value"] == next(r["val_accuracy"] for r in trial if r["epoch"] == best_epoch)


@pytest.mark.parametrize("space, message", [
    ("lrr: {low: 0.001, high: 0.1}", "unknown config field 'lrr'"),
    ("lr: {low: 0.1, high: 0.01}", "bad range: low 0.1 must be below high 0.01"),
    ("weight_decay: {low: 0, high: 0.01, log: true}", "a log range needs low above 0"),
    ("optimizer: {low: 1, high: 2}", "is not a number, so it takes a list of choices"),
    ("lr: [fast, 0.01]", "train.lr must be a number"),
    ("batch_size: {low: 8, high: 64.5}", "train.batch_size must be a whole number"),
    ("label_smoothing: {low: 0.0, high: 1.5}", "label_smoothing must be a number in [0, 0.999]"),
    ("optimizer: [adam, nadam]", "optimizer 'nadam' is not accepted"),
    ("data: [digits, mnist]", "data cannot be searched"),
    ("model_option: [a, b]", "name one model option at a time, as model_option.KEY"),
    ("model_option.depth: [1, 2]", "model 'fastnet_small' does not accept these options ['depth']; it takes: widths"),
    ("model.options.pool: [ceil, middle]", "space: model_option.pool: choice 'middle' is refused: pool must be"),
    ("model_option.widths: [[8, 8, 8], [16, 16, 16]]",
     "model_option.widths is both given (--model-option widths=...) and searched"),
])
def test_a_bad_space_is_refused_before_any_trial(tmp_path, capsys, space, message):
    path = _write(tmp_path / "space.yaml", space + "\n")
    out = tmp_path / "runs"
    assert main(["tune", *TINY_FLAGS, "--trials", "2", "--out", str(out), "--study", "s", "--space", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "s").exists()


def test_a_model_option_is_refused_with_the_message_training_gives(tmp_path, capsys):
    path = _write(tmp_path / "space.yaml", "model_option.depth: [1, 2]\n")
    assert main(["tune", "--epochs", "1", "--out", str(tmp_path / "runs"), "--space", str(path)]) == 2
    refused = capsys.readouterr().err.strip()
    assert main(["train", "--epochs", "1", "--model-option", "depth=1", "--out", str(tmp_path / "t"), "--quiet"]) == 2
    trained = capsys.readouterr().err.strip()
    assert refused == f"error: space: model_option.depth: choice 1 is refused: {trained.removeprefix('error: ')}"
    assert not (tmp_path / "runs").exists()
    # An option given beside the space (not searched) is refused before any trial too.
    space = {"lr": [0.01]}
    with pytest.raises(ConfigError, match=r"does not accept these options \['depth'\]"):
        api.tune(trials=1, epochs=1, model_option={"depth": 1}, space=space, out=str(tmp_path / "runs"), quiet=True)
    assert not (tmp_path / "runs").exists()


def test_a_space_of_model_widths_trains_each_trial_at_its_widths(tmp_path):
    from imgcls.models import create_model

    choices = [[8, 8, 8], [16, 16, 32]]
    summary = api.tune(trials=2, epochs=1, model="fastnet_small", model_option={"bn_scale": False},
                       space={"model.options.widths": {"choices": choices}}, sampler="grid", out=str(tmp_path),
                       study="w", quiet=True)
    assert summary["counts"]["complete"] == 2
    assert summary["space"] == {"model_option.widths": {"choices": choices}}
    chosen = sorted(t["params"]["model_option.widths"] for t in summary["trials"])  # lists, not Optuna's text
    assert chosen == choices
    for t in summary["trials"]:
        run = tmp_path / "w" / t["run"]
        options = api.make_config(run / "config.yaml").model.options
        widths = t["params"]["model_option.widths"]
        assert options == {"widths": widths, "bn_scale": False}  # the searched option joins the given one
        count = json.loads((run / "run.json").read_text())["parameters"]
        model = create_model("fastnet_small", 1, 10, (8, 8), widths=widths, bn_scale=False)  # digits: 1x8x8
        assert count == sum(p.numel() for p in model.parameters())
    counts = {json.loads((tmp_path / "w" / t["run"] / "run.json").read_text())["parameters"]
              for t in summary["trials"]}
    assert len(counts) == 2
    rows = list(csv.DictReader((tmp_path / "w" / "trials.csv").open()))
    assert sorted(r["model_option.widths"] for r in rows) == ["[16, 16, 32]", "[8, 8, 8]"]
    best = api.make_config(summary["best_config"])
    assert best.model.options["widths"] == summary["best_params"]["model_option.widths"]


@pytest.mark.parametrize("space, trials, complete", [
    ({"optimizer": ["adam", "adamw"]}, 1, 1),  # one trial, choices only
    ({"batch_size": [5000]}, 1, 0),  # every trial failed (larger than the training split)
])
def test_the_page_has_its_parameter_figures_for_one_trial_or_none_complete(tmp_path, space, trials, complete):
    summary = api.tune(trials=trials, **TINY, space=space, out=str(tmp_path), study="p", sampler="random",
                       quiet=True)
    assert summary["counts"]["complete"] == complete and summary["finished"] == trials
    section = _section((tmp_path / "p" / "tune.html").read_text(), "Parameters")
    figures = _images(section)
    if complete:
        assert set(figures) == {"tune_parallel", *(f"tune_slice_{name}" for name in space)}
    else:
        assert figures == {} and "no trial has a val_accuracy yet (1 failed" in section


def test_a_field_both_given_and_searched_and_a_continuous_grid_are_refused(tmp_path, capsys):
    path = _write(tmp_path / "space.yaml", "lr: {low: 0.001, high: 0.1, log: true}\n")
    out = tmp_path / "runs"
    assert main(["tune", *TINY_FLAGS, "--lr", "0.01", "--out", str(out), "--space", str(path)]) == 2
    assert "lr is both given (--lr) and searched" in capsys.readouterr().err
    assert main(["tune", *TINY_FLAGS, "--out", str(out), "--space", str(path), "--sampler", "grid"]) == 2
    assert "grid sampler needs a finite space, but lr is a continuous range" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("url, message", [
    ("nosuchdb://host/db", "unknown database kind 'nosuchdb'"),
    ("not a url", "is not a database URL"),
    ("sqlite:////nonexistent-folder/sub/study.db", "the database cannot be opened"),
    ("sqlite://", "a database in memory, which keeps nothing"),
])
def test_a_storage_that_cannot_be_used_is_refused_before_any_trial(tmp_path, capsys, url, message):
    out = tmp_path / "runs"
    assert main(["tune", *TINY_FLAGS, "--out", str(out), "--study", "s", "--storage", url]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("driver", ["postgresql", "postgresql+psycopg"])  # the default driver, and psycopg 3 named
def test_an_unreachable_database_is_one_line_without_its_password(tmp_path, capsys, driver):
    out = tmp_path / "runs"
    code = main(["tune", *TINY_FLAGS, "--out", str(out), "--storage", f"{driver}://me:s3cret@127.0.0.1:1/db"])
    err = capsys.readouterr().err
    assert code == 2 and ("cannot be opened" in err or "driver 'psycopg2' is not installed" in err)
    assert "s3cret" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow  # several seconds: the default run stays under 5 minutes
def test_running_again_continues_the_study_and_another_space_is_refused(tmp_path):
    space = {"lr": {"low": 1e-3, "high": 3e-2, "log": True}}
    common = dict(TINY, out=str(tmp_path), study="c", space=space, sampler="random", quiet=True)
    first = imgcls.tune(trials=2, **common)  # the package's face, as api.tune
    assert first["finished"] == 2
    second = api.tune(trials=4, **common)
    numbers = [t["trial"] for t in second["trials"]]
    assert numbers == [0, 1, 2, 3] and second["finished"] == 4
    # The first two trials are the same ones, not repeated.
    assert [t["params"] for t in second["trials"][:2]] == [t["params"] for t in first["trials"]]
    assert sorted(p.name for p in tmp_path.joinpath("c").glob("trial-*")) == [f"trial-{i}" for i in range(4)]
    # Reaching the number again runs nothing more.
    assert [t["trial"] for t in api.tune(trials=4, **common)["trials"]] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="made with another search space .*lr"):
        api.tune(trials=5, **{**common, "space": {"lr": {"low": 1e-4, "high": 3e-2, "log": True}}})
    with pytest.raises(ConfigError, match="made with another training flags .*epochs"):
        api.tune(trials=5, **{**common, "epochs": 3})


def test_a_failed_trial_is_recorded_with_its_reason_and_the_study_goes_on(tmp_path):
    # The digits' training split has about 1,400 images: a batch of 5,000 passes the config checks and is
    # refused by the data, when that trial starts.
    summary = api.tune(trials=2, **TINY, out=str(tmp_path), study="f", space={"batch_size": [32, 5000]},
                       sampler="grid", quiet=True)
    by_size = {t["params"]["batch_size"]: t for t in summary["trials"]}
    assert by_size[5000]["state"] == "failed"
    assert "batch_size 5000 is larger than the" in by_size[5000]["reason"]
    assert by_size[32]["state"] == "complete" and summary["best_trial"] == by_size[32]["trial"]
    assert summary["finished"] == 2


def test_a_loss_that_becomes_nan_fails_its_trial_only(tmp_path, monkeypatch):
    # Whether lr 100 makes the loss NaN depends on the CPU's kernels; here the loss of that trial is made NaN.
    import torch.nn.functional as F

    real_train, real_loss = api.train, F.cross_entropy

    def train(*args, **kwargs):
        if kwargs.get("lr") != 100.0:
            return real_train(*args, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(F, "cross_entropy", lambda *a, **k: real_loss(*a, **k) * float("nan"))
            return real_train(*args, **kwargs)

    monkeypatch.setattr(api, "train", train)
    summary = api.tune(trials=2, **TINY, out=str(tmp_path), study="n", optimizer="sgd",
                       space={"lr": [0.01, 100.0]}, sampler="grid", quiet=True)
    by_lr = {t["params"]["lr"]: t for t in summary["trials"]}
    assert by_lr[100.0]["state"] == "failed" and "the training loss became nan" in by_lr[100.0]["reason"]
    assert by_lr[0.01]["state"] == "complete"


@pytest.mark.slow  # several seconds: the default run stays under 5 minutes
def test_pruning_stops_the_trials_that_are_clearly_worse(tmp_path):
    good, bad = 0.01, 1e-7
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    # Seed 0 of the random sampler draws bad, good, bad, bad, good, good.
    summary = api.tune(trials=6, **{**TINY, "epochs": 3}, out=str(tmp_path), study="p", space={"lr": [good, bad]},
                       sampler="random", pruner=pruner, seed=0, quiet=True)
    trials = sorted(summary["trials"], key=lambda t: t["trial"])
    # What the median pruner must do with this sequence: a bad trial is stopped once two trials have completed
    # and at least half of them were good (the median is then above chance); a good trial is never stopped.
    expected, completed = [], []
    for t in trials:
        lr = t["params"]["lr"]
        stop = lr == bad and len(completed) >= 2 and completed.count(good) >= completed.count(bad)
        expected.append("pruned" if stop else "complete")
        if not stop:
            completed.append(lr)
    assert [t["state"] for t in trials] == expected
    assert "pruned" in expected, "the seed gives no trial to prune: choose another"
    # The slice plot shows the pruned trials apart from the complete ones: grey crosses at their value when stopped.
    from imgcls.tuning import figures
    from imgcls.tuning.space import parse_space

    ax = figures.slice_figure(summary, "lr", parse_space({"lr": [good, bad]})["lr"]).axes[0]
    handles, labels = ax.get_legend_handles_labels()
    points = {label: len(h.get_offsets()) for h, label in zip(handles, labels)}
    assert points == {"complete": expected.count("complete"), "pruned": expected.count("pruned"), "best": 1}
    for t in trials:
        history = read_history(tmp_path / "p" / t["run"])
        if t["state"] == "pruned":  # stopped after its first epoch, its folder kept
            assert len(history) == 1 and t["reason"] == "pruned after epoch 1"
            assert (tmp_path / "p" / t["run"] / "checkpoints" / "last.safetensors").is_file()
        else:
            assert len(history) == 3


def test_show_space_prints_a_file_that_space_reads(tmp_path, capsys):
    assert main(["tune", *TINY_FLAGS, "--show-space"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# default search space: fastnet_small trained from scratch")
    space = read_space(_write(tmp_path / "space.yaml", text))
    assert list(space) == ["lr", "weight_decay", "label_smoothing", "batch_size", "optimizer", "augment"]
    assert space["lr"].log and space["lr"].low == 1e-4
    # A flag given fixes its field: it leaves the default space.
    assert main(["tune", *TINY_FLAGS, "--lr", "0.003", "--show-space"]) == 0
    assert "\nlr:" not in capsys.readouterr().out
    # A from-scratch model's width is searched, at its own and at half, unless given.
    assert main(["tune", "--epochs", "2", "--model", "fastnet_small", "--show-space"]) == 0
    space = read_space(_write(tmp_path / "space.yaml", capsys.readouterr().out))
    assert space["model_option.widths"].choices == ([16, 32, 64], [32, 64, 128])
    assert main(["tune", "--epochs", "2", "--model", "resnet8", "--show-space"]) == 0
    assert read_space(_write(tmp_path / "space.yaml", capsys.readouterr().out))["model_option.width"].choices == (
        0.5, 1.0)
    assert main(["tune", "--epochs", "2", "--model", "resnet8", "--model-option", "width=2", "--show-space"]) == 0
    assert "model_option.width" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_study_resumes_with_no_trial_lost_or_duplicated(tmp_path):
    space = _write(tmp_path / "space.yaml", "lr: [0.003, 0.01]\n")
    args = ["tune", "--epochs", "15", "--model", "fastnet_small", "--model-option", "widths=[8,8,8]", "--trials", "3",
            "--out", str(tmp_path / "runs"), "--study", "k", "--sampler", "random", "--space", str(space)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started = tmp_path / "runs" / "k" / "trial-1" / "metrics.jsonl"  # trial 1 has trained an epoch
    deadline = time.time() + 300
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert started.exists(), "the study ended before it could be killed"
    assert main(args + ["--quiet"]) == 0
    summary = _study(tmp_path / "runs" / "k")
    states = {t["trial"]: t["state"] for t in summary["trials"]}
    assert sorted(states) == [0, 1, 2, 3]  # every number once
    assert states[1] == "interrupted" and [states[n] for n in (0, 2, 3)] == ["complete"] * 3
    assert summary["finished"] == 3 and summary["counts"]["interrupted"] == 1
    assert len(read_history(tmp_path / "runs" / "k" / "trial-1")) < 15  # its folder kept as the kill left it
    rows = list(csv.DictReader((tmp_path / "runs" / "k" / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]


def test_macro_f1_and_hyperband(tmp_path):
    summary = api.tune(trials=2, **TINY, out=str(tmp_path), study="m", space={"lr": [0.003, 0.01]}, sampler="grid",
                       metric="val_macro_f1", pruner="hyperband", quiet=True)
    # Hyperband may stop the second trial after its first epoch: each finishes, complete or pruned.
    assert summary["finished"] == 2 and summary["counts"]["complete"] >= 1 and summary["direction"] == "maximize"
    for t in summary["trials"]:
        history = read_history(tmp_path / "m" / t["run"])
        accuracy = {r["epoch"]: r["val_accuracy"] for r in history}
        # Macro F1 is not accuracy (10 classes of unequal recall), but near it.
        assert 0 < t["value"] <= 1 and t["value"] not in accuracy.values()
        assert min(abs(t["value"] - a) for a in accuracy.values()) < 0.2


def test_a_built_in_dataset_without_a_val_split_is_refused(tmp_path, capsys):
    assert main(["tune", *TINY_FLAGS, "--val-fraction", "0", "--out", str(tmp_path)]) == 2
    assert "give --val-fraction 0.1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_two_workers_sharing_one_study_finish_exactly_its_trials(tmp_path):
    # Two processes on one SQLite file, as two machines on one PostgreSQL database would be: trial numbers come
    # from the storage, and a trial started once the study has its number runs nothing and is left out.
    space = _write(tmp_path / "space.yaml", "lr: {low: 0.001, high: 0.03, log: true}\n")
    args = ["tune", "--epochs", "3", "--model", "fastnet_small", "--model-option", "widths=[8,8,8]", "--trials", "5",
            "--out", str(tmp_path / "runs"), "--study", "w", "--sampler", "random", "--space", str(space), "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "imgcls.cli", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    summary = _study(tmp_path / "runs" / "w")
    numbers = sorted(t["trial"] for t in summary["trials"])
    assert summary["finished"] == 5 and summary["counts"]["complete"] == 5
    assert len(numbers) == len(set(numbers)) == 5
    assert all((tmp_path / "runs" / "w" / f"trial-{n}" / "config.yaml").is_file() for n in numbers)


def test_ctrl_c_leaves_the_trial_interrupted_and_the_same_command_goes_on(tmp_path):
    from rich.console import Console

    from imgcls.tuning import search

    space = {"lr": [0.003, 0.01]}
    flags = {**TINY, "out": str(tmp_path)}
    started = []

    def train(params, out_dir, name, on_epoch_end):
        started.append(name)
        if len(started) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second trial
        return api.train(quiet=True, on_epoch_end=on_epoch_end, **{**flags, **params, "out": str(out_dir)},
                         report=False, name=name)

    with pytest.raises(KeyboardInterrupt):
        search.tune(make=lambda p: api.make_config(**flags, report=False, **p), train=train, flags=flags, trials=3,
                    space=space, study="i", sampler="random", console=Console(quiet=True))
    states = {t["trial"]: t["state"] for t in _study(tmp_path / "i")["trials"]}
    assert states == {0: "complete", 1: "interrupted"}  # study.json written as the study stopped
    summary = api.tune(trials=3, **flags, space=space, study="i", sampler="random", quiet=True)
    assert {t["trial"]: t["state"] for t in summary["trials"]} == {0: "complete", 1: "interrupted", 2: "complete",
                                                                   3: "complete"}
    assert summary["finished"] == 3


def _planted_study(tmp_path, sampler: str) -> list[float]:
    """A study of 30 trials over lr whose trainer is a planted curve peaking at lr = 3e-3; the lrs in trial order."""
    import math
    from types import SimpleNamespace

    from rich.console import Console

    from imgcls.rundir import RUN, RunFolder
    from imgcls.tuning import search

    flags = {**TINY, "epochs": 1, "out": str(tmp_path / sampler)}

    def make(params):
        return api.make_config(**flags, report=False, **params)

    def train(params, out_dir, name, on_epoch_end):  # no training: the value is a function of lr alone
        cfg = make(params)
        run = RunFolder(out_dir / name)
        run.path.mkdir(parents=True)
        record = {"epoch": 1, "val_accuracy": 1.0 - (math.log10(params["lr"]) - math.log10(3e-3)) ** 2 / 16}
        on_epoch_end(SimpleNamespace(cfg=cfg), record)
        run.write_json(RUN, {"final_checkpoint": "last", "epochs_run": 1, "best_epoch": 1})
        return SimpleNamespace(path=run.path, config=cfg, history=[record])

    summary = search.tune(make=make, train=train, flags=flags, trials=30, study="planted", sampler=sampler,
                          pruner="none", space={"lr": {"low": 1e-6, "high": 1.0, "log": True}},
                          console=Console(quiet=True))
    assert summary["finished"] == 30
    return [t["params"]["lr"] for t in sorted(summary["trials"], key=lambda t: t["trial"])]


@pytest.mark.slow  # several seconds: the default run stays under 5 minutes
def test_tpe_finds_the_planted_learning_rate_and_draws_near_it_more_than_random(tmp_path):
    import math

    near = {}
    for sampler in ("tpe", "random"):
        lrs = _planted_study(tmp_path, sampler)
        # After TPE's 10 random start-up trials: how many of the next 20 fall within half a decade of the peak.
        near[sampler] = sum(abs(math.log10(lr / 3e-3)) < 0.5 for lr in lrs[10:])
        if sampler == "tpe":
            assert min(abs(math.log10(lr / 3e-3)) for lr in lrs) < 0.2
    # Random draws a sixth of its trials there (a decade of six); seeded, TPE draws 7 of 20 and random 4.
    assert near["tpe"] > near["random"], near


@pytest.mark.slow
def test_retrain_best_trains_the_best_config_on_train_and_val_and_tests_it_once(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["tune", *TINY_FLAGS, "--trials", "2", "--out", str(out), "--study", "rb", "--sampler", "random",
                 "--seed", "0", "--retrain-best"]) == 0
    printed = capsys.readouterr().out
    summary = _study(out / "rb")
    best, again = Path(summary["best_run"]), out / "rb" / "best-retrained"
    assert f"best configuration retrained: {again}" in printed
    best_data = json.loads((best / "dataset.json").read_text())["splits"]
    again_data = json.loads((again / "dataset.json").read_text())["splits"]
    # The best trial's train and val images train the retrained model; the test split is the same.
    assert "val" not in again_data
    assert again_data["train"]["images"] == best_data["train"]["images"] + best_data["val"]["images"]
    assert again_data["test"] == best_data["test"]
    best_run = json.loads((best / "run.json").read_text())
    assert len(read_history(again)) == best_run["best_epoch"]  # as long as the best trial's chosen epoch
    assert (again / "eval_test.json").is_file() and (again / "report.html").is_file()
    again_cfg = imgcls.api.make_config(again / "config.yaml")
    searched = imgcls.api.make_config(**summary["best_params"]).train  # the values in their config form
    for key in summary["best_params"]:  # the searched values are the best trial's
        assert getattr(again_cfg.train, key) == getattr(searched, key), key


def test_two_workers_opening_a_fresh_study_together_draw_different_values(tmp_path):
    """Both workers seed their sampler with the config's seed (the study was empty when each opened it); the one
    whose first trial is not trial 0 reseeds, so the two do not draw the same values."""
    from types import SimpleNamespace

    import optuna

    from imgcls.rundir import RUN, RunFolder
    from imgcls.tuning import search
    from imgcls.tuning.space import parse_space

    def train(params, out_dir, name, on_epoch_end):
        cfg = api.make_config(**{**TINY, "epochs": 1}, report=False, **params)
        run = RunFolder(out_dir / name)
        run.path.mkdir(parents=True)
        record = {"epoch": 1, "val_accuracy": params["lr"]}
        on_epoch_end(SimpleNamespace(cfg=cfg), record)
        run.write_json(RUN, {"final_checkpoint": "last", "epochs_run": 1, "best_epoch": 1})
        return SimpleNamespace(path=run.path, config=cfg, history=[record])

    space = parse_space({"lr": {"low": 1e-4, "high": 1e-1, "log": True}})
    storage = optuna.storages.InMemoryStorage()
    drawn = {}
    with search._optuna_quiet():
        workers = [optuna.create_study(study_name="s", storage=storage, load_if_exists=True, direction="maximize",
                                       sampler=optuna.samplers.RandomSampler(seed=0)) for _ in range(2)]
        for i, (study, fresh) in enumerate([(workers[0], True), (workers[1], True), (workers[1], False)]):
            objective = search.make_objective(space, train, tmp_path / f"w{i}", "val_accuracy", 10, {},
                                              fresh_seed=fresh)
            study.optimize(objective, n_trials=1)
            drawn[i] = study.trials[-1].params["lr"]
    assert drawn[1] != drawn[0]  # reseeded: without it, the same seed draws the same first value
    # Control: a sampler with the same seed, not reseeded, repeats worker 0's first value.
    again = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    with search._optuna_quiet():
        again.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=1)
    assert again.trials[0].params["lr"] == drawn[0]


def _photos(root: Path, n: int = 12) -> Path:
    """Noisy colour photos of 3 classes (a tint each), 80x80, n a class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.full((80, 80, 3), 100.0)
            pixels[..., c] += 40
            pixels += rng.normal(0, 50, pixels.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.jpg")
    return root


@pytest.mark.slow
def test_on_photos_the_default_space_searches_the_transfer_settings_and_trials_reuse_the_features(
        tmp_path, capsys, monkeypatch):
    photos = _photos(tmp_path / "photos")
    assert main(["tune", "--data", str(photos), "--show-space"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# default search space: efficientnet_lite2, stage 1 only (--epochs 0): label smoothing, "
                           "the backbone (efficientnet_lite0, efficientnet_lite1, efficientnet_lite2), the image size "
                           "(128, 160, 192 px), the stages the classifier reads (1, 4 or 7)")
    space = read_space(_write(tmp_path / "space.yaml", text))
    assert space["model"].choices == ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    assert space["image_size"].choices == (128, 160, 192)
    assert space["model_option.head_stages"].choices == (1, 4, 7)
    # Trials that share a backbone and a size fit their classifiers on the same cached frozen features.
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "cache"))
    summary = imgcls.tune(data=str(photos), trials=2, space={"label_smoothing": {"low": 0.0, "high": 0.2}},
                          out=str(tmp_path / "out"), image_size=64, quiet=True)
    assert summary["counts"]["complete"] == 2
    study = Path(summary["path"])
    logs = [(study / t["run"] / "train.log").read_text() for t in sorted(summary["trials"], key=lambda t: t["trial"])]
    assert "from the cache" not in logs[0] and "4 of 4 from the cache" in logs[1]


def test_a_grid_smaller_than_the_trials_asked_says_so_when_it_runs_out(tmp_path, capsys):
    summary = api.tune(trials=5, **TINY, out=str(tmp_path), study="g", space={"lr": [0.003, 0.01]}, sampler="grid")
    assert summary["counts"]["complete"] == 2
    out = capsys.readouterr().out
    assert "note: the grid has 2 combinations and every one was tried: the study stops at 2 of the 5 trials" in out


def test_a_grid_over_the_limit_is_refused_before_a_value_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"the grid has 99,000,000,001 combinations \(lr: 99,000,000,001\)"):
        api.tune(trials=1, **TINY, out=str(tmp_path), space={"lr": {"low": 0.001, "high": 0.1, "step": 1e-12}},
                 sampler="grid", quiet=True)
    assert not (tmp_path / "digits-tune").exists()


def test_a_trial_reads_its_final_epoch_from_run_json_and_a_damaged_one_is_named(tmp_path):
    from types import SimpleNamespace

    from imgcls.errors import CheckpointError
    from imgcls.tuning.search import _final_value

    run = SimpleNamespace(path=tmp_path, history=[{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.7}])
    info = tmp_path / "run.json"
    info.write_text(json.dumps({"best_epoch": 1, "final_checkpoint": "best", "epochs_run": 2}))
    assert _final_value("val_accuracy", run, {}) == 0.5
    info.write_text(json.dumps({"best_epoch": 1, "final_checkpoint": "last", "epochs_run": 2}))
    assert _final_value("val_accuracy", run, {}) == 0.7
    info.write_text('{"best_epoch": 1')  # cut short
    with pytest.raises(CheckpointError) as refused:
        _final_value("val_accuracy", run, {})
    said = str(refused.value)
    assert said.startswith(f"{info} is damaged: it is not JSON;") and "\n" not in said
