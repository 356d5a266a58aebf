"""Multi-label classification on flower mosaics: imgcls's default run against a plain one-vs-rest baseline.

    python benchmarks/multilabel_mosaic.py all                         # build 1,700 mosaics (seed 0), imgcls, baseline, plain baseline
    python benchmarks/multilabel_mosaic.py all --cpu-class avx2        # the same, capped at AVX2 (common.py)
    python benchmarks/multilabel_mosaic.py build --images 300          # each step runs alone too
    python benchmarks/multilabel_mosaic.py baseline --images 300 --json /tmp/mosaic.json
    python benchmarks/multilabel_mosaic.py imgcls --images 300

Steps (``all`` runs build, imgcls, baseline, plain, in that order, so that
the baselines can read imgcls's split back):

1. **build** (:func:`build_mosaics`, seeded, one numpy Generator): ``--images``
   mosaics of 128x128 RGB, JPEG quality 90, from the photos of
   ``--flowers`` (``../shared/data/flowers.zip``: ``flowers/<class>/<file>.jpg``,
   4,317 photos of 5 classes).  Each mosaic shows 1 to 4 photos, the count
   drawn uniformly: one photo fills it; two sit side by side or stacked
   (p 0.5 each), each in a 64x128 or 128x64 half; three or four fill a 2x2
   grid of 64x64 cells, for three one cell (drawn uniformly) left mid-grey
   (128, 128, 128).  A photo is fitted to its cell by a centred crop to the
   cell's shape, then a bicubic resize (``ImageOps.fit``: a square photo in a
   quadrant is only resized; in a half, its middle half is kept).  Photos
   are drawn without replacement from one shuffled pass over the pool; when
   the pool runs out (1,700 mosaics need about 4,250 of the 4,317; 3,000 would need 7,500) the next pass is
   a fresh shuffle, and how many photos ended in more than one mosaic is
   recorded (``photos.reused``).  A mosaic never shows one photo twice.  Its
   labels are the distinct classes of its photos.  Written to
   ``<work>/mosaics-seed<S>-n<N>/`` (``--work``, default
   ``~/.cache/imgcls-bench/multilabel-mosaic``): ``images/<index>.jpg`` and ``labels.csv``
   (header ``filename,labels``; ``images/00012.jpg,daisy rose``: the file
   relative to the folder, the labels sorted and space separated); beside it,
   ``mosaics-seed<S>-n<N>.json`` (the manifest: parameters, source zip's
   SHA-256, statistics, each mosaic's layout, cells and photos).  A folder
   whose manifest has the same format, seed, size and source is reused.
   flowers.zip holds a few photos in two class folders (rose and tulip,
   benchmarks/README.md "Inspect"); a mosaic showing one carries the class of
   the folder it was drawn from.

2. **imgcls**: ``imgcls train --data FOLDER --out <work>/runs-seed<S>-n<N>
   --name mosaic --seed S`` (``sys.executable -m imgcls``), nothing else, in
   a fresh process with an empty ``IMGCLS_DATA_DIR`` (so it decodes the
   images and computes the frozen features from scratch, as a person's first
   run does), timed from launch to exit (``common.run_child``), plus launch
   to run.json.  The test metrics are read from the run folder's
   ``eval_test.json`` (``rundir.eval_stem("test")``), whose multi-label
   contract is: ``map``, ``micro_f1``, ``macro_f1``, ``subset_accuracy``,
   ``hamming_loss`` and ``per_label`` (``label``, ``precision``, ``recall``,
   ``f1``, ``ap``, ``support``).  A run that fails, or whose eval_test.json
   lacks those keys (an imgcls without multi-label training), is recorded as
   an error, and ``all`` goes on to the baseline.

3. **baseline** (:func:`run_baseline`): scikit-learn's
   ``OneVsRestClassifier(LogisticRegression(C, max_iter=1000))`` after a
   ``StandardScaler``, C from ``C_GRID`` by the val split's mean binary
   cross-entropy (as imgcls's stage 1 chooses its L2 strength), fitted on
   the train split alone.  The imgcls run read is ``--run``, by default the
   imgcls step's (``<work>/runs-seed<S>-n<N>/mosaic``).  Its features are the frozen features imgcls's
   default run reads: the settings from the imgcls run's config.yaml when
   there is a run (else what ``imgcls.auto.choose`` picks for the folder on
   this machine; where that cannot size the folder up, auto's photo settings:
   EfficientNet-Lite2, ImageNet weights, 128 px, stretch, the pooled outputs
   of stage 2 to the head convolution), the images decoded by imgcls's own
   ``decode_all``/``assemble`` and the features computed by its
   ``FeatureRunner`` (ONNX Runtime fp32 on a CPU for 1,000 images or more)
   and ``compute_features``.  Only the images themselves: imgcls's stage 1
   may add the mirror image at test time; the baseline does not.  The
   split: imgcls's own, rebuilt from
   the run folder's config.yaml as every imgcls analysis does
   (``build_dataset(cfg.data, seed=cfg.train.seed)``: its ``paths`` per
   split, checked against dataset.json's split sizes and labels.csv); where
   that cannot be read back (no run, or this imgcls cannot load the folder),
   a seeded iterative stratification (Sechidis et al. 2011) with imgcls's
   default shares (10% test, 10% val, the rest train).  ``split.source``
   says which.  Per-label thresholds: on the val split, the cut that
   maximises each label's F1 (midway between the two val scores it falls
   between; 0.5 for a label with no positive in val).  Wall time is
   measured in this process: ``decode`` (imgcls's decoder), ``features``
   (the backbone built, its weights converted into an empty imgcls cache as
   imgcls's run does, the frozen pass), ``fit`` (the C search, the
   thresholds, the test predictions; with one BLAS thread, ``BLAS_THREADS``);
   ``from_raw_images`` is their sum.
   This process's interpreter start and imports are not in it (imgcls's
   wall time holds its own, and its calibration and report.html).

4. **plain** (:func:`run_plain_baseline`): the same baseline as a person
   writes it, in a fresh process timed from launch to exit like imgcls's
   run (interpreter start and imports included): the split and feature
   settings as step 3 has them, handed over in a file; the mosaics decoded
   with PIL (``Image.open(...).convert("RGB").resize((W, H), BICUBIC)``);
   the same backbone and ImageNet weights (imgcls's model class, the weights
   from their pip package into an empty cache) run in PyTorch eager fp32 in
   batches of 64 (``eval()``, ``no_grad``, the default memory layout), its
   pooled features averaged over positions; the same scikit-learn fit as
   step 3.  Under ``--cpu-class avx2`` its PyTorch is capped, where step
   3's ONNX Runtime is not.  ``all`` runs it after step 3.

Metrics, on the test split (:func:`multilabel_metrics`): mAP (the mean over
labels with a positive in the test split of scikit-learn's
``average_precision_score``), micro and macro F1, exact-set (subset)
accuracy, Hamming loss and per-label precision, recall, F1, AP and support;
the baseline's at 0.5 and at its val thresholds.

Results: ``benchmarks/results/multilabel-mosaic-<class>.json`` (``<class>``:
``common.class_tag()``: avx2, bf16, cuda, ...; ``-n<N>-seed<S>`` inserted
when not the defaults), or ``--json PATH``.  Each step's figures are kept in
``<work>/mosaics-seed<S>-n<N>.results.json`` and every step after build
writes the whole of it, so ``baseline`` and ``imgcls`` may run apart (each
side records its own machine and time).  The exit status is 1 when the
imgcls step was asked for and failed.  Frozen-pass caveat of
``--cpu-class avx2``: ONNX Runtime is not capped (common.py).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# imgcls, torch and scikit-learn are imported in the functions that use them: the build step needs none of them.
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLS_BENCH_DATA") or ROOT.parent / "shared" / "data")  # as common.SHARED
# Mosaics of the default run: as many as the 4,317 photos fill with none used twice (2.5 photos a mosaic on
# average), so that no photo is in a training mosaic and a test mosaic at once.
DEFAULT_IMAGES = 1700
WORK = Path.home() / ".cache" / "imgcls-bench" / "multilabel-mosaic"

FORMAT = 1  # of the manifest; bumped when mosaics are drawn otherwise, so that older folders are rebuilt
SIDE = 128  # px, each mosaic's height and width
HALF = SIDE // 2  # px
QUALITY = 90  # JPEG quality of the mosaics
GREY = (128, 128, 128)  # RGB of a 3-photo mosaic's empty cell
MAX_PHOTOS = 4  # photos a mosaic shows: 1 to this, uniformly
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Cells as PIL boxes (left, top, right, bottom), px.
LAYOUTS = {
    "single": [(0, 0, SIDE, SIDE)],
    "side_by_side": [(0, 0, HALF, SIDE), (HALF, 0, SIDE, SIDE)],
    "stacked": [(0, 0, SIDE, HALF), (0, HALF, SIDE, SIDE)],
    "grid": [(0, 0, HALF, HALF), (HALF, 0, SIDE, HALF), (0, HALF, HALF, SIDE), (HALF, HALF, SIDE, SIDE)],
}

# The baseline.  C is scikit-learn's inverse L2 strength, on standardised features.  On 300 and 1,200 mosaics
# (2,120 features) the val mAP kept rising down to C 0.001, so the grid reaches 1e-4.
C_GRID = (1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
MAX_ITER = 1000  # lbfgs iterations per label and C
# OpenBLAS threads while the baseline fits.  One: each lbfgs step is a few small matrix-vector products, and with
# two threads on the shared 2-core CPU (and torch's OpenMP threads beside them) a fit took 10 to 40 times as long
# (0.2-0.7 s against 0.01-0.03 s for one label on 241 x 2,120 features; one-off, busy machine).
BLAS_THREADS = 1
# The fallback split's shares, as imgcls's defaults (DataConfig.val_fraction, test_fraction).
VAL_SHARE, TEST_SHARE = 0.1, 0.1
# What eval_test.json of a multi-label run holds (the contract with imgcls's multi-label training).
IMGCLS_KEYS = ("map", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "per_label")
RUN_NAME = "mosaic"


# ----------------------------------------------------------------------------------------------------- building


def flower_photos(zip_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The image members of a zip of class folders (``[wrapper/]<class>/<file>``) and each one's class folder.

    Hidden files (``.DS_Store``) and ``__MACOSX`` are left out; members are sorted by name.
    """
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES) and n.count("/") >= 1
                       and not any(p.startswith(".") or p == "__MACOSX" for p in n.split("/")))
    return names, [n.split("/")[-2] for n in names]


