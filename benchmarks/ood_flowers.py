"""How well a photo model says "unknown" for images that are none of its classes.

    python benchmarks/ood_flowers.py --cpu-class avx2

From ``../shared/data/flowers.zip`` it makes a folder of four flower classes (tulips left out) and trains
``imgcls train --data <folder>`` with the defaults (the run measures its own score against scikit-learn's digits,
its default outside images).  Then, with the stored score and threshold, it scores the run's own test split (in)
against two folders the run never saw:

* ``tulips``: the fifth flower (near: a photo of a flower, of a class the model does not know);
* ``cifar``: 500 CIFAR-10 test photos (airplanes to trucks, 32 px upscaled) from ``../shared/data``.

It prints, per outside folder and per score (MSP, energy, kNN, the kept one marked), the AUROC, and at the stored
threshold the share of test images rejected and of outside images accepted; and writes the figures to
``benchmarks/results/ood-flowers-<hardware class>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    SHARED,
    add_cpu_class_argument,
    class_tag,
    cpu_class_env,
    enter_cpu_class,
    hardware_class,
    hardware_line,
    machine,
    run_child,
)

WORK = Path.home() / ".cache" / "imgcls-bench" / "ood-flowers"
LEFT_OUT = "tulip"
CIFAR_IMAGES = 500


def make_folders(work: Path, seed: int) -> dict[str, Path]:
    """flowers4/<class>/, tulips/ and cifar/ under ``work`` (made once)."""
    folders = {"train": work / "flowers4", "tulips": work / "tulips", "cifar": work / "cifar"}
    if all(p.is_dir() for p in folders.values()):
        return folders
    for p in folders.values():
        shutil.rmtree(p, ignore_errors=True)
    with zipfile.ZipFile(SHARED / "flowers.zip") as z:
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) != 3 or not parts[2].lower().endswith(".jpg"):
                continue
            target = folders["tulips"] / parts[2] if parts[1] == LEFT_OUT else folders["train"] / parts[1] / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
    with zipfile.ZipFile(SHARED / "cifar10-jpg.zip") as z:
        names = sorted(n for n in z.namelist() if n.startswith("test/") and n.endswith(".jpg"))
        pick = np.random.default_rng(seed).permutation(len(names))[:CIFAR_IMAGES]
        folders["cifar"].mkdir(parents=True)
        for i in pick:
            (folders["cifar"] / names[i].replace("/", "_")).write_bytes(z.read(names[i]))
    return folders


def measure(run: Path, folders: dict[str, Path]) -> dict:
    """Every score's AUROC (test split against each outside folder), and the kept one's rates at its threshold."""
    import imgcls
    from imgcls.inference import predict_logits
    from imgcls.ood import auroc, feature_directions, knn_score, logit_scores

    clf = imgcls.load(run)
    ood = clf.ood
    test = clf.dataset().splits["test"].images

    def scores(images: np.ndarray) -> dict[str, np.ndarray]:
        logits, pooled = predict_logits(clf.model, images, clf.meta["normalize"], clf.runtime, clf.batch_size,
                                        clf.meta.get("tta", "none"), features=True)
        out = logit_scores(logits.numpy())
        if ood["score"] == "knn":
            out["knn"] = knn_score(feature_directions(pooled), ood["bank"].float().numpy(), int(ood["k"]))
        return out

    inside = scores(test)
    kept = ood["score"]
    result = {"kept": kept, "threshold": ood["threshold"], "test_images": len(test),
              "test_rejected": round(float(np.mean(inside[kept] < ood["threshold"])), 4), "outside": {}}
    for name in ("tulips", "cifar"):
        _, images, _ = clf.load_inputs([str(folders[name])])
        outside = scores(images)
        result["outside"][name] = {
            "images": len(images),
            "auroc": {k: round(auroc(inside[k], outside[k]), 4) for k in inside},
            "accepted": round(float(np.mean(outside[kept] >= ood["threshold"])), 4),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--seed", type=int, default=0)
    add_cpu_class_argument(parser)
    args = parser.parse_args(argv)
    enter_cpu_class(args.cpu_class)
    hw = hardware_class(cpu_class_env(args.cpu_class))
    print(hardware_line(hw), flush=True)
    folders = make_folders(args.work, args.seed)
    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(folders["train"]), "--out", str(runs), "--name",
           "flowers4", "--seed", str(args.seed), "--no-report"]
    train_seconds = run_child(cmd)["wall_seconds"]  # raises with the child's error when it fails
    result = measure(runs / "flowers4", folders)
    own = json.loads((runs / "flowers4" / "ood.json").read_text())
    print(f"kept score: {result['kept']} (chosen on val against {own['against']}); at its threshold "
          f"{result['test_rejected']:.1%} of the {result['test_images']} test images are rejected")
    print("| outside folder | images | AUROC msp | AUROC energy | AUROC knn | accepted at the threshold |")
    print("|---|---|---|---|---|---|")
    for name, r in result["outside"].items():
        a = r["auroc"]
        print(f"| {name} | {r['images']} | {a['msp']:.3f} | {a['energy']:.3f} | {a.get('knn', float('nan')):.3f} | "
              f"{r['accepted']:.1%} |")
    doc = {"benchmark": "ood-flowers", "machine": machine(), "hardware": hw, "hardware_line": hardware_line(hw),
           "seed": args.seed, "train_seconds": round(train_seconds, 1), "own_measurement": own, **result,
           "command": "python benchmarks/ood_flowers.py --cpu-class " + args.cpu_class}
    path = RESULTS / f"ood-flowers-{class_tag()}.json"
    path.write_text(json.dumps(doc, indent=2))
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
