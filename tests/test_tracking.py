"""--track tensorboard / mlflow on the built-in digits: what the trackers logged, read back with TensorBoard's and
MLflow's own readers, equals the run folder's figures; a resumed run continues them without duplicates; a missing
package or an unknown tracker is refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

import imgcls
from imgcls import api
from imgcls.cli import main
from imgcls.config import dump_config
from imgcls.errors import ConfigError
from imgcls.rundir import read_history

pytestmark = pytest.mark.usefixtures("one_thread")

# 1,437 training digits in batches of 256: 6 steps an epoch, reported at the first and last step of each.
TINY = {"quiet": True, "report": False, "epochs": 2, "batch_size": 256, "model_option": {"widths": [8, 8, 8]}}


def _events(run_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(run_path / "tensorboard"),
                                       size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return acc.Reload()


def _steps_values(acc, tag):
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def _client(run_path):
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_path / "mlflow.json").read_text())
    return MlflowClient(tracking_uri=saved["tracking_uri"]), saved["run_id"]


def _artifacts(client, run_id, path=None) -> set[str]:
    found = set()
    for f in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return found


def _expected_params(run_path) -> dict:
    """config.yaml flattened as MLflow params: ``section.field`` (top-level fields as they are) -> str or JSON."""
    config = yaml.safe_load((run_path / "config.yaml").read_text())
    flat = {}
    for key, value in config.items():
        for name, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            flat[key if name is None else f"{key}.{name}"] = v if isinstance(v, str) else json.dumps(v)
    return flat


def test_tensorboard_events_hold_the_run_folders_figures(tmp_path):
    pytest.importorskip("tensorboard")
    run = imgcls.train(out=str(tmp_path), name="tb", track="tensorboard", **TINY)
    acc = _events(run.path)
    records = read_history(run.path)
    # Every numeric field of every metrics.jsonl record, at the global step that ended its epoch.
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "train_seconds", "images_per_sec"):
        steps, values = _steps_values(acc, f"epoch/{key}")
        assert steps == [6, 12]
        assert values == pytest.approx([r[key] for r in records], rel=1e-6)  # TensorBoard keeps float32
    for tag in ("train/loss", "train/accuracy", "train/lr", "train/images_per_sec"):
        assert _steps_values(acc, tag)[0] == [1, 6, 7, 12]
    # The last step of an epoch reports the epoch's running means: metrics.jsonl's figures.
    assert _steps_values(acc, "train/loss")[1][1::2] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)
    assert _steps_values(acc, "test/accuracy") == ([12], [pytest.approx(run.test_metrics["accuracy"], rel=1e-6)])
    assert _steps_values(acc, "test/macro_f1")[1] == [pytest.approx(run.test_metrics["macro_avg"]["f1"], rel=1e-6)]
    for tag in ("test/confusion_matrix", "curves/learning_curves"):
        (image,) = acc.Images(tag)
        assert image.step == 12 and image.width > 200 and image.height > 200
        assert image.encoded_image_string.startswith(b"\x89PNG")
    (text,) = acc.Tensors("config/text_summary")
    config = text.tensor_proto.string_val[0].decode()
    assert "track:" in config and "- tensorboard" in config and "widths:" in config


class CrashAt:
    """Raises ``error`` on the trainer's hook at ``step``, after the trackers logged the steps before it."""

    def __init__(self, step: int, error=RuntimeError):
        self.step, self.error = step, error

    def on_step(self, state, values):
        if values["step"] == self.step:
            raise self.error(f"crash at step {self.step}")