class PhotoPool:
    """Indices 0..n-1 drawn without replacement from shuffled passes over them: a new shuffle when one runs out.

    ``draw(k)`` never returns one index twice: an index already drawn for the same call goes back to the end of
    the pass (which happens only where a pass ends within a draw).
    """

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        if n < MAX_PHOTOS:
            raise ValueError(f"the photo pool holds {n} photos; a mosaic may need {MAX_PHOTOS}")
        self.n, self.rng, self.passes = n, rng, 0
        self.queue: list[int] = []

    def draw(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.queue:
                self.queue = self.rng.permutation(self.n).tolist()
                self.passes += 1
            i = self.queue.pop(0)
            if i in out:
                self.queue.append(i)
            else:
                out.append(i)
        return out


@dataclass(frozen=True)
class Mosaic:
    """One mosaic's composition: ``photos[i]`` (indices into the pool) fills ``cells[i]`` (PIL boxes)."""

    layout: str
    cells: list[tuple[int, int, int, int]]
    photos: list[int]
    empty: tuple[int, int, int, int] | None  # the grey cell of a 3-photo grid


def draw_mosaic(pool: PhotoPool, rng: np.random.Generator) -> Mosaic:
    """The next mosaic: 1-4 photos (uniform), its layout and which photo goes in which cell."""
    count = int(rng.integers(1, MAX_PHOTOS + 1))
    photos = pool.draw(count)
    if count == 1:
        return Mosaic("single", LAYOUTS["single"], photos, None)
    if count == 2:
        layout = "side_by_side" if rng.random() < 0.5 else "stacked"
        return Mosaic(layout, LAYOUTS[layout], photos, None)
    cells, empty = list(LAYOUTS["grid"]), None
    if count == 3:
        empty = cells.pop(int(rng.integers(len(cells))))
    return Mosaic("grid", cells, photos, empty)


def render(mosaic: Mosaic, photo: Callable[[int], Image.Image]) -> Image.Image:
    """The mosaic as a SIDE x SIDE RGB image; ``photo(index)`` gives a pool photo as an RGB PIL image."""
    canvas = Image.new("RGB", (SIDE, SIDE), GREY)
    for box, index in zip(mosaic.cells, mosaic.photos):
        size = (box[2] - box[0], box[3] - box[1])
        canvas.paste(ImageOps.fit(photo(index), size, Image.Resampling.BICUBIC), box[:2])
    return canvas


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_name(seed: int, images: int) -> str:
    return f"mosaics-seed{seed}-n{images}"


def build_mosaics(flowers: str | os.PathLike, dest: str | os.PathLike, images: int, seed: int = 0) -> dict:
    """Write ``dest/images/<index>.jpg`` and ``dest/labels.csv``; return the manifest (also ``<dest>.json``).

    Built in a temporary folder beside ``dest`` and renamed, the manifest written last: a folder with its
    manifest is complete.  Raises ValueError for fewer than 1 image or a pool of fewer than 4 photos.
    """
    if images < 1:
        raise ValueError(f"--images {images}: give 1 or more")
    dest = Path(dest)
    names, labels = flower_photos(flowers)
    rng = np.random.default_rng(seed)
    pool = PhotoPool(len(names), rng)
    mosaics = [draw_mosaic(pool, rng) for _ in range(images)]
    width = max(5, len(str(images - 1)))
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rows, records = [], []
    with zipfile.ZipFile(flowers) as zf:
        def photo(index: int) -> Image.Image:
            with Image.open(io.BytesIO(zf.read(names[index]))) as im:
                return im.convert("RGB")

        for k, m in enumerate(mosaics):
            file = f"images/{k:0{width}d}.jpg"
            render(m, photo).save(tmp / file, "JPEG", quality=QUALITY)
            shown = sorted({labels[i] for i in m.photos})
            rows.append((file, " ".join(shown)))
            records.append({"file": file, "layout": m.layout, "cells": [list(c) for c in m.cells],
                            "photos": [names[i] for i in m.photos], "empty": list(m.empty) if m.empty else None,
                            "labels": shown})
    with open(tmp / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "labels"])
        writer.writerows(rows)
    manifest = {"format": FORMAT, "seed": seed, "images": images, "source": str(Path(flowers).resolve()),
                "source_sha256": file_sha256(flowers), "classes": sorted(set(labels)), "pool": len(names),
                "side": SIDE, "quality": QUALITY, "stats": mosaic_stats(records, len(names), pool.passes),
                "mosaics": records}
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    write_json(manifest_path(dest), manifest)
    return manifest


