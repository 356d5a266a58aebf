"""Reproduce the seed documents' runs with imgcls and print accuracy, wall time and throughput.

Each case runs ``imgcls train`` in a fresh process (imports, data loading and
the final test evaluation all count in the wall time), once per seed, and
prints the median with min and max.  The MNIST and CIFAR-10 zips are read from
../shared/data beside the checkout.

    python benchmarks/seed_runs.py                  # all cases, seeds 0 1 2
    python benchmarks/seed_runs.py --cases mnist --seeds 0

Cases:
  digits  `imgcls train` with no arguments (the built-in 8x8 digits)
  mnist   seeds 002/004: one-conv model, SGD lr 0.01 momentum 0.9, batch 32, 10 epochs,
          all 60,000 training images (no val split), final weights; the seed reports 98.78%
  cifar10 seed 000: TensorFlow-tutorial CNN, Adam lr 1e-3, batch 32, 10 epochs; best
          epoch by val loss on a 10% val split carved from train
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED, machine_line, spread

CASES = {
    "digits": [],
    "mnist": ["--data", str(SHARED / "mnist-png.zip"), "--model", "seed_mnist_oneconv", "--optimizer", "sgd",
              "--lr", "0.01", "--momentum", "0.9", "--batch-size", "32", "--epochs", "10",
              "--val-fraction", "0", "--no-restore-best"],
    "cifar10": ["--data", str(SHARED / "cifar10-jpg.zip"), "--model", "seed_tf_tutorial", "--optimizer", "adam",
                "--lr", "0.001", "--batch-size", "32", "--epochs", "10"],
}


def run_once(args: list[str], seed: int, out: Path) -> dict:
    name = f"s{seed}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "imgcls.cli", "train", *args, "--seed", str(seed), "--out", str(out),
           "--name", name, "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    run = out / name
    summary = json.loads((run / "run.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"accuracy": summary["test_accuracy"], "wall": wall, "data": summary["data_seconds"],
            "img_s": statistics.median(e["images_per_sec"] for e in epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    print(f"machine: {machine_line()}")
    print("figures: median [min, max] over seeds", args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            if "--data" in CASES[case] and not Path(CASES[case][1]).is_file():
                print(f"{case}: skipped, {CASES[case][1]} is absent")
                continue
            results = [run_once(CASES[case], seed, Path(tmp)) for seed in args.seeds]
            acc = [r["accuracy"] * 100 for r in results]
            print(f"{case:8s} test accuracy % {spread(acc, '.2f')} (mean {statistics.mean(acc):.2f})  "
                  f"wall s {spread([r['wall'] for r in results], '.1f')}  "
                  f"data s {spread([r['data'] for r in results], '.2f')}  "
                  f"train img/s {spread([r['img_s'] for r in results], '.0f')}")
            print(f"         command: imgcls train {' '.join(CASES[case])}")


if __name__ == "__main__":
    main()
