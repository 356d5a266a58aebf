"""Comparing run folders: leaderboard, figures read from the runs' files, the page."""

import json
import re
import shutil

import numpy as np
import pytest

import imgcls
from imgcls.errors import CheckpointError
from imgcls.reports.compare import (
    compare_runs,
    format_leaderboard,
    plot_compare,
    write_compare,
)

# The after-training analysis is not what these tests are about.
TINY = {"model_option": {"widths": [8, 16, 16]}, "epochs": 2, "report": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    # A learning rate far too low leaves one run clearly behind the other.
    slow = imgcls.train(out=str(out), name="slow", lr=1e-5, quiet=True, **TINY)
    fast = imgcls.train(out=str(out), name="fast", lr=3e-3, quiet=True, **TINY)
    no_val = imgcls.train(out=str(out), name="no-val", lr=3e-3, val_fraction=0.0, quiet=True, **TINY)
    return slow, fast, no_val


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_leaderboard_is_ordered_by_test_accuracy(runs):
    slow, fast, _ = runs
    assert fast.test_metrics["accuracy"] > slow.test_metrics["accuracy"]
    board = compare_runs([slow.path, fast.path])["leaderboard"]
    assert [e["name"] for e in board] == ["fast", "slow"]
    assert [e["rank"] for e in board] == [1, 2]
    text = format_leaderboard({"leaderboard": board})
    assert text.index("fast") < text.index("slow")


def test_figures_equal_those_in_the_run_files(runs):
    for run in runs:
        (entry,) = compare_runs([run.path])["leaderboard"]
        info = json.loads((run.path / "run.json").read_text())
        test = json.loads((run.path / "eval_test.json").read_text())
        history = _lines(run.path / "metrics.jsonl")
        assert entry["test_accuracy"] == info["test_accuracy"] == test["accuracy"] == run.test_metrics["accuracy"]
        assert entry["test_macro_f1"] == info["test_macro_f1"] == test["macro_avg"]["f1"]
        assert entry["epochs"] == len(history) == 2
        assert entry["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in history))
        assert entry["images_per_sec"] == pytest.approx(np.median([r["images_per_sec"] for r in history]))
        assert entry["model"] == "fastnet_small" and entry["dataset"] == "digits"
        model = imgcls.load(run.path).model
        assert entry["parameters"] == sum(p.numel() for p in model.parameters())


def test_page_and_json_are_written(runs, tmp_path):
    result = compare_runs([r.path for r in runs])
    page = write_compare(result, tmp_path / "cmp")
    assert page == tmp_path / "cmp" / "compare.html"
    html = page.read_text()
    assert html.count("<img") == 1
    assert all(name in html for name in ("slow", "fast", "no-val"))
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [e["name"] for e in saved["leaderboard"]] == [e["name"] for e in result["leaderboard"]]
    assert (tmp_path / "cmp" / "compare_curves.png").is_file()


def test_curves_fall_back_to_training_without_val(runs):
    result = compare_runs([r.path for r in runs])
    fig = plot_compare(result)
    acc, loss = fig.axes
    labels = [line.get_label() for line in acc.get_lines()]
    assert sorted(labels) == ["fast", "no-val (train)", "slow"]
    for ax, key in ((acc, "accuracy"), (loss, "loss")):
        for line, entry in zip(ax.get_lines(), result["leaderboard"]):
            prefix = "train" if entry["name"] == "no-val" else "val"
            assert list(line.get_ydata()) == [r[f"{prefix}_{key}"] for r in entry["history"]]
            assert line.get_linestyle() == ("--" if prefix == "train" else "-")


def test_a_folder_that_is_not_a_run_is_refused(runs, tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(CheckpointError, match=r"photos is not a run folder \(no config.yaml or metrics.jsonl\)"):
        compare_runs([runs[0].path, tmp_path / "photos"])
    with pytest.raises(CheckpointError, match="missing is not a run folder: no such folder"):
        compare_runs([tmp_path / "missing"])


@pytest.mark.parametrize("name", ["run.json", "eval_test.json", "environment.json"])
@pytest.mark.parametrize("garbage, why", [('{"accuracy": 0.9', "it is not JSON"),
                                          ("[1, 2]", "it holds a JSON list, not an object")])
def test_a_damaged_run_file_is_refused_in_one_line_naming_it(runs, tmp_path, capsys, name, garbage, why):
    from imgcls.cli import main

    run = tmp_path / "damaged"
    shutil.copytree(runs[1].path, run)
    (run / name).write_text(garbage)
    with pytest.raises(CheckpointError, match=re.escape(f"{run / name} is damaged: {why}")):
        compare_runs([runs[0].path, run])
    assert main(["compare", str(runs[0].path), str(run), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert str(run / name) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_run_file_is_an_unfinished_run_or_a_fallback(runs, tmp_path):
    fast = runs[1]
    run = tmp_path / "partial"
    shutil.copytree(fast.path, run)
    (run / "eval_test.json").unlink()
    (run / "environment.json").unlink()
    (entry,) = compare_runs([run])["leaderboard"]
    assert entry["finished"] and entry["test_accuracy"] == fast.test_metrics["accuracy"]  # from run.json
    assert entry["device"] is None
    (run / "run.json").unlink()
    (entry,) = compare_runs([run])["leaderboard"]
    assert not entry["finished"] and entry["test_accuracy"] is None and entry["epochs"] == 2