def manifest_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".json")


def mosaic_stats(records: list[dict], pool: int, passes: int) -> dict:
    """Label and set-size distributions, and how the photos were used."""
    uses = Counter(p for r in records for p in r["photos"])
    return {"labels": dict(sorted(Counter(lab for r in records for lab in r["labels"]).items())),
            "set_sizes": {str(k): v for k, v in sorted(Counter(len(r["labels"]) for r in records).items())},
            "photos_per_mosaic": {str(k): v for k, v in sorted(Counter(len(r["photos"]) for r in records).items())},
            "layouts": dict(sorted(Counter(r["layout"] for r in records).items())),
            "photos": {"pool": pool, "placed": sum(uses.values()), "distinct": len(uses),
                       "reused": sum(1 for n in uses.values() if n > 1), "max_uses": max(uses.values(), default=0),
                       "passes": passes}}


def reusable(folder: Path, flowers: Path, images: int, seed: int) -> dict | None:
    """The manifest of an existing build of the same format, seed, size and source zip; None if there is none."""
    try:
        manifest = json.loads(manifest_path(folder).read_text())
    except (OSError, ValueError):
        return None
    same = (manifest.get("format"), manifest.get("seed"), manifest.get("images")) == (FORMAT, seed, images)
    if not same or manifest.get("source_sha256") != file_sha256(flowers):
        return None
    if not (folder / "labels.csv").is_file() or len(list((folder / "images").glob("*.jpg"))) != images:
        return None
    return manifest


def ensure_built(flowers: Path, folder: Path, images: int, seed: int) -> dict:
    """Reuse the build in ``folder`` when it matches, else build it; print the distributions."""
    manifest = reusable(folder, flowers, images, seed)
    if manifest is not None:
        print(f"build: reusing {folder} ({images:,} mosaics, seed {seed})", flush=True)
    else:
        started = time.perf_counter()
        manifest = build_mosaics(flowers, folder, images, seed)
        print(f"build: {images:,} mosaics in {time.perf_counter() - started:.1f} s -> {folder}", flush=True)
    print(distribution_lines(manifest["stats"], images))
    return manifest


def distribution_lines(stats: dict, images: int) -> str:
    def share(counts: dict) -> str:
        return ", ".join(f"{k} {v:,} ({v / images:.1%})" for k, v in counts.items())

    p = stats["photos"]
    return "\n".join([
        f"  mosaics showing each label: {share(stats['labels'])}",
        f"  labels per mosaic (set size): {share(stats['set_sizes'])}",
        f"  photos per mosaic: {share(stats['photos_per_mosaic'])}",
        (f"  photos: {p['placed']:,} placed from a pool of {p['pool']:,} in {p['passes']} shuffled pass(es); "
         f"{p['distinct']:,} distinct, {p['reused']:,} in more than one mosaic (at most {p['max_uses']})")])


