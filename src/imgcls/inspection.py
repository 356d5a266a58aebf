"""``imgcls inspect DATA``: the problems in a folder of images before anyone trains on it.

    inspect(cfg, console)
      -> build_dataset                  the folder or zip, split as `imgcls train --data` splits it
      -> frozen features                the pretrained backbone training would use, through the same feature
                                        cache (a second inspect, or a training run after it, reads them back)
      -> copies                         identical pixels, or similar features confirmed on their thumbnails (crop,
                                        mirror and scale tolerant: imgcls.data.quality.copy_pairs); each within a
                                        class, across classes (a conflicting label) or across splits (leakage)
      -> label errors                   k-fold out-of-sample probabilities of a linear classifier on the features,
                                        then confident learning (imgcls.evaluation.labels)
      -> outliers                       far from every class's median direction in feature space
      -> inspect.json, issues.csv, oof.npz and inspect.html in the inspection's folder

The findings are records (see :func:`finding`); ``imgcls train --exclude issues.csv`` leaves their images out.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from pathlib import Path

import numpy as np

from imgcls.config import RunConfig
from imgcls.data.base import ImageDataset
from imgcls.data.quality import copy_pairs, image_measures
from imgcls.data.registry import build_dataset
from imgcls.errors import ConfigError
from imgcls.evaluation.calibration import fit_temperature, softmax
from imgcls.evaluation.cv import make_folds
from imgcls.evaluation.labels import find_label_issues
from imgcls.inference import scoring_runtime
from imgcls.io import write_atomic, write_json, write_npz
from imgcls.models import create_model
from imgcls.models.pretrained import load_weights
from imgcls.rundir import claim_folder, default_run_name
from imgcls.terminal import say
from imgcls.training.transfer import (
    cached_features,
    fit_linear_head,
    frozen_pass,
    last_stage_directions,
)

# The problems, in the order they are reported; groups name several for --fail-on.
PROBLEMS = ("leakage", "exact_duplicate", "near_duplicate", "conflicting_label", "label_error", "outlier",
            "dark", "bright", "low_contrast", "blurry", "grayscale", "tiny", "extreme_aspect")
GROUPS = {"duplicates": ("exact_duplicate", "near_duplicate", "conflicting_label"),
          "label_errors": ("label_error",), "outliers": ("outlier",),
          "quality": ("dark", "bright", "low_contrast", "blurry", "grayscale", "tiny", "extreme_aspect")}
SPLIT_ORDER = ("train", "val", "test")

# Outliers: the cosine distance to the nearest class's median feature direction, flagged above the folder's median
# by more than OUTLIER_MADS median absolute deviations (off-topic images planted in flowers.zip cluster among
# themselves, so a distance to the nearest images misses them; to every class it does not). Where the label check
# ran, the out-of-fold classifier's entropy joins the distance, OUTLIER_ENTROPY_WEIGHT times its own deviations
# (capped at 3): an off-topic image is far from every class and none of them fits it. On three planted folders
# (benchmarks/README.md) it found 20 / 19 / 15 of 30 off-topic images with 17 / 20 / 4 false alarms, where the
# distance alone found 19 / 21 / 15 with 30 / 34 / 12.
OUTLIER_MADS = 3.0
OUTLIER_ENTROPY_WEIGHT = 0.7
OUTLIER_DISTANCE_MADS = 2.5  # with the entropy, the distance alone must still be this far out: an image near a class
# that the classifier merely hesitates over is not off-topic (no planted off-topic image was lost to it)
OUTLIER_MIN_IMAGES = 50  # fewer, and the folder's spread is not known well enough to call anything far
# Quality, on the decoded images: brightness and contrast of the luminance in [0, 1]; sharpness in log10 of
# the Laplacian's variance, flagged BLUR_DECADES below the folder's median; colour in levels of 255.
# Dark: even the brightest 5% of the pixels are below DARK; bright: even the darkest 5% above BRIGHT.
DARK, BRIGHT, FLAT = 0.12, 0.85, 0.04
BLUR_DECADES = 0.8
GREY_LEVELS = 1.0
# Sizes, of the images as they were before resizing: tiny under TINY_SIDE px or a quarter of the folder's median
# shorter side, whichever is larger; extreme when the longer side is over EXTREME_ASPECT times the shorter.
TINY_SIDE = 32
EXTREME_ASPECT = 3.0
FOLDS = 5
# A label is called an error where the out-of-sample probability of it is under 3% and another class is the
# classifier's pick; the flags are ranked by that self-confidence. On three planted folders
# (benchmarks/inspect_folder.py: flowers.zip with seeds 0 and 1, 3,000 CIFAR-10 photos at 64 px; 5% of labels
# flipped), over three draws of the folds each, precision / recall were 0.78 / 0.50, 0.82 / 0.51 and 0.80 / 0.79
# (F1 0.609 / 0.627 / 0.796), with 0.7 / 0.6 / 1.0% of the unplanted images flagged; at 4% 0.71 / 0.55, 0.75 /
# 0.56, 0.74 / 0.83 (F1 0.619 / 0.643 / 0.783; 1.2 / 1.0 / 1.5% flagged), at 2.5% F1 0.587 / 0.598 / 0.805.
# Requiring confident learning's flag too (the confident joint's count per pair of classes, by margin) cost a
# tenth of the recall on ten classes (0.69 against 0.79 at 4%, one draw, before the temperature): a flipped
# image's probability is often spread over several classes, none past its per-class threshold. Counted over
# every image with out-of-sample probabilities.
LABEL_ERROR_PROBABILITY = 0.03
CSV_COLUMNS = ("file", "problem", "score", "suggested_label", "paired_file", "split", "label", "paired_split",
               "detail")
INSPECT_JSON, ISSUES_CSV, OOF = "inspect.json", "issues.csv", "oof.npz"


@dataclasses.dataclass
class Images:
    """Every image of the dataset in one order (train, val, test), with where each one is."""

    ds: ImageDataset
    root: str  # the prefix of the dataset's paths: DATA/
    splits: list[str]  # per image
    index: list[int]  # per image, its row in its split
    labels: np.ndarray  # int (N,)
    files: list[str]  # per image, its path relative to DATA
    sizes: np.ndarray | None  # int (N, 2): each image's own (height, width), when the dataset knows them

    @classmethod
    def of(cls, ds: ImageDataset, data: str) -> Images:
        splits, index, labels, files, sizes = [], [], [], [], []
        root = str(Path(data).expanduser()).rstrip("/") + "/"
        for name in (s for s in SPLIT_ORDER if s in ds.splits):
            split = ds.splits[name]
            splits += [name] * len(split)
            index += list(range(len(split)))
            labels.append(split.labels)
            paths = split.paths or [f"{name}/{i}" for i in range(len(split))]
            files += [p.removeprefix(root) for p in paths]
            sizes.append(split.sizes)
        known = all(s is not None for s in sizes)
        return cls(ds, root, splits, index, np.concatenate(labels), files, np.concatenate(sizes) if known else None)

    def pixels(self, i: int) -> np.ndarray:
        return self.ds.splits[self.splits[i]].images[self.index[i]]

    def each_split(self):
        """Each split's images, in the order of the rows."""
        for name in (s for s in SPLIT_ORDER if s in self.ds.splits):
            yield self.ds.splits[name].images


