"""Experiment tracking: TensorBoard and MLflow, as trainer callbacks (:mod:`imgcls.training.callbacks`).

    imgcls train --track tensorboard,mlflow [--mlflow-uri URI]

    build_trackers(cfg, group)   the trackers ``cfg.track`` names; a missing package is refused here, before any data
                                 is read (the run driver, imgcls.driver, calls it first)
    tracked(trackers)            the ``with`` block around training and the report: every tracker's run ends
                                 FINISHED, or FAILED on an error, KILLED on Ctrl-C or a pruned tune trial
    TensorBoardTracker           <run>/tensorboard/: train/* scalars every 20 steps, epoch/* scalars of every
                                 metrics.jsonl record, the config as text, test/* scalars and two figures at the end;
                                 every scalar at the global step, so a resumed run purges what its killed session
                                 wrote after the checkpoint
    MLflowTracker                the flattened config as params, every metrics.jsonl field per epoch (step = epoch),
                                 test_* metrics, and the run's files as artefacts; its run id in <run>/mlflow.json,
                                 so a resumed run goes on in the same MLflow run

A tune trial or a cross-validation fold is a run like any other; its :class:`Group` (the study and the trial's
number, or the cv folder and the fold's) puts it in the MLflow experiment named after the study or cv folder,
tagged with both, and its event files lie in its run folder inside that folder, so
``tensorboard --logdir <study or cv folder>`` shows every trial or fold.  The hooks run only where the trainer calls them
(rank 0 under DDP); a tracker whose run never started closes as a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import logging
import math
import os
import threading
import time
import warnings
from pathlib import Path

from imgcls import rundir
from imgcls.config import RunConfig, dump_config
from imgcls.errors import ConfigError, hide_secrets, shown_url
from imgcls.plots import figure_png

INSTALL = "pip install 'imgcls[track]'"
EXPERIMENT = "imgcls"  # the MLflow experiment of runs that are not tune trials
MLFLOW_DB = "mlflow.db"  # the default store, in the folder that holds the run folders (--out; a study's folder)
MLFLOW_ARTIFACTS = "mlartifacts"  # beside it
PARAM_CHARS = 6000  # MLflow's longest param value
BATCH = 100  # MLflow takes at most 100 params (1,000 metrics) in one log_batch


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs tracked together: the trials of a tune study (kind ``study``) or the folds of a cross-validation
    (kind ``cv``)."""

    kind: str  # "study" or "cv"
    name: str  # the study's or the cv folder's name: the MLflow experiment
    member: int  # the trial's number, or the fold's

    def tags(self) -> dict[str, str]:
        """MLflow tags: imgcls.study and imgcls.trial, or imgcls.cv and imgcls.fold."""
        return {f"imgcls.{self.kind}": self.name,
                f"imgcls.{'trial' if self.kind == 'study' else 'fold'}": str(self.member)}


def build_trackers(cfg: RunConfig, group: Group | None = None) -> list:
    """The trackers ``cfg.track`` names, ready to be given to ``fit(callbacks=...)`` and :func:`tracked`.

    Raises:
        ConfigError: a tracker's package is not installed (one line, with the install command).
    """
    built = []
    for name in cfg.track:
        if name == "tensorboard":
            _require(name, "tensorboard", "tensorboard", "torch.utils.tensorboard")
            built.append(TensorBoardTracker())
        elif name == "mlflow":
            _require(name, "mlflow", "mlflow", "mlflow.tracking")
            tracker = MLflowTracker(cfg.mlflow_uri, group)
            tracker.check(cfg.out_dir)
            built.append(tracker)
        else:  # config.validate refuses other names; this is for a RunConfig changed after it was checked
            raise ConfigError(f"track {name!r} is not accepted; choose one or more of: tensorboard, mlflow")
    return built


def check_run_folder(cfg: RunConfig, run_dir: str | Path) -> None:
    """Refuse, in one line, a resumed run folder whose tracker files cannot be written (before anything in it
    changes): ``tensorboard/`` that is a file, or a folder this user cannot write."""
    if "tensorboard" not in cfg.track:
        return
    folder = Path(run_dir) / rundir.TENSORBOARD
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file where this run's TensorBoard event files go (it tracks to "
                          f"tensorboard); move the file away, then resume")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder} cannot be written by this user, and this run tracks to tensorboard; make "
                          f"it writable, then resume")


def _require(tracker: str, package: str, *modules: str) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing = f"{exc.name} is missing" if exc.name else " ".join(str(exc).split())[:200]
            raise ConfigError(f"--track {tracker} needs the {package} package, which is not installed ({missing}); "
                              f"{INSTALL}") from None


@contextlib.contextmanager
def tracked(trackers: list):
    """Close every tracker when the block ends: FINISHED, or the status of the exception that ended it (re-raised;
    a tracker that fails to close then does not hide it)."""
    try:
        yield
    except BaseException as exc:
        for tracker in trackers:
            with contextlib.suppress(Exception):
                tracker.close(status_of(exc))
        raise
    for tracker in trackers:
        tracker.close("FINISHED")