# ------------------------------------------------------------------------------------------------------ metrics


def read_labels(folder: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """labels.csv -> (files, multi-hot bool (N, K), the K labels sorted)."""
    with open(Path(folder) / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    files = [r["filename"] for r in rows]
    sets = [r["labels"].split() for r in rows]
    classes = sorted({lab for s in sets for lab in s})
    y = np.zeros((len(rows), len(classes)), dtype=bool)
    col = {c: j for j, c in enumerate(classes)}
    for i, s in enumerate(sets):
        y[i, [col[lab] for lab in s]] = True
    return files, y, classes


def fit_thresholds(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Per label, the cut on ``proba`` (N, K) that maximises the F1 of ``y`` (N, K) bool: (K,) float.

    The cut lies midway between the lowest score it keeps and the next lower one (the first of equal F1s,
    the fewest positives, wins); a label without a positive keeps 0.5.
    """
    out = np.full(y.shape[1], 0.5)
    for k in range(y.shape[1]):
        truth, scores = y[:, k].astype(bool), proba[:, k]
        if not truth.any():
            continue
        order = np.argsort(-scores, kind="stable")
        hits = np.cumsum(truth[order])  # true positives when the top j + 1 are kept
        f1 = 2 * hits / (np.arange(1, len(order) + 1) + truth.sum())
        ranked = scores[order]
        distinct = np.append(ranked[1:] < ranked[:-1], True)  # a cut can only fall between different scores
        j = int(np.flatnonzero(distinct)[np.argmax(f1[distinct])])
        out[k] = 0.5 * (ranked[j] + ranked[j + 1]) if j + 1 < len(ranked) else ranked[j] / 2
    return out


def multilabel_metrics(y: np.ndarray, proba: np.ndarray, thresholds, classes: list[str]) -> dict:
    """Test metrics of scores ``proba`` (N, K) against ``y`` (N, K) bool, predicting ``proba >= thresholds``.

    The keys of imgcls's multi-label eval_test.json: ``map`` (mean AP over labels with a positive),
    ``micro_f1``, ``macro_f1``, ``subset_accuracy`` (the exact set), ``hamming_loss``, ``per_label``.
    """
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        hamming_loss,
        precision_recall_fscore_support,
    )

    y = np.asarray(y, dtype=bool)
    pred = proba >= np.broadcast_to(np.asarray(thresholds, dtype=float), (proba.shape[1],))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    ap = [float(average_precision_score(y[:, k], proba[:, k])) if y[:, k].any() else None
          for k in range(y.shape[1])]
    scored = [a for a in ap if a is not None]
    return {"map": float(np.mean(scored)) if scored else None,
            "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
            "subset_accuracy": float(accuracy_score(y, pred)),
            "hamming_loss": float(hamming_loss(y, pred)),
            "n": len(y),
            "per_label": [{"label": c, "precision": float(p), "recall": float(r), "f1": float(f), "ap": a,
                           "support": int(s)}
                          for c, p, r, f, a, s in zip(classes, precision, recall, f1, ap, support)]}


def mean_ap(y: np.ndarray, proba: np.ndarray) -> float:
    """The mean over labels with a positive of the average precision."""
    from sklearn.metrics import average_precision_score

    return float(np.mean([average_precision_score(y[:, k], proba[:, k]) for k in range(y.shape[1])
                          if y[:, k].any()]))


# ------------------------------------------------------------------------------------------------------ splits


def iterative_split(y: np.ndarray, shares: dict[str, float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Iterative stratification of multi-label ``y`` (N, K) bool (Sechidis, Tsoumakas and Vlahavas, 2011).

    The label with the fewest images left is dealt out first, each of its images to the split that wants
    most of that label (then most images, then at random); images without a label go to the split that wants
    most images.  ``shares``: split name -> share of the images (summing to 1).  Returns split name ->
    sorted indices.
    """
    names = list(shares)
    share = np.array([shares[s] for s in names], dtype=float)
    if not np.isclose(share.sum(), 1.0) or (share < 0).any():
        raise ValueError(f"split shares {shares} must be non-negative and sum to 1")
    y = np.asarray(y, dtype=bool)
    want_images = share * len(y)
    want_label = np.outer(share, y.sum(0)).astype(float)  # (splits, K)
    left = np.ones(len(y), dtype=bool)
    parts: list[list[int]] = [[] for _ in names]

    def give(i: int, label: int | None) -> None:
        keys = [(want_label[s, label] if label is not None else 0.0, want_images[s], rng.random())
                for s in range(len(names))]
        s = max(range(len(names)), key=lambda j: keys[j])
        parts[s].append(i)
        left[i] = False
        want_images[s] -= 1
        want_label[s] -= y[i]

    while left.any():
        counts = y[left].sum(0)
        if not counts.any():  # only images without a label are left
            for i in rng.permutation(np.flatnonzero(left)):
                give(int(i), None)
            break
        label = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        for i in rng.permutation(np.flatnonzero(left & y[:, label])):
            give(int(i), label)
    return {name: np.sort(np.array(p, dtype=np.int64)) for name, p in zip(names, parts)}


def indices_of_paths(paths: list[str], folder: str | os.PathLike, files: list[str]) -> np.ndarray:
    """Positions in ``files`` (labels.csv's, relative to ``folder``) of imgcls's split ``paths``: ``<folder>/<rel>``
    as imgcls's loader names them, or the file as labels.csv names it.

    Raises ValueError naming a path that is not one of the folder's listed files.
    """
    root = os.path.realpath(folder)
    where = {f: i for i, f in enumerate(files)}
    out = []
    for p in paths:
        rel = p if p in where else os.path.relpath(os.path.realpath(p), root).replace(os.sep, "/")
        if rel not in where:
            raise ValueError(f"imgcls's split names {p!r}, which labels.csv of {folder} does not list")
        out.append(where[rel])
    return np.array(out, dtype=np.int64)


def imgcls_split(run_dir: Path, folder: Path, files: list[str]) -> dict[str, np.ndarray]:
    """The train, val and test indices (into ``files``) of imgcls's run in ``run_dir``, rebuilt from its
    config.yaml as imgcls's analyses rebuild them; checked against its dataset.json.

    Raises:
        ValueError, OSError or an imgcls error: no run there, or its split cannot be read back.
    """
    from imgcls import rundir
    from imgcls.config import load_config
    from imgcls.data.registry import build_dataset

    cfg = load_config(run_dir / rundir.CONFIG)
    record = json.loads((run_dir / rundir.DATASET).read_text())
    ds = build_dataset(dataclasses.replace(cfg.data, cache=False), seed=cfg.train.seed)  # not into the user's cache
    if os.path.realpath(ds.name) != os.path.realpath(folder):
        raise ValueError(f"the run in {run_dir} trained on {ds.name}, not on {folder}")
    split = {}
    for name in ("train", "val", "test"):
        part = ds.splits.get(name)
        if part is None or part.paths is None:
            raise ValueError(f"the rebuilt {name} split of {run_dir} keeps no image paths")
        recorded = record["splits"].get(name, {}).get("images")
        if recorded != len(part):
            raise ValueError(f"the rebuilt {name} split has {len(part)} images, dataset.json {recorded}")
        split[name] = indices_of_paths(list(part.paths), folder, files)
    joined = np.concatenate(list(split.values()))
    if len(np.unique(joined)) != len(joined):
        raise ValueError(f"the rebuilt splits of {run_dir} share images")
    return split


def choose_split(run_dir: Path | None, folder: Path, y: np.ndarray, files: list[str], seed: int) -> tuple[dict, dict]:
    """imgcls's split where its run can be read back, else the seeded iterative stratification; and a record
    of which (``source``: ``imgcls-run`` or ``own``, and why)."""
    from imgcls import rundir

    reason = "no imgcls run folder"
    if run_dir is not None and (run_dir / rundir.CONFIG).is_file():
        try:
            split = imgcls_split(run_dir, folder, files)
            return split, {"source": "imgcls-run", "run": str(run_dir)}
        except Exception as exc:  # noqa: BLE001 - any failure to read it back falls back, and says why
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    elif run_dir is not None:
        reason = f"{run_dir} holds no imgcls run"
    shares = {"train": 1 - VAL_SHARE - TEST_SHARE, "val": VAL_SHARE, "test": TEST_SHARE}
    split = iterative_split(y, shares, np.random.default_rng(seed))
    return split, {"source": "own", "why": reason, "method": "iterative stratification", "shares": shares,
                   "seed": seed}


# ----------------------------------------------------------------------------------------------------- baseline


def fit_baseline(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 grid=C_GRID, max_iter: int = MAX_ITER):
    """StandardScaler + OneVsRestClassifier(LogisticRegression(C)), C from ``grid`` by the val log loss.

    The loss is the mean over labels and images of the binary cross-entropy: it judges the probabilities
    themselves, so the chosen C also gives a meaningful 0.5 threshold (a ranking measure such as the mAP
    favours ever stronger penalties, whose probabilities all sit near the labels' base rates).

    Args:
        x_train, x_val: float (N, F) features; y_train, y_val: bool (N, K).
    Returns:
        (the fitted pipeline of the chosen C, C, {C: {"val_log_loss", "val_map"}}).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best, tried = None, {}
    for c in grid:
        model = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=c, max_iter=max_iter)))
        model.fit(x_train, y_train.astype(int))
        proba = np.clip(model.predict_proba(x_val), 1e-7, 1 - 1e-7)
        loss = -np.mean(np.where(y_val, np.log(proba), np.log1p(-proba)))
        tried[c] = {"val_log_loss": round(float(loss), 5), "val_map": round(mean_ap(y_val, proba), 5)}
        if best is None or loss < best[2]:
            best = (model, c, loss)
    return best[0], best[1], tried


def evaluate_baseline(x: np.ndarray, y: np.ndarray, split: dict, classes: list[str], **fit_options) -> dict:
    """Fit on train (C by val), thresholds on val, metrics on test: at 0.5 and at the val thresholds."""
    tr, va, te = split["train"], split["val"], split["test"]
    model, c, tried = fit_baseline(x[tr], y[tr], x[va], y[va], **fit_options)
    thresholds = fit_thresholds(y[va], model.predict_proba(x[va]))
    proba = model.predict_proba(x[te])
    return {"C": c, "val_by_C": {str(k): v for k, v in tried.items()},
            "thresholds": dict(zip(classes, thresholds.round(4).tolist())),
            "at_0.5": multilabel_metrics(y[te], proba, 0.5, classes),
            "at_val_thresholds": multilabel_metrics(y[te], proba, thresholds, classes)}


def feature_settings(run_dir: Path | None, folder: Path) -> dict:
    """Backbone, weights, size, resize and model options of imgcls's default run on ``folder``, and where from."""
    from imgcls import auto, rundir
    from imgcls.config import load_config
    from imgcls.models.registry import model_options

    if run_dir is not None and (run_dir / rundir.CONFIG).is_file():
        cfg = load_config(run_dir / rundir.CONFIG)
        return {"model": cfg.model.name, "pretrained": cfg.model.weights, "image_size": list(cfg.data.image_size),
                "resize": cfg.data.resize, "options": dict(cfg.model.options), "from": str(run_dir / rundir.CONFIG)}
    settings, line = auto.choose(str(folder), {})
    if settings.get("pretrained"):
        return {"model": settings["model"], "pretrained": settings["pretrained"], "image_size": settings["image_size"],
                "resize": settings["resize"], "options": dict(settings["model_option"]), "from": f"auto: {line}"}
    # This imgcls cannot size the folder up (no multi-label loading): auto's photo settings for this machine.
    kind = auto.machine_kind()
    model = auto.PHOTO_MODEL[kind]
    takes = model_options(model) or {}
    options = {k: v for k, v in {"freeze_bn": True, "head_stages": auto.MULTI_STAGE_HEAD}.items() if k in takes}
    return {"model": model, "pretrained": "imagenet", "image_size": [auto.PHOTO_SIDE[kind]] * 2, "resize": "stretch",
            "options": options, "from": f"auto's photo settings for the {kind} (auto could not size the folder up: "
                                         f"{line})"}


@contextlib.contextmanager
def data_dir_env(path: Path):
    """Set IMGCLS_DATA_DIR (imgcls's cache of weights, decoded images and features) for the ``with`` block."""
    before = os.environ.get("IMGCLS_DATA_DIR")
    os.environ["IMGCLS_DATA_DIR"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("IMGCLS_DATA_DIR", None)
        else:
            os.environ["IMGCLS_DATA_DIR"] = before


def decode_images(folder: Path, files: list[str], size: list[int], resize: str) -> np.ndarray:
    """uint8 (N, H, W, 3) of ``files`` (relative to ``folder``), by imgcls's decoder, as its loader calls it."""
    from imgcls.data.decode import DecodeOptions, assemble, decode_all
    from imgcls.data.sources import open_source

    hw = (int(size[0]), int(size[1]))
    with open_source(folder) as source:
        chunks = decode_all(source, [files], DecodeOptions(3, hw, resize, None, 3))[0]
    bad = [(f, e) for f, e in zip(files, (e for c in chunks for e in c.errors)) if e is not None]
    if bad:
        raise RuntimeError(f"{len(bad)} mosaics could not be decoded, e.g. {bad[0][0]}: {bad[0][1]}")
    return assemble(chunks, 3, hw, resize)


def frozen_features(images: np.ndarray, settings: dict, num_classes: int) -> tuple[np.ndarray, str]:
    """(N, F) float32 pooled features of ``images`` by imgcls's FeatureRunner, and the runtime's name."""
    import torch

    from imgcls.inference import scoring_runtime
    from imgcls.models import create_model
    from imgcls.models.pretrained import load_weights
    from imgcls.training.transfer import FeatureRunner, compute_features

    if not settings["pretrained"]:
        raise ValueError(f"imgcls's settings name no pretrained weights ({settings['from']}): no frozen features")
    h, w = settings["image_size"]
    torch.manual_seed(0)  # the classifier's random initial weights, which the features do not read
    model = create_model(settings["model"], in_chans=3, num_classes=num_classes, img_size=(h, w),
                         **settings["options"])
    _, norm = load_weights(model, settings["pretrained"])
    runner = FeatureRunner.create(model, scoring_runtime("auto"), (h, w), norm, len(images))
    return compute_features(runner, images, "none"), runner.name


def run_baseline(folder: Path, run_dir: Path | None, seed: int) -> dict:
    """The baseline's figures on ``folder`` (module docstring, step 3)."""
    files, y, classes = read_labels(folder)
    split, split_record = choose_split(run_dir, folder, y, files, seed)
    settings = feature_settings(run_dir, folder)
    print(f"baseline: split from {split_record['source']}"
          + (f" ({split_record['why']})" if split_record["source"] == "own" else "")
          + f": {', '.join(f'{k} {len(v):,}' for k, v in split.items())}; features: {settings['model']} at "
            f"{settings['image_size'][0]}x{settings['image_size'][1]} ({settings['from']})", flush=True)
    seconds = {}
    started = time.perf_counter()
    images = decode_images(folder, files, settings["image_size"], settings["resize"])
    seconds["decode"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="imgcls-baseline-cache-") as cache, data_dir_env(Path(cache)):
        started = time.perf_counter()
        x, runtime = frozen_features(images, settings, len(classes))
        seconds["features"] = time.perf_counter() - started
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        result = evaluate_baseline(x, y, split, classes)
    seconds["fit"] = time.perf_counter() - started
    seconds["from_raw_images"] = seconds["decode"] + seconds["features"] + seconds["fit"]
    return {**result, "split": {**split_record, **{k: len(v) for k, v in split.items()}},
            "features": {**settings, "width": int(x.shape[1]), "runtime": runtime, "views": ["none"]},
            "blas_threads": BLAS_THREADS,
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "classes": classes}


def run_plain_baseline(folder: Path, run_dir: Path | None, seed: int) -> dict:
    """The baseline as a person writes it (module docstring, step 4): a fresh process, timed from launch to exit."""
    from common import run_child

    files, y, classes = read_labels(folder)
    split, split_record = choose_split(run_dir, folder, y, files, seed)
    settings = feature_settings(run_dir, folder)
    with tempfile.TemporaryDirectory(prefix="imgcls-plain-baseline-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"folder": str(folder), "settings": settings,
                                    "split": {k: np.asarray(v).tolist() for k, v in split.items()}}))
        # The weights come from their pip package into an empty cache, as a first run's would.
        proc = run_child([sys.executable, str(Path(__file__).resolve()), "plain-child", str(spec), str(out)],
                         env={"IMGCLS_DATA_DIR": str(Path(tmp) / "cache")})
        result = json.loads(out.read_text())
    print(f"plain baseline: {proc['wall_seconds']:.1f} s launch to exit", flush=True)
    return {**result, "wall_seconds": round(proc["wall_seconds"], 2), "peak_rss_mib": round(proc["peak_rss_mib"]),
            "split": {**split_record, **{k: len(v) for k, v in split.items()}}, "classes": classes}


def plain_child(spec_path: Path, out_path: Path) -> None:
    """The plain baseline's process: PIL decoding, the backbone in PyTorch eager fp32 (as a person runs a model:
    ``eval()``, ``no_grad``, batches of 64, the default memory layout), scikit-learn's one-vs-rest fit."""
    seconds, started = {}, time.perf_counter()
    import torch

    from imgcls.models import create_model
    from imgcls.models.pretrained import load_weights

    seconds["imports"] = time.perf_counter() - started
    spec = json.loads(Path(spec_path).read_text())
    folder, settings = Path(spec["folder"]), spec["settings"]
    files, y, classes = read_labels(folder)
    h, w = settings["image_size"]
    started = time.perf_counter()
    images = np.stack([np.asarray(Image.open(folder / f).convert("RGB").resize((w, h), Image.BICUBIC)) for f in files])
    seconds["decode"] = time.perf_counter() - started
    started = time.perf_counter()
    model = create_model(settings["model"], in_chans=3, num_classes=len(classes), img_size=(h, w),
                         **settings["options"])
    _, norm = load_weights(model, settings["pretrained"])
    norm = norm or {"mean": [0.5] * 3, "std": [0.5] * 3}  # a weights file names no normalisation (the tests')
    model.eval()
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            x = torch.from_numpy(images[start:start + 64]).permute(0, 3, 1, 2).float() / 255
            parts.append(model.forward_features((x - mean) / std).mean((2, 3)).numpy())
    x = np.concatenate(parts)
    seconds["features"] = time.perf_counter() - started
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    split = {k: np.asarray(v, dtype=np.int64) for k, v in spec["split"].items()}
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        result = evaluate_baseline(x, y, split, classes)
    seconds["fit"] = time.perf_counter() - started
    features = {**settings, "width": int(x.shape[1]), "runtime": f"torch eager fp32 ({torch.get_num_threads()} "
                                                                   f"threads)", "decoder": "PIL", "views": ["none"]}
    write_json(Path(out_path), {**result, "features": features, "blas_threads": BLAS_THREADS,
                                "seconds_inside": {k: round(v, 2) for k, v in seconds.items()}})


# ------------------------------------------------------------------------------------------------------- imgcls


def imgcls_command(folder: Path, runs: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "imgcls", "train", "--data", str(folder), "--out", str(runs), "--name", RUN_NAME,
            "--seed", str(seed)]


def read_imgcls_metrics(run_dir: Path) -> dict:
    """The multi-label test metrics of an imgcls run (the contract's keys of its eval_test.json).

    Raises ValueError when the file lacks them (an imgcls that trained a single-label model).
    """
    from imgcls import rundir

    path = run_dir / f"{rundir.eval_stem('test')}.json"
    doc = json.loads(path.read_text())
    missing = [k for k in IMGCLS_KEYS if k not in doc]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} (its keys: {', '.join(sorted(doc)[:12])}): this "
                         f"imgcls did not train a multi-label model")
    return {**{k: doc[k] for k in IMGCLS_KEYS}, "n": doc.get("n")}