@pytest.mark.slow  # several seconds: the default run stays under 5 minutes
def test_a_resumed_run_continues_both_trackers_without_duplicates(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    # Epoch 3 dies at its last step (18), after the trackers logged its first (13): the resumed run restarts
    # from epoch 2's checkpoint (step 12) and logs step 13 again.
    with pytest.raises(RuntimeError, match="crash at step 18"):
        imgcls.train(out=str(tmp_path), name="r", track=["tensorboard", "mlflow"], callbacks=[CrashAt(18)],
                     **{**TINY, "epochs": 3})
    path = tmp_path / "r"
    client, run_id = _client(path)
    assert client.get_run(run_id).info.status == "FAILED"

    run = imgcls.train(resume=path, quiet=True)  # the config keeps the trackers
    records = read_history(run.path)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    acc = _events(run.path)
    assert _steps_values(acc, "train/loss")[0] == [1, 6, 7, 12, 13, 18]
    steps, values = _steps_values(acc, "epoch/val_accuracy")
    assert steps == [6, 12, 18] and values == pytest.approx([r["val_accuracy"] for r in records], rel=1e-6)
    # The same MLflow run, one value per epoch, finished.
    assert _client(run.path)[1] == run_id
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_accuracy"]) for r in records]
    assert info.data.metrics["test_accuracy"] == run.test_metrics["accuracy"]


def test_ctrl_c_ends_the_mlflow_run_killed(tmp_path):
    pytest.importorskip("mlflow")
    with pytest.raises(KeyboardInterrupt):
        imgcls.train(out=str(tmp_path), name="k", track="mlflow", callbacks=[CrashAt(1, KeyboardInterrupt)],
                     **{**TINY, "epochs": 1})
    client, run_id = _client(tmp_path / "k")
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_damaged_mlflow_json_stops_the_resume_in_one_line_naming_it(tmp_path, capsys):
    pytest.importorskip("mlflow")
    with pytest.raises(KeyboardInterrupt):
        imgcls.train(out=str(tmp_path), name="d", track="mlflow", callbacks=[CrashAt(7, KeyboardInterrupt)],
                     **TINY)  # in epoch 2, after epoch 1's checkpoint
    saved = tmp_path / "d" / "mlflow.json"
    saved.write_text('{"run_id": "ab')  # cut short
    assert main(["train", "--resume", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{saved} is damaged: it is not JSON" in err
    assert "delete it" in err and "Traceback" not in err


@pytest.mark.slow  # several seconds: the default run stays under 5 minutes
def test_mlflow_logs_the_config_every_epoch_and_the_run_files(tmp_path):
    pytest.importorskip("mlflow")
    run = imgcls.train(out=str(tmp_path), name="m", track="mlflow", **{**TINY, "report": True})
    assert (tmp_path / "mlflow.db").is_file()  # the default store: sqlite:///<out>/mlflow.db
    client, run_id = _client(run.path)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "m"
    assert client.get_experiment(got.info.experiment_id).name == "imgcls"
    params = got.data.params
    assert params == _expected_params(run.path)
    assert params["train.epochs"] == "2" and params["model.options"] == '{"widths": [8, 8, 8]}'
    records = read_history(run.path)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_sec"):
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["epoch"], r[key]) for r in records]
    assert got.data.metrics["test_accuracy"] == run.test_metrics["accuracy"]
    assert got.data.metrics["test_macro_f1"] == run.test_metrics["macro_avg"]["f1"]
    files = _artifacts(client, run_id)
    final = json.loads((run.path / "run.json").read_text())["final_checkpoint"]
    assert {"config.yaml", "metrics.jsonl", "eval_test.json", "eval_test.csv", "run.json", "report.html",
            f"checkpoints/{final}.safetensors"} <= files
    # Artefacts of the default store lie beside it, not in the working directory's ./mlruns.
    local = tmp_path / "mlartifacts" / run_id / "artifacts"
    assert (local / "report.html").read_bytes() == (run.path / "report.html").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free port of 127.0.0.1 (its artefacts proxied); skips when it does not answer.

    Opt-in (IMGCLS_TEST_MLFLOW_SERVER=1): the server takes 15-35 s to answer on a busy 2-core machine.
    """
    if os.environ.get("IMGCLS_TEST_MLFLOW_SERVER") != "1":
        pytest.skip("set IMGCLS_TEST_MLFLOW_SERVER=1 to start an mlflow server (15-35 s to start)")
    pytest.importorskip("mlflow.server")
    pytest.importorskip("flask")  # mlflow-skinny has no server
    exe = shutil.which("mlflow") or pytest.skip("no mlflow command")
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "art")]
    proc = subprocess.Popen(cmd, cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its workers in its own process group, stopped together
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # 15-25 s on a busy 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"mlflow server did not start ({'exited' if proc.poll() is not None else 'no answer'})")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_mlflow_over_http_to_a_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    run = imgcls.train(out=str(tmp_path / "runs"), name="h", track="mlflow", mlflow_uri=mlflow_server, **TINY)
    client = MlflowClient(tracking_uri=mlflow_server)
    saved = json.loads((run.path / "mlflow.json").read_text())
    assert saved["tracking_uri"] == mlflow_server
    got = client.get_run(saved["run_id"])
    assert got.info.status == "FINISHED" and got.data.params["mlflow_uri"] == mlflow_server
    history = client.get_metric_history(saved["run_id"], "val_loss")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_loss"]) for r in read_history(run.path)]
    assert {"config.yaml", "metrics.jsonl"} <= _artifacts(client, saved["run_id"])
    assert not (tmp_path / "runs" / "mlflow.db").exists()


@pytest.mark.parametrize("tracker, module", [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_package_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                             tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now fails as if it were not installed
    out = tmp_path / "runs"
    assert main(["train", "--out", str(out), "--track", tracker, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--track {tracker} needs the {module} package" in err
    assert "pip install 'imgcls[track]'" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"imgcls\[track\]"):
        imgcls.train(out=str(out), track=["tensorboard", "mlflow"], **TINY)


@pytest.mark.parametrize("args, message", [
    (["--track", "wandb"], "track 'wandb' is not accepted; choose one or more of: tensorboard, mlflow"),
    (["--track", "tensorboard,neptune"], "track 'neptune' is not accepted"),
    (["--mlflow-uri", "http://127.0.0.1:5000"], "track does not name mlflow; add --track mlflow"),
])
def test_bad_tracking_flags_are_refused(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "runs"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # several seconds: the default run stays under 5 minutes
def test_cross_validation_tracks_every_fold_as_one_group(tmp_path):
    """imgcls cv --track tensorboard,mlflow: each fold's run folder holds its event files, whose test figures are
    the fold's in cv.json, and MLflow groups the folds in an experiment named after the cv folder."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    assert main(["cv", "--folds", "2", "--out", str(out), "--name", "c", "--track", "tensorboard,mlflow",
                 "--epochs", "1", "--batch-size", "256", "--model-option", "widths=[8,8,8]"]) == 0
    cv = json.loads((out / "c" / "cv.json").read_text())
    for fold in cv["per_fold"]:
        acc = _events(out / "c" / fold["run"])
        assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(fold["accuracy"], abs=1e-6)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'c' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("c").experiment_id])
    assert sorted((r.data.tags["imgcls.cv"], r.data.tags["imgcls.fold"], r.info.run_name, r.info.status)
                  for r in runs) == [("c", "1", "fold-1", "FINISHED"), ("c", "2", "fold-2", "FINISHED")]
    by_fold = {f["run"]: f for f in cv["per_fold"]}
    for r in runs:
        assert r.data.metrics["test_accuracy"] == pytest.approx(by_fold[r.info.run_name]["accuracy"], abs=1e-6)


