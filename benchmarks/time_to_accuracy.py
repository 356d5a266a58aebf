"""Time to the peer's accuracy: imgcls against the seeds' Keras pipelines, side by side in one run.

For each dataset (the zips in ../shared/data) and each seed this runs, each in
a fresh process:

* the peer: the seed's Keras model on TensorFlow (CPU build, in its own venv,
  created on first use; see benchmarks/peer_keras.py), 10 epochs as the seed;
* imgcls with the same architecture, trained imgcls's way;
* imgcls's fastest recipe for the dataset;

the two imgcls runs once with an empty data cache ("first": the zip is
decoded) and once from the cache ("cached").  Every process scores the test
set after each epoch, with that time kept off its clock.  The target is the
peer's final test accuracy (median over seeds).  Time to target is the
wall-clock time from launching the process to the end of the first epoch
whose test accuracy reaches the target: imports, data loading and training
included, test scoring excluded.  Peak RSS is the process's own.

    python benchmarks/time_to_accuracy.py                      # both datasets, seeds 0 1 2
    python benchmarks/time_to_accuracy.py --cases mnist --seeds 0
    python benchmarks/time_to_accuracy.py --keras-python /path/to/venv/bin/python
    python benchmarks/time_to_accuracy.py --cpu-class avx2     # as on an AVX2-only CPU, the peer too

Figures print as median [min, max] over seeds, with ratios (peer time /
imgcls time, per seed, then the median); all raw numbers go to
benchmarks/results/time_to_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import (
    ROOT,
    SHARED,
    add_cpu_class_argument,
    class_tag,
    enter_cpu_class,
    keras_python,
    machine_line,
    run_child,
    save_results,
    spread,
)

# The imgcls side of each case: flat training options (as the CLI flags).
CASES = {
    "cifar10": {
        "zip": "cifar10-jpg.zip",
        # seed 000's CNN with a one-cycle schedule at twice the seed's learning rate, on all 50,000 images.
        "same_arch": {"model": "seed_tf_tutorial", "optimizer": "adam", "lr": 2e-3, "batch_size": 32,
                      "schedule": "onecycle", "epochs": 4, "val_fraction": 0.0, "restore_best": False},
        # The recipe with its schedule compressed into one epoch of batches of 384, on a narrow fastnet
        # (16/32/64) whose whitening stem is frozen from the start (whiten_bias_epochs=0: no gradient flows
        # back into the stem, about 25% of a step at this width), the first 3/4 of the epoch on 24x24 images
        # (progressive resizing), Muon momentum 0.8, no lookahead (over a single epoch it cost about a
        # point), flip TTA. Seeds 0-2: 69.76 / 69.17 / 69.01% in 4.8 s of training (one-off runs). The previous
        # fastest (batch 512, the stem's bias trained, half the epoch at 24x24, Muon momentum 0.6): 70.58 /
        # 72.13 / 69.84% in 5.6-5.9 s; batch 384 alone adds about a point for 2% more time per image.
        "fastest": {"recipe": "cifar10-fast", "epochs": 1, "batch_size": 384, "lookahead": False, "tta": "flip",
                    "muon_momentum": 0.8, "model_option": {"widths": [16, 32, 64], "whiten_bias_epochs": 0},
                    "low_res_scale": 0.75, "low_res_epochs": 0.75},
    },
    "mnist": {
        "zip": "mnist-png.zip",
        "same_arch": {"model": "seed_mnist_oneconv", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                      "nesterov": True, "batch_size": 128, "schedule": "onecycle", "epochs": 4,
                      "label_smoothing": 0.1, "val_fraction": 0.0, "restore_best": False},
        # The recipe with its schedule compressed into one epoch at half the width (16/32/64), with batches
        # of 512 and a longer warmup (0.4 epochs from 2% of the rate): at batch 1024 and mnist-fast's warmup,
        # 2 seeds in 3 ended between 93% and 98.8%. The first half of the epoch on 21x21 images: seeds 0-2
        # 99.52 / 99.31 / 99.45% in 4.1-4.4 s of training, against 99.46 / 99.05 / 99.45% in 5.1-5.4 s.
        "fastest": {"recipe": "mnist-fast", "epochs": 1, "batch_size": 512, "warmup_epochs": 0.4,
                    "warmup_start": 0.02, "model_option": {"widths": [16, 32, 64]}, "low_res_scale": 0.75,
                    "low_res_epochs": 0.5},
    },
}

# The child process for an imgcls run: train with the given options, score the test split (fp32, the
# model's own TTA, as `imgcls evaluate`) after every epoch, and keep that time off the clock.
CHILD = r"""
import json, sys, time
t0 = float(__import__("os").environ["BENCH_T0"])
import imgcls
from imgcls.evaluation.evaluate import evaluate_model
from imgcls.inference import scoring_runtime
opts, out = json.loads(sys.argv[1]), sys.argv[2]
epochs, excluded = [], [0.0]

def score(state, record):
    start = time.time()
    rt = scoring_runtime(state.runtime.device)
    test = state.dataset.splits["test"]
    metrics, _ = evaluate_model(state.model, state.meta, test, state.dataset.classes, rt, 1024)
    epochs.append({"epoch": record["epoch"], "seconds": start - t0 - excluded[0],
                   "test_accuracy": metrics["accuracy"], "images_per_sec": record["images_per_sec"]})
    excluded[0] += time.time() - start

