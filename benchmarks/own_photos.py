"""Own photos: the Keras seed-000 recipe against imgcls's defaults on a folder of class folders, side by side.

For each folder (or zip) of class folders, each seed and each repeat, this
runs on this machine, each in a fresh process, one after the other:

* Keras: seed 000's CNN at 64x64 RGB, Adam 1e-3, batch 32, 10 epochs, on
  TensorFlow's CPU build in its own venv (benchmarks/peer_keras.py
  ``--case folder``; the venv is created on first use);
* imgcls with its defaults: ``imgcls train --data FOLDER --out TMP --name own
  --seed S`` and no other flag.  Its test accuracy is run.json's
  ``test_accuracy`` (the checkpoint training ends on, fp32, as
  ``imgcls evaluate``);
* a plain fine-tune (benchmarks/peer_finetune.py): the same EfficientNet-Lite0
  ImageNet weights fine-tuned in plain PyTorch as a person would write it
  (Adam, every layer, 128 px, flip and crop, early stopping on val), given
  imgcls's wall time of that run (``--seconds``), in this venv.

Both see the same images.  imgcls draws its own stratified split from
``--seed`` (there is no separate split seed), so for seed S the benchmark
builds imgcls's split the way ``imgcls train --seed S`` does
(``build_dataset(DataConfig(dataset=FOLDER, image_size=[64, 64]), seed=S)``:
the test split is drawn first, so it depends on neither the image size nor
the val fraction) and writes it to a split file: Keras trains on imgcls's
train + val images and is scored on imgcls's test images.  After each imgcls
run its dataset.json is checked against the split file's per-class counts.
So the split changes with the seed, for both frameworks alike.

Wall time is the whole process, from launch to exit, as ``common.run_child``
measures it: interpreter start, imports, reading and decoding the images,
training, and whatever each does besides (Keras scores the test set after
every epoch; imgcls validates every epoch, then calibrates and writes
report.html, which its defaults do).  ``imgcls_to_run_json`` is imgcls's time
from launch to writing run.json, before calibration and the report.  Peak RSS
is the process's own.

imgcls's decoded-image cache: by default every imgcls run gets an empty
``IMGCLS_DATA_DIR``, so every run decodes the images as a person's first run
does.  ``--warm-cache`` shares one cache folder
(~/.cache/imgcls-bench/own-photos-cache) between runs and invocations, so
only the first run ever decodes; each row records whether its images came
from the cache.

    python benchmarks/own_photos.py                                   # ../shared/data/flowers.zip, seed 0
    python benchmarks/own_photos.py ~/photos --seeds 0 1 2 --cpu-class avx2
    python benchmarks/own_photos.py FOLDER --seeds 1 --write-split split.json   # just the split file

The bars (issue 16): imgcls's test accuracy beats Keras's; by at least 10
points where Keras scores below 85%; and imgcls takes less wall time.  They
are judged on the medians of the per-run differences and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from common import (
    ROOT,
    SHARED,
    add_cpu_class_argument,
    cpu_class_env,
    hardware_class,
    hardware_line,
    keras_python,
    machine,
    run_child,
    save_results,
    spread,
)

PEER = ROOT / "benchmarks" / "peer_keras.py"
FINETUNE_PEER = ROOT / "benchmarks" / "peer_finetune.py"
IMGCLS_TRAIN = [sys.executable, "-m", "imgcls.cli", "train"]
ZIP_SEPARATOR = "::"  # peer_keras.py's "<zip file>::<member>"
SPLIT_IMAGE_SIZE = [64, 64]  # the test split does not depend on it; the peer's input size
WARM_CACHE = Path.home() / ".cache" / "imgcls-bench" / "own-photos-cache"
BAR_MARGIN_POINTS = 10.0  # issue 16: imgcls ahead by this much where Keras is below BAR_KERAS_CEILING
BAR_KERAS_CEILING = 0.85


# ----------------------------------------------------------------------------
# The split file


def zip_members(zip_path: str | os.PathLike) -> dict[str, str]:
    """Each member's name as imgcls's ZipSource normalises it (``/`` separators, no leading ``/``) -> as stored."""
    with zipfile.ZipFile(zip_path) as zf:
        return {n.replace("\\", "/").lstrip("/"): n for n in zf.namelist() if not n.endswith("/")}


def to_reference(path: str, source: str, members: dict[str, str] | None) -> str:
    """A Split path -> a split-file path: an absolute file path, or ``<absolute zip>::<member>``.

    Args:
        path: one of ``Split.paths``: ``<folder>/<rel>`` for a folder, ``<zip>/<rel>`` for a zip.
        source: the dataset's name (the folder or zip as it was given to imgcls).
        members: for a zip, :func:`zip_members` of it; None for a folder.
    """
    if members is None:
        return os.path.abspath(path)
    prefix = source.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"image path {path!r} is not inside the zip {source!r}")
    rel = path[len(prefix):]
    if rel not in members:
        raise ValueError(f"image path {path!r}: {rel!r} is not a member of {source!r}")
    return f"{os.path.abspath(source)}{ZIP_SEPARATOR}{members[rel]}"


def split_document(ds) -> dict:
    """The split file for an imgcls ImageDataset: Keras trains on train + val and is scored on test.

    Returns:
        ``{"classes": [...], "train": [[path, label], ...], "test": [[path, label], ...]}``.
    """
    members = zip_members(ds.name) if Path(ds.name).is_file() else None
    doc = {"classes": list(ds.classes), "train": [], "test": []}
    for split, into in (("train", "train"), ("val", "train"), ("test", "test")):
        if split not in ds.splits:
            continue
        part = ds.splits[split]
        if part.paths is None:
            raise ValueError(f"{ds.name}: the {split} split keeps no image paths; a split file needs them")
        doc[into] += [[to_reference(p, ds.name, members), int(y)] for p, y in zip(part.paths, part.labels)]
    return doc


def imgcls_split(folder: str, seed: int):
    """The ImageDataset that ``imgcls train --data FOLDER --seed SEED`` splits (decoded afresh, cache untouched)."""
    from imgcls.config import DataConfig
    from imgcls.data.registry import build_dataset

    return build_dataset(DataConfig(dataset=str(folder), image_size=SPLIT_IMAGE_SIZE, cache=False), seed=seed)


def per_class(items: list, num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for _, label in items:
        counts[label] += 1
    return counts


def split_mismatches(doc: dict, dataset_record: dict) -> list[str]:
    """Where imgcls's dataset.json disagrees with the split file (per-class counts of train + val, and of test)."""
    k = len(doc["classes"])
    splits = dataset_record["splits"]
    ours = {"train": per_class(doc["train"], k), "test": per_class(doc["test"], k)}
    theirs = {"train": [sum(c) for c in zip(*(splits[s]["per_class"] for s in ("train", "val") if s in splits))],
              "test": splits["test"]["per_class"]}
    problems = []
    if dataset_record["classes"] != doc["classes"]:
        problems.append(f"classes: imgcls {dataset_record['classes']}, split file {doc['classes']}")
    problems += [f"{name}: imgcls {theirs[name]} per class, split file {ours[name]}"
                 for name in ("train", "test") if theirs[name] != ours[name]]
    return problems


