"""Stratified k-fold cross-validation: K models, each scored on the fold it never saw.

    cross_validate(cfg, folds=5, console)
      -> build_dataset once; pool its train and val splits (the test split is left alone)
      -> make_folds(labels, k, seed)        stratified, shuffled, seeded
      -> for each fold i: fold_dataset(...)  train/val from the other folds, "test" = fold i
                          fit(...)           into <cv folder>/fold-<i>/, an ordinary run folder
      -> cv.json, cv.csv, folds.npz and report.html in the cv folder

Fold numbers run from 1 to K.  ``folds.npz`` holds, per fold, the indices
(into the pooled train + val images, train first) of its train, val and
held-out images; :func:`load_folds` reads them back.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from imgcls.config import RunConfig
from imgcls.data.base import ImageDataset, Split
from imgcls.data.registry import build_dataset, stratified_split
from imgcls.errors import ConfigError
from imgcls.plots import new_figure

# Per-fold figures that get a mean and a spread; names as in cv.json and cv.csv.
METRICS = ("accuracy", "macro_f1", "weighted_f1", "loss", "top_k_accuracy")
_LABELS = {"accuracy": "accuracy", "macro_f1": "macro F1", "weighted_f1": "weighted F1", "loss": "loss",
           "top_k_accuracy": "top-k acc"}


FOLD_FILE = "fold.npz"  # in each fold's run folder: pooled indices of its train, val and test images


def pool_splits(ds: ImageDataset) -> Split:
    """The train and val splits of ``ds`` as one split (train first); test is not included."""
    parts = [ds.splits[name] for name in ("train", "val") if name in ds.splits]
    paths = None
    if all(p.paths is not None for p in parts):
        paths = [path for p in parts for path in p.paths]
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), paths)


def check_folds(folds, labels: np.ndarray) -> None:
    """Refuse a fold count below 2 or above the image count of the smallest class."""
    _, counts = np.unique(labels, return_counts=True)
    limit = int(counts.min()) if len(counts) else 0
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2 or folds > limit:
        raise ConfigError(f"folds must be a whole number from 2 to {limit} (the number of training images "
                          f"of the smallest class), got {folds!r}")


def make_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of each fold, shape (n_i,) each, sorted.

    Stratified and shuffled (scikit-learn's StratifiedKFold seeded by ``seed``):
    the folds partition ``range(len(labels))`` and each class is spread over
    them as evenly as its count allows.
    """
    from sklearn.model_selection import StratifiedKFold

    check_folds(folds, labels)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [np.sort(held) for _, held in splitter.split(np.zeros(len(labels)), labels)]


def fold_dataset(ds: ImageDataset, pooled: Split, held_out: np.ndarray, fold: int, folds: int,
                 val_fraction: float, seed: int) -> tuple[ImageDataset, dict[str, np.ndarray]]:
    """The dataset of one fold and the pooled indices of its splits.

    ``test`` is the held-out fold; ``train`` is every other image, less a
    stratified ``val_fraction`` of them for ``val`` (no val when it is 0).
    """
    rest = np.setdiff1d(np.arange(len(pooled)), held_out)
    index = {"train": rest}
    if val_fraction > 0:
        train_part, val_part = stratified_split(pooled.labels[rest], [val_fraction], np.random.default_rng([seed, fold]))
        index = {"train": rest[train_part], "val": rest[val_part]}
    index["test"] = held_out
    splits = {name: pooled.subset(idx) for name, idx in index.items()}
    note = (f"cross-validation fold {fold} of {folds}: the test split is fold {fold} of the pooled train + val "
            f"images; indices in ../folds.npz")
    return ImageDataset(ds.name, list(ds.classes), splits, notes=list(ds.notes) + [note]), index


