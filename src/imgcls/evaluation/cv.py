"""Stratified k-fold cross-validation: folds, each fold's splits, the summary over folds, and the cv folder.

The loop over the folds is :func:`imgcls.driver.cross_validate`, the page
:func:`imgcls.reports.cv.write_cv_page`; :func:`imgcls.api.cross_validate`
runs both.

This module alone names the cv folder's files::

    <cv folder>/
      fold-<i>/        an ordinary run folder per fold (i from 1 to K), with its fold.npz
      cv.json          the summary: per-fold figures, mean and std, sizes, the config
      cv.csv           the same figures as a table
      folds.npz        per fold, the indices (into the pooled train + val images, train first) of its train,
                       val and held-out images; :func:`load_folds` reads them back
      report.html      the page (:mod:`imgcls.reports.cv`), beside its figures
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from imgcls.config import RunConfig
from imgcls.data.base import ImageDataset, Split, pool_splits  # noqa: F401 (pool_splits: part of cv's vocabulary)
from imgcls.data.multilabel import iterative_split
from imgcls.data.registry import split_by_label
from imgcls.errors import ConfigError
from imgcls.io import write_atomic, write_json, write_npz
from imgcls.rundir import claim_folder, default_run_name

CV_JSON = "cv.json"
CV_CSV = "cv.csv"
FOLDS = "folds.npz"
FOLD_PREFIX = "fold-"  # fold-1, fold-2, ...: the folds' run folders

# Per-fold figures that get a mean and a spread; names as in cv.json and cv.csv.  Several labels per image:
# mAP first, the figure multi-label runs are judged by.
METRICS = ("accuracy", "macro_f1", "weighted_f1", "loss", "top_k_accuracy")
MULTILABEL_METRICS = ("map", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "loss")
LABELS = {"accuracy": "accuracy", "macro_f1": "macro F1", "weighted_f1": "weighted F1", "loss": "loss",
          "top_k_accuracy": "top-k acc", "map": "mAP", "micro_f1": "micro F1", "subset_accuracy": "exact-set acc",
          "hamming_loss": "Hamming loss"}


def metric_names(result: dict) -> tuple[str, ...]:
    """The per-fold figures of a cv.json (or of its ``per_fold`` records): multi-label ones or not."""
    folds = result.get("per_fold", [result])
    return MULTILABEL_METRICS if folds and "map" in folds[0] else METRICS


def fold_name(fold: int) -> str:
    """The run folder of fold ``fold`` (from 1) inside the cv folder."""
    return f"{FOLD_PREFIX}{fold}"


def new_cv_folder(cfg: RunConfig, folds: int, out_dir: Path | None) -> Path:
    """The cv folder, made: ``out_dir`` (refused when it already holds a cross-validation), else a new
    ``<out>/<name>-cv<K>`` (``-2``, ``-3``, ... when taken)."""
    if out_dir is not None:
        out_dir = Path(out_dir)
        if (out_dir / CV_JSON).exists() or any(out_dir.glob(f"{FOLD_PREFIX}*/config.yaml")):
            raise ConfigError(f"{out_dir} already holds a cross-validation; choose another folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    return claim_folder(Path(cfg.out_dir), cfg.name or f"{default_run_name(cfg)}-cv{folds}")


def fold_record(fold: int, run_dir: Path, m: dict, epochs: int, index: dict, seconds: float) -> dict:
    """One fold's line of cv.json: its held-out figures ``m`` (test metrics), sizes, epochs and seconds."""
    if m.get("task") == "multilabel":
        figures = {k: m[k] for k in MULTILABEL_METRICS}
    else:
        figures = {"accuracy": m["accuracy"], "macro_f1": m["macro_avg"]["f1"], "weighted_f1": m["weighted_avg"]["f1"],
                   "loss": m["loss"], "top_k_accuracy": m["top_k_accuracy"], "top_k": m["top_k"]}
    return {
        "fold": fold, "run": Path(run_dir).name, **figures, "train_images": len(index["train"]),
        "val_images": len(index.get("val", ())), "held_out_images": len(index["test"]), "epochs": epochs,
        "train_seconds": round(seconds, 2),
    }


