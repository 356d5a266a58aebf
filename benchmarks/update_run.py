"""Updating a trained run with a new class (issue 33, part 3): its wall time, and its accuracy against training
again from scratch on the old and new photos together.

    python benchmarks/update_run.py                               # ../shared/data/flowers.zip: tulip, 100 photos, seed 0
    python benchmarks/update_run.py --new-class rose --photos 100 --seed 1 --work /tmp/update-bench

What it does, with imgcls from this checkout (``src/`` first on PYTHONPATH) and one fresh ``IMGCLS_DATA_DIR``
under ``--work`` (a temporary folder by default), every command in a fresh process (wall time from launch to exit,
interpreter start and imports included: ``common.run_child``):

1. **Folders** from flowers.zip (``flowers/<class>/<file>.jpg``, no split): ``parent/``, every photo of every
   class but ``--new-class``; ``new/<new class>/``, ``--photos`` of its photos, drawn with ``--seed`` (numpy
   Generator); ``union/``, both.  Files are hard links (copies where links fail) of one extracted copy.
2. ``imgcls train --data parent``: the parent, with the defaults (on a CPU: EfficientNet-Lite2 head-first, the
   classifier alone on frozen features, which stage 1 caches).
3. ``imgcls train --update runs/parent --data new``: **the update**, with the defaults (the report on).  The cache
   is warm: the parent's decoded images and frozen features are there; the new photos are decoded and pass the
   backbone.  This wall time is the figure of the speed bar (under 20 s).
4. The same update again with ``--no-report`` (another name): every feature is cached now; how much of step 3 is
   the report and the new photos.
5. ``imgcls train --data union``: training again from scratch on the old and new photos, the defaults.
6. **Accuracy**: each run's own test accuracy (run.json, as it reported it), and the accuracy of the update and of
   the union run on the test images both test on (the old classes' test images: the seeded split carves the same
   ones from both folders, checked by path), each run's model predicting them (``imgcls.load(run)``).

The result goes to benchmarks/results/update_run-<zip>-<hardware class>.json (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from common import (
    ROOT,
    SHARED,
    class_tag,
    hardware_line,
    machine,
    machine_line,
    run_child,
    save_results,
)

IMGCLS = [sys.executable, "-m", "imgcls.cli", "train"]


def make_folders(zip_path: Path, work: Path, new_class: str, photos: int, seed: int) -> dict:
    """parent/, new/ and union/ under ``work`` (see the module docstring); their image counts."""
    src = work / "extracted"
    if not src.is_dir():
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(src)
    top = next(p for p in src.iterdir() if p.is_dir())  # flowers/
    classes = sorted(p.name for p in top.iterdir() if p.is_dir())
    if new_class not in classes:
        raise SystemExit(f"--new-class {new_class!r} is not a class of {zip_path}: {', '.join(classes)}")
    files = sorted(p for p in (top / new_class).iterdir() if p.is_file() and not p.name.startswith("."))
    picked = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), photos, replace=False))]
    counts = {}
    for name, sources in (("parent", {c: _images(top / c) for c in classes if c != new_class}),
                          ("new", {new_class: picked}),
                          ("union", {**{c: _images(top / c) for c in classes if c != new_class}, new_class: picked})):
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        for cls, paths in sources.items():
            (folder / cls).mkdir(parents=True)
            for path in paths:
                _link(path, folder / cls / path.name)
        counts[name] = sum(len(p) for p in sources.values())
    return counts


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def timed(args: list[str], work: Path, env: dict) -> dict:
    """Run ``imgcls train ARGS`` in ``work`` in a fresh process: wall seconds and peak RSS."""
    cwd = os.getcwd()
    os.chdir(work)  # the runs name their data relative to here, as a user's would
    try:
        return run_child([*IMGCLS, *args], env=env)
    finally:
        os.chdir(cwd)


def shared_test_accuracy(runs: dict[str, Path], work: Path) -> dict:
    """Accuracy of each run's model on the test images every run tests on (by class folder and file name)."""
    import imgcls  # this checkout's: ROOT/src is first on sys.path

    cwd = os.getcwd()
    os.chdir(work)
    try:
        preds = {}
        for name, path in runs.items():
            clf = imgcls.load(path, device="cpu")
            test = clf.dataset().splits["test"]
            proba = clf.proba_of_arrays(test.images)
            keys = ["/".join(Path(p).parts[-2:]) for p in test.paths]
            preds[name] = {k: (clf.classes[int(p.argmax())], Path(k).parts[0]) for k, p in zip(keys, proba)}
    finally:
        os.chdir(cwd)
    common = sorted(set.intersection(*(set(p) for p in preds.values())))
    return {"images": len(common),
            **{name: float(np.mean([p[k][0] == p[k][1] for k in common])) for name, p in preds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, default=SHARED / "flowers.zip", help="a zip of class folders")
    parser.add_argument("--new-class", default="tulip", help="the class the update adds (default: tulip)")
    parser.add_argument("--photos", type=int, default=100, help="photos of it the update adds (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="which photos (numpy Generator); imgcls's seed is 0")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--json", type=Path, help="write the result here (default: benchmarks/results/...)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    print(hardware_line(machine()["hardware"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        env = {"IMGCLS_DATA_DIR": str(work / "cache"), "PYTHONPATH": str(ROOT / "src")}
        shutil.rmtree(work / "cache", ignore_errors=True)
        shutil.rmtree(work / "runs", ignore_errors=True)
        counts = make_folders(args.zip, work, args.new_class, args.photos, args.seed)
        print(f"folders: parent {counts['parent']:,} photos, new {counts['new']} ({args.new_class}), union "
              f"{counts['union']:,}", flush=True)
        steps = {
            "parent": ["--data", "parent", "--out", "runs", "--name", "parent"],
            "update": ["--update", "runs/parent", "--data", "new"],
            "update_cached_no_report": ["--update", "runs/parent", "--data", "new", "--no-report", "--name", "again"],
            "union": ["--data", "union", "--out", "runs", "--name", "union"],
        }
        times = {}
        for step, argv in steps.items():
            times[step] = timed(argv, work, env)
            print(f"{step}: {times[step]['wall_seconds']:.1f} s wall (imgcls train {' '.join(argv)})", flush=True)
        runs = {"parent": work / "runs" / "parent", "update": work / "runs" / "parent-update",
                "union": work / "runs" / "union"}
        info = {k: json.loads((p / "run.json").read_text()) for k, p in runs.items()}
        sys.path.insert(0, str(ROOT / "src"))
        os.environ["IMGCLS_DATA_DIR"] = env["IMGCLS_DATA_DIR"]
        shared = shared_test_accuracy({"update": runs["update"], "union": runs["union"]}, work)
        test_images = {k: sum(json.loads((runs[k] / "dataset.json").read_text())["splits"]["test"]["per_class"])
                       for k in runs}  # read while the working folder is there
    doc = {"zip": str(args.zip), "new_class": args.new_class, "photos": args.photos, "seed": args.seed,
           "counts": counts, "times": times,
           "test_accuracy": {k: v["test_accuracy"] for k, v in info.items()},
           "test_images": test_images,
           "update_seconds_to_run_json": info["update"]["train_seconds_this_session"],
           "update_frozen_passes": info["update"]["update"]["frozen_passes"],
           "update_comparison": info["update"]["update"]["comparison"],
           "shared_test": shared}
    print(f"the update: {times['update']['wall_seconds']:.1f} s wall with the report "
          f"({doc['update_seconds_to_run_json']:.1f} s of it from the update's start to its run.json, before the "
          f"report), {times['update_cached_no_report']['wall_seconds']:.1f} s again without it (every feature cached); "
          f"training on the union from scratch: {times['union']['wall_seconds']:.1f} s")
    for k in ("parent", "update", "union"):
        print(f"  {k:<7} test accuracy {info[k]['test_accuracy']:.4f} ({doc['test_images'][k]} test images)")
    print(f"  on the {shared['images']} test images both test on: update {shared['update']:.4f}, union from scratch "
          f"{shared['union']:.4f} (difference {100 * (shared['update'] - shared['union']):+.1f} points)")
    name = f"update_run-{args.zip.stem}-{class_tag()}"
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), **doc}, indent=1))
        print(f"result: {args.json}")
    else:
        print(f"result: {save_results(name, doc)}")


if __name__ == "__main__":
    main()