def run_imgcls(folder: Path, runs: Path, seed: int, cache: Path) -> dict:
    """``imgcls train --data FOLDER`` in a fresh process with an empty cache: wall time and its test metrics."""
    from common import run_child

    from imgcls import rundir

    run_dir = runs / RUN_NAME
    shutil.rmtree(run_dir, ignore_errors=True)  # else the run would be named mosaic-2 and the old one read
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    cmd = imgcls_command(folder, runs, seed)
    record = {"command": shlex.join(["python", *cmd[1:]]), "run": str(run_dir)}
    try:
        proc = run_child(cmd, env={"IMGCLS_DATA_DIR": str(cache)})
    except RuntimeError as exc:
        return {**record, "error": str(exc)[-3000:]}
    launched = time.time() - proc["wall_seconds"]
    record.update(wall_seconds=round(proc["wall_seconds"], 2), peak_rss_mib=round(proc["peak_rss_mib"]))
    if (run_dir / rundir.RUN).is_file():
        record["launch_to_run_json"] = round((run_dir / rundir.RUN).stat().st_mtime - launched, 2)
    try:
        record["dataset"] = {k: v for k, v in json.loads((run_dir / rundir.DATASET).read_text()).items()
                             if k in ("classes", "image_shape", "layout", "splits", "notes")}
        record["metrics"] = read_imgcls_metrics(run_dir)
    except (OSError, ValueError) as exc:
        record["error"] = str(exc)
    return record


