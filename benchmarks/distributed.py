"""Data-parallel scaling: one training process against N (DDP, gloo on CPU, NCCL on CUDA), on the same data.

For each case, each repeat, in a fresh process tree one after the other:

* ``1 process``: ``imgcls train`` with every core (torch's default threads);
* ``N processes``: ``imgcls train --nproc N`` (each process cores/N threads, as the launcher sets them);
* ``N processes, --sync-bn``: the same with BatchNorm statistics over the global batch.

All train the same global batch (``--batch-size``) for ``--epochs`` epochs, with no report.  The figure is
the training throughput: images per second of the epochs after the first (metrics.jsonl's images_per_sec,
which counts the global batch), median over those epochs and the repeats; the scaling efficiency is
``throughput(N) / (N x throughput(1))``.  Wall time of the whole command is printed beside it.

On a 2-core CPU two processes share the two cores that one process already uses with two threads, and
they add a gradient all-reduce (and with --sync-bn one per BatchNorm layer) every step: expect an
efficiency well under 1/2 x 2 = 1, that is, no speed-up.  DDP pays on several GPUs or machines.

    python benchmarks/distributed.py                              # flowers.zip at 64x64, fastnet_small, 2 processes
    python benchmarks/distributed.py --data ../shared/data/cifar10-jpg.zip --nproc 2 --repeats 3
    python benchmarks/distributed.py --device cuda --nproc 4      # on a machine with 4 GPUs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flowers.zip"


def _run(args, nproc: int, sync_bn: bool, cache: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(args.data), "--image-size", str(args.image_size),
               "--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--no-report",
               "--device", args.device, "--out", out, "--name", "run", *args.extra]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        if sync_bn:
            cmd += ["--sync-bn"]
        child = common.run_child(cmd, env={"IMGCLS_DATA_DIR": str(cache)})
        records = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
        run = json.loads((Path(out) / "run" / "run.json").read_text())
    return {"images_per_sec": [r["images_per_sec"] for r in records[1:]], "wall_seconds": child["wall_seconds"],
            "test_accuracy": run["test_accuracy"]}


def setup(doc: str, image_size: int, epochs: int, epochs_help: str) -> tuple[argparse.Namespace, dict]:
    """The command line shared by the data-parallel benchmarks, parsed; the hardware line printed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--model", default="fastnet_small", help="trained from scratch, so no weights to load")
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more imgcls train flags")
    common.add_cpu_class_argument(parser)
    args = parser.parse_args()
    common.enter_cpu_class(args.cpu_class)
    if not args.data.exists():
        sys.exit(f"{args.data} does not exist; give --data a folder or zip of class folders")
    hw = common.hardware_class(common.cpu_class_env(args.cpu_class))
    print(common.hardware_line(hw))
    return args, hw


def run_cases(args, cases: list[tuple[str, int, bool]], run, describe) -> dict[str, list[dict]]:
    """``run(args, nproc, flag, cache)`` for every case, each repeat, after one untimed run that fills the
    decoded-image cache; ``describe(result)`` is printed after each."""
    results = {name: [] for name, _, _ in cases}
    with tempfile.TemporaryDirectory() as cache:
        run(argparse.Namespace(**{**vars(args), "epochs": 1}), 1, cases[0][2], Path(cache))  # a warm cache
        for repeat in range(args.repeats):
            for name, nproc, flag in cases:
                r = run(args, nproc, flag, Path(cache))
                results[name].append(r)
                print(f"  repeat {repeat + 1}, {name}: {describe(r)}", flush=True)
    return results


def main() -> None:
    args, hw = setup(__doc__, 64, 3, "epochs per run; the first is not counted")
    cases = [("1 process", 1, False), (f"{args.nproc} processes", args.nproc, False),
             (f"{args.nproc} processes, --sync-bn", args.nproc, True)]
    results = run_cases(args, cases, _run, lambda r: (
        f"{statistics.median(r['images_per_sec']):,.0f} img/s, {r['wall_seconds']:.1f} s, "
        f"test accuracy {r['test_accuracy']:.4f}"))
    base = statistics.median(v for r in results["1 process"] for v in r["images_per_sec"])
    print(f"\n{args.data.name} at {args.image_size}x{args.image_size}, {args.model}, global batch {args.batch_size}, "
          f"{args.epochs} epochs (the first not counted), {args.repeats} repeats, device {args.device}:")
    print(f"{'case':<28} {'img/s median [min, max]':>26} {'speed-up':>9} {'efficiency':>10} {'wall s':>16}")
    summary = {}
    for name, nproc, _ in cases:
        rates = [v for r in results[name] for v in r["images_per_sec"]]
        median = statistics.median(rates)
        summary[name] = {"processes": nproc, "images_per_sec": rates, "median": median,
                         "speedup": median / base, "efficiency": median / base / nproc,
                         "wall_seconds": [r["wall_seconds"] for r in results[name]],
                         "test_accuracy": [r["test_accuracy"] for r in results[name]]}
        print(f"{name:<28} {common.spread(rates, ',.0f'):>26} {median / base:>8.2f}x {median / base / nproc:>10.2f} "
              f"{common.spread(summary[name]['wall_seconds']):>16}")
    path = common.save_results(f"distributed-{common.class_tag()}", {
        "command": " ".join(sys.argv), "data": str(args.data), "model": args.model, "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size, "repeats": args.repeats, "device": args.device, "hardware": hw,
        "cases": summary, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