def status_of(exc: BaseException) -> str:
    """MLflow's name for how a run that raised ``exc`` ended: KILLED (Ctrl-C, or pruned by a tune study), else FAILED."""
    # Optuna's TrialPruned, by name: tracking does not import Optuna.
    return "KILLED" if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrialPruned" else "FAILED"


def epoch_scalars(record: dict) -> dict[str, float]:
    """Every numeric field of a metrics.jsonl record but ``epoch`` itself (the step it is logged at)."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def scalars_of_test(metrics: dict) -> dict[str, float]:
    """The headline figures of the test split's metrics (eval_test.json): accuracy, top-k, loss, macro and weighted
    precision, recall and F1; with several labels per image mAP, micro F1, exact-set accuracy and Hamming loss."""
    out = {k: float(metrics[k]) for k in ("accuracy", "top_k_accuracy", "loss", "map", "micro_f1", "subset_accuracy",
                                          "hamming_loss") if isinstance(metrics.get(k), (int, float))}
    for avg in ("macro", "weighted"):
        for k in ("precision", "recall", "f1"):
            if k in metrics.get(f"{avg}_avg", {}):
                out[f"{avg}_{k}"] = float(metrics[f"{avg}_avg"][k])
    return out


def flat_params(cfg: RunConfig) -> dict[str, str]:
    """The resolved config as MLflow params: ``section.field`` (``field`` at the top level) -> the value, strings as
    they are and everything else as JSON."""
    params = {}
    for key, value in cfg.to_dict().items():
        items = value.items() if key in ("data", "model", "train") else [(None, value)]
        for name, v in items:
            text = v if isinstance(v, str) else json.dumps(v)
            params[key if name is None else f"{key}.{name}"] = text[:PARAM_CHARS]
    return params


def _figure_array(fig):
    """uint8 (H, W, 3) pixels of a matplotlib Figure (TensorBoard's own add_figure would import pyplot)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(figure_png(fig))).convert("RGB"))


class TensorBoardTracker:
    """Event files in ``<run>/tensorboard/``, every value at the global optimiser step."""

    def __init__(self):
        self.writer = None

    def on_train_start(self, state, run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run (its history restored) hides what a killed session wrote after the last checkpoint's step.
        purge = state.step + 1 if state.history else None
        self.writer = SummaryWriter(log_dir=str(run.path / rundir.TENSORBOARD), purge_step=purge)
        text = "\n".join("    " + line for line in dump_config(state.cfg).splitlines())  # Markdown: a code block
        self.writer.add_text("config", text, state.step)

    def on_step(self, state, values: dict) -> None:
        step = values["step"]
        for key, tag in (("train_loss", "loss"), ("train_accuracy", "accuracy"), ("lr", "lr"),
                         ("images_per_sec", "images_per_sec")):
            self.writer.add_scalar(f"train/{tag}", values[key], step)

    def on_epoch_end(self, state, record: dict) -> None:
        for key, value in epoch_scalars(record).items():
            self.writer.add_scalar(f"epoch/{key}", value, state.step)

    def on_train_end(self, state, result) -> None:
        from imgcls.reports.figures import (  # matplotlib: on use
            plot_confusion,
            plot_learning_curves,
        )

        metrics = result.test_metrics
        for key, value in scalars_of_test(metrics).items():
            self.writer.add_scalar(f"test/{key}", value, state.step)
        figures = {"curves/learning_curves": plot_learning_curves(state.history, state.tracker.best_epoch)}
        if "confusion_matrix" in metrics:  # one class per image
            figures["test/confusion_matrix"] = plot_confusion(metrics["confusion_matrix"], metrics["classes"])
        for tag, fig in figures.items():
            self.writer.add_image(tag, _figure_array(fig), state.step, dataformats="HWC")
        self.writer.flush()

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tracker_timeout() -> float:
    """Seconds a tracking store may take to answer the check before training: IMGCLS_TRACKER_TIMEOUT, else 5."""
    text = os.environ.get("IMGCLS_TRACKER_TIMEOUT", "")
    try:
        value = float(text) if text else 5.0
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"IMGCLS_TRACKER_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


def default_mlflow_uri(out_dir: str | Path) -> str:
    """``sqlite:///<out>/mlflow.db``: one store for the runs of an --out folder (a study's trials: its folder)."""
    return "sqlite:///" + str(Path(out_dir).resolve() / MLFLOW_DB)


def _artifact_location(uri: str) -> str | None:
    """Artefacts of a local SQLite store beside its file (MLflow's default is ./mlruns of the working directory);
    None (the store's or server's own choice) for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / MLFLOW_ARTIFACTS).as_uri()


@contextlib.contextmanager
def _mlflow_quiet():
    """MLflow's and Alembic's info lines (a new store's table creation) and SQLAlchemy's deprecation warnings off
    for the block, then as they were."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class MLflowTracker:
    """One MLflow run per run folder, through an ``MlflowClient`` of its own (no global tracking URI is set)."""

    def __init__(self, uri: str | None, group: Group | None = None):
        self.uri, self.group = uri, group
        self.client = self.run_id = self.run = None

    def check(self, out_dir: str | Path, timeout: float | None = None) -> None:
        """Refuse, in one line, a store that cannot take this run: before any data is read.

        A local SQLite store must be writable; any other URI must answer a search for one experiment within
        ``timeout`` seconds (``IMGCLS_TRACKER_TIMEOUT``, default 5; MLflow's own retries take minutes).
        """
        uri = self.uri or default_mlflow_uri(out_dir)
        where = f"mlflow_uri {shown_url(uri)}" if self.uri else f"the MLflow store {uri}"
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            folder = next((p for p in (db.parent, *db.parent.parents) if p.exists()), None)
            if db.exists() and (not db.is_file() or not os.access(db, os.R_OK | os.W_OK)) or (
                    folder is not None and not db.exists() and not os.access(folder, os.W_OK | os.X_OK)):
                raise ConfigError(f"{where} cannot be written by this user; give --mlflow-uri a store it can "
                                  f"write, or --out a folder it can write")
            return
        if timeout is None:
            timeout = _tracker_timeout()
        outcome: dict = {}

        def probe() -> None:
            try:
                from mlflow.tracking import MlflowClient

                with _mlflow_quiet():
                    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            except BaseException as exc:  # noqa: BLE001 - any store's error is reported in one line
                outcome["error"] = exc

        thread = threading.Thread(target=probe, name="imgcls-mlflow-check", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise ConfigError(f"{where} did not answer within {timeout:g} s; start the server or check the "
                              f"address (IMGCLS_TRACKER_TIMEOUT sets how long to wait)")
        if "error" in outcome:
            exc = outcome["error"]
            said = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"{where} cannot be used: {hide_secrets(said, uri)[:300]}")

    def on_train_start(self, state, run) -> None:
        from mlflow.tracking import MlflowClient

        uri = self.uri or default_mlflow_uri(run.path.parent)
        with _mlflow_quiet():
            self.client = MlflowClient(tracking_uri=uri)
        self.run = run
        saved = rundir.read_doc(run.path / rundir.MLFLOW, "delete it: the run then goes on in a new MLflow run")
        params = flat_params(state.cfg)
        if saved.get("tracking_uri") == uri and self._reopen(saved.get("run_id"), params):
            return
        experiment = self._experiment_id(self.group.name if self.group else EXPERIMENT, uri)
        tags = {"imgcls.run_dir": str(run.path.resolve()), "imgcls.dataset": state.cfg.data.dataset}
        if self.group:
            tags.update(self.group.tags())
        self.run_id = self.client.create_run(experiment, run_name=run.path.name, tags=tags).info.run_id
        run.write_json(rundir.MLFLOW, {"tracking_uri": uri, "experiment_id": experiment, "run_id": self.run_id})
        self._log_params(params)

    def _reopen(self, run_id: str | None, params: dict) -> bool:
        """Go on in the run of an earlier session of this run folder; False when the store does not have it."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            logged = self.client.get_run(run_id).data.params
        except MlflowException:
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        self._log_params({k: v for k, v in params.items() if k not in logged})
        changed = [f"{k}: {logged[k]} -> {v}" for k, v in params.items() if k in logged and logged[k] != v]
        if changed:  # a param cannot change once logged; resuming may raise train.epochs
            self.client.set_tag(run_id, "imgcls.changed_on_resume", "; ".join(changed)[:PARAM_CHARS])
        return True

    def _experiment_id(self, name: str, uri: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_location(uri))
        except MlflowException:  # another worker of the study made it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + BATCH])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def on_epoch_end(self, state, record: dict) -> None:
        self._log_metrics(epoch_scalars(record), record["epoch"])

    def on_train_end(self, state, result) -> None:
        self._log_metrics({f"test_{k}": v for k, v in scalars_of_test(result.test_metrics).items()}, state.epoch)
        stem = rundir.eval_stem("test")
        for name in (rundir.CONFIG, rundir.METRICS, rundir.RUN, rundir.ENVIRONMENT, rundir.DATASET,
                     f"{stem}.json", f"{stem}.csv"):
            self._log_file(name)
        self.client.log_artifact(self.run_id, str(self.run.checkpoint(result.final_checkpoint)), rundir.CHECKPOINTS)

    def _log_file(self, name: str) -> None:
        path = self.run.path / name
        if path.is_file():
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        """End the MLflow run with ``status``; a finished run first logs what was written after training: the report
        (api._analyse writes it after fit returns), the calibration, and the whole train.log."""
        if self.run_id is None:
            return
        if status == "FINISHED":
            for name in (rundir.REPORT, rundir.CALIBRATION, rundir.LOG):
                self._log_file(name)
        self.client.set_terminated(self.run_id, status)
        self.run_id = None