def finding(im: Images, problem: str, i: int, score: float, detail: str, suggested: int | None = None,
            paired: int | None = None) -> dict:
    """One finding: ``problem`` on image ``i`` (see the contract in docs/inspect.md)."""
    classes = im.ds.classes
    return {"problem": problem, "file": im.files[i], "split": im.splits[i], "label": label_text(im, i),
            "score": round(float(score), 4), "suggested_label": None if suggested is None else classes[suggested],
            "paired_file": None if paired is None else im.files[paired],
            "paired_split": None if paired is None else im.splits[paired], "detail": detail}


def label_text(im: Images, i: int) -> str:
    """Image ``i``'s class, or with several labels per image its labels separated by spaces (as a labels CSV)."""
    if im.labels.ndim == 2:
        return " ".join(c for c, on in zip(im.ds.classes, im.labels[i]) if on)
    return im.ds.classes[im.labels[i]]


def inspect(cfg: RunConfig, console, out_dir: Path, name: str | None = None, folds: int = FOLDS) -> dict:
    """Inspect ``cfg.data`` and write the inspection's folder under ``out_dir``; its inspect.json's content."""
    started = time.perf_counter()
    ds = build_dataset(cfg.data, seed=cfg.train.seed, progress=console.is_terminal)
    for line in ds.summary_lines():
        say(console, line)
    im = Images.of(ds, cfg.data.dataset)
    features, unit = _features(cfg, im, console)
    skipped: list[str] = []
    pairs = _duplicates(im, unit)
    mislabelled, proba = _label_errors(im, features, folds, cfg.train.seed, skipped)
    if ds.multilabel:
        skipped.append("outliers (they are measured from each class's centre, and these images carry several "
                       "labels)")
        odd = [*_quality(im), *_sizes(im)]
    elif len(im.files) >= OUTLIER_MIN_IMAGES:
        odd = [*_outliers(im, unit, proba), *_quality(im), *_sizes(im)]
    else:
        odd = [*_quality(im), *_sizes(im)]
        skipped.append(f"outliers ({len(im.files)} images; the check needs {OUTLIER_MIN_IMAGES} or more to know the "
                       f"folder's spread)")
    # An off-topic, dark, bright or flat image has no right label among the classes: it is not called mislabelled.
    unlabelable = {f["file"] for f in odd if f["problem"] in ("outlier", "dark", "bright", "low_contrast")}
    findings = [*pairs, *(f for f in mislabelled if f["file"] not in unlabelable), *odd]
    order = {p: k for k, p in enumerate(PROBLEMS)}
    findings.sort(key=lambda f: (order[f["problem"]], -f["score"], f["file"]))
    counts = {s: dict(zip(ds.classes, ds.counts(s).tolist())) for s in SPLIT_ORDER if s in ds.splits}
    if im.sizes is None:
        skipped.append("tiny images and extreme aspect ratios (the images' own sizes are not known: a built-in "
                       "dataset)")
    folder = _folder(out_dir, name, cfg)
    result = {"data": cfg.data.dataset, "path": str(folder), "classes": list(ds.classes), "counts": counts,
              "summary": _summary(findings, counts), "skipped": skipped, "findings": findings}
    result["seconds"] = round(time.perf_counter() - started, 2)
    _write(folder, result, im, proba)
    for line in result["summary"] + [f"not checked: {line}" for line in skipped]:
        say(console, line)
    say(console, f"inspection: {folder / INSPECT_JSON} (and {ISSUES_CSV}, inspect.html) in "
                 f"{result['seconds']:.1f}s")
    return result


