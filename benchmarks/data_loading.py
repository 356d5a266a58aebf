"""Time decoding the MNIST and CIFAR-10 zips, first into an empty cache and then from the cache.

Each repeat runs in a fresh process with its own empty cache folder, so the
first load really decodes every image and the second really reads the cache.

    python benchmarks/data_loading.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import SHARED

PROBE = """
import json, sys, time
from imgcls.config import DataConfig
from imgcls.data.registry import build_dataset
cfg = DataConfig(dataset=sys.argv[1])
t = time.perf_counter(); build_dataset(cfg); first = time.perf_counter() - t
t = time.perf_counter(); build_dataset(cfg); cached = time.perf_counter() - t
print(json.dumps({"first": first, "cached": cached}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; median [min, max] over {args.repeats} fresh processes")
    for name in ("mnist-png.zip", "cifar10-jpg.zip"):
        path = SHARED / name
        if not path.is_file():
            print(f"{name}: skipped, {path} is absent")
            continue
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, IMGCLS_DATA_DIR=cache)
                out = subprocess.run([sys.executable, "-c", PROBE, str(path)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                runs.append(json.loads(out))
        for key in ("first", "cached"):
            values = [r[key] for r in runs]
            print(f"{name:16s} {key:6s} load {statistics.median(values):6.2f} s "
                  f"[{min(values):.2f}, {max(values):.2f}]")


if __name__ == "__main__":
    main()
