"""The run folder: what a training run leaves behind, and the one owner of its file names.

    runs/<name>/
      config.yaml          the fully resolved config (``imgcls train --config`` repeats the run)
      metrics.jsonl        one JSON line per epoch
      checkpoints/best.safetensors, checkpoints/last.safetensors
      environment.json     package versions, device, CPU
      dataset.json         classes, split sizes, skipped and undecodable files
      train.log            everything printed during training
      run.json             summary: final checkpoint, test metrics, time
      .lock                the PID of the process training in it, locked while it does
      fold.npz             a cross-validation fold's pooled indices of its train, val and test images
      calibration.json, thresholds.json, ood.json, probes.json, eval_<split>.json/.csv   written after training
      report.html          the report, beside its figures
      export/model.onnx, export/export.json                                       ``imgcls export``
      export/model-int8.onnx, export/export-int8.json                             ``imgcls export --int8``
      tensorboard/         TensorBoard event files (``--track tensorboard``)
      mlflow.json          the MLflow run this run logs to, so that a resumed run continues it (``--track mlflow``)

Every other module names these files through the constants below.

One process at a time writes a run: :meth:`RunFolder.writing` holds an
advisory lock on ``.lock`` (``flock``, released by the kernel when the process
ends, however it ends), and a second ``imgcls train --resume`` is refused with
the holder's PID.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import imgcls
from imgcls.config import RunConfig, dump_config
from imgcls.data.base import ImageDataset, pool_splits
from imgcls.errors import CheckpointError, TrainingError
from imgcls.io import read_json, write_atomic, write_npz

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ENVIRONMENT = "environment.json"
DATASET = "dataset.json"
LOG = "train.log"
RUN = "run.json"
LOCK = ".lock"
FOLD = "fold.npz"
CALIBRATION = "calibration.json"
THRESHOLDS = "thresholds.json"
OOD = "ood.json"  # how well the stored out-of-distribution score tells the classes from other images
PROBES = "probes.json"
REPORT = "report.html"
EXPORT = "export/model.onnx"
EXPORT_REPORT = "export/export.json"
EXPORT_INT8 = "export/model-int8.onnx"
EXPORT_INT8_REPORT = "export/export-int8.json"  # beside the fp32 export's report, which it does not replace
TENSORBOARD = "tensorboard"
MLFLOW = "mlflow.json"


def eval_stem(split: str, data: str | None = None) -> str:
    """The name (without .json or .csv) of an evaluation's files: ``eval_test``, or ``eval_test_<data's stem>``
    for other data than the run's own."""
    return f"eval_{split}" if data is None else f"eval_{split}_{Path(str(data)).stem}"


def read_doc(path: str | Path, fix: str) -> dict:
    """The JSON object a run folder keeps at ``path`` ({} when the file is not there).

    Raises:
        CheckpointError: the file is there but is not a JSON object; the message names it and ``fix``.
    """
    path = Path(path)
    try:
        doc = read_json(path, default={})
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as exc:
        said = "it is not JSON" if isinstance(exc, ValueError) else f"it cannot be read ({type(exc).__name__})"
        raise CheckpointError(f"{path} is damaged: {said}; {fix}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} is damaged: it holds a JSON {type(doc).__name__}, not an object; {fix}")
    return doc


def read_history(run_dir: str | Path) -> list[dict]:
    """The run's metrics.jsonl: one dict per epoch, in order ([] before the first epoch).

    Raises:
        CheckpointError: a line is not a JSON record of an epoch (the file is damaged).
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise CheckpointError(f"{path} is damaged: line {number} is not the JSON record of an epoch; "
                                  f"restore the file or train again")
        records.append(record)
    return records


def write_fold_index(run_dir: str | Path, index: dict[str, np.ndarray]) -> None:
    """Store a cross-validation fold's pooled indices (``train``, ``val``, ``test``) in its run folder."""
    write_npz(Path(run_dir) / FOLD, index)


