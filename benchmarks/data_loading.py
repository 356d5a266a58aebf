"""Time decoding the MNIST and CIFAR-10 zips, first into an empty cache and then from the cache.

Each repeat gives a new, empty cache folder to two fresh processes in turn:
the first really decodes every image, and the second really reads the cache,
as a second `imgcls train` would.  (Reading the cache in the process that just
decoded flattered it: that process's allocator already held the pages.)

    python benchmarks/data_loading.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from common import SHARED

PROBE = """
import sys, time
from imgcls.config import DataConfig
from imgcls.data.registry import build_dataset
t = time.perf_counter(); build_dataset(DataConfig(dataset=sys.argv[1])); print(time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; median [min, max] over {args.repeats} pairs of fresh processes")
    for name in ("mnist-png.zip", "cifar10-jpg.zip"):
        path = SHARED / name
        if not path.is_file():
            print(f"{name}: skipped, {path} is absent")
            continue
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, IMGCLS_DATA_DIR=cache)
                runs.append({key: float(subprocess.run([sys.executable, "-c", PROBE, str(path)], env=env, check=True,
                                                        capture_output=True, text=True).stdout)
                             for key in ("first", "cached")})  # in this order: the first fills the cache
        for key in ("first", "cached"):
            values = [r[key] for r in runs]
            print(f"{name:16s} {key:6s} load {statistics.median(values):6.2f} s "
                  f"[{min(values):.2f}, {max(values):.2f}]")


if __name__ == "__main__":
    main()