run = imgcls.train(quiet=True, report=False, on_epoch_end=score, **opts)
info = json.loads((run.path / "run.json").read_text())
json.dump({"epochs": epochs, "final_test_accuracy": run.test_metrics["accuracy"],
           "data_seconds": info["data_seconds"]}, open(out, "w"))
"""


def first_reaching(epochs: list[dict], target: float, key: str) -> float | None:
    """Seconds at the end of the first epoch whose test accuracy reaches ``target`` (None: never)."""
    return next((e[key] for e in epochs if e["test_accuracy"] >= target), None)


def run_peer(python: str, case: str, seed: int, tmp: Path) -> dict:
    out = tmp / f"peer-{case}-{seed}.json"
    cmd = [python, str(ROOT / "benchmarks" / "peer_keras.py"), "--case", case, "--zip", str(SHARED / CASES[case]["zip"]),
           "--seed", str(seed), "--json", str(out)]
    proc = run_child(cmd)
    doc = json.loads(out.read_text())
    epochs = [{"epoch": e["epoch"], "seconds": doc["fit_start_since_launch"] + e["train_seconds"],
               "test_accuracy": e["test_accuracy"]} for e in doc["epochs"]]
    return {**proc, "epochs": epochs, "final_test_accuracy": doc["final_test_accuracy"],
            "data_seconds": doc["load_seconds"], "tensorflow": doc["tensorflow_version"]}


def run_imgcls(options: dict, seed: int, cache: Path, tmp: Path, tag: str) -> dict:
    out = tmp / f"{tag}.json"
    opts = {**options, "seed": seed, "out": str(tmp / "runs"), "name": tag}
    proc = run_child([sys.executable, "-c", CHILD, json.dumps(opts), str(out)], env={"IMGCLS_DATA_DIR": str(cache)})
    return {**proc, **json.loads(out.read_text())}


def command(options: dict, data: str) -> str:
    from imgcls.cli import option_as_flag

    return " ".join(["imgcls train --data", data] + [option_as_flag(k, v) for k, v in options.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--keras-python", help="a Python with tensorflow-cpu (default: a venv made on first use)")
    add_cpu_class_argument(parser)  # the Keras peer runs under the same caps (TensorFlow's oneDNN reads the ISA one)
    args = parser.parse_args()
    enter_cpu_class(args.cpu_class)
    print(f"machine: {machine_line()}", flush=True)
    python = keras_python(args.keras_python)
    results = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for case in args.cases:
            spec = CASES[case]
            data = SHARED / spec["zip"]
            if not data.is_file():
                print(f"{case}: skipped, {data} is absent")
                continue
            runs: dict[str, list[dict]] = {"peer": []}
            for seed in args.seeds:
                runs["peer"].append(run_peer(python, case, seed, tmp))
                for variant in ("same_arch", "fastest"):
                    cache = tmp / f"cache-{case}-{variant}-{seed}"  # empty: the first run decodes the zip
                    for when in ("first", "cached"):
                        tag = f"{case}-{variant}-{when}-{seed}"
                        runs.setdefault(f"{variant}_{when}", []).append(
                            run_imgcls({"data": str(data), **spec[variant]}, seed, cache, tmp, tag))
                print(f"  {case} seed {seed} done", flush=True)
            target = statistics.median(r["final_test_accuracy"] for r in runs["peer"])
            results[case] = {"target": target, "runs": runs,
                             "commands": {v: command(spec[v], str(data)) for v in ("same_arch", "fastest")}}
            report(case, target, runs, results[case]["commands"])
    tag = class_tag()  # the bf16 CPU's file (the first measured) has no tag
    path = save_results("time_to_accuracy" + ("" if tag == "bf16" else f"-{tag}"),
                        {"seeds": args.seeds, "cases": results})
    print(f"raw results: {path}")


def report(case: str, target: float, runs: dict, commands: dict) -> None:
    peer_times = [first_reaching(r["epochs"], target, "seconds") for r in runs["peer"]]
    print(f"\n{case}: target = the peer's final test accuracy, median {target:.4f} "
          f"(peer finals {spread([r['final_test_accuracy'] * 100 for r in runs['peer']], '.2f')} %)")
    print(f"  {'run':22s} {'time to target s':>24s} {'ratio (peer/imgcls)':>24s} {'final acc %':>22s} "
          f"{'data s':>18s} {'peak RSS MiB':>20s}")
    for name, rs in runs.items():
        times = [first_reaching(r["epochs"], target, "seconds") for r in rs]
        reached = [t for t in times if t is not None]
        ratios = [p / t for p, t in zip(peer_times, times) if p is not None and t is not None]
        missed = len(times) - len(reached)
        print(f"  {name:22s} {spread(reached):>24s}{'*' if missed else ' '} "
              f"{(spread(ratios, '.2f') if name != 'peer' else '1'):>23s} "
              f"{spread([r['final_test_accuracy'] * 100 for r in rs], '.2f'):>22s} "
              f"{spread([r['data_seconds'] for r in rs], '.2f'):>18s} {spread([r['peak_rss_mib'] for r in rs], '.0f'):>20s}")
        if missed:
            print(f"    * {missed} of {len(times)} runs never reached the target")
    print(f"  peer: benchmarks/peer_keras.py --case {case} (Keras on TensorFlow {runs['peer'][0]['tensorflow']} CPU, "
          f"10 epochs)")
    for variant, cmd in commands.items():
        print(f"  {variant}: {cmd}")


if __name__ == "__main__":
    main()
