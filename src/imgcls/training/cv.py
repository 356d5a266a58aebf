"""Stratified k-fold cross-validation: K models, each scored on the fold it never saw.

    cross_validate(cfg, folds=5, console)
      -> build_dataset once; pool its train and val splits (the test split is left alone)
      -> make_folds(labels, k, seed)        stratified, shuffled, seeded
      -> for each fold i: fold_dataset(...)  train/val from the other folds, "test" = fold i
                          fit(...)           into <cv folder>/fold-<i>/, an ordinary run folder
      -> cv.json, cv.csv and folds.npz in the cv folder

The page of the folds (report.html) is :func:`imgcls.reports.cv.write_cv_page`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import time
from pathlib import Path

import numpy as np

from imgcls.config import RunConfig
from imgcls.data.base import pool_splits
from imgcls.data.registry import build_dataset
from imgcls.errors import ConfigError
from imgcls.evaluation.cv import (
    METRICS,
    fold_dataset,
    make_folds,
    summarize,
)
from imgcls.io import write_atomic, write_json
from imgcls.rundir import RunFolder, default_run_name, write_fold_index
from imgcls.training.trainer import check_compatible, fit


def cross_validate(cfg: RunConfig, folds: int, console, out_dir: Path | None = None) -> dict:
    """Train and score one model per fold; write cv.json, cv.csv and folds.npz.

    Args:
        cfg: the run config every fold trains with (its seed also seeds the folds).
        folds: K, from 2 to the image count of the smallest class.
        console: a rich Console for progress and each fold's training log.
        out_dir: the cv folder (default: ``<cfg.out_dir>/<name>-cv<K>``); it must
            not already hold a cross-validation.

    Returns:
        The summary written to cv.json: per_fold figures, their mean and std
        (population, ``np.std``), sizes, and ``path`` of the cv folder.
    """
    seed = cfg.train.seed
    ds = build_dataset(cfg.data, seed=seed, progress=console.is_terminal)
    pooled = pool_splits(ds)
    held_outs = make_folds(pooled.labels, folds, seed)
    cv_dir = _cv_folder(cfg, folds, out_dir)
    _say(console, f"{folds}-fold cross-validation of {cfg.model.name} on {ds.name}: {len(pooled)} train + val "
                  f"images pooled, test split ({len(ds.splits['test'])} images) left untouched; folder {cv_dir}")
    per_fold, indices = [], {}
    for i, held_out in enumerate(held_outs, start=1):
        fold_ds, index = fold_dataset(ds, pooled, held_out, i, folds, cfg.data.val_fraction, seed)
        indices.update({f"fold{i}_{name}": idx for name, idx in index.items()})
        fold_cfg = dataclasses.replace(copy.deepcopy(cfg), out_dir=str(cv_dir), name=f"fold-{i}")  # shares nothing
        fold_cfg, notes = check_compatible(fold_cfg, fold_ds)
        for note in notes:
            _say(console, f"note: {note}")
        sizes = ", ".join(f"{k} {len(v)}" for k, v in index.items() if k != "test")
        _say(console, f"fold {i}/{folds}: {sizes}; its test split is the held-out fold {i} ({len(held_out)} images)")
        run, fold_cfg = RunFolder.create(fold_cfg)
        write_fold_index(run.path, index)  # lets `imgcls report` rebuild this fold's splits
        started = time.perf_counter()
        result = fit(fold_cfg, fold_ds, run, console)
        per_fold.append(_fold_record(i, run, result, index, time.perf_counter() - started))
    np.savez_compressed(cv_dir / "folds.npz", **indices)
    summary = {
        "path": str(cv_dir), "dataset": ds.name, "model": cfg.model.name, "folds": folds, "seed": seed,
        "pooled_images": len(pooled), "pooled_from": [s for s in ("train", "val") if s in ds.splits],
        "test_split_images": len(ds.splits["test"]), "val_fraction": cfg.data.val_fraction,
        "metrics": list(METRICS), "per_fold": per_fold, **summarize(per_fold), "config": cfg.to_dict(),
    }
    write_cv(summary, cv_dir)
    return summary


def write_cv(result: dict, cv_dir: Path) -> None:
    """Write cv.json and cv.csv into ``cv_dir``."""
    write_json(cv_dir / "cv.json", result)
    columns = ["fold", *METRICS, "train_images", "val_images", "held_out_images", "epochs", "train_seconds"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for f in result["per_fold"]:
        writer.writerow([f[c] for c in columns])
    for stat in ("mean", "std"):
        writer.writerow([stat, *(result[stat][m] for m in METRICS)] + [""] * (len(columns) - len(METRICS) - 1))
    write_atomic(cv_dir / "cv.csv", buf.getvalue())


def _fold_record(fold: int, run, result, index: dict, seconds: float) -> dict:
    m = result.test_metrics
    return {
        "fold": fold, "run": run.path.name, "accuracy": m["accuracy"], "macro_f1": m["macro_avg"]["f1"],
        "weighted_f1": m["weighted_avg"]["f1"], "loss": m["loss"], "top_k_accuracy": m["top_k_accuracy"],
        "top_k": m["top_k"], "train_images": len(index["train"]), "val_images": len(index.get("val", ())),
        "held_out_images": len(index["test"]), "epochs": len(result.history), "train_seconds": round(seconds, 2),
    }


def _cv_folder(cfg: RunConfig, folds: int, out_dir: Path | None) -> Path:
    if out_dir is not None:
        out_dir = Path(out_dir)
        if (out_dir / "cv.json").exists() or any(out_dir.glob("fold-*/config.yaml")):
            raise ConfigError(f"{out_dir} already holds a cross-validation; choose another folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir
    base = cfg.name or f"{default_run_name(cfg)}-cv{folds}"
    name, n = base, 1
    while (Path(cfg.out_dir) / name).exists():
        n += 1
        name = f"{base}-{n}"
    path = Path(cfg.out_dir) / name
    path.mkdir(parents=True)
    return path


def _say(console, line: str) -> None:
    console.print(line, highlight=False, markup=False, soft_wrap=True)