def test_track_flags_are_config_fields():
    cfg = api.make_config(track="mlflow,tensorboard,mlflow", mlflow_uri="sqlite:///x.db")
    assert cfg.track == ["mlflow", "tensorboard"] and cfg.mlflow_uri == "sqlite:///x.db"
    assert "track:\n- mlflow\n- tensorboard\n" in dump_config(cfg)
    with pytest.raises(ConfigError, match="track must be a list of trackers"):
        api.make_config(track=5)


@pytest.mark.slow  # several seconds: the default run stays under 5 minutes
def test_a_tune_study_groups_its_trials(tmp_path):
    pytest.importorskip("optuna")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    summary = imgcls.tune(trials=2, study="s", out=str(out), sampler="random", pruner="none", quiet=True,
                          space={"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, track="mlflow,tensorboard",
                          epochs=1, batch_size=256, model_option={"widths": [8, 8, 8]})
    assert summary["counts"]["complete"] == 2
    folder = out / "s"
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("s")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted((r.data.tags["imgcls.study"], r.data.tags["imgcls.trial"], r.info.run_name, r.info.status)
                  for r in runs) == [("s", "0", "trial-0", "FINISHED"), ("s", "1", "trial-1", "FINISHED")]
    by_trial = {t["trial"]: t for t in summary["trials"]}
    for r in runs:
        trial = by_trial[int(r.data.tags["imgcls.trial"])]
        assert float(r.data.params["train.lr"]) == pytest.approx(trial["params"]["lr"])
        assert any((folder / r.info.run_name / "tensorboard").iterdir())  # tensorboard --logdir <study folder>
