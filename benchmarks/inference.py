"""Inference throughput: images per second at batch 1, 32 and 256, PyTorch eager against ONNX Runtime, on CPU.

Models: seed 000's CNN (seed_tf_tutorial) and the fast CIFAR network (fastnet)
at 3x32x32, the latter with and without the 6-view test-time augmentation
(flips and one-pixel shifts) that the cifar10-fast recipe keeps with it.  Throughput does not depend on the
weights, so each model is built with its initial weights, saved as a
checkpoint and exported with `imgcls export` (checked against PyTorch).  Each
call takes uint8 images and returns probabilities: normalisation, TTA and
softmax are inside the timed call on both sides.

PyTorch runs eagerly in fp32 with channels_last inputs (what `imgcls.load`,
`predict` and `serve` use, so that predictions do not depend on the CPU) and with bf16 autocast +
channels_last (what training uses where the CPU has AMX/AVX512-BF16); ONNX
Runtime runs the fp32 graph.  Both use all cores.

    python benchmarks/inference.py [--rounds 5] [--cpu-class avx2]

Prints median [min, max] images/s over rounds (each round: enough calls for
about a second), and ONNX Runtime / PyTorch ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    add_cpu_class_argument,
    class_tag,
    enter_cpu_class,
    machine_line,
    save_results,
    spread,
)

MODELS = {
    "seed_tf_tutorial": {"arch": "seed_tf_tutorial", "tta": "none"},
    "fastnet (flip-translate TTA)": {"arch": "fastnet", "tta": "flip-translate"},
    "fastnet": {"arch": "fastnet", "tta": "none"},
}
BATCHES = (1, 32, 256)


def make_checkpoint(arch: str, tta: str, folder: Path) -> Path:
    from imgcls import __version__
    from imgcls.checkpoint import save_checkpoint
    from imgcls.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, in_chans=3, num_classes=10, img_size=(32, 32)).eval()
    meta = {"arch": arch, "arch_kwargs": model.arch_kwargs, "classes": [f"c{i}" for i in range(10)],
            "input_shape": [3, 32, 32], "normalize": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]},
            "resize": "stretch", "tta": tta, "dataset": "benchmark", "imgcls_version": __version__, "epoch": 0}
    return save_checkpoint(folder / f"{arch}-{tta}.safetensors", model, meta)


def throughput(predict, images: np.ndarray, rounds: int) -> list[float]:
    """images/s of ``predict(images)`` per round; a round repeats the call for about a second."""
    predict(images)  # warm-up (allocations, first-call setup)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        predict(images)
        calls += 1
    per_round = max(1, int(calls / (time.perf_counter() - start)))
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            predict(images)
        out.append(per_round * len(images) / (time.perf_counter() - start))
    return out


def main() -> None:
    import imgcls
    from imgcls.export import export_onnx, load_onnx
    from imgcls.inference import resolve_runtime
    from imgcls.startup import keep_freed_memory

    keep_freed_memory()  # as imgcls predict and serve do: a program that predicts through imgcls.load opts in
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    add_cpu_class_argument(parser)  # ONNX Runtime has no ISA cap: under avx2 it still uses all the CPU has
    args = parser.parse_args()
    enter_cpu_class(args.cpu_class)
    print(f"machine: {machine_line()}; {torch.get_num_threads()} torch threads")
    print(f"images/s, median [min, max] over {args.rounds} rounds")
    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in MODELS.items():
            ckpt = make_checkpoint(spec["arch"], spec["tta"], Path(tmp))
            onnx_path = Path(tmp) / f"{ckpt.stem}.onnx"
            check = export_onnx(ckpt, out=onnx_path)
            fast = imgcls.load(ckpt)  # imgcls.load predicts in fp32; this one gets the training runtime's speed-ups
            fast.runtime = resolve_runtime("cpu", "auto", "auto")
            if fast.runtime.channels_last:
                fast.model.to(memory_format=torch.channels_last)
            runtimes = {"torch fp32": imgcls.load(ckpt), "torch bf16": fast, "onnxruntime": load_onnx(onnx_path)}
            if not fast.runtime.bf16:
                del runtimes["torch bf16"]  # this CPU has no fast bf16: the same as fp32
            print(f"\n{name} (ONNX max |diff| of probabilities {check['max_abs_diff_probabilities']:.1e})")
            print(f"  {'batch':>5s} " + " ".join(f"{r:>26s}" for r in runtimes) + f" {'ORT / torch fp32':>17s}")
            results[name] = {}
            for batch in BATCHES:
                images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
                row = {r: throughput(p.proba_of_arrays, images, args.rounds) for r, p in runtimes.items()}
                results[name][batch] = row
                ratio = np.median(row["onnxruntime"]) / np.median(row["torch fp32"])
                print(f"  {batch:5d} " + " ".join(f"{spread(v, '.0f'):>26s}" for v in row.values()) + f" {ratio:>17.2f}")
    tag = class_tag()  # the bf16 CPU's file (the first measured) has no tag
    doc = {"rounds": args.rounds, "images_per_sec": results}
    print(f"\nraw results: {save_results('inference' + ('' if tag == 'bf16' else f'-{tag}'), doc)}")


if __name__ == "__main__":
    main()