def fold_dataset_of_run(run_dir: str | Path, ds: ImageDataset) -> ImageDataset | None:
    """The splits a fold run was trained and tested on, rebuilt from its fold.npz and the full dataset;
    None for a run that is not a cross-validation fold."""
    path = Path(run_dir) / FOLD
    if not path.is_file():
        return None
    with np.load(path) as data:
        index = {name: data[name] for name in data.files}
    pooled = pool_splits(ds)
    splits = {name: pooled.subset(index[name]) for name in ("train", "val", "test") if name in index}
    note = f"cross-validation fold {Path(run_dir).name}: the test split is the held-out fold"
    return ImageDataset(ds.name, list(ds.classes), splits, notes=list(ds.notes) + [note])


class RunFolder:
    """Paths and writers of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: RunConfig) -> tuple[RunFolder, RunConfig]:
        """A new run folder for ``cfg``, and the config with the name it got (a new object) in its config.yaml."""
        out = Path(cfg.out_dir)
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--out {out} is a file, not a folder; give the folder the runs go in")
        base = cfg.name or default_run_name(cfg)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"--out {out} cannot be created ({exc.strerror}); give a folder imgcls may "
                                f"write in") from None
        # A taken name gets a suffix, so that repeating a run from its config.yaml never overwrites the original
        # and a run never writes into a folder it did not make.
        try:
            path = claim_folder(out, base)
        except OSError as exc:
            raise TrainingError(f"run folder {exc.filename or out} cannot be created ({exc.strerror}); give --out "
                                f"a folder imgcls may write in") from None
        cfg = dataclasses.replace(cfg, name=path.name)
        run = cls(path)
        run.write_text(CONFIG, dump_config(cfg))
        return run, cfg

    @contextmanager
    def writing(self):
        """Hold the run folder's write lock for the ``with`` block; TrainingError when another process holds it."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): nothing to hold
            yield self
            return
        try:
            fh = open(self.path / LOCK, "a+")  # noqa: SIM115 (held for the with block below)
        except OSError as exc:
            raise TrainingError(f"run folder {self.path} cannot be locked: {self.path / LOCK} cannot be opened "
                                f"({exc.strerror}); remove it if it is not a file") from None
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                raise TrainingError(f"run folder {self.path} is in use by another imgcls process (PID {holder}); "
                                    f"wait for it to finish or stop it, then try again") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            yield self  # closing the file (or the process ending) releases the lock

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, which: str) -> Path:
        return self.checkpoints / f"{which}.safetensors"

    def write_text(self, name: str, text: str) -> Path:
        """Write a file of the run whole or not at all (:func:`imgcls.io.write_atomic`)."""
        return write_atomic(self.path / name, text)

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def log(self, line: str) -> None:
        with open(self.path / LOG, "a") as fh:
            fh.write(line.rstrip("\n") + "\n")

    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        return read_history(self.path)

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop metric lines of epochs after the last checkpoint (a run killed mid-epoch)."""
        kept = [r for r in self.read_metrics() if r["epoch"] <= epochs_done]
        self.write_text(METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def claim_folder(out: Path, base: str) -> Path:
    """A new, empty folder ``out/base``, or ``base-2``, ``base-3``, ... where the name is taken (by a folder, a
    file, anything); ``out`` must exist.  mkdir without exist_ok claims the name against a concurrent process too.

    Raises:
        OSError: a folder cannot be made there (no permission, no space); its ``filename`` is the path tried.
    """
    n = 1
    while True:
        path = out / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def default_run_name(cfg: RunConfig) -> str:
    source = Path(cfg.data.dataset).stem if cfg.data.dataset not in ("", ".") else "data"
    source = re.sub(r"[^A-Za-z0-9_.-]+", "-", source).strip("-.") or "data"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{source}-{cfg.model.name}-{stamp}"


def environment(runtime, processes: int = 1) -> dict:
    """Versions and hardware, for the run folder; ``processes``: how many trained it (DDP)."""
    import numpy
    import torch

    env = {
        "imgcls": imgcls.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(runtime.device),
        "bf16": runtime.bf16,
        "channels_last": runtime.channels_last,
        "processes": processes,
    }
    if runtime.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(runtime.device)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
