"""Memory of data-parallel training: what a node's processes hold, with and without sharing the split images.

Each case, each repeat, in a fresh process tree one after the other (after one untimed run that fills the
decoded-image cache): ``imgcls train`` in one process; ``imgcls train --nproc N``, whose processes map one
copy of the split images (``distributed.share_splits``); and the same with ``IMGCLS_SHARE_SPLITS=0``, where
each process holds its own copy, as before sharing existed.

The figure is the proportional set size (PSS, from /proc/PID/smaps_rollup) summed over the whole process
tree: pages shared by k processes count 1/k to each, so the sum is the memory the job takes.  It is sampled
every 0.5 s; printed are its peak and its median over the second half of the run (training, past the data
loading), median over the repeats.  The decoded split images take N x H x W x C bytes in all.

    python benchmarks/ddp_memory.py                    # flowers.zip at 128x128, 1 epoch, 2 processes
    python benchmarks/ddp_memory.py --image-size 224 --nproc 2 --repeats 3
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import distributed


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(status.split("PPid:")[1].split()[0])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _run(args, nproc: int, share: bool, cache: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(args.data), "--image-size", str(args.image_size),
               "--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--no-report", "--device", args.device, "--out", out, "--name", "run", *args.extra]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        env = {**os.environ, "IMGCLS_DATA_DIR": str(cache), "IMGCLS_SHARE_SPLITS": "1" if share else "0"}
        started = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples = []
        while proc.poll() is None:
            samples.append(sum(_pss_kib(pid) for pid in _tree(proc.pid)) / 1024)
            time.sleep(0.5)
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    late = samples[len(samples) // 2:]
    return {"peak_mib": max(samples), "training_mib": statistics.median(late), "wall_seconds": time.time() - started}


def main() -> None:
    args, hw = distributed.setup(__doc__, 128, 1, "epochs per run")
    cases = [("1 process", 1, True), (f"{args.nproc} processes, images shared", args.nproc, True),
             (f"{args.nproc} processes, a copy each", args.nproc, False)]
    results = distributed.run_cases(args, cases, _run, lambda r: (
        f"peak {r['peak_mib']:,.0f} MiB, training {r['training_mib']:,.0f} MiB, {r['wall_seconds']:.1f} s"))
    print(f"\n{args.data.name} at {args.image_size}x{args.image_size}, {args.model}, batch {args.batch_size}, "
          f"{args.epochs} epoch(s), {args.repeats} repeats; summed PSS of the process tree, MiB:")
    print(f"{'case':<34} {'training, median [min, max]':>28} {'peak, median [min, max]':>26}")
    summary = {}
    for name, nproc, share in cases:
        training = [r["training_mib"] for r in results[name]]
        peak = [r["peak_mib"] for r in results[name]]
        summary[name] = {"processes": nproc, "shared": share, "training_mib": training, "peak_mib": peak}
        print(f"{name:<34} {common.spread(training, ',.0f'):>28} {common.spread(peak, ',.0f'):>26}")
    path = common.save_results(f"ddp-memory-{common.class_tag()}", {
        "command": " ".join(sys.argv), "data": str(args.data), "model": args.model, "image_size": args.image_size,
        "epochs": args.epochs, "batch_size": args.batch_size, "repeats": args.repeats, "hardware": hw,
        "cases": summary, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