# ------------------------------------------------------------------------------------------------------- output


def write_json(path: Path, doc: dict) -> Path:
    """Write ``doc`` to ``path`` whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


def _num(value, fmt: str = ".4f") -> str:
    return "n/a" if value is None else format(value, fmt)


def table(doc: dict) -> str:
    """imgcls against the baseline as markdown (a side not measured reads n/a)."""
    head = ["| | mAP | micro F1 | macro F1 | exact-set accuracy | Hamming loss | wall s |", "|---|---|---|---|---|---|---|"]
    rows = []
    ours = doc.get("imgcls") or {}
    m = ours.get("metrics") or {}
    note = ": FAILED (the JSON's imgcls.error says why)" if ours.get("error") else ""
    rows.append(("imgcls, default run" + note, m, ours.get("wall_seconds")))
    base = doc.get("baseline") or {}
    wall = (base.get("seconds") or {}).get("from_raw_images")
    rows.append(("baseline, per-label thresholds from val", base.get("at_val_thresholds") or {}, wall))
    rows.append(("baseline, threshold 0.5", base.get("at_0.5") or {}, wall))
    plain = doc.get("baseline_plain") or {}
    if plain:
        rows.append(("plain baseline (fresh process: PIL, PyTorch eager), val thresholds",
                     plain.get("at_val_thresholds") or {}, plain.get("wall_seconds")))
    lines = head + [f"| {name} | {_num(m.get('map'))} | {_num(m.get('micro_f1'))} | {_num(m.get('macro_f1'))} | "
                    f"{_num(m.get('subset_accuracy'))} | {_num(m.get('hamming_loss'))} | {_num(w, '.1f')} |"
                    for name, m, w in rows]
    if base:
        s, sp = base["seconds"], base["split"]
        losses = ", ".join(f"{c} {v['val_log_loss']:.4f}" for c, v in base["val_by_C"].items())
        lines.append(f"\nbaseline: C {base['C']} (val log loss by C: {losses}); wall {s['decode']:.1f} s "
                     f"decode + {s['features']:.1f} s features ({base['features']['runtime']}, "
                     f"{base['features']['width']:,} wide) + {s['fit']:.1f} s fit; split {sp['source']} "
                     f"(train {sp['train']:,}, val {sp['val']:,}, test {sp['test']:,})")
    if ours.get("wall_seconds") is not None:
        lines.append(f"imgcls: {ours['wall_seconds']:.1f} s launch to exit, {ours.get('launch_to_run_json', 'n/a')} s "
                     f"to run.json, peak RSS {ours['peak_rss_mib']:,} MiB")
    if base and ours.get("metrics") and base["split"].get("run") != ours.get("run"):
        lines.append("WARNING: the baseline did not use this imgcls run's split: run the baseline step again")
    return "\n".join(lines)


def results_name(seed: int, images: int, tag: str) -> str:
    default = seed == 0 and images == DEFAULT_IMAGES
    return "multilabel-mosaic" + ("" if default else f"-n{images}-seed{seed}") + f"-{tag}"


# --------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from common import add_cpu_class_argument

    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--flowers", type=Path, default=SHARED / "flowers.zip",
                        help="the zip of class folders the photos come from (default: ../shared/data/flowers.zip)")
    shared.add_argument("--seed", type=int, default=0, help="the mosaics', imgcls's and the baseline's seed (default: 0)")
    shared.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                        help=f"mosaics to build (default: {DEFAULT_IMAGES}: each photo in one mosaic at most)")
    shared.add_argument("--work", type=Path, default=WORK, help=f"where the mosaics, runs and step results go "
                                                                f"(default: {WORK})")
    shared.add_argument("--run", type=Path, help="baseline: the imgcls run folder to read the split and the feature "
                                                 "settings from (default: the imgcls step's, when there is one)")
    shared.add_argument("--json", type=Path, help="write the results here (default: benchmarks/results/"
                                                  "multilabel-mosaic[-n<N>-seed<S>]-<hardware class>.json)")
    add_cpu_class_argument(shared)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    for name, what in (("build", "build the mosaics (or reuse them)"), ("imgcls", "build, then imgcls train"),
                       ("baseline", "build, then the baseline"),
                       ("plain", "build, then the plain baseline (a fresh process: PIL, PyTorch eager)"),
                       ("all", "build, imgcls, baseline, plain baseline")):
        steps.add_parser(name, parents=[shared], help=what, description=what)
    child = steps.add_parser("plain-child", help=argparse.SUPPRESS)  # the plain baseline's own process
    child.add_argument("spec", type=Path)
    child.add_argument("out", type=Path)
    return parser.parse_args(argv)


def run_steps(args, folder: Path, hw_line: str) -> dict:
    """Run the imgcls and baseline steps asked for; return every step's figures so far (the steps store)."""
    store = folder.with_name(folder.name + ".results.json")
    steps = json.loads(store.read_text()) if store.is_file() else {}
    stamp = {"hardware_line": hw_line, "cpu_class": args.cpu_class,
             "when": _dt.datetime.now().isoformat(timespec="seconds")}
    runs = runs_folder(args)
    if args.step in ("imgcls", "all"):
        steps["imgcls"] = {**run_imgcls(folder, runs, args.seed, args.work.resolve() / "imgcls-cache"), **stamp}
        print(f"imgcls: {steps['imgcls'].get('error') or 'done'}", flush=True)
    if args.step in ("baseline", "all"):
        run_dir = args.run.resolve() if args.run else runs / RUN_NAME
        steps["baseline"] = {**run_baseline(folder, run_dir, args.seed), **stamp}
    if args.step in ("plain", "all"):
        run_dir = args.run.resolve() if args.run else runs / RUN_NAME
        steps["baseline_plain"] = {**run_plain_baseline(folder, run_dir, args.seed), **stamp}
    write_json(store, steps)
    return steps