def _features(cfg: RunConfig, im: Images, console) -> tuple[np.ndarray, np.ndarray]:
    """(every pooled feature the classifier reads, (N, F); the last stage's, scaled to unit length, (N, D)).

    The backbone, its weights, the image size and the feature cache are those training uses for this config,
    so either one reads what the other computed.
    """
    ds = im.ds
    c, h, w = ds.image_shape
    if not cfg.model.weights:
        raise ConfigError(f"imgcls inspect needs a pretrained backbone, and model {cfg.model.name!r} has no "
                          f"weights here; give --model efficientnet_lite0 (or another model with --pretrained "
                          f"imagenet)")
    model = create_model(cfg.model.name, in_chans=c, num_classes=ds.num_classes, img_size=(h, w),
                         **cfg.model.options)
    _, norm = load_weights(model, cfg.model.weights)
    if norm is None:
        raise ConfigError(f"the weights {cfg.model.weights} carry no input normalisation; imgcls inspect needs "
                          f"pretrained weights such as --pretrained imagenet")
    runner, cache, backbone = frozen_pass(model, scoring_runtime(cfg.train.device), (h, w), norm, len(im.files),
                                          cfg.data.cache)
    parts, hits = [], 0
    for images in im.each_split():
        part, hit = cached_features(runner, images, "none", cache, backbone, lambda line: say(console, line))
        parts.append(part)
        hits += hit
    x = np.concatenate(parts)
    say(console, f"features: {x.shape[1]:,} per image from {cfg.model.name} at {h}x{w}"
                 f"{f', {hits} of {len(parts)} splits from the cache' if hits else ''} ({runner.name})")
    return x, last_stage_directions(x, model)