def write_split_file(folder: str, seed: int, path: Path) -> dict:
    doc = split_document(imgcls_split(folder, seed))
    path.write_text(json.dumps(doc))
    return doc


# ----------------------------------------------------------------------------
# The runs


def keras_command(python: str, split_file: Path, seed: int, out: Path) -> list[str]:
    return [python, str(PEER), "--case", "folder", "--split-file", str(split_file), "--seed", str(seed),
            "--json", str(out)]


def imgcls_command(folder: str, out: Path, seed: int) -> list[str]:
    return [*IMGCLS_TRAIN, "--data", str(folder), "--out", str(out), "--name", "own", "--seed", str(seed)]


def run_keras(python: str, split_file: Path, seed: int, env: dict, out: Path) -> dict:
    proc = run_child(keras_command(python, split_file, seed, out), env=env)
    doc = json.loads(out.read_text())
    return {**proc, "test_accuracy": doc["final_test_accuracy"], "n_train": doc["n_train"], "n_test": doc["n_test"],
            "load_seconds": doc["load_seconds"], "fit_seconds": doc["fit_seconds"], "params": doc["params"],
            "tensorflow": doc["tensorflow_version"]}


def finetune_command(split_file: Path, seed: int, seconds: float, out: Path) -> list[str]:
    return [sys.executable, str(FINETUNE_PEER), "--split-file", str(split_file), "--seed", str(seed),
            "--seconds", f"{seconds:.1f}", "--json", str(out)]


