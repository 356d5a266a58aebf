"""imgcls inspect against known, planted problems (issue 31), with cleanlab as a peer on the same probabilities.

    python benchmarks/inspect_folder.py                         # ../shared/data/flowers.zip, seed 0
    python benchmarks/inspect_folder.py --seed 1 --cpu-class avx2 --json benchmarks/results/inspect-flowers-avx2.json
    python benchmarks/inspect_folder.py --skip-train --skip-peer --work /tmp/inspect-bench

What it does:

1. **Plants** (:func:`plant`, seeded, numpy Generator) known problems in a copy
   of flowers.zip (``flowers/<class>/<file>.jpg``, no split), written with
   split folders, ``train/<class>/...``, ``val/<class>/...``,
   ``test/<class>/...``: every photo is given a split, 80/10/10 stratified by
   class, so that whether a planted copy crosses splits is known.  Then, on
   disjoint sets of the photos:

   * 5% of the labels flipped: the file moves, bytes and name unchanged, to a
     class folder drawn uniformly from the other classes, in its own split;
   * 60 near-duplicates: a transformed copy (crop to 85-95% of each side at a
     random place, mirror with p=0.5, rescale 0.5-1.5x, JPEG quality 40-90)
     under a new name in the original's class folder: for half of them in the
     original's split, for the other half across splits (an original in train
     gets its copy in val or test, one in val or test gets it in train: always
     train against val/test, the split pair that leaks);
   * 30 off-topic images: MNIST digits and CIFAR-10 images (alternately) from
     ``../shared/data``, upscaled to 200-300 px, JPEG quality 90, in a random
     class folder of a random split (80/10/10);
   * 15 very dark photos (pixel values scaled to 3-10%) and 15 blurred ones
     (Gaussian blur, radius 4-8), re-encoded at quality 95 in place.

   New files get neutral names in the style of the photos'
   (``<10 digits>_<10 hex>_n.jpg``).  The ground truth is written beside the
   zip as ``truth.json`` (format below).

2. **Inspects** the planted zip twice, each in a fresh process
   (``imgcls.inspect(zip, out=..., quiet=True)``), with one fresh, empty
   ``IMGCLS_DATA_DIR``: the first run is cold (decodes and computes
   everything), the second finds the first's cache.  Both the process's wall
   time (interpreter start and imports included) and the result's ``seconds``
   are reported.  The first run's findings are scored; whether the second's
   are the same is reported.

3. **Scores** (:func:`score`) precision, recall and F1 per problem type, the
   near-duplicate pairs, and the false alarms (matching rules below).

4. **Peer**: cleanlab 2.9.0, in its own venv (``~/.cache/imgcls-bench/
   cleanlab-venv``, or ``$IMGCLS_CLEANLAB_VENV``; made on first use; never a
   dependency of imgcls), runs ``cleanlab.filter.find_label_issues(labels,
   pred_probs)`` with its default arguments on the out-of-fold probabilities
   inspect used, ``<inspect folder>/oof.npz`` (arrays ``proba`` (N, C),
   ``labels`` (N,), ``files`` (N,) as a string array).  Its flags are scored as
   imgcls's ``label_error`` findings are, both over every image and over the
   images the probabilities cover (the fair comparison).

5. **Training** (unless ``--skip-train``): ``imgcls train --data planted.zip
   --no-report --quiet`` as it is, and with ``--exclude`` of a csv (``file``
   column) of the ``label_error`` findings in train and val.  Test-split
   findings are not excluded, so both runs are scored on the same test images
   (planted flips included); the accuracy is each run's eval_test.json's.

Ground truth (``truth.json``; :func:`plant` returns it)::

    {"format": 1, "seed": 0, "source": ".../flowers.zip", "classes": [...], "params": {...},
     "counts": {"images": 4407, "originals": 4317, "train": ..., "val": ..., "test": ...},
     "files": {"train/daisy/x.jpg": {"split": "train", "label": "daisy", "origin": "flowers/daisy/x.jpg",
                                     "planted": null}, ...},   # every image of the planted zip
     "flipped": [{"file", "split", "label" (the folder's), "original_label"}],
     "near_duplicates": [{"original", "copy", "label", "split", "copy_split", "across_splits",
                          "scale", "crop", "quality", "mirrored"}],
     "off_topic": [{"file", "split", "label", "origin" ("mnist-png.zip:train/3/17.png"), "size"}],
     "dark": [{"file", "split", "label", "brightness"}],
     "blurred": [{"file", "split", "label", "radius"}]}

``planted`` is null for a photo as flowers.zip has it (the originals of the
near-duplicate pairs included), else ``flipped``, ``near_duplicate`` (the
copy), ``off_topic``, ``dark`` or ``blurred``.

Matching rules (:func:`score`), findings by their ``file`` (the path inside
the zip, as ``files`` has it):

* a type's TP are its planted files with a finding of its problem, FP the
  flagged files that are neither planted for it nor neutral for it, FN its
  planted files without such a finding.  Neutral (neither right nor wrong to
  flag, left out of precision): off-topic images for label_error, dark and
  blurry (a digit has no right class among flowers, and is dark and soft);
  dark and blurred photos for outlier; dark photos for blurry.  So a dark or
  blurred photo flagged as a label error is a false positive.

  ======================  ==============  ===================
  type                    problem         neutral
  ======================  ==============  ===================
  flipped labels          label_error     off-topic
  off-topic               outlier         dark, blurred
  dark                    dark            off-topic
  blurred                 blurry          off-topic, dark
  ======================  ==============  ===================

  For a found flip, whether ``suggested_label`` is the original label is
  counted too (``suggested_right``).
* a planted near-duplicate pair is found if a finding of problem
  exact_duplicate, near_duplicate, conflicting_label or leakage links its two
  files, in either direction (``file`` and ``paired_file``).  Every reported
  pair (unordered, counted once) is one of: ``planted``; ``unplanted`` (both
  files are flowers.zip photos: a duplicate flowers.zip may already hold,
  listed to be judged by hand, not counted against); ``via_unplanted`` (a
  planted copy and a photo that an unplanted reported pair links to the copy's
  original: a duplicate of a duplicate, not counted against); or ``false``.
  ``false_share`` is false / all reported pairs; precision is planted /
  (planted + false).
* false alarms: the photos as flowers.zip has them (``planted`` null) with a
  label_error or outlier finding, over all such photos.  Planted copies
  flagged so are counted beside them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLS_BENCH_DATA") or ROOT.parent / "shared" / "data")  # as common.SHARED
CLEANLAB_VENV = Path(os.environ.get("IMGCLS_CLEANLAB_VENV")
                     or Path.home() / ".cache" / "imgcls-bench" / "cleanlab-venv")
CLEANLAB_PACKAGES = ["cleanlab==2.9.0", "scikit-learn", "numpy"]

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DUPLICATE_PROBLEMS = ("exact_duplicate", "near_duplicate", "conflicting_label", "leakage")
# type -> (the finding's problem, the planted kind it should find, kinds neither right nor wrong to flag)
TYPES = {
    "flipped": ("label_error", "flipped", ("off_topic",)),
    "off_topic": ("outlier", "off_topic", ("dark", "blurred")),
    "dark": ("dark", "dark", ("off_topic",)),
    "blurred": ("blurry", "blurred", ("off_topic", "dark")),
}
FALSE_ALARM_PROBLEMS = ("label_error", "outlier")
SHOWN = 30  # files and pairs listed per kind in the scores, for judging by hand
ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # one date on every member: a seed gives the same bytes


# ----------------------------------------------------------------------------------------------------- planting


def _images_in(zf: zipfile.ZipFile) -> list[str]:
    """The zip's image members (by extension; hidden files and __MACOSX left out), sorted."""
    out = []
    for name in zf.namelist():
        parts = name.split("/")
        if name.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        if name.lower().endswith(IMAGE_SUFFIXES):
            out.append(name)
    return sorted(out)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _new_name(rng: np.random.Generator, folder: str, taken: set[str]) -> str:
    """A fresh ``<folder>/<10 digits>_<10 hex>_n.jpg`` (the photos' own style), not in ``taken`` (added to it)."""
    while True:
        path = f"{folder}/{int(rng.integers(10**9, 10**10))}_{rng.bytes(5).hex()}_n.jpg"
        if path not in taken:
            taken.add(path)
            return path


