"""One training step of fastnet (forward and backward, bf16 autocast, channels_last), eager against torch.compile.

    python benchmarks/compile_step.py                       # CUDA when there is a GPU, else CPU
    python benchmarks/compile_step.py --batch-size 1024 --modes default max-autotune-no-cudagraphs

Prints, for eager and each compile mode, the first step (which includes the
compilation) and the median [min, max] of the next ``--steps`` steps.  The
optimiser step is left out: it is the same code either way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine_line

from imgcls.models.registry import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", nargs="+", default=["default"], help="torch.compile modes to time")
    args = parser.parse_args()
    dev, bs = args.device, args.batch_size
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    x = torch.randn(bs, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,), device=dev)

    def make():
        torch.manual_seed(0)
        return create_model("fastnet", 3, 10, (32, 32)).to(dev).to(memory_format=torch.channels_last).train()

    def step(model):
        with torch.autocast(dev, torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()

    def show(name, model):
        t = time.perf_counter()
        step(model)
        sync()
        first = time.perf_counter() - t
        times = []
        for _ in range(args.steps):
            sync()
            t = time.perf_counter()
            step(model)
            sync()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"{name:36s} first step {first:7.2f} s   then {med * 1e3:8.2f} ms [{min(times) * 1e3:.2f}, "
              f"{max(times) * 1e3:.2f}]   {bs / med:9.0f} img/s", flush=True)

    print(f"machine: {machine_line()}; batch {bs}, {args.steps} timed steps", flush=True)
    show("eager", make())
    for mode in args.modes:
        torch._dynamo.reset()
        show(f"torch.compile {mode}", torch.compile(make(), mode=None if mode == "default" else mode))


if __name__ == "__main__":
    main()