def run_finetune(split_file: Path, seed: int, seconds: float, env: dict, out: Path) -> dict:
    """The plain fine-tune peer on the split file, stopped after ``seconds`` of wall time from its launch."""
    proc = run_child(finetune_command(split_file, seed, seconds, out), env=env)
    doc = json.loads(out.read_text())
    return {**proc, **{k: doc[k] for k in ("test_accuracy", "epochs", "best_epoch", "steps", "train_images_per_sec",
                                          "n_train", "n_val", "n_test")}}


def run_imgcls(folder: str, seed: int, env: dict, cache: Path, out: Path) -> dict:
    proc = run_child(imgcls_command(folder, out, seed), env={**env, "IMGCLS_DATA_DIR": str(cache)})
    launched = time.time() - proc["wall_seconds"]
    run = out / "own"
    summary = json.loads((run / "run.json").read_text())
    dataset = json.loads((run / "dataset.json").read_text())
    return {**proc, "test_accuracy": summary["test_accuracy"], "epochs_run": summary["epochs_run"],
            "data_seconds": summary["data_seconds"], "parameters": summary["parameters"],
            "imgcls_to_run_json": (run / "run.json").stat().st_mtime - launched,
            "from_cache": any("came from the cache" in n for n in dataset["notes"]), "dataset": dataset}


def run_folder(folder: str, args, python: str, env: dict, tmp: Path) -> dict:
    """Every seed and repeat of one folder: the split files, then Keras and imgcls in turn."""
    pairs, mismatches = [], []
    for seed in args.seeds:
        split_file = tmp / f"split-seed{seed}.json"
        doc = write_split_file(folder, seed, split_file)
        print(f"  seed {seed}: {len(doc['train'])} train + val and {len(doc['test'])} test images, "
              f"{len(doc['classes'])} classes", flush=True)
        for rep in range(args.repeats):
            tag = f"seed{seed}-rep{rep}"
            keras = run_keras(python, split_file, seed, env, tmp / f"keras-{tag}.json")
            cache = WARM_CACHE if args.warm_cache else tmp / f"cache-{tag}"  # empty: this run decodes
            cache.mkdir(parents=True, exist_ok=True)
            ours = run_imgcls(folder, seed, env, cache, tmp / f"imgcls-{tag}")
            plain = run_finetune(split_file, seed, ours["wall_seconds"], env, tmp / f"finetune-{tag}.json") \
                if args.finetune else None
            problems = split_mismatches(doc, ours.pop("dataset"))
            if problems:
                mismatches.append({"seed": seed, "problems": problems})
                print(f"  WARNING seed {seed}: imgcls's split is not the split file's: {'; '.join(problems)}")
            if keras["n_test"] != len(doc["test"]) or keras["n_train"] != len(doc["train"]):
                raise RuntimeError(f"the Keras peer read {keras['n_train']}/{keras['n_test']} images, "
                                   f"the split file lists {len(doc['train'])}/{len(doc['test'])}")
            pairs.append({"seed": seed, "repeat": rep, "keras": keras, "imgcls": ours, "finetune": plain})
            line = (f"  {tag}: Keras {keras['test_accuracy']:.4f} in {keras['wall_seconds']:.1f}s, "
                    f"imgcls {ours['test_accuracy']:.4f} in {ours['wall_seconds']:.1f}s")
            if plain:
                line += (f", plain fine-tune {plain['test_accuracy']:.4f} in {plain['wall_seconds']:.1f}s "
                         f"({plain['epochs']} epoch(s), {plain['steps']} steps)")
            print(line, flush=True)
    return {"pairs": pairs, "split_mismatches": mismatches}


# ----------------------------------------------------------------------------
# The summary