def _place(folder: str, name: str, taken: set[str]) -> str:
    """``<folder>/<name>``, or ``<folder>/<stem>-<k><ext>`` when taken (two classes may hold one name)."""
    path, k = f"{folder}/{name}", 1
    stem, dot, ext = name.rpartition(".")
    while path in taken:
        path = f"{folder}/{stem}-{k}{dot}{ext}" if dot else f"{folder}/{name}-{k}"
        k += 1
    taken.add(path)
    return path


def near_copy(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A near-duplicate of ``img``: cropped to 85-95% of each side, mirrored (p=0.5), rescaled 0.5-1.5x, JPEG 40-90."""
    crop, scale = float(rng.uniform(0.85, 0.95)), float(rng.uniform(0.5, 1.5))
    quality, mirrored = int(rng.integers(40, 91)), bool(rng.random() < 0.5)
    ox, oy = float(rng.random()), float(rng.random())
    w, h = img.size
    cw, ch = max(1, round(w * crop)), max(1, round(h * crop))
    left, top = round((w - cw) * ox), round((h - ch) * oy)
    out = img.crop((left, top, left + cw, top + ch))
    if mirrored:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = out.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    return _jpeg(out, quality), {"scale": round(scale, 4), "crop": round(crop, 4), "quality": quality,
                                 "mirrored": mirrored}


def plant(src_zip, dest_zip, seed: int = 0, *, off_topic_sources=None, flip_fraction: float = 0.05,
          near_duplicates: int = 60, across_splits: int | None = None, off_topic: int = 30, dark: int = 15,
          blurred: int = 15, split_fractions=(0.8, 0.1, 0.1), off_topic_size=(200, 300)) -> dict:
    """Write ``dest_zip``: the images of ``src_zip`` (``[wrapper/]<class>/<file>``) with problems planted.

    Args:
        src_zip: a zip of class folders (flowers.zip).
        dest_zip: the zip to write, ``<split>/<class>/<file>``; written to a temporary name and renamed.
        seed: seeds the one numpy Generator every draw comes from.
        off_topic_sources: zips whose images are the off-topic ones, drawn from alternately (default: MNIST and
            CIFAR-10 of ``../shared/data``).
        flip_fraction: share of the photos whose label is flipped (rounded).
        near_duplicates: planted near-duplicate copies, one per original.
        across_splits: how many of them land in another split (default: half, rounded down).
        off_topic, dark, blurred: how many of each.
        split_fractions: train, val, test shares of each class (the test and val counts rounded).
        off_topic_size: the off-topic images' side, drawn from this range (inclusive).

    Returns:
        The ground truth (the module docstring's format).
    """
    src_zip, dest_zip = Path(src_zip), Path(dest_zip)
    if off_topic_sources is None:
        off_topic_sources = [SHARED / "mnist-png.zip", SHARED / "cifar10-jpg.zip"]
    off_topic_sources = [Path(p) for p in off_topic_sources]
    across = near_duplicates // 2 if across_splits is None else across_splits
    if not 0 <= across <= near_duplicates:
        raise ValueError(f"across_splits {across} is not within 0..{near_duplicates}")
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(src_zip) as zf:
        members = [m for m in _images_in(zf) if m.count("/") >= 1]
        source = {m: zf.read(m) for m in members}
    label_of = {m: m.split("/")[-2] for m in members}
    classes = sorted(set(label_of.values()))
    if len(classes) < 2:
        raise ValueError(f"{src_zip} holds {len(classes)} class folder(s); planting needs 2 or more")
    n = len(members)

    # Splits, stratified by class: the test and val shares of each class first, the rest train.
    split_of = {}
    for c in classes:
        own = [m for m in members if label_of[m] == c]
        n_test, n_val = round(len(own) * split_fractions[2]), round(len(own) * split_fractions[1])
        for j, k in enumerate(rng.permutation(len(own))):
            split_of[own[k]] = "test" if j < n_test else "val" if j < n_test + n_val else "train"

    n_flip = round(flip_fraction * n)
    need = n_flip + near_duplicates + dark + blurred
    if need > n:
        raise ValueError(f"{need} photos to plant problems in, but {src_zip} holds {n}")
    order = [members[k] for k in rng.permutation(n)]
    picks, start = {}, 0
    for kind, count in (("flipped", n_flip), ("near_original", near_duplicates), ("dark", dark),
                        ("blurred", blurred)):
        picks[kind], start = order[start:start + count], start + count

    out: dict[str, bytes] = {}  # path in the planted zip -> bytes
    files: dict[str, dict] = {}
    taken: set[str] = set()
    truth = {"format": 1, "seed": seed, "source": str(src_zip), "classes": classes,
             "params": {"flip_fraction": flip_fraction, "near_duplicates": near_duplicates,
                        "across_splits": across, "off_topic": off_topic, "dark": dark, "blurred": blurred,
                        "split_fractions": list(split_fractions), "off_topic_size": list(off_topic_size),
                        "off_topic_sources": [str(p) for p in off_topic_sources]},
             "flipped": [], "near_duplicates": [], "off_topic": [], "dark": [], "blurred": []}

    def put(path: str, data: bytes, origin: str, planted: str | None) -> None:
        split, label, _ = path.split("/", 2)
        out[path] = data
        files[path] = {"split": split, "label": label, "origin": origin, "planted": planted}

    names_in = {c: {m.rsplit("/", 1)[1] for m in members if label_of[m] == c} for c in classes}
    new_label = {}
    for m in picks["flipped"]:  # to a class without a photo of the same name where there is one (no renaming)
        others = [c for c in classes if c != label_of[m]]
        others = [c for c in others if m.rsplit("/", 1)[1] not in names_in[c]] or others
        new_label[m] = others[int(rng.integers(len(others)))]
    effect = {}
    for m in picks["dark"]:
        effect[m] = ("dark", float(rng.uniform(0.03, 0.10)))
    for m in picks["blurred"]:
        effect[m] = ("blurred", float(rng.uniform(4.0, 8.0)))

    path_of = {}
    for m in members:  # every photo once, in its split; flipped ones in their new class folder
        label = new_label.get(m, label_of[m])
        path = _place(f"{split_of[m]}/{label}", m.rsplit("/", 1)[1], taken)
        path_of[m] = path
        data, planted = source[m], None
        if m in new_label:
            planted = "flipped"
            truth["flipped"].append({"file": path, "split": split_of[m], "label": label,
                                     "original_label": label_of[m]})
        elif m in effect:
            kind, amount = effect[m]
            img = _decode(data)
            if kind == "dark":
                arr = np.asarray(img, dtype=np.float32) * amount
                img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
                truth["dark"].append({"file": path, "split": split_of[m], "label": label,
                                      "brightness": round(amount, 4)})
            else:
                img = img.filter(ImageFilter.GaussianBlur(amount))
                truth["blurred"].append({"file": path, "split": split_of[m], "label": label,
                                         "radius": round(amount, 4)})
            data, planted = _jpeg(img, 95), kind
        put(path, data, m, planted)

    crossing = set(rng.choice(near_duplicates, size=across, replace=False).tolist()) if across else set()
    for j, m in enumerate(picks["near_original"]):
        split = split_of[m]
        if j in crossing:  # always train against val/test: the pair that leaks
            copy_split = ("val", "test")[int(rng.integers(2))] if split == "train" else "train"
        else:
            copy_split = split
        data, how = near_copy(_decode(source[m]), rng)
        path = _new_name(rng, f"{copy_split}/{label_of[m]}", taken)
        put(path, data, m, "near_duplicate")
        truth["near_duplicates"].append({"original": path_of[m], "copy": path, "label": label_of[m],
                                         "split": split, "copy_split": copy_split,
                                         "across_splits": copy_split != split, **how})

    if off_topic:
        per_source = [len(range(i, off_topic, len(off_topic_sources))) for i in range(len(off_topic_sources))]
        drawn = []
        for src, count in zip(off_topic_sources, per_source):
            with zipfile.ZipFile(src) as zf:
                names = _images_in(zf)
                if count > len(names):
                    raise ValueError(f"{count} off-topic images wanted from {src}, which holds {len(names)}")
                chosen = [names[k] for k in rng.choice(len(names), size=count, replace=False)]
                drawn.append([(f"{src.name}:{name}", zf.read(name)) for name in chosen])
        for i in range(off_topic):  # alternately from each source
            origin, raw = drawn[i % len(drawn)][i // len(drawn)]
            split = SPLITS[int(rng.choice(3, p=np.asarray(split_fractions, dtype=float) / sum(split_fractions)))]
            label = classes[int(rng.integers(len(classes)))]
            side = int(rng.integers(off_topic_size[0], off_topic_size[1] + 1))
            img = _decode(raw).resize((side, side), Image.Resampling.BICUBIC)
            path = _new_name(rng, f"{split}/{label}", taken)
            put(path, _jpeg(img, 90), origin, "off_topic")
            truth["off_topic"].append({"file": path, "split": split, "label": label, "origin": origin,
                                       "size": side})

    for key in ("flipped", "off_topic", "dark", "blurred"):
        truth[key].sort(key=lambda r: r["file"])
    split_counts = Counter(f["split"] for f in files.values())
    truth["counts"] = {"images": len(files), "originals": n, **{s: split_counts.get(s, 0) for s in SPLITS}}
    truth["files"] = dict(sorted(files.items()))

    dest_zip.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest_zip.with_name(dest_zip.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for path in sorted(out):
                zf.writestr(zipfile.ZipInfo(path, ZIP_TIME), out[path])
        os.replace(tmp, dest_zip)
    finally:
        tmp.unlink(missing_ok=True)
    truth["zip"] = str(dest_zip)
    return truth


# ------------------------------------------------------------------------------------------------------ scoring


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 2 * p * r / (p + r) if p + r else 0.0


def score_flags(truth: dict, flagged, kind: str = "flipped", among=None) -> dict:
    """Precision, recall and F1 of ``flagged`` (files) as finders of the planted ``kind`` (a key of TYPES).

    ``among``: only these files count, planted or flagged (the images a peer's probabilities cover); default all.
    """
    _, planted_kind, neutral = TYPES[kind]
    files = truth["files"]
    universe = set(files) if among is None else set(among) & set(files)
    planted = {f for f in universe if files[f]["planted"] == planted_kind}
    flagged = set(flagged)
    hits = flagged & planted
    false = sorted(f for f in flagged & universe if f not in planted and files[f]["planted"] not in neutral)
    p, r = _ratio(len(hits), len(hits) + len(false)), _ratio(len(hits), len(planted))
    return {"planted": len(planted), "flagged": len(flagged & universe), "tp": len(hits), "fp": len(false),
            "fn": len(planted - hits), "neutral": len({f for f in flagged & universe
                                                       if files[f]["planted"] in neutral}),
            "precision": p, "recall": r, "f1": _f1(p, r), "false_files": false[:SHOWN],
            "missed_files": sorted(planted - hits)[:SHOWN]}


def _pairs(findings: list[dict]) -> dict[frozenset, set[str]]:
    """Unordered reported duplicate pairs -> the problems that reported them."""
    pairs: dict[frozenset, set[str]] = {}
    for f in findings:
        if f.get("problem") in DUPLICATE_PROBLEMS and f.get("paired_file") and f["paired_file"] != f["file"]:
            pairs.setdefault(frozenset((f["file"], f["paired_file"])), set()).add(f["problem"])
    return pairs


def score_pairs(truth: dict, findings: list[dict]) -> dict:
    """The planted near-duplicate pairs found, and every reported pair sorted into planted, unplanted,
    via_unplanted or false (module docstring)."""
    files = truth["files"]
    planted = {frozenset((d["original"], d["copy"])): d for d in truth["near_duplicates"]}
    original_of = {d["copy"]: d["original"] for d in truth["near_duplicates"]}
    reported = _pairs(findings)

    def photo(f: str) -> bool:  # a flowers.zip photo (moved, darkened or blurred, maybe), not a planted file
        return f in files and files[f]["planted"] not in ("near_duplicate", "off_topic")

    parent: dict[str, str] = {}  # union-find over the unplanted pairs: duplicates of duplicates

    def root(f: str) -> str:
        while parent.get(f, f) != f:
            f = parent[f] = parent.get(parent[f], parent[f])
        return f

    unplanted = sorted(sorted(p) for p in reported if p not in planted and all(photo(f) for f in p))
    for a, b in unplanted:
        parent[root(a)] = root(b)
    via, false = [], []
    for pair in reported:
        if pair in planted or all(photo(f) for f in pair):
            continue
        a, b = sorted(pair)
        copy, other = (a, b) if a in original_of else (b, a)
        if copy in original_of and photo(other) and root(other) == root(original_of[copy]):
            via.append([a, b])
        else:
            false.append([a, b])
    found = [d for pair, d in planted.items() if pair in reported]
    across = [d for d in truth["near_duplicates"] if d["across_splits"]]
    across_found = [d for d in found if d["across_splits"]]
    as_leakage = [d for d in across_found if "leakage" in reported[frozenset((d["original"], d["copy"]))]]
    p, r = _ratio(len(found), len(found) + len(false)), _ratio(len(found), len(planted))
    return {"planted": len(planted), "found": len(found), "reported_pairs": len(reported),
            "false_pairs": len(false), "false_share": _ratio(len(false), len(reported)),
            "unplanted_pairs": len(unplanted), "via_unplanted": len(via),
            "precision": p, "recall": r, "f1": _f1(p, r),
            "across_planted": len(across), "across_found": len(across_found), "across_as_leakage": len(as_leakage),
            "missed": sorted([d["original"], d["copy"]] for pair, d in planted.items()
                             if pair not in reported)[:SHOWN],
            "false": sorted(false)[:SHOWN], "unplanted": unplanted[:SHOWN], "via": sorted(via)[:SHOWN]}


def score(truth: dict, result: dict) -> dict:
    """Score an inspection (the contract's dict; its ``findings`` are read) against the ground truth."""
    findings = result.get("findings") or []
    files = truth["files"]
    flagged: dict[str, set[str]] = {}
    for f in findings:
        flagged.setdefault(f["problem"], set()).add(f["file"])
    out = {kind: score_flags(truth, flagged.get(problem, ()), kind) for kind, (problem, _, _) in TYPES.items()}
    suggested = {f["file"]: f.get("suggested_label") for f in findings if f["problem"] == "label_error"}
    out["flipped"]["suggested_right"] = sum(suggested.get(r["file"]) == r["original_label"]
                                            for r in truth["flipped"])
    off = {r["file"] for r in truth["off_topic"]}
    as_what = Counter(f["problem"] for f in findings if f["file"] in off)
    out["off_topic"]["flagged_as"] = dict(sorted(as_what.items()))
    out["off_topic"]["flagged_as_anything"] = len({f["file"] for f in findings if f["file"] in off})
    out["near_duplicates"] = score_pairs(truth, findings)

    clean = {f for f, rec in files.items() if rec["planted"] is None}
    copies = {f for f, rec in files.items() if rec["planted"] == "near_duplicate"}
    alarms = set().union(*(flagged.get(p, set()) for p in FALSE_ALARM_PROBLEMS))
    out["false_alarms"] = {
        "unplanted_images": len(clean), "flagged": len(alarms & clean), "rate": _ratio(len(alarms & clean), len(clean)),
        "by_problem": {p: len(flagged.get(p, set()) & clean) for p in FALSE_ALARM_PROBLEMS},
        "planted_copies_flagged": len(alarms & copies), "files": sorted(alarms & clean)[:SHOWN]}
    unknown = sorted({f["file"] for f in findings if f["file"] not in files})
    out["unknown_files"] = {"count": len(unknown), "files": unknown[:SHOWN]}
    out["findings"] = dict(sorted(Counter(f["problem"] for f in findings).items()))
    return out


# ------------------------------------------------------------------------------------------ the runs and the peer

_INSPECT_CHILD = """
import json, sys
import imgcls
result = imgcls.inspect(sys.argv[1], out=sys.argv[2], quiet=True)
with open(sys.argv[3], "w") as f:
    json.dump(result, f)
"""

_CLEANLAB_CHILD = """
import json, sys, time
import numpy as np
import cleanlab
from cleanlab.filter import find_label_issues
data = np.load(sys.argv[1], allow_pickle=False)
start = time.perf_counter()
issues = find_label_issues(data["labels"], data["proba"])
print(json.dumps({"flagged": np.flatnonzero(issues).tolist(), "seconds": time.perf_counter() - start,
                  "version": cleanlab.__version__}))
"""


def cleanlab_python() -> str:
    """The Python of the cleanlab venv, creating it (pip install cleanlab) on first use."""
    from common import peer_python

    return peer_python(CLEANLAB_VENV, CLEANLAB_PACKAGES, "cleanlab")


def run_inspect(data: Path, out: Path, env: dict, work: Path) -> dict:
    """One inspection in a fresh process: its result, wall seconds and peak RSS."""
    from common import run_child

    result_file = work / f"{out.name}.result.json"
    run = run_child([sys.executable, "-c", _INSPECT_CHILD, str(data), str(out), str(result_file)], env=env)
    result = json.loads(result_file.read_text())
    return {"result": result, "wall_seconds": run["wall_seconds"], "peak_rss_mib": run["peak_rss_mib"],
            "seconds": result.get("seconds")}


def run_peer(truth: dict, folder: Path, label_errors: set[str]) -> dict:
    """cleanlab's find_label_issues on ``<folder>/oof.npz``, scored as imgcls's label errors are."""
    npz = folder / "oof.npz"
    if not npz.is_file():
        return {"skipped": f"{npz} is not there: inspect wrote no out-of-fold probabilities"}
    with np.load(npz, allow_pickle=False) as data:
        files, n = [str(f) for f in data["files"]], len(data["labels"])
        if data["proba"].shape[0] != n or len(files) != n:
            raise ValueError(f"{npz}: proba {data['proba'].shape}, labels ({n},) and files ({len(files)},) differ")
    proc = subprocess.run([cleanlab_python(), "-c", _CLEANLAB_CHILD, str(npz)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cleanlab failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    flagged = {files[i] for i in doc["flagged"]}
    return {"version": doc["version"], "seconds": doc["seconds"], "covered": n,
            "covered_flips": len({r["file"] for r in truth["flipped"]} & set(files)),
            "cleanlab": score_flags(truth, flagged, "flipped", among=files),
            "imgcls_same_images": score_flags(truth, label_errors, "flipped", among=files)}


def exclude_csv(result: dict, dest: Path) -> int:
    """Write the train and val label_error findings as a csv with a ``file`` column; return how many."""
    rows = sorted({f["file"] for f in result.get("findings") or []
                   if f["problem"] == "label_error" and f.get("split") in ("train", "val")})
    with open(dest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file"])
        w.writerows([r] for r in rows)
    return len(rows)


def run_train(data: Path, runs: Path, name: str, env: dict, extra: list[str]) -> dict:
    from common import run_child

    cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(data), "--out", str(runs), "--name", name,
           "--no-report", "--quiet", *extra]
    run = run_child(cmd, env=env)
    ev = json.loads((runs / name / "eval_test.json").read_text())
    return {"accuracy": ev.get("accuracy"), "n": ev.get("n"), "wall_seconds": run["wall_seconds"], "cmd": cmd[3:]}


# ------------------------------------------------------------------------------------------------------ output


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(doc: dict) -> str:
    """The results as markdown."""
    s, lines = doc["scores"], []
    lines += ["| problem | planted | flagged | TP | FP | precision | recall | F1 | notes |",
              "|---|---|---|---|---|---|---|---|---|"]
    names = {"flipped": "flipped labels (label_error)", "off_topic": "off-topic (outlier)", "dark": "dark (dark)",
             "blurred": "blurred (blurry)"}
    for kind, name in names.items():
        r = s[kind]
        note = f"{r['neutral']} neutral flagged"
        if kind == "flipped":
            note += f"; suggested label right for {r['suggested_right']}/{r['tp']}"
        if kind == "off_topic":
            note += f"; {r['flagged_as_anything']} flagged as anything ({r['flagged_as']})"
        lines.append(f"| {name} | {r['planted']} | {r['flagged']} | {r['tp']} | {r['fp']} | {_pct(r['precision'])} "
                     f"| {_pct(r['recall'])} | {_pct(r['f1'])} | {note} |")
    peer = doc.get("peer") or {}
    for key, name in (("imgcls_same_images", "flipped labels, imgcls, images with oof probabilities"),
                      ("cleanlab", (f"flipped labels, cleanlab {peer.get('version', '')} find_label_issues, "
                                    "same probabilities"))):
        if key in peer:
            r = peer[key]
            lines.append(f"| {name} | {r['planted']} | {r['flagged']} | {r['tp']} | {r['fp']} | "
                         f"{_pct(r['precision'])} | {_pct(r['recall'])} | {_pct(r['f1'])} | "
                         f"{peer['covered']} images covered |")
    d = s["near_duplicates"]
    lines.append(f"| near-duplicate pairs | {d['planted']} ({d['across_planted']} across splits) | "
                 f"{d['reported_pairs']} pairs | {d['found']} | {d['false_pairs']} | {_pct(d['precision'])} | "
                 f"{_pct(d['recall'])} | {_pct(d['f1'])} | false pairs {_pct(d['false_share'])} of reported; "
                 f"across found {d['across_found']}/{d['across_planted']} ({d['across_as_leakage']} as leakage); "
                 f"{d['unplanted_pairs']} unplanted pairs (judge by hand), {d['via_unplanted']} via them |")
    fa = s["false_alarms"]
    lines += ["", (f"False alarms: {fa['flagged']} of {fa['unplanted_images']} unplanted photos "
                   f"({_pct(fa['rate'])}) flagged as label_error or outlier {fa['by_problem']}; "
                   f"planted copies flagged so: {fa['planted_copies_flagged']}.")]
    if s["unknown_files"]["count"]:
        lines.append(f"WARNING: {s['unknown_files']['count']} findings name files the planted zip does not hold, "
                     f"e.g. {s['unknown_files']['files'][:3]}")
    lines.append("")
    runs = doc["inspect"]
    lines.append(f"Times: planting {doc['plant_seconds']:.1f} s; inspect cold {runs['cold']['wall_seconds']:.1f} s "
                 f"(process; result's seconds {runs['cold']['seconds']}), warm {runs['warm']['wall_seconds']:.1f} s "
                 f"(result's seconds {runs['warm']['seconds']}); warm findings same as cold: "
                 f"{runs['same_findings']}; peak RSS {runs['cold']['peak_rss_mib']:.0f} MiB"
                 + (f"; cleanlab {peer['seconds']:.2f} s" if "seconds" in peer else "") + ".")
    if peer.get("skipped"):
        lines.append(f"Peer skipped: {peer['skipped']}")
    train = doc.get("train")
    if train:
        lines.append(f"Test accuracy ({train['plain']['n']} test images, planted flips in them included): plain "
                     f"{_pct(train['plain']['accuracy'])}; with --exclude of {train['excluded_files']} train/val "
                     f"label errors {_pct(train['excluded']['accuracy'])}.")
    lines.append(f"{doc['hardware_line']}; ATEN_CPU_CAPABILITY "
                 f"{'set to ' + doc['aten_cpu_capability'] if doc['aten_cpu_capability'] else 'not set'}.")
    return "\n".join(lines)


def _same(a: dict, b: dict) -> bool:
    def key(r):
        return sorted((f["problem"], f["file"], f.get("paired_file") or "") for f in r.get("findings") or [])
    return key(a) == key(b)


def main(argv: list[str] | None = None) -> int:
    from common import (
        add_cpu_class_argument,
        cpu_class_env,
        hardware_class,
        hardware_line,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the planting's seed (default: 0)")
    p.add_argument("--data", type=Path, default=SHARED / "flowers.zip", help="the zip of class folders to plant in")
    p.add_argument("--work", type=Path, help="working folder (default: a new temporary one, kept)")
    p.add_argument("--skip-train", action="store_true", help="leave out the two training runs")
    p.add_argument("--skip-peer", action="store_true", help="leave out cleanlab")
    p.add_argument("--json", type=Path, help="write everything measured here")
    add_cpu_class_argument(p)
    args = p.parse_args(argv)

    work = (args.work or Path(tempfile.mkdtemp(prefix="imgcls-inspect-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, json_out = args.data.resolve(), args.json.resolve() if args.json else None
    os.chdir(work)  # the children (inspect, the peer, training) start in the work folder
    env = cpu_class_env(args.cpu_class)
    hw = hardware_class(env)
    print(hardware_line(hw), flush=True)
    print(f"working folder: {work}", flush=True)

    start = time.perf_counter()
    planted = work / "planted.zip"
    truth = plant(data, planted, args.seed)
    plant_seconds = time.perf_counter() - start
    (work / "truth.json").write_text(json.dumps(truth, indent=1))
    print(f"planted in {plant_seconds:.1f} s: {planted} ({truth['counts']})", flush=True)

    cache = work / "cache"
    for folder in (cache, work / "inspect-cold", work / "inspect-warm", work / "runs"):
        shutil.rmtree(folder, ignore_errors=True)
    cache.mkdir()
    child_env = {**env, "IMGCLS_DATA_DIR": str(cache)}
    cold = run_inspect(planted, work / "inspect-cold", child_env, work)
    print(f"inspect, cold: {cold['wall_seconds']:.1f} s", flush=True)
    warm = run_inspect(planted, work / "inspect-warm", child_env, work)
    print(f"inspect, warm: {warm['wall_seconds']:.1f} s", flush=True)
    result = cold["result"]
    scores = score(truth, result)
    doc = {"seed": args.seed, "data": str(data), "work": str(work), "truth": str(work / "truth.json"),
           "hardware": hw, "hardware_line": hardware_line(hw), "cpu_class": args.cpu_class,
           "aten_cpu_capability": env.get("ATEN_CPU_CAPABILITY") or os.environ.get("ATEN_CPU_CAPABILITY"),
           "plant_seconds": plant_seconds, "counts": truth["counts"],
           "inspect": {name: {k: v for k, v in r.items() if k != "result"} | {"path": r["result"].get("path")}
                       for name, r in (("cold", cold), ("warm", warm))},
           "scores": scores}
    doc["inspect"]["same_findings"] = _same(cold["result"], warm["result"])
    folder = Path(result["path"])
    folder = folder if folder.is_absolute() else work / folder
    if not args.skip_peer:
        label_errors = {f["file"] for f in result.get("findings") or [] if f["problem"] == "label_error"}
        doc["peer"] = run_peer(truth, folder, label_errors)
    if not args.skip_train:
        excluded = exclude_csv(result, work / "exclude-label-errors.csv")
        doc["train"] = {"excluded_files": excluded,
                        "plain": run_train(planted, work / "runs", "plain", child_env, []),
                        "excluded": run_train(planted, work / "runs", "excluded", child_env,
                                              ["--exclude", str(work / "exclude-label-errors.csv")])}
    print(table(doc))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
