"""What experiment tracking costs: training with --track none, tensorboard, mlflow and both, as medians over repeats.

    python benchmarks/tracking.py                                 # digits, 6 epochs, 5 repeats: a few minutes
    python benchmarks/tracking.py --epochs 2 --repeats 1          # a check that it runs
    python benchmarks/tracking.py --mlflow-uri http://127.0.0.1:5000   # MLflow over HTTP instead of the local SQLite

Every run trains the same tiny fastnet_small on the built-in digits (data cached after the first) in this process,
the modes one after the other in each repeat, each repeat starting at the next mode (so drift on a shared machine
spreads over all modes alike). Two figures per mode, median [min, max] over the repeats:

- **per epoch**: the median time from one epoch's end to the next's (the first epoch left out): the training steps,
  the trackers' step hooks and their epoch hook. Its difference to ``none`` is tracking's cost per epoch.
- **fixed**: the rest of a run's wall time (start, test, end): opening the store or event file, logging the
  params, the figures and artefacts at the end, and closing.

A warm-up run of each mode comes first, not counted: it imports TensorBoard and MLflow and creates the SQLite store.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import class_tag, machine_line, save_results, spread

import imgcls

MODES = {"none": [], "tensorboard": ["tensorboard"], "mlflow": ["mlflow"], "both": ["tensorboard", "mlflow"]}


class EpochClock:
    """The time of every epoch's end (a callback placed before the trackers)."""

    def __init__(self):
        self.ends = []

    def on_epoch_end(self, state, record):
        self.ends.append(time.perf_counter())


def run_once(mode: str, out: Path, args, mlflow_uri: str | None) -> dict:
    clock = EpochClock()
    extra = {"mlflow_uri": mlflow_uri} if mlflow_uri and "mlflow" in MODES[mode] else {}
    started = time.perf_counter()
    imgcls.train(out=str(out), quiet=True, report=False, epochs=args.epochs, batch_size=args.batch_size,
                 model="fastnet_small", model_option={"widths": args.widths}, track=MODES[mode],
                 callbacks=[clock], **extra)
    wall = time.perf_counter() - started
    gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    return {"wall": wall, "per_epoch": statistics.median(gaps) if gaps else float("nan"),
            "fixed": wall - sum(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (at least 2; default: 6)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each mode (default: 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64: 23 steps an "
                        "epoch, the step hook at 3 of them)")
    parser.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64], help="fastnet_small's widths")
    parser.add_argument("--mlflow-uri", help="an MLflow server to log to (default: sqlite:///<out>/mlflow.db)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/tracking-<hardware class>.json")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the per-epoch figure is a time between two epochs' ends")
    print(machine_line(), flush=True)
    print(f"digits, fastnet_small widths {args.widths}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.repeats} repeats; MLflow store {args.mlflow_uri or 'sqlite:///<out>/mlflow.db'}", flush=True)
    results: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="imgcls-bench-tracking-") as tmp:
        out = Path(tmp)
        for mode in args.modes:
            run_once(mode, out, argparse.Namespace(**{**vars(args), "epochs": 2}), args.mlflow_uri)
        for repeat in range(args.repeats):
            first = repeat % len(args.modes)
            for mode in args.modes[first:] + args.modes[:first]:
                results[mode].append(run_once(mode, out, args, args.mlflow_uri))
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    base = statistics.median(r["per_epoch"] for r in results[args.modes[0]])
    print(f"\n{'mode':12s} {'per epoch, ms':>26s} {'vs ' + args.modes[0]:>12s} {'fixed, s':>22s}")
    for mode, runs in results.items():
        per_epoch = [r["per_epoch"] * 1e3 for r in runs]
        over = statistics.median(per_epoch) - base * 1e3
        print(f"{mode:12s} {spread(per_epoch):>26s} {over:+10.1f} ms {spread([r['fixed'] for r in runs], '.2f'):>22s}")
    if args.save:
        path = save_results(f"tracking-{class_tag()}", {"settings": {k: v for k, v in vars(args).items() if k != "save"},
                                         "runs": results})
        print(f"results: {path}")


if __name__ == "__main__":
    main()