def write_cv(result: dict, cv_dir: Path, indices: dict[str, np.ndarray] | None = None) -> None:
    """Write folds.npz (``indices``: ``fold<i>_<split>`` -> pooled indices), cv.json and cv.csv into ``cv_dir``,
    each whole or not at all."""
    if indices is not None:
        write_npz(cv_dir / FOLDS, indices)
    write_json(cv_dir / CV_JSON, result)
    names = metric_names(result)
    columns = ["fold", *names, "train_images", "val_images", "held_out_images", "epochs", "train_seconds"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for f in result["per_fold"]:
        writer.writerow([f[c] for c in columns])
    for stat in ("mean", "std"):
        writer.writerow([stat, *(result[stat][m] for m in names)] + [""] * (len(columns) - len(names) - 1))
    write_atomic(cv_dir / CV_CSV, buf.getvalue())


def check_folds(folds, labels: np.ndarray) -> None:
    """Refuse a fold count below 2 or above the image count of the smallest class (or rarest label)."""
    counts = labels.sum(0) if labels.ndim == 2 else np.unique(labels, return_counts=True)[1]
    counts = counts[counts > 0]
    limit = int(counts.min()) if len(counts) else 0
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2 or folds > limit:
        what = "images of the rarest label" if labels.ndim == 2 else "training images of the smallest class"
        raise ConfigError(f"folds must be a whole number from 2 to {limit} (the number of {what}), got {folds!r}")


def make_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of each fold, shape (n_i,) each, sorted.

    Stratified and shuffled, seeded by ``seed``: the folds partition ``range(len(labels))``; each class's images,
    in a random order, are dealt to the folds in turn, each class going on from the fold where the last one
    stopped, so that a class's count in any two folds, and any two folds' sizes, differ by one at most.  (Numpy
    alone: scikit-learn's StratifiedKFold cost 1.7 s of imports, a sixth of a warm ``imgcls inspect``.)
    """
    check_folds(folds, labels)
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:  # several labels per image: iterative stratification into K near-equal parts
        parts = iterative_split(labels, [1.0 / folds] * (folds - 1), rng)
        return [parts[(i + 1) % folds] for i in range(folds)]
    fold_of = np.empty(len(labels), np.int64)
    start = 0
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        fold_of[idx] = (start + np.arange(len(idx))) % folds
        start = (start + len(idx)) % folds
    return [np.flatnonzero(fold_of == k) for k in range(folds)]


def fold_dataset(ds: ImageDataset, pooled: Split, held_out: np.ndarray, fold: int, folds: int,
                 val_fraction: float, seed: int) -> tuple[ImageDataset, dict[str, np.ndarray]]:
    """The dataset of one fold and the pooled indices of its splits.

    ``test`` is the held-out fold; ``train`` is every other image, less a
    stratified ``val_fraction`` of them for ``val`` (no val when it is 0).
    """
    rest = np.setdiff1d(np.arange(len(pooled)), held_out)
    index = {"train": rest}
    if val_fraction > 0:
        train_part, val_part = split_by_label(pooled.labels[rest], [val_fraction], np.random.default_rng([seed, fold]))
        index = {"train": rest[train_part], "val": rest[val_part]}
    index["test"] = held_out
    splits = {name: pooled.subset(idx) for name, idx in index.items()}
    note = (f"cross-validation fold {fold} of {folds}: the test split is fold {fold} of the pooled train + val "
            f"images; indices in ../{FOLDS}")
    return ImageDataset(ds.name, list(ds.classes), splits, notes=list(ds.notes) + [note]), index


def summarize(per_fold: list[dict]) -> dict:
    """{"mean": {...}, "std": {...}} of each metric over the folds (std with ddof=0, as np.std)."""
    values = {m: np.array([f[m] for f in per_fold], dtype=np.float64) for m in metric_names({"per_fold": per_fold})}
    return {"mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std()) for m, v in values.items()}}


def load_folds(cv_dir: str | Path) -> list[dict[str, np.ndarray]]:
    """Per fold, the pooled indices of its ``train``, ``val`` (if any) and ``test`` (held-out) images."""
    with np.load(Path(cv_dir) / FOLDS) as data:
        arrays = dict(data)
    folds = sorted({int(key.split("_")[0][4:]) for key in arrays})
    return [{key.split("_", 1)[1]: arrays[key] for key in arrays if key.startswith(f"fold{i}_")} for i in folds]


def format_cv(result: dict) -> str:
    """A plain-text table: one line per fold, then mean ± std."""
    names = metric_names(result)
    head = f"{'fold':>6}  " + "  ".join(f"{LABELS[m]:>17}" for m in names) + f"  {'held out':>8}"
    title = (f"{result['folds']}-fold cross-validation of {result['model']} on {result['dataset']} "
             f"({result['pooled_images']} images; the test split is not used)")
    lines = [title, head]
    for f in result["per_fold"]:
        lines.append(f"{f['fold']:>6}  " + "  ".join(f"{f[m]:>17.4f}" for m in names) + f"  {f['held_out_images']:>8}")
    lines.append(f"{'mean':>6}  " + "  ".join(f"{result['mean'][m]:>8.4f} ± {result['std'][m]:<6.4f}" for m in names))
    return "\n".join(lines)
