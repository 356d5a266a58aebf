"""Tuning: a fixed trial budget with and without pruning, against the default settings trained once.

On ../shared/data/flowers.zip (4,317 photos, 5 classes), at a small image size, with a model trained from
scratch (fastnet_small, whose default space searches lr, weight decay, label smoothing, batch size, optimiser,
augmentation and widths: `imgcls tune --show-space`), one after the other, each in a fresh process:

  (a) `imgcls tune --trials N --epochs E --pruner median`      the default pruner
  (b) the same with `--pruner none`                             every trial runs its E epochs
  (c) `imgcls train` with the default settings (no search) and `--time-budget` equal to (a)'s wall time, with
      `--epochs 4*N*E` so that the budget, not the epochs, ends it: the same time spent on one run (the budget
      counts from the data being ready, so (c)'s wall time is a few seconds more)

All three use one seed, so one split (imgcls draws the test split first from --seed) and one data cache
(decoded by two untimed warm-up epochs; the second one's time is printed as the per-epoch estimate).  (a) and
(b) use the same TPE seed, so their first trials draw the same values.

Prints, for (a) and (b): the best trial's val accuracy and its test accuracy (run.json of that trial: the test
split is scored once per trial, and the trial is chosen by val alone), wall time, finished trials per hour, pruned
trials; for (c): its test accuracy, best val accuracy, epochs and wall time; the hardware class; and each exact
command.  Raw numbers go to benchmarks/results/tune-flowers[-quick]-<class>.json.

    python benchmarks/tune.py                # N=12 trials of E=4 epochs at 64x64 (about 20-25 min on 2 cores)
    python benchmarks/tune.py --quick        # 6 trials of 2 epochs at 32x32, on 300 of the photos: a check
    python benchmarks/tune.py --trials 30 --epochs 6 --image-size 96

The zips are read from ../shared/data, or from the folder IMGCLS_BENCH_DATA names.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path

from common import SHARED, class_tag, machine, machine_line, run_child, save_results

DATA = "flowers.zip"
QUICK = {"trials": 6, "epochs": 2, "image_size": 32, "images": 300}  # --quick: a check that it runs, no figure


def imgcls(*args) -> list[str]:
    return [sys.executable, "-m", "imgcls.cli", *map(str, args)]


def small_zip(source: Path, dest: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class folder of ``source`` (in name order), as a zip."""
    with zipfile.ZipFile(source) as zin:
        names = sorted(n for n in zin.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
        by_class: dict[str, list[str]] = {}
        for name in names:
            by_class.setdefault(str(Path(name).parent), []).append(name)
        with zipfile.ZipFile(dest, "w") as zout:
            for members in by_class.values():
                for name in members[:per_class]:
                    zout.writestr(name, zin.read(name))
    return dest


def study(data: Path, out: Path, name: str, pruner: str, args, common: list[str], env: dict) -> dict:
    """One `imgcls tune` in a fresh process: its command, wall time and what its study.json says."""
    cmd = imgcls("tune", "--data", data, "--trials", args.trials, "--epochs", args.epochs, "--pruner", pruner,
                 "--study", name, "--out", out, "--quiet", *common)
    proc = run_child(cmd, env=env, timeout=24 * 3600)
    summary = json.loads((out / name / "study.json").read_text())
    best_run = Path(summary["best_run"]) if summary["best_run"] else None
    test = json.loads((best_run / "run.json").read_text())["test_accuracy"] if best_run else None
    finished = summary["finished"]
    return {"command": shlex.join(cmd), **proc, "finished": finished, "counts": summary["counts"],
            "best_trial": summary["best_trial"], "best_val_accuracy": summary["best_value"],
            "best_test_accuracy": test, "best_params": summary["best_params"],
            "trials_per_hour": finished / proc["wall_seconds"] * 3600,
            "epochs_trained": sum(t["epochs"] for t in summary["trials"])}


def single(data: Path, out: Path, budget_s: float, args, common: list[str], env: dict) -> dict:
    """(c): the default settings trained once, stopped by a time budget of ``budget_s``."""
    cmd = imgcls("train", "--data", data, "--epochs", 4 * args.trials * args.epochs, "--time-budget",
                 f"{budget_s:.0f}s", "--name", "default", "--out", out, "--no-report", "--quiet", *common)
    proc = run_child(cmd, env=env, timeout=24 * 3600)
    run = json.loads((out / "default" / "run.json").read_text())
    history = [json.loads(line) for line in (out / "default" / "metrics.jsonl").read_text().splitlines()]
    return {"command": shlex.join(cmd), **proc, "test_accuracy": run["test_accuracy"],
            "best_val_accuracy": max(r["val_accuracy"] for r in history), "epochs_run": run["epochs_run"],
            "budget_seconds": round(budget_s)}


def warm_up(data: Path, out: Path, common: list[str], env: dict) -> dict:
    """Two untimed epochs of the default settings: they decode the images into the shared cache, and the second
    gives the seconds an epoch takes once started (the first also pays one-off costs)."""
    cmd = imgcls("train", "--data", data, "--epochs", 2, "--name", "warm-up", "--out", out, "--no-report",
                 "--quiet", *common)
    proc = run_child(cmd, env=env)
    epochs = [json.loads(line) for line in (out / "warm-up" / "metrics.jsonl").read_text().splitlines()]
    return {**proc, "epoch_seconds": epochs[-1]["train_seconds"], "data_seconds":
            json.loads((out / "warm-up" / "run.json").read_text())["data_seconds"]}


def show(label: str, r: dict) -> None:
    counts = r["counts"]
    print(f"{label}: best val accuracy {r['best_val_accuracy']:.4f} (trial {r['best_trial']}), its test accuracy "
          f"{r['best_test_accuracy']:.4f}; wall {r['wall_seconds']:.0f} s; {r['finished']} trials, "
          f"{r['trials_per_hour']:.1f} trials/hour; {counts['pruned']} pruned, {counts['failed']} failed; "
          f"{r['epochs_trained']} epochs trained")
    print(f"  {r['command']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / DATA, help="a zip or folder of class folders")
    parser.add_argument("--trials", type=int, default=12, help="trials per study (N)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (E)")
    parser.add_argument("--image-size", type=int, default=64, help="pixels a side")
    parser.add_argument("--model", default="fastnet_small", help="a model trained from scratch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['trials']} trials of {QUICK['epochs']} epochs at {QUICK['image_size']} px "
                             f"on {QUICK['images']} of the images: checks that it runs (its figures mean nothing)")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.image_size = QUICK["trials"], QUICK["epochs"], QUICK["image_size"]
    if not args.data.exists():
        sys.exit(f"{args.data} is absent: give --data or set IMGCLS_BENCH_DATA")
    print(f"machine: {machine_line()}", flush=True)
    hw = machine()["hardware"]
    bf16 = (hw.get("flags") or {}).get("avx512_bf16")
    print(f"hardware class: {hw['class']} | {hw.get('cpu')} | AVX512-BF16: {'yes' if bf16 else 'no'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if args.quick:
            data = small_zip(args.data, tmp / "flowers-small.zip", QUICK["images"] // 5)
        env = {"IMGCLS_DATA_DIR": str(tmp / "cache")}  # one cache for all: decoded by the warm-up alone
        common = ["--image-size", args.image_size, "--model", args.model, "--seed", args.seed]
        warm = warm_up(data, tmp / "runs", common, env)
        print(f"warm-up (untimed in the comparison): data {warm['data_seconds']:.1f} s, the second epoch of the "
              f"default settings {warm['epoch_seconds']:.1f} s; a study of {args.trials} x {args.epochs} epochs without "
              f"pruning is about {args.trials * args.epochs * warm['epoch_seconds'] / 60:.1f} min of epochs",
              flush=True)
        runs = {"median": study(data, tmp / "runs", "pruned", "median", args, common, env)}
        show("(a) --pruner median", runs["median"])
        runs["none"] = study(data, tmp / "runs", "unpruned", "none", args, common, env)
        show("(b) --pruner none", runs["none"])
        runs["default"] = single(data, tmp / "runs", runs["median"]["wall_seconds"], args, common, env)
        d = runs["default"]
        print(f"(c) default settings, one run for (a)'s wall time: test accuracy {d['test_accuracy']:.4f}, best val "
              f"accuracy {d['best_val_accuracy']:.4f}; {d['epochs_run']} epochs in {d['wall_seconds']:.0f} s "
              f"(--time-budget {d['budget_seconds']}s)")
        print(f"  {d['command']}")
    speed_up = runs["median"]["trials_per_hour"] / runs["none"]["trials_per_hour"]
    print(f"pruning: {runs['median']['trials_per_hour']:.1f} against {runs['none']['trials_per_hour']:.1f} trials "
          f"per hour ({speed_up:.2f}x); wall {runs['median']['wall_seconds']:.0f} s against "
          f"{runs['none']['wall_seconds']:.0f} s")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    tag = class_tag()
    path = save_results(f"tune-flowers{'-quick' if args.quick else ''}-{tag}",
                        {"data": str(args.data), "trials": args.trials, "epochs": args.epochs,
                         "image_size": args.image_size, "model": args.model, "seed": args.seed, "quick": args.quick,
                         "warm_up": warm, "runs": runs, "pruning_speed_up": speed_up,
                         "command": shlex.join([sys.executable, *sys.argv])})
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
