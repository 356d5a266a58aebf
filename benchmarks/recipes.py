"""The fast recipes end to end: test accuracy over seeds, wall time with data loading, peak memory.

Each run is `imgcls train --data ZIP --recipe NAME --seed S --no-report` in a
fresh process with an empty data cache, so the wall time covers starting
Python, decoding the zip, training and the final test evaluation (the
report, which `train` otherwise writes afterwards, is left out of the clock).

    python benchmarks/recipes.py                           # both recipes, seeds 0 1 2
    python benchmarks/recipes.py --recipes mnist-fast --seeds 0 1 2 3 4
    python benchmarks/recipes.py --recipes cifar10-fast --epochs 10
    python benchmarks/recipes.py --device cuda             # on a CUDA GPU (results named *-cuda.json)
    python benchmarks/recipes.py --cpu-class avx2          # as on an AVX2-only CPU (results named *-avx2.json)

Each recipe runs the variant for the precision the machine trains in (bf16
where it is native, fp32 elsewhere; `imgcls recipes` lists them), and the
output names the hardware class.

The zips are read from ../shared/data, or from the folder IMGCLS_BENCH_DATA names.

Prints the test accuracy as mean and standard deviation (and min, max) over
seeds, as airbench reports it, and the wall time, data time, training
throughput and peak RSS as median [min, max]; raw numbers go to
benchmarks/results/recipe-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from common import (
    SHARED,
    add_cpu_class_argument,
    class_tag,
    enter_cpu_class,
    machine_line,
    run_child,
    save_results,
    spread,
)

DATA = {"cifar10-fast": "cifar10-jpg.zip", "mnist-fast": "mnist-png.zip"}
# (accuracy, seconds) per variant; the fp32 CIFAR-10 variant's bar is the time alone: how far it gets in 10 minutes.
BARS = {"cifar10-fast": {"bf16": (0.91, 600.0), "fp32": (0.0, 600.0)},
        "mnist-fast": {"bf16": (0.995, 60.0), "fp32": (0.995, 60.0)}}


def run_recipe(recipe: str, seed: int, tmp: Path, extra: list[str]) -> dict:
    name = f"{recipe}-{seed}"
    cmd = [sys.executable, "-m", "imgcls.cli", "train", "--data", str(SHARED / DATA[recipe]), "--recipe", recipe,
           "--seed", str(seed), "--no-report", "--quiet", "--out", str(tmp / "runs"), "--name", name, *extra]
    proc = run_child(cmd, env={"IMGCLS_DATA_DIR": str(tmp / f"cache-{name}")})  # empty: the zip is decoded
    info = json.loads((tmp / "runs" / name / "run.json").read_text())
    epochs = [json.loads(line) for line in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    variant = yaml.safe_load((tmp / "runs" / name / "config.yaml").read_text()).get("recipe_variant")
    return {**proc, "variant": variant, "test_accuracy": info["test_accuracy"], "data_seconds": info["data_seconds"],
            "train_seconds": sum(e["train_seconds"] for e in epochs), "fit_seconds": info["train_seconds_this_session"],
            "epochs": len(epochs), "images_per_sec": statistics.median(e["images_per_sec"] for e in epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override the recipes' epochs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="what `imgcls train --device` gets (auto: a CUDA GPU where there is one)")
    add_cpu_class_argument(parser)
    args = parser.parse_args()
    enter_cpu_class(args.cpu_class)
    extra = (["--epochs", str(args.epochs)] if args.epochs else []) + ["--device", args.device]
    print(f"machine: {machine_line()}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            if not (SHARED / DATA[recipe]).is_file():
                print(f"{recipe}: skipped, {SHARED / DATA[recipe]} is absent")
                continue
            runs = []
            for seed in args.seeds:
                runs.append(run_recipe(recipe, seed, Path(tmp), extra))
                print(f"  {recipe} seed {seed}: {runs[-1]['test_accuracy']:.4f} in {runs[-1]['wall_seconds']:.1f}s",
                      flush=True)
            results[recipe] = runs
            acc = [r["test_accuracy"] * 100 for r in runs]
            bar_acc, bar_s = BARS[recipe]["fp32" if "its fp32 variant" in (runs[0]["variant"] or "") else "bf16"]
            hits = sum(r["test_accuracy"] >= bar_acc and r["wall_seconds"] <= bar_s for r in runs)
            print(f"{recipe}: imgcls train --data {SHARED / DATA[recipe]} --recipe {recipe} {' '.join(extra)}")
            print(f"  variant: {runs[0]['variant']}")
            print(f"  test accuracy %  mean {statistics.mean(acc):.2f}  std {statistics.pstdev(acc):.2f}  "
                  f"[{min(acc):.2f}, {max(acc):.2f}]  over seeds {args.seeds}")
            print(f"  wall s {spread([r['wall_seconds'] for r in runs])}   data s "
                  f"{spread([r['data_seconds'] for r in runs], '.2f')}   training steps s "
                  f"{spread([r['train_seconds'] for r in runs])}   training and test pass s "
                  f"{spread([r['fit_seconds'] for r in runs])}   train img/s "
                  f"{spread([r['images_per_sec'] for r in runs], '.0f')}   peak RSS MiB "
                  f"{spread([r['peak_rss_mib'] for r in runs], '.0f')}   epochs {runs[0]['epochs']}")
            print(f"  bar ({f'{bar_acc:.1%} ' if bar_acc else ''}within {bar_s:.0f} s, data loading included): met by {hits} of {len(runs)} runs")
    for recipe, runs in results.items():  # one file per recipe, so that running one leaves the others
        tag = class_tag()  # the bf16 CPU's files (the first measured) have no tag
        path = save_results(f"recipe-{recipe}" + (f"-{args.epochs}ep" if args.epochs else "")
                            + ("" if tag == "bf16" else f"-{tag}"),
                            {"seeds": args.seeds, "runs": runs})
        print(f"raw results: {path}")


if __name__ == "__main__":
    main()