def _duplicates(im: Images, unit: np.ndarray) -> list[dict]:
    """Exact and near copies, each pair once (the finding on the later image: val after train, test last)."""
    found = []
    for c in copy_pairs(list(im.each_split()), unit):
        i, j, detail = c.first, c.second, c.detail
        differ = not np.array_equal(im.labels[i], im.labels[j])
        if im.splits[i] != im.splits[j]:
            problem = "leakage"
            if differ:
                detail += "; the labels differ too"
        elif differ:
            problem = "conflicting_label"
        else:
            problem = "exact_duplicate" if c.exact else "near_duplicate"
        found.append(finding(im, problem, j, c.score, detail, paired=i))
    return found


def out_of_fold_proba(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int, seed: int) -> np.ndarray:
    """Probabilities (N, K) of each image from a linear classifier fitted on the other folds' features.

    The L2 penalty is chosen once, on a held-out sixth of the first fold's training images, and kept for the
    rest (one fit per fold). The out-of-sample logits are then divided by the one temperature that fits the
    images' labels best: the L2 chosen on that sixth sets how sure the classifier is, and with it how many
    images fall under LABEL_ERROR_PROBABILITY (127 to 178 of 4,400 planted flowers over three draws of the
    folds; 169 to 177 with the temperature).
    """
    logits = np.zeros((len(y), num_classes), np.float64)
    l2 = None
    for held in make_folds(y, folds, seed):
        rest = np.setdiff1d(np.arange(len(y)), held)
        if l2 is None:
            inner = np.random.default_rng(seed).permutation(rest)
            val, fit_on = inner[: max(1, len(inner) // 6)], inner[max(1, len(inner) // 6):]
            l2 = fit_linear_head(x[fit_on], y[fit_on], num_classes, x[val], y[val]).l2
        fit = fit_linear_head(x[rest], y[rest], num_classes, grid=(l2,))
        logits[held] = fit.logits(x[held]).double().numpy()
    return softmax(logits, fit_temperature(logits, y)).astype(np.float32)


def likely_label_errors(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(N,) bool: the classifier is sure each flagged image is something else, its label's out-of-sample
    probability ``proba`` (N, K) being under LABEL_ERROR_PROBABILITY with another class its pick."""
    own = proba[np.arange(len(proba)), labels]
    return (own < LABEL_ERROR_PROBABILITY) & (proba.argmax(1) != labels)


def _label_errors(im: Images, x: np.ndarray, folds: int, seed: int, skipped: list[str]
                  ) -> tuple[list[dict], np.ndarray | None]:
    if im.labels.ndim == 2:
        skipped.append("label errors (confident learning judges one class per image, and these images carry "
                       "several labels)")
        return [], None
    counts = np.bincount(im.labels, minlength=im.ds.num_classes)
    k = int(min(folds, counts.min()))
    if k < 2:
        small = int(counts.argmin())
        skipped.append(f"label errors (class {im.ds.classes[small]!r} has {counts[small]} image"
                       f"{'' if counts[small] == 1 else 's'}, and the k-fold check needs 2 or more in every class)")
        return [], None
    proba = out_of_fold_proba(x, im.labels, im.ds.num_classes, k, seed)
    issues = find_label_issues(im.labels, proba)
    sure = likely_label_errors(im.labels, proba)
    unpruned = "; confident learning (pruning by the confident joint) does not flag it"
    found = [finding(im, "label_error", i, issues.score[i],
                     f"p({im.ds.classes[im.labels[i]]}) {proba[i, im.labels[i]]:.3f}, "
                     f"p({im.ds.classes[issues.suggested[i]]}) {proba[i, issues.suggested[i]]:.3f}"
                     f"{'' if issues.flagged[i] else unpruned}", suggested=int(issues.suggested[i]))
             for i in np.flatnonzero(sure)]
    return found, proba


def _deviations(values: np.ndarray) -> np.ndarray:
    """How many median absolute deviations (scaled to a normal's standard deviation) each value lies above the
    median of ``values``."""
    med = float(np.median(values))
    return (values - med) / (float(np.median(np.abs(values - med))) * 1.4826 + 1e-6)


def _outliers(im: Images, unit: np.ndarray, proba: np.ndarray | None) -> list[dict]:
    """Images far from every class: the cosine distance of their last-stage features to the nearest class's median
    direction, with the out-of-fold classifier's entropy where ``proba`` (N, K) is given, flagged more than
    OUTLIER_MADS deviations above the folder's median (see OUTLIER_ENTROPY_WEIGHT, OUTLIER_DISTANCE_MADS)."""
    classes = [c for c in range(im.ds.num_classes) if (im.labels == c).any()]
    centres = np.stack([np.median(unit[im.labels == c], 0) for c in classes])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - (unit @ centres.T).max(1)
    med = float(np.median(dist))
    far = _deviations(dist)
    score, entropy = far, None
    if proba is not None:
        entropy = -(proba * np.log(np.clip(proba, 1e-12, 1.0))).sum(1) / np.log(max(proba.shape[1], 2))
        score = _deviations(far + OUTLIER_ENTROPY_WEIGHT * np.clip(_deviations(entropy), -3.0, 3.0))
        score = np.where(far > OUTLIER_DISTANCE_MADS, score, -np.inf)
    return [finding(im, "outlier", i, min(1.0, float(dist[i])), f"distance to the nearest class {dist[i]:.3f}; "
                    f"the folder's median {med:.3f}"
                    + ("" if entropy is None else f"; the classifier's uncertainty {entropy[i]:.2f} of 1"))
            for i in np.flatnonzero(score > OUTLIER_MADS)]


def _quality(im: Images) -> list[dict]:
    parts = [image_measures(images) for images in im.each_split()]
    m = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    found = []
    b, c, sharp = m["brightness"], m["contrast"], m["sharpness"]
    top, bottom = m["bright_end"], m["dark_end"]
    exposure = (top < DARK) | (bottom > BRIGHT) | (c < FLAT)
    blur_line = float(np.median(sharp)) - BLUR_DECADES
    colour_folder = float(np.median(m["colour"])) > 5 * GREY_LEVELS
    for i in range(len(b)):
        if top[i] < DARK:
            found.append(finding(im, "dark", i, 1 - top[i] / DARK, f"mean brightness {b[i]:.3f}, 95% of the "
                                                                  f"pixels below {top[i]:.3f}"))
        elif bottom[i] > BRIGHT:
            found.append(finding(im, "bright", i, (bottom[i] - BRIGHT) / (1 - BRIGHT),
                                 f"mean brightness {b[i]:.3f}, 95% of the pixels above {bottom[i]:.3f}"))
        elif c[i] < FLAT:
            found.append(finding(im, "low_contrast", i, 1 - c[i] / FLAT, f"contrast {c[i]:.3f}"))
        if not exposure[i] and sharp[i] < blur_line:
            found.append(finding(im, "blurry", i, min(1.0, (blur_line + BLUR_DECADES - sharp[i]) / 3),
                                 f"sharpness {sharp[i]:.2f}; the folder's median {blur_line + BLUR_DECADES:.2f}"))
        if colour_folder and m["colour"][i] < GREY_LEVELS:
            found.append(finding(im, "grayscale", i, 1.0, "grey pixels stored as colour"))
    return found


def _sizes(im: Images) -> list[dict]:
    """Tiny images and extreme aspect ratios, by the images' own sizes (see TINY_SIDE, EXTREME_ASPECT)."""
    if im.sizes is None or not len(im.sizes):
        return []
    short, long = im.sizes.min(1), im.sizes.max(1)
    floor = max(TINY_SIDE, float(np.median(short)) / 4)
    found = []
    for i in range(len(short)):
        h, w = im.sizes[i]
        if short[i] < floor:
            found.append(finding(im, "tiny", i, 1 - short[i] / floor, f"{w}x{h} px; under {floor:.0f} px on the "
                                                                        f"shorter side"))
        if short[i] > 0 and long[i] / short[i] > EXTREME_ASPECT:
            found.append(finding(im, "extreme_aspect", i, min(1.0, long[i] / short[i] / (4 * EXTREME_ASPECT)),
                                 f"{w}x{h} px: {long[i] / short[i]:.1f} to 1"))
    return found


def _summary(findings: list[dict], counts: dict) -> list[str]:
    """One line per problem type, then the balance of the classes."""
    lines = []
    for problem in PROBLEMS:
        mine = [f for f in findings if f["problem"] == problem]
        files = ", ".join(f["file"] for f in mine[:3]) + (", ..." if len(mine) > 3 else "")
        lines.append(f"{problem.replace('_', ' ')}: {len(mine)}" + (f" ({files})" if mine else ""))
    totals = {c: sum(split[c] for split in counts.values()) for c in next(iter(counts.values()))}
    lines.append("balance: " + ", ".join(f"{c} {n}" for c, n in totals.items())
                 + f" (largest/smallest {max(totals.values()) / max(1, min(totals.values())):.1f}x)")
    for split, per_class in counts.items():
        few = [c for c, n in per_class.items() if n < (5 if split == "train" else 1)]
        if few:
            lines.append(f"small classes in {split}: {', '.join(few)} "
                         f"({'fewer than 5 images to train on' if split == 'train' else 'no image to score'})")
    return lines


def _folder(out_dir: Path, name: str | None, cfg: RunConfig) -> Path:
    """A new folder for the inspection: ``<out>/<name>``, else ``<out>/<data>-inspect`` (-2, -3, ... if taken)."""
    if name and (Path(out_dir) / name).exists():
        raise ConfigError(f"{Path(out_dir) / name} exists already; choose another --name or --out")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return claim_folder(Path(out_dir), name or f"{default_run_name(cfg).rsplit('-', 3)[0]}-inspect")


def _write(folder: Path, result: dict, im: Images, proba: np.ndarray | None) -> None:
    from imgcls.reports.inspection import write_inspect_page  # PIL and the page: on use

    if proba is not None:
        write_npz(folder / OOF, {"proba": proba, "labels": im.labels, "files": np.array(im.files)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(result["findings"])
    write_atomic(folder / ISSUES_CSV, buf.getvalue())
    where = {f: i for i, f in enumerate(im.files)}
    write_inspect_page(result, lambda file: im.pixels(where[file]) if file in where else None, folder)
    write_json(folder / INSPECT_JSON, result)


def failed_checks(result: dict, fail_on: list[str]) -> list[str]:
    """The problems of ``fail_on`` (problem names or groups: duplicates, label_errors, outliers, quality) that
    the inspection found, as "problem (count)"."""
    wanted = []
    for name in fail_on:
        if name not in GROUPS and name not in PROBLEMS:
            raise ConfigError(f"--fail-on {name!r} is not a problem; choose from {', '.join([*GROUPS, *PROBLEMS])}")
        wanted += GROUPS.get(name, (name,))
    found = {p: sum(f["problem"] == p for f in result["findings"]) for p in dict.fromkeys(wanted)}
    return [f"{p} ({n})" for p, n in found.items() if n]
