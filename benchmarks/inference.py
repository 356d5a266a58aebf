"""Inference throughput: images per second at batch 1, 32 and 256, PyTorch eager against ONNX Runtime, on CPU;
and the int8 export against the fp32 one in ONNX Runtime on a real photo run.

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

int8 (``--part int8``, part of ``all``): a run of ``imgcls train --data
../shared/data/flowers.zip`` with its defaults (EfficientNet-Lite2 at 128 px,
stage 1; or ``--int8-run RUN``) is exported in fp32 and, for each calibration
method, as int8 (``imgcls export RUN --int8``, with ``max_drop=1`` so that every
figure is recorded).  Per model: file size, images/s at batch 1 and 64 (the
models take turns within each round, so a busy machine slows them alike), p50
and p99 latency of one image, and test accuracy with top-1 agreement (the
export's own check, on the whole test split).  ONNX Runtime's kernels read
neither ATEN_CPU_CAPABILITY nor ONEDNN_MAX_CPU_ISA: under ``--cpu-class avx2``
it still runs the CPU's VNNI / AMX int8 kernels, so figures for an AVX2-only
CPU (AMD Zen 3: no VNNI) need one.

    python benchmarks/inference.py [--rounds 5] [--cpu-class avx2] [--part all|eager|int8] [--int8-run RUN]

Prints median [min, max] images/s over rounds (each round: enough calls for
about a second), and ONNX Runtime / PyTorch ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    SHARED,
    add_cpu_class_argument,
    class_tag,
    cpu_flags,
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
INT8_BATCHES = (1, 64)
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")  # what ONNX Runtime's int8 kernels can use
LATENCY_CALLS = 200  # batch-1 calls timed one by one for p50 / p99, per model
ORT_NOTE = ("ONNX Runtime is not capped by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA: it uses every int8 "
            "instruction the CPU has (VNNI, AMX) whatever --cpu-class says")


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
    from imgcls.startup import keep_freed_memory

    keep_freed_memory()  # as imgcls predict and serve do: a program that predicts through imgcls.load opts in
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part", choices=("all", "eager", "int8"), default="all",
                        help="eager: PyTorch against ONNX Runtime fp32; int8: the int8 export against fp32")
    parser.add_argument("--int8-run", type=Path, help="run folder to quantize (default: train one on flowers.zip)")
    add_cpu_class_argument(parser)  # ONNX Runtime has no ISA cap: under avx2 it still uses all the CPU has
    args = parser.parse_args()
    enter_cpu_class(args.cpu_class)
    print(f"machine: {machine_line()}; {torch.get_num_threads()} torch threads")
    tag = class_tag()  # the bf16 CPU's file (the first measured) has no tag
    if args.part in ("all", "eager"):
        doc = {"rounds": args.rounds, "images_per_sec": eager_against_onnx(args.rounds)}
        print(f"\nraw results: {save_results('inference' + ('' if tag == 'bf16' else f'-{tag}'), doc)}")
    if args.part in ("all", "int8"):
        doc = int8_against_fp32(args.int8_run, args.rounds)
        print(f"\nraw results: {save_results(f'inference-int8-{tag}', doc)}")


def eager_against_onnx(rounds: int) -> dict:
    """images/s of each MODELS entry, per batch and runtime: {model: {batch: {runtime: [per round]}}}."""
    import imgcls
    from imgcls.export import export_onnx, load_onnx
    from imgcls.inference import resolve_runtime

    print(f"images/s, median [min, max] over {rounds} rounds")
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
                row = {r: throughput(p.proba_of_arrays, images, rounds) for r, p in runtimes.items()}
                results[name][batch] = row
                ratio = np.median(row["onnxruntime"]) / np.median(row["torch fp32"])
                print(f"  {batch:5d} " + " ".join(f"{spread(v, '.0f'):>26s}" for v in row.values()) + f" {ratio:>17.2f}")
    return results


def int8_against_fp32(run: Path | None, rounds: int) -> dict:
    """Size, speed, latency and test accuracy of the fp32 export and of an int8 export per calibration method."""
    from imgcls.export import export_onnx, load_onnx
    from imgcls.quantize import CALIBRATIONS

    flags = cpu_flags()
    print(f"\nint8 against fp32 in ONNX Runtime; CPU int8 flags: "
          f"{' '.join(f if f in flags else '-' + f for f in INT8_FLAGS)}\nnote: {ORT_NOTE}")
    with tempfile.TemporaryDirectory() as tmp:
        run = run or train_flowers(Path(tmp))
        fp32 = export_onnx(run, out=Path(tmp) / "fp32" / "model.onnx")
        models, reports = {"fp32": load_onnx(fp32["path"])}, {"fp32": fp32}
        for method in CALIBRATIONS:
            reports[method] = export_onnx(run, int8=True, calibration=method, max_drop=1.0,
                                          out=Path(tmp) / method / "model-int8.onnx")
            models[f"int8 {method}"] = load_onnx(reports[method]["path"])
        speed = interleaved_speed(models, rounds)
        latency = {name: batch1_latency(clf) for name, clf in models.items()}
    rows = int8_rows(reports, speed, latency)
    print_int8_table(rows, run)
    return {"rounds": rounds, "run": str(run), "note": ORT_NOTE, "cpu_int8_flags": {f: f in flags for f in INT8_FLAGS},
            "models": rows, "exports": reports}


def train_flowers(folder: Path) -> Path:
    """A run of `imgcls train --data flowers.zip` with its defaults, in ``folder``."""
    import imgcls

    data = SHARED / "flowers.zip"
    if not data.is_file():
        raise SystemExit(f"{data} is missing: pass --int8-run RUN, or IMGCLS_BENCH_DATA=<folder with flowers.zip>")
    print(f"training on {data} (imgcls's defaults) ...", flush=True)
    return imgcls.train(data=str(data), out=str(folder / "runs"), quiet=True).path


def interleaved_speed(models: dict, rounds: int) -> dict:
    """{batch: {model: [images/s per round]}}: within a round the models take turns, about a second each."""
    rng = np.random.default_rng(0)
    out = {}
    for batch in INT8_BATCHES:
        c, h, w = next(iter(models.values())).input_shape
        images = rng.integers(0, 256, (batch, h, w, c), dtype=np.uint8)
        calls = {}
        for name, clf in models.items():  # warm-up, and calls per round for about a second
            clf.proba_of_arrays(images)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 0.3:
                clf.proba_of_arrays(images)
                n += 1
            calls[name] = max(1, int(n / (time.perf_counter() - start)))
        out[batch] = {name: [] for name in models}
        for _ in range(rounds):
            for name, clf in models.items():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    clf.proba_of_arrays(images)
                out[batch][name].append(calls[name] * batch / (time.perf_counter() - start))
    return out


def batch1_latency(clf) -> dict:
    """p50 and p99 of LATENCY_CALLS calls on one image, milliseconds."""
    c, h, w = clf.input_shape
    image = np.random.default_rng(1).integers(0, 256, (1, h, w, c), dtype=np.uint8)
    clf.proba_of_arrays(image)
    times = []
    for _ in range(LATENCY_CALLS):
        start = time.perf_counter()
        clf.proba_of_arrays(image)
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=100)
    return {"p50_ms": statistics.median(times), "p99_ms": q[98]}


def int8_rows(reports: dict, speed: dict, latency: dict) -> dict:
    fp32_bytes = reports["fp32"]["bytes"]
    rows = {}
    for key, report in reports.items():
        name = "fp32" if key == "fp32" else f"int8 {key}"
        check = report.get("check", {})
        row = {"bytes": report["bytes"], "times_smaller": round(fp32_bytes / report["bytes"], 2),
               **{f"images_per_sec_batch{b}": speed[b][name] for b in INT8_BATCHES}, **latency[name],
               "test_accuracy": check.get("accuracy_fp32" if key == "fp32" else "accuracy_int8"),
               "top1_agreement": check.get("top1_agreement")}
        if key != "fp32":
            row["drop_points"] = round(check["drop"] * 100, 2)
            row["calibration_seconds"] = report["quantization"]["seconds"]
        rows[name] = row
    first = next(r for k, r in reports.items() if k != "fp32")["check"]  # every int8 check measures fp32 the same
    rows["fp32"]["test_accuracy"] = first["accuracy_fp32"]
    for b in INT8_BATCHES:
        base = statistics.median(rows["fp32"][f"images_per_sec_batch{b}"])
        for row in rows.values():
            row[f"speedup_batch{b}"] = round(statistics.median(row[f"images_per_sec_batch{b}"]) / base, 2)
    return rows


def print_int8_table(rows: dict, run: Path) -> None:
    print(f"\nrun: {run}")
    print(f"{'model':<18s} {'bytes':>11s} {'smaller':>7s} {'img/s b1':>22s} {'img/s b64':>22s} {'x b1':>5s} "
          f"{'x b64':>5s} {'p50 ms':>7s} {'p99 ms':>7s} {'test acc':>8s} {'agree':>6s}")
    for name, r in rows.items():
        agree = "" if r["top1_agreement"] is None else f"{r['top1_agreement']:.1%}"
        print(f"{name:<18s} {r['bytes']:>11,d} {r['times_smaller']:>6.2f}x "
              f"{spread(r['images_per_sec_batch1'], '.0f'):>22s} {spread(r['images_per_sec_batch64'], '.0f'):>22s} "
              f"{r['speedup_batch1']:>5.2f} {r['speedup_batch64']:>5.2f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
              f"{r['test_accuracy']:>8.2%} {agree:>6s}")


if __name__ == "__main__":
    main()
