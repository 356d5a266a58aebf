"""The command line as a user meets it: models, predict, evaluate, and bad input refused up front."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from imgcls.cli import main


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--epochs", "6", "--out", str(out), "--name", "d", "--quiet", "--no-report"]) == 0
    return out / "d"


@pytest.fixture
def digit_files(tmp_path):
    """Three digits as PNG files (a 0, a 1, a 2), upscaled and in RGB: predict must convert them back."""
    digits = load_digits()
    paths = []
    for label in (0, 1, 2):
        index = int(np.flatnonzero(digits.target == label)[-1])
        pixels = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
        path = tmp_path / f"digit{label}.png"
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(path)
        paths.append(path)
    return paths


def test_models_lists_the_seed_architectures(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("seed_tf_tutorial", "seed_named_dropout", "seed_cifar_model1", "seed_mnist_oneconv", "resnet20", "fastnet"):
        assert name in out


def test_models_summary_like_keras(capsys):
    assert main(["models", "seed_mnist_oneconv", "--input", "1x28x28", "--classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "(None, 32, 26, 26)" in out and "542,230" in out


def test_predict_json_and_csv(digits_run, digit_files, capsys):
    assert main(["predict", str(digits_run), *map(str, digit_files), "--format", "json", "--top-k", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [len(p["top"]) for p in doc["predictions"]] == [2, 2, 2]
    assert [p["top"][0]["class"] for p in doc["predictions"]] == ["0", "1", "2"]
    for p in doc["predictions"]:
        assert p["top"][0]["probability"] >= p["top"][1]["probability"]
    assert main(["predict", str(digits_run), str(digit_files[0]), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    # the run stores an out-of-distribution score: each row adds the answer (the class, or unknown) and the score
    assert rows[0] == "input,rank,class,probability,answer,ood_score" and len(rows) == 4


def test_predict_a_zip_and_report_a_bad_file(digits_run, digit_files, tmp_path, capsys):
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in digit_files:
            zf.write(p, f"imgs/{p.name}")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    code = main(["predict", str(digits_run), str(archive), str(broken)])
    captured = capsys.readouterr()
    assert code == 1
    assert len(captured.out.strip().splitlines()) == 3
    assert "broken.png" in captured.err


def test_evaluate_writes_json_and_csv(digits_run, capsys):
    assert main(["evaluate", str(digits_run)]) == 0
    out = capsys.readouterr().out
    assert "macro avg" in out and "confusion matrix" in out
    saved = json.loads((digits_run / "eval_test.json").read_text())
    assert np.array(saved["confusion_matrix"]).sum() == saved["n"]
    assert (digits_run / "eval_test.csv").read_text().startswith("class,precision,recall,f1,support")


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder"], "neither a built-in dataset (digits, mnist, fashion-mnist, cifar10, cifar100)"),
    (["--model", "vgg99"], "unknown model 'vgg99'; choose one of:"),
    (["--model-option", "depth=3"], "does not accept these options ['depth']"),
    (["--model", "seed_tf_tutorial"], "needs images of at least"),
    (["--batch-size", "5000"], "batch_size 5000 is larger than the"),
    (["--augment", "mixup"], "choose one of"),
    (["--class-weights", "1,2"], "class_weights has 2 values but the dataset has 10 classes"),
    (["--val-fraction", "0", "--early-stopping"], "needs a validation split"),
])
def test_bad_training_input_is_refused_before_a_run_exists(tmp_path, capsys, args, message):
    code = main(["train", "--out", str(tmp_path / "runs"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_refuses_changes_other_than_epochs(digits_run, capsys):
    assert main(["train", "--resume", str(digits_run), "--lr", "0.5"]) == 2
    assert "only --epochs may change" in capsys.readouterr().err


def test_a_full_disk_while_writing_the_run_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import imgcls.rundir as run_module

    def full(self, line):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "train.log"))

    monkeypatch.setattr(run_module.RunFolder, "log", full)
    assert main(["train", "--out", str(tmp_path), "--name", "full", "--epochs", "1", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full writing" in err and "train.log" in err and "Traceback" not in err


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_file_and_class_names_that_are_not_utf8_survive_every_writer(tmp_path, cache, monkeypatch, capsys):
    import os

    from PIL import Image

    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "cache"))
    root = os.fsencode(tmp_path / "photos")
    rng = np.random.default_rng(0)
    try:
        for cls, base in ((b"dark", 40), (b"li\xffght", 200)):  # a class folder whose name is not UTF-8 too
            os.makedirs(os.path.join(root, cls))
            for i in range(20):
                name = f"img{i}".encode() + (b"\xfe" if i % 4 == 0 else b"") + b".png"
                img = rng.normal(base, 20, (12, 12, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(root, cls, name))
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    args = ["train", "--data", os.fsdecode(root), cache, "--epochs", "1", "--batch-size", "8",
            "--out", str(tmp_path / "runs"), "--name", "bytes", "--model-option", "widths=[8,8,8]"]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    run = tmp_path / "runs" / "bytes"
    for name in ("run.json", "eval_test.csv", "dataset.json", "report.html"):
        assert (run / name).is_file(), name
    assert "li\\xffght" in (run / "eval_test.csv").read_text()
    assert "Traceback" not in capsys.readouterr().err


def test_resume_accepts_the_runs_own_values_and_refuses_other_ones(tmp_path, capsys):
    common = ["--out", str(tmp_path), "--name", "r", "--model-option", "widths=[8,8,8]"]
    assert main(["train", "--epochs", "1", "--no-report", *common]) == 0
    run = str(tmp_path / "r")
    assert main(["train", "--resume", run, "--no-report", "--epochs", "2"]) == 0  # report is already false
    capsys.readouterr()
    assert main(["train", "--resume", run, "--report", "--epochs", "3"]) == 2
    assert "only --epochs may change (got report)" in capsys.readouterr().err