def summarise(pairs: list[dict]) -> dict:
    """Per-run lists (accuracies in %, differences in points, seconds, ratios) and whether the bars hold."""
    k_acc = [p["keras"]["test_accuracy"] * 100 for p in pairs]
    i_acc = [p["imgcls"]["test_accuracy"] * 100 for p in pairs]
    diff = [i - k for i, k in zip(i_acc, k_acc)]
    k_wall = [p["keras"]["wall_seconds"] for p in pairs]
    i_wall = [p["imgcls"]["wall_seconds"] for p in pairs]
    ratio = [k / i for k, i in zip(k_wall, i_wall)]
    keras_median = statistics.median(k_acc)
    plain = [p["finetune"] for p in pairs if p.get("finetune")]
    f_acc = [p["test_accuracy"] * 100 for p in plain]
    f_diff = [p["imgcls"]["test_accuracy"] * 100 - p["finetune"]["test_accuracy"] * 100 for p in pairs
              if p.get("finetune")]
    bars = {"imgcls_more_accurate": statistics.median(diff) > 0,
            "margin_needed": keras_median < BAR_KERAS_CEILING * 100,
            "margin_held": statistics.median(diff) >= BAR_MARGIN_POINTS,
            "imgcls_faster": statistics.median(ratio) > 1,
            "runs_more_accurate": sum(d > 0 for d in diff), "runs_faster": sum(r > 1 for r in ratio),
            "runs": len(pairs)}
    if plain:
        bars.update(imgcls_at_least_plain_finetune=all(d >= 0 for d in f_diff),
                    runs_at_least_plain_finetune=sum(d >= 0 for d in f_diff))
    return {"keras_accuracy": k_acc, "imgcls_accuracy": i_acc, "difference_points": diff, "keras_wall": k_wall,
            "finetune_accuracy": f_acc, "finetune_wall": [p["wall_seconds"] for p in plain],
            "difference_finetune_points": f_diff,
            "imgcls_wall": i_wall, "ratio": ratio, "imgcls_peak_rss": [p["imgcls"]["peak_rss_mib"] for p in pairs],
            "keras_peak_rss": [p["keras"]["peak_rss_mib"] for p in pairs],
            "imgcls_to_run_json": [p["imgcls"]["imgcls_to_run_json"] for p in pairs], "bars": bars}


def bar_lines(bars: dict) -> list[str]:
    n = bars["runs"]

    def held(ok: bool) -> str:
        return "holds" if ok else "FAILS"

    lines = [(f"imgcls more accurate than Keras: {held(bars['imgcls_more_accurate'])} "
              f"({bars['runs_more_accurate']} of {n} runs)")]
    if bars["margin_needed"]:
        lines.append(f"by >= {BAR_MARGIN_POINTS:.0f} points (Keras below {BAR_KERAS_CEILING:.0%}): "
                     f"{held(bars['margin_held'])}")
    else:
        lines.append(f"by >= {BAR_MARGIN_POINTS:.0f} points: not asked (Keras at {BAR_KERAS_CEILING:.0%} or more)")
    lines.append(f"imgcls less wall time: {held(bars['imgcls_faster'])} ({bars['runs_faster']} of {n} runs)")
    if "imgcls_at_least_plain_finetune" in bars:
        lines.append(f"imgcls at least as accurate as the plain fine-tune in the same wall time: "
                     f"{held(bars['imgcls_at_least_plain_finetune'])} ({bars['runs_at_least_plain_finetune']} "
                     f"of {n} runs)")
    return lines


def report(folder: str, summary: dict, pairs: list[dict]) -> None:
    s = summary
    rows = [("Keras test accuracy %", spread(s["keras_accuracy"], ".2f")),
            ("imgcls test accuracy %", spread(s["imgcls_accuracy"], ".2f")),
            ("difference, points (imgcls - Keras)", spread(s["difference_points"], "+.2f")),
            ("Keras wall s", spread(s["keras_wall"])),
            ("imgcls wall s", spread(s["imgcls_wall"])),
            ("ratio (Keras / imgcls wall)", spread(s["ratio"], ".2f")),
            ("imgcls peak RSS MiB", spread(s["imgcls_peak_rss"], ".0f")),
            ("Keras peak RSS MiB", spread(s["keras_peak_rss"], ".0f")),
            ("imgcls launch to run.json s", spread(s["imgcls_to_run_json"]))]
    if s["finetune_accuracy"]:
        rows += [("plain fine-tune test accuracy %", spread(s["finetune_accuracy"], ".2f")),
                 ("difference, points (imgcls - plain)", spread(s["difference_finetune_points"], "+.2f")),
                 ("plain fine-tune wall s", spread(s["finetune_wall"]))]
    cached = sum(p["imgcls"]["from_cache"] for p in pairs)
    print(f"\n{folder}: {len(pairs)} run(s) a framework, median [min, max]; imgcls's images came from its cache in "
          f"{cached} of {len(pairs)} runs")
    for name, value in rows:
        print(f"  {name:38s} {value:>28s}")
    for line in bar_lines(s["bars"]):
        print(f"  bar: {line}")