def cross_validate(cfg: RunConfig, folds: int, console, out_dir: Path | None = None) -> dict:
    """Train and score one model per fold; write cv.json, cv.csv, folds.npz and report.html.

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
    from imgcls.training.run import RunFolder
    from imgcls.training.trainer import check_compatible, fit

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
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.out_dir, fold_cfg.name = str(cv_dir), f"fold-{i}"
        for note in check_compatible(fold_cfg, fold_ds):
            _say(console, f"note: {note}")
        sizes = ", ".join(f"{k} {len(v)}" for k, v in index.items() if k != "test")
        _say(console, f"fold {i}/{folds}: {sizes}; its test split is the held-out fold {i} ({len(held_out)} images)")
        run = RunFolder.create(fold_cfg)
        np.savez_compressed(run.path / FOLD_FILE, **index)  # lets `imgcls report` rebuild this fold's splits
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
    _say(console, f"cross-validation folder: {cv_dir}")
    return summary


def summarize(per_fold: list[dict]) -> dict:
    """{"mean": {...}, "std": {...}} of each metric over the folds (std with ddof=0, as np.std)."""
    values = {m: np.array([f[m] for f in per_fold], dtype=np.float64) for m in METRICS}
    return {"mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std()) for m, v in values.items()}}


def fold_dataset_of_run(run_dir: str | Path, ds: ImageDataset) -> ImageDataset:
    """The splits a fold run was trained and tested on, rebuilt from its ``fold.npz`` and the full dataset."""
    with np.load(Path(run_dir) / FOLD_FILE) as data:
        index = {name: data[name] for name in data.files}
    pooled = pool_splits(ds)
    splits = {name: pooled.subset(index[name]) for name in ("train", "val", "test") if name in index}
    note = f"cross-validation fold {Path(run_dir).name}: the test split is the held-out fold"
    return ImageDataset(ds.name, list(ds.classes), splits, notes=list(ds.notes) + [note])


def load_folds(cv_dir: str | Path) -> list[dict[str, np.ndarray]]:
    """Per fold, the pooled indices of its ``train``, ``val`` (if any) and ``test`` (held-out) images."""
    with np.load(Path(cv_dir) / "folds.npz") as data:
        arrays = dict(data)
    folds = sorted({int(key.split("_")[0][4:]) for key in arrays})
    return [{key.split("_", 1)[1]: arrays[key] for key in arrays if key.startswith(f"fold{i}_")} for i in folds]


def format_cv(result: dict) -> str:
    """A plain-text table: one line per fold, then mean ± std."""
    head = f"{'fold':>6}  " + "  ".join(f"{_LABELS[m]:>17}" for m in METRICS) + f"  {'held out':>8}"
    title = (f"{result['folds']}-fold cross-validation of {result['model']} on {result['dataset']} "
             f"({result['pooled_images']} images; the test split is not used)")
    lines = [title, head]
    for f in result["per_fold"]:
        lines.append(f"{f['fold']:>6}  " + "  ".join(f"{f[m]:>17.4f}" for m in METRICS) + f"  {f['held_out_images']:>8}")
    lines.append(f"{'mean':>6}  " + "  ".join(f"{result['mean'][m]:>8.4f} ± {result['std'][m]:<6.4f}" for m in METRICS))
    return "\n".join(lines)


def write_cv(result: dict, cv_dir: Path) -> Path:
    """Write cv.json, cv.csv and report.html (table and chart) into ``cv_dir``; returns the page."""
    from imgcls.reports.html import Section, render_page, table

    (cv_dir / "cv.json").write_text(json.dumps(result, indent=2) + "\n")
    columns = ["fold", *METRICS, "train_images", "val_images", "held_out_images", "epochs", "train_seconds"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for f in result["per_fold"]:
        writer.writerow([f[c] for c in columns])
    for stat in ("mean", "std"):
        writer.writerow([stat, *(result[stat][m] for m in METRICS)] + [""] * (len(columns) - len(METRICS) - 1))
    (cv_dir / "cv.csv").write_text(buf.getvalue())
    header = ["fold", *(_LABELS[m] for m in METRICS), "train", "val", "held out", "epochs", "seconds"]
    rows = [[f"fold {f['fold']}", *(f[m] for m in METRICS), f["train_images"], f["val_images"],
             f["held_out_images"], f["epochs"], f["train_seconds"]] for f in result["per_fold"]]
    rows.append(["mean ± std", *(f"{result['mean'][m]:.4f} ± {result['std'][m]:.4f}" for m in METRICS),
                 "", "", "", "", ""])
    links = ", ".join(f"<a href='{f['run']}/'>{f['run']}</a>" for f in result["per_fold"])
    method = (
        f"{result['folds']} stratified folds of the {result['pooled_images']} pooled "
        f"{' + '.join(result['pooled_from'])} images of {_escape(result['dataset'])}, seed {result['seed']}; "
        f"model {_escape(result['model'])}. Each fold's model trains on the other folds "
        f"(val fraction {result['val_fraction']:g} of them held out for validation) and is scored on its own fold. "
        f"The dataset's test split ({result['test_split_images']} images) is not used. Std is the population "
        f"standard deviation over the folds.")
    about = Section("Folds", paragraphs=[method, f"Run folders: {links}."],
                    tables=[table(header, rows, caption="held-out fold metrics")])
    chart = Section("Accuracy and macro F1 per fold", figures=[("cv_folds", plot_cv(result))])
    return render_page(f"Cross-validation: {result['model']} on {result['dataset']}", [about, chart], cv_dir)


def plot_cv(result: dict):
    """Each fold's accuracy and macro F1 (points), with their mean (dashed) and ± std (band)."""
    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    folds = np.array([f["fold"] for f in result["per_fold"]])
    for offset, metric, color, marker in ((-0.06, "accuracy", "tab:blue", "o"), (0.06, "macro_f1", "tab:orange", "s")):
        values = np.array([f[metric] for f in result["per_fold"]])
        mean, std = result["mean"][metric], result["std"][metric]
        ax.plot(folds + offset, values, marker, color=color, markersize=7,
                label=f"{_LABELS[metric]}: {mean:.4f} ± {std:.4f}")
        ax.axhline(mean, color=color, linestyle="--", linewidth=1)
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xticks(folds, [f"fold {f}" for f in folds])
    ax.set_xlim(folds[0] - 0.5, folds[-1] + 0.5)
    ax.set_ylabel("on the held-out fold")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2)
    ax.set_title(f"{result['folds']}-fold cross-validation (dashed: mean, band: mean ± std)")
    return fig


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
    from imgcls.training.run import default_run_name

    base = cfg.name or f"{default_run_name(cfg)}-cv{folds}"
    name, n = base, 1
    while (Path(cfg.out_dir) / name).exists():
        n += 1
        name = f"{base}-{n}"
    path = Path(cfg.out_dir) / name
    path.mkdir(parents=True)
    return path


def _escape(text) -> str:
    import html

    return html.escape(str(text))


def _say(console, line: str) -> None:
    console.print(line, highlight=False, markup=False, soft_wrap=True)
