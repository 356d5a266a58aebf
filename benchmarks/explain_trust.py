"""How far each attribution method can be trusted, on a task where the evidence is known.

For each seed: build ``make_pattern_dataset`` (tests/explain/patterns.py)
(32x32 noise, one 8x8 class shape and one 8x8 distractor shape of no class, at
random places), train a ResNet-8 on it as ``tests/explain/test_localisation.py``
does, and on the correctly classified held-out images measure per method:

  localisation  fraction of maps whose peak lies in the class shape's box (+-2 px)
  rand. corr.   mean Spearman correlation of the trained and the fully
                randomised model's maps (Adebayo et al. 2018), and in how
                many seeds it passed (below RANDOMISATION_THRESHOLD)
  deletion AUC  mean area under the target probability as the top pixels are
                set to the mean colour (Petsiuk et al. 2018), against the
                same for a random pixel order; lower = better
  seconds       wall time to compute the maps of all the held-out images

``edges (control)`` is a Sobel edge map of the input, blind to the model: the
randomisation check must flag it.  Figures are medians over the seeds with
[min, max].

    python benchmarks/explain_trust.py
    python benchmarks/explain_trust.py --seeds 0 --test-images 128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from imgcls.explain.attribution import METHODS
from imgcls.explain.sanity import (
    RANDOMISATION_THRESHOLD,
    compute_maps,
    deletion_auc,
    deletion_curve,
    edge_map,
    peak_in_box,
    random_deletion_auc,
    randomisation_check,
)
from imgcls.inference import channel_stats, normalization_tensors, to_input

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "explain"))  # the pattern task: test data
from patterns import make_pattern_dataset, train_pattern_model

TRAIN_IMAGES = 3000
TRAIN_STEPS = 300  # Adam steps
BATCH = 64  # images per step
LR = 2e-3  # Adam, per step
MARGIN = 2  # pixels around the 8x8 box (Grad-CAM's map is 8x8, upsampled x4)
DELETION_STEPS = 20  # chunks of pixels removed
CONTROL = "edges (control)"


def load_data(seed: int, test_images: int):
    """Normalised train and held-out tensors plus the held-out boxes; train and test seeds differ."""
    images, labels, _ = make_pattern_dataset(TRAIN_IMAGES, seed=2 * seed)
    test, test_labels, boxes = make_pattern_dataset(test_images, seed=2 * seed + 1)
    mean, std = normalization_tensors(channel_stats(images), torch.device("cpu"))

    def prepare(u8):
        return to_input(torch.from_numpy(u8), mean, std, channels_last=False)

    return prepare(images), torch.from_numpy(labels), prepare(test), torch.from_numpy(test_labels), boxes


def train(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    return train_pattern_model(x, y, seed, steps=TRAIN_STEPS, batch=BATCH, lr=LR)


def measure(model, x, y, boxes, method, seed: int) -> dict:
    compute_maps(model, x[:2], y[:2], method)  # warm-up: imports and first-call allocations are not timed
    start = time.perf_counter()
    maps = compute_maps(model, x, y, method)
    seconds = time.perf_counter() - start
    return {
        "localisation": float(peak_in_box(maps, boxes, MARGIN).mean()),
        "correlation": randomisation_check(model, x, y, method, seed=seed)["mean"],
        "deletion": float(deletion_auc(deletion_curve(model, x, y, maps, DELETION_STEPS, seed=seed)).mean()),
        "seconds": seconds,
    }


def run_seed(seed: int, test_images: int) -> tuple[dict, float, int]:
    """Per-method figures for one seed, the random-order deletion AUC, and the images scored."""
    x, y, xt, yt, boxes = load_data(seed, test_images)
    start = time.perf_counter()
    model = train(x, y, seed)
    with torch.no_grad():
        correct = model(xt).argmax(1) == yt
    print(f"seed {seed}: trained in {time.perf_counter() - start:.1f} s, "
          f"held-out accuracy {correct.float().mean():.1%}", flush=True)
    xt, yt, boxes = xt[correct], yt[correct], boxes[correct.numpy()]
    methods = {m: m for m in METHODS} | {CONTROL: edge_map}
    rows = {name: measure(model, xt, yt, boxes, method, seed) for name, method in methods.items()}
    random_auc = float(random_deletion_auc(model, xt, yt, DELETION_STEPS, seed).mean())
    return rows, random_auc, len(xt)


def spread(values) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def print_table(runs: list[dict], random_aucs: list[float]) -> None:
    print(f"\n{'method':22s} {'localisation':>22s} {'rand. corr. (verdict)':>34s} "
          f"{'deletion AUC':>22s} {'seconds':>8s}")
    for name in runs[0]:
        col = {k: [run[name][k] for run in runs] for k in runs[0][name]}
        passed = sum(c < RANDOMISATION_THRESHOLD for c in col["correlation"])
        verdict = f"passed {passed}/{len(runs)}"
        print(f"{name:22s} {spread(col['localisation']):>22s} {spread(col['correlation']):>22s} "
              f"({verdict:>9s}) {spread(col['deletion']):>22s} {statistics.median(col['seconds']):8.2f}")
    print(f"{'random pixel order':22s} {'':>22s} {'':>34s} {spread(random_aucs):>22s}")


def main(args) -> None:
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"randomisation threshold {RANDOMISATION_THRESHOLD}; localisation margin {MARGIN} px")
    runs, random_aucs, counts = [], [], []
    for seed in args.seeds:
        rows, random_auc, n = run_seed(seed, args.test_images)
        runs.append(rows)
        random_aucs.append(random_auc)
        counts.append(n)
    print(f"\nmedians over seeds {args.seeds} [min, max]; {int(np.median(counts))} correctly classified "
          f"held-out images per seed")
    print_table(runs, random_aucs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-images", type=int, default=256, help="held-out images per seed")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