def print_commands(folder: str, args, python: str, env: dict) -> None:
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    prefix = prefix + " " if prefix else ""
    seed = args.seeds[0]
    script = ["python", "benchmarks/own_photos.py", folder]
    bench = [*script, "--seeds", *map(str, args.seeds), "--repeats", str(args.repeats), "--cpu-class", args.cpu_class]
    bench += ["--warm-cache"] if args.warm_cache else []
    print("  to reproduce (from the repository root):")
    print(f"    the whole benchmark: {shlex.join(bench)}")
    print(f"    the split file:      {shlex.join([*script, '--seeds', str(seed), '--write-split', 'split.json'])}")
    print(f"    Keras:  {prefix}{shlex.join(keras_command(python, Path('split.json'), seed, Path('keras.json')))}")
    cache = "" if args.warm_cache else "IMGCLS_DATA_DIR=$(mktemp -d) "
    print(f"    imgcls: {prefix}{cache}{shlex.join(imgcls_command(folder, Path('runs'), seed))}")
    if args.finetune:
        command = finetune_command(Path("split.json"), seed, 0.0, Path("finetune.json"))
        command[command.index("--seconds") + 1] = "IMGCLS_WALL_SECONDS"
        print(f"    plain fine-tune: {prefix}{shlex.join(command)}")


def write_results(path: Path, doc: dict) -> Path:
    """Write ``doc`` (plus the machine) to ``path`` atomically, as common.save_results does in results/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **doc}, indent=1))
    os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", default=[str(SHARED / "flowers.zip")],
                        help="folders or zips of class folders (default: ../shared/data/flowers.zip)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="imgcls's --seed (and so its split) and Keras's seed (default: 0)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per seed, for the spread of the times")
    add_cpu_class_argument(parser)
    parser.add_argument("--json", help="write the raw results of every folder to this one file (default: "
                                       "benchmarks/results/own_photos-<folder>-<cpu class>.json per folder)")
    parser.add_argument("--keras-python", help="a Python with tensorflow-cpu (default: a venv made on first use)")
    parser.add_argument("--warm-cache", action="store_true",
                        help=f"let imgcls reuse decoded images in {WARM_CACHE} (default: every run decodes)")
    parser.add_argument("--no-finetune", dest="finetune", action="store_false",
                        help="leave out the plain fine-tune peer (benchmarks/peer_finetune.py)")
    parser.add_argument("--write-split", metavar="PATH",
                        help="only write the split file of the first folder and seed to PATH, then stop")
    args = parser.parse_args()
    if args.write_split:
        doc = write_split_file(args.folders[0], args.seeds[0], Path(args.write_split))
        print(f"{args.write_split}: {len(doc['train'])} train + val, {len(doc['test'])} test images")
        return
    env = cpu_class_env(args.cpu_class)
    hw = hardware_class(env)
    print(hardware_line(hw), flush=True)
    python = keras_python(args.keras_python)
    results = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        for n, folder in enumerate(args.folders):
            if not Path(folder).exists():
                print(f"{folder}: skipped, it does not exist")
                continue
            print(f"{folder}:", flush=True)
            tmp = Path(tmpdir) / f"folder{n}"
            tmp.mkdir()
            runs = run_folder(folder, args, python, env, tmp)
            summary = summarise(runs["pairs"])
            report(folder, summary, runs["pairs"])
            if runs["split_mismatches"]:
                print("  WARNING: imgcls's split differed from Keras's in some runs (see above): not like for like")
            print_commands(folder, args, python, env)
            results[folder] = {**runs, "summary": summary}
    common_doc = {"hardware": hw, "cpu_class": args.cpu_class, "seeds": args.seeds, "repeats": args.repeats,
                  "warm_cache": args.warm_cache, "imgcls_command": "imgcls train --data FOLDER --out TMP --name own "
                                                                   "--seed S (defaults otherwise)"}
    if args.json:
        print(f"raw results: {write_results(Path(args.json), {**common_doc, 'folders': results})}")
    for folder, result in ({} if args.json else results).items():
        # -native and -avx2 are the AVX512-BF16 CPU's runs, as it is and capped; a CPU that is AVX2-only is -avx2-cpu.
        cls = "avx2-cpu" if hw["class"] == "AVX2 only" else args.cpu_class
        name = f"own_photos-{Path(folder).stem}-{cls}"
        print(f"raw results: {save_results(name, {**common_doc, 'folders': {folder: result}})}")


if __name__ == "__main__":
    main()