def runs_folder(args) -> Path:
    return args.work.resolve() / f"runs-seed{args.seed}-n{args.images}"


def main(argv: list[str] | None = None) -> int:
    from common import enter_cpu_class

    args = parse_args(argv)
    if args.step == "plain-child":
        plain_child(args.spec, args.out)
        return 0
    if args.step != "build":
        enter_cpu_class(args.cpu_class)  # before torch is imported: the baseline's frozen pass runs here
    folder = args.work.resolve() / folder_name(args.seed, args.images)
    manifest = ensure_built(args.flowers.resolve(), folder, args.images, args.seed)
    if args.step == "build":
        return 0
    from common import class_tag, cpu_class_env, hardware_class, hardware_line, machine

    hw = hardware_class(cpu_class_env(args.cpu_class))
    print(hardware_line(hw), flush=True)
    steps = run_steps(args, folder, hardware_line(hw))
    command = ["python", *imgcls_command(folder, runs_folder(args), args.seed)[1:]]
    doc = {"benchmark": "multilabel-mosaic", "seed": args.seed, "images": args.images, "folder": str(folder),
           "flowers": str(args.flowers.resolve()), "build": {k: v for k, v in manifest.items() if k != "mosaics"},
           "hardware": hw, "hardware_line": hardware_line(hw), "cpu_class": args.cpu_class, **steps,
           "commands": {"imgcls": shlex.join(command),
                        "benchmark": shlex.join(["python", "benchmarks/multilabel_mosaic.py", args.step, "--seed",
                                                 str(args.seed), "--images", str(args.images), "--cpu-class",
                                                 args.cpu_class])}}
    print(table(doc))
    name = results_name(args.seed, args.images, class_tag())
    path = args.json.resolve() if args.json else ROOT / "benchmarks" / "results" / f"{name}.json"
    print(f"raw results: {write_json(path, {'machine': machine(), **doc})}")
    return 1 if (steps.get("imgcls") or {}).get("error") and args.step != "baseline" else 0


if __name__ == "__main__":
    sys.exit(main())
