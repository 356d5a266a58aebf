"""Peer baseline: the seed pipelines run in Keras on TensorFlow (CPU), as their authors ran them.

Runs under its own virtualenv (tensorflow-cpu, numpy, pillow) and imports only
the standard library, numpy, PIL and tensorflow/keras -- never torch or imgcls --
so the benchmark can compare imgcls against the original framework:

    /tmp/tfvenv/bin/python benchmarks/peer_keras.py --case cifar10 \\
        --zip ../shared/data/cifar10-jpg.zip --seed 0 --json out.json
    /tmp/tfvenv/bin/python benchmarks/peer_keras.py --case folder \\
        --split-file split.json --seed 0 --json out.json

Cases (model, preprocessing, loss, optimiser, batch size and epochs as in the seeds):

  cifar10  seed 000 (the TensorFlow CNN tutorial): Conv2D(32,3,relu) MaxPool(2)
           Conv2D(64,3,relu) MaxPool(2) Conv2D(64,3,relu) Flatten Dense(64,relu)
           Dense(10); x/255; sparse categorical cross-entropy; Adam (Keras
           defaults, lr 1e-3); batch 32 (Keras default, the seed sets none);
           10 epochs.  122,570 parameters.
  mnist    seeds 002 and 004: Conv2D(32,3,relu) MaxPool(2) Flatten Dense(100,relu)
           Dense(10,softmax); x/255; sparse categorical cross-entropy;
           SGD(learning_rate=0.01, momentum=0.9); batch 32; 10 epochs.
           542,230 parameters.
  folder   seed 000's recipe (the cifar10 case's CNN, loss, optimiser, batch and
           epochs) on a person's own photos: 64x64 RGB, K classes, so Dense(K)
           and 646,208 + 65 K parameters (646,533 for the 5 flowers).  The
           images and labels come from a split file (below), not a zip's
           train/ and test/.

Choices where the seeds leave room (each also commented where it is made):

* Data: the images come from the same zips of class folders that imgcls reads
  (CIFAR-10 is the JPEG q75 copy, so accuracy runs a little below published
  CIFAR-10 figures), not from ``keras.datasets``.  Labels are the index of the
  class folder in sorted order, which is the official label order for both.
  The single official train/test split is used (neither seed does k-fold).
* cifar10 loss: seed 000's code cells are images and its text names only
  'sparse_categorical_crossentropy'; its model ends in ``Dense(10)`` with no
  softmax, as in the TensorFlow tutorial it copies, which compiles the loss as
  ``SparseCategoricalCrossentropy(from_logits=True)``.  We follow the tutorial:
  the plain string loss on logits would treat them as probabilities, which is
  not what the report's "high accuracy" run can have been.
* cifar10 validation: seed 000 says only that training "monitors" a validation
  split; the tutorial passes the test set as ``validation_data``.  We train on
  all 50,000 training images and score the test set after every epoch -- the
  tutorial's numbers -- in a callback whose time is left off the training clock.
* mnist: seed 004 elides its layer list (``model = Sequential()``) but gives the
  same optimiser, loss, batch and epochs as seed 002, whose layers we use.
* The input shape is given with ``keras.Input`` rather than ``input_shape=`` on
  the first layer (Keras 3 deprecates the latter); the model is identical.
* Inputs are ``(x / 255.0)`` computed in float64 as the seeds do, then stored
  as float32 -- the dtype Keras casts them to anyway -- to halve the memory.
* ``model.fit`` shuffles every epoch (its default), as in the seeds.

Timing (time.perf_counter): ``import_seconds`` is ``import tensorflow``;
``load_seconds`` reads and decodes the zip; ``fit_seconds`` is the whole
``model.fit`` call (first-epoch graph tracing included) minus the per-epoch
test evaluations; ``wall_seconds`` runs from the process's start (interpreter start-up included,
read from /proc on Linux; 10 ms resolution) to just before the JSON is written.

``--limit N`` keeps N training and N test images (every k-th in name order, so
every class is there): for smoke tests only.

The folder case's split file (``--split-file``) is JSON::

    {"classes": ["daisy", ...], "train": [[path, label], ...], "test": [[path, label], ...]}

where a path is an image file, or ``<zip file>::<member>`` for a member of a
zip (read with :mod:`zipfile`).  benchmarks/own_photos.py writes one from
imgcls's own split, so that both frameworks see the same images.  Each image
is decoded and resized to 64x64 as Keras' ``image_dataset_from_directory``
does it, then divided by 255: ``tf.image.decode_image(channels=3)`` (TF's
JPEG decoder uses the fast integer DCT: pixels differ from PIL's by up to 3
levels, about 1 on average), then ``tf.image.resize`` bilinear without
antialiasing, which leaves float32 (PIL's bilinear averages over a wider
window when it shrinks).  Formats TF cannot decode (WebP, TIFF, which
imgcls reads and Keras' loader would not list) are decoded by PIL and
converted to RGB.  Reading, decoding and resizing count in ``load_seconds``
and so in ``wall_seconds``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

# Fallback start of the wall clock where /proc is unavailable (see process_seconds).
_T_START = time.perf_counter()

# Keras 3 picks its backend from this variable; pin TensorFlow so it never
# looks at another installed framework.  Quieten TF's C++ INFO lines.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# Per case: the image shape (H, W, C), the PIL mode, and the parameter count
# that the PyTorch ports in imgcls match exactly (the folder case's depends on
# its class count: see tutorial_cnn_params).
CASES = {
    "cifar10": {"shape": (32, 32, 3), "mode": "RGB", "params": 122_570},
    "mnist": {"shape": (28, 28, 1), "mode": "L", "params": 542_230},
    "folder": {"shape": (64, 64, 3), "mode": "RGB", "params": None},
}
NUM_CLASSES = 10  # of the cifar10 and mnist cases
ZIP_SEPARATOR = "::"  # a split file's "<zip file>::<member>"


def load_split(zf: zipfile.ZipFile, split: str, case: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``split/<class>/<file>`` members into uint8 (N, H, W, C) images and int labels.

    Members are taken in sorted name order so the arrays are deterministic;
    a label is the index of its class folder among the sorted folder names.
    """
    h, w, c = CASES[case]["shape"]
    mode = CASES[case]["mode"]
    names = sorted(n for n in zf.namelist() if n.startswith(split + "/") and not n.endswith("/"))
    classes = sorted({n.split("/")[1] for n in names})
    if len(classes) != NUM_CLASSES:
        raise SystemExit(f"{split}: expected {NUM_CLASSES} class folders, found {len(classes)}: {classes}")
    index = {name: i for i, name in enumerate(classes)}
    if limit is not None:
        names = names[::max(1, len(names) // limit)][:limit]  # every k-th: all classes, for smoke tests
    x = np.empty((len(names), h, w, c), dtype=np.uint8)
    y = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        with Image.open(io.BytesIO(zf.read(name))) as img:
            if img.mode != mode:
                img = img.convert(mode)
            arr = np.asarray(img)
        if arr.shape[:2] != (h, w):
            raise SystemExit(f"{name}: expected {h}x{w}, got {arr.shape[1]}x{arr.shape[0]}")
        x[i] = arr.reshape(h, w, c)  # MNIST: (28, 28) -> (28, 28, 1), as the seeds' reshape
        y[i] = index[name.split("/")[1]]
    return x, y


def tutorial_cnn_params(height: int, width: int, channels: int, num_classes: int) -> int:
    """Parameters of seed 000's CNN (see build_model) on (height, width, channels) inputs and ``num_classes``."""
    h, w = (height - 2) // 2, (width - 2) // 2  # Conv2D 3x3 valid, MaxPool 2
    h, w = (h - 2) // 2, (w - 2) // 2
    h, w = h - 2, w - 2
    convs = (9 * channels * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64)
    return convs + (h * w * 64 * 64 + 64) + (64 * num_classes + num_classes)


def split_reference(ref: str) -> tuple[str | None, str]:
    """``"<zip>::<member>"`` -> (zip, member); a plain file path -> (None, path).

    The zip is the first prefix before a ``::`` that is a file, so a ``::``
    inside a member's name (or a folder's, for a plain path) does no harm.
    """
    start = 0
    while (at := ref.find(ZIP_SEPARATOR, start)) >= 0:
        if os.path.isfile(ref[:at]):
            return ref[:at], ref[at + len(ZIP_SEPARATOR):]
        start = at + 1
    return None, ref


def read_split_file(path: str) -> dict:
    """Load and check a split file: classes, and train/test lists of [path, label]."""
    with open(path) as f:
        doc = json.load(f)
    classes = doc.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise SystemExit(f"{path}: 'classes' must list at least two class names, got {classes!r}")
    for split in ("train", "test"):
        items = doc.get(split)
        if not items:
            raise SystemExit(f"{path}: the {split!r} list is missing or empty")
        bad = [it for it in items if len(it) != 2 or not 0 <= int(it[1]) < len(classes)]
        if bad:
            raise SystemExit(f"{path}: {split} entries must be [path, label] with 0 <= label < {len(classes)}; "
                             f"first bad: {bad[0]!r}")
    return doc


def load_folder_split(items: list, limit: int | None, size: tuple[int, int], tf) -> tuple[np.ndarray, np.ndarray]:
    """Decode [path, label] items into float32 (N, H, W, 3) images in 0..255 and int labels.

    Decoding and resizing are ``image_dataset_from_directory``'s (see the
    module docstring); PIL decodes what TF cannot.
    """
    if limit is not None:
        items = items[::max(1, len(items) // limit)][:limit]  # every k-th: all classes, for smoke tests
    zips: dict[str, zipfile.ZipFile] = {}
    x = np.empty((len(items), size[0], size[1], 3), dtype=np.float32)
    y = np.empty(len(items), dtype=np.int64)
    try:
        for i, (ref, label) in enumerate(items):
            archive, member = split_reference(ref)
            if archive is None:
                with open(member, "rb") as f:
                    data = f.read()
            else:
                if archive not in zips:
                    zips[archive] = zipfile.ZipFile(archive)
                data = zips[archive].read(member)
            try:
                arr = tf.image.decode_image(data, channels=3, expand_animations=False)
            except tf.errors.OpError:  # not JPEG, PNG, GIF or BMP
                with Image.open(io.BytesIO(data)) as img:
                    arr = np.asarray(img.convert("RGB"))
            x[i] = tf.image.resize(arr, size, method="bilinear").numpy()
            y[i] = int(label)
    finally:
        for zf in zips.values():
            zf.close()
    return x, y


def scale(x: np.ndarray) -> np.ndarray:
    """The seeds' ``x / 255.0`` (float64 arithmetic), stored as float32 in chunks to bound memory."""
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), 8192):
        out[start:start + 8192] = x[start:start + 8192] / 255.0
    return out


def build_model(case: str, keras, num_classes: int = NUM_CLASSES):
    """The seed's Sequential model and its compile settings."""
    layers = keras.layers
    if case in ("cifar10", "folder"):
        # Seed 000, section "3. Model Architecture" (the TensorFlow CNN tutorial); the folder case
        # changes only the input size and the number of outputs.
        model = keras.Sequential([
            keras.Input(shape=CASES[case]["shape"]),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(num_classes),
        ])
        # Seed 000 "4. Model Compilation": Adam + sparse categorical cross-entropy.
        # Dense(10) gives logits, so the tutorial's from_logits=True (see docstring).
        model.compile(optimizer=keras.optimizers.Adam(),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    else:
        # Seed 002 (In [12] / In [13]); seed 004 section iii gives the same compile settings.
        model = keras.Sequential([
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(100, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
                      loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    return model


def process_seconds() -> float:
    """Seconds since this process started, interpreter start-up included.

    Linux gives the start time in /proc/self/stat (clock ticks since boot, the
    CLOCK_BOOTTIME origin); elsewhere fall back to the clock taken after this
    module's imports.
    """
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _T_START


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tf_threads(tf) -> dict:
    """TF's configured thread pools; 0 means TF's default, one intra-op thread per usable CPU."""
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"intra_op_configured": intra, "inter_op_configured": inter, "usable_cpus": usable,
            "intra_op_effective": intra or usable}


def write_json_atomic(path: str, data: dict) -> None:
    """Write to a temp file in the target's folder, then os.replace it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".peer_keras-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes it 0600; use a normal file's mode
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--zip", help="cifar10 and mnist: zip of train/<class>/* and test/<class>/* images")
    ap.add_argument("--split-file", help="folder: JSON of classes and train/test [path, label] lists (see above)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--epochs", type=int, default=10, help="default 10, as in the seeds")
    ap.add_argument("--limit", type=int, default=None,
                    help="keep the first N train and N test images (smoke tests only)")
    args = ap.parse_args(argv)
    if args.case == "folder" and not args.split_file:
        ap.error("--case folder needs --split-file")
    if args.case != "folder" and not args.zip:
        ap.error(f"--case {args.case} needs --zip")

    t0 = time.perf_counter()
    import tensorflow as tf
    import_seconds = time.perf_counter() - t0
    import keras  # the Keras 3 that tensorflow already loaded

    t0 = time.perf_counter()
    if args.case == "folder":
        split = read_split_file(args.split_file)
        classes = list(split["classes"])
        size = CASES["folder"]["shape"][:2]
        x_train, y_train = load_folder_split(split["train"], args.limit, size, tf)
        x_test, y_test = load_folder_split(split["test"], args.limit, size, tf)
    else:
        classes = None
        with zipfile.ZipFile(args.zip) as zf:
            x_train, y_train = load_split(zf, "train", args.case, args.limit)
            x_test, y_test = load_split(zf, "test", args.case, args.limit)
    load_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_train, x_test = scale(x_train), scale(x_test)
    preprocess_seconds = time.perf_counter() - t0

    num_classes = len(classes) if classes else NUM_CLASSES
    expected = CASES[args.case]["params"] or tutorial_cnn_params(*CASES[args.case]["shape"], num_classes)
    keras.utils.set_random_seed(args.seed)  # python, numpy and TF seeds: weights and shuffling
    model = build_model(args.case, keras, num_classes)
    params = model.count_params()
    assert params == expected, f"{args.case}: {params:,} params, expected {expected:,}"

    epochs: list[dict] = []

    class EpochClock(keras.callbacks.Callback):
        """Scores the test set after each epoch; its time is kept off the training clock."""

        def __init__(self, fit_start: float):
            super().__init__()
            self.fit_start = fit_start
            self.eval_seconds = 0.0  # total spent in our evaluations so far

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            train_seconds = now - self.fit_start - self.eval_seconds
            # Larger eval batches only speed up scoring; accuracy does not depend on them.
            res = self.model.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)
            eval_seconds = time.perf_counter() - now
            self.eval_seconds += eval_seconds
            logs = logs or {}
            epochs.append({"epoch": epoch + 1, "train_seconds": round(train_seconds, 4),
                           "test_accuracy": float(res["accuracy"]), "test_loss": float(res["loss"]),
                           "train_loss": float(logs["loss"]), "train_accuracy": float(logs["accuracy"]),
                           "eval_seconds": round(eval_seconds, 4)})
            print(f"epoch {epoch + 1}/{args.epochs}: train {train_seconds:.1f}s cumulative, "
                  f"loss {logs['loss']:.4f}, test acc {res['accuracy']:.4f}", flush=True)

    # Seconds from the launch of this process to the start of training: the benchmark that launches it sets
    # BENCH_T0 (its time.time() just before the launch), so the peer and imgcls are clocked the same way.
    launched = float(os.environ["BENCH_T0"]) if "BENCH_T0" in os.environ else time.time() - process_seconds()
    fit_start_since_launch = time.time() - launched
    fit_start = time.perf_counter()
    clock = EpochClock(fit_start)
    # Batch 32: the seeds' (002/004 explicit, 000 Keras' default).  No validation_data:
    # the callback scores the test set, so fit's own clock stays training-only.
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=32, shuffle=True, verbose=0,
              callbacks=[clock])
    fit_seconds = time.perf_counter() - fit_start - clock.eval_seconds

    assert "torch" not in sys.modules and "imgcls" not in sys.modules, "peer must not load torch/imgcls"
    result = {
        "case": args.case,
        "seed": args.seed,
        "framework": "keras",
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
        "tf_threads": tf_threads(tf),
        "cpu_model": cpu_model(),
        "params": params,
        "num_classes": num_classes,
        "classes": classes,
        "split_file": args.split_file,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "limit": args.limit,
        "batch_size": 32,
        "import_seconds": round(import_seconds, 4),
        "load_seconds": round(load_seconds, 4),
        "preprocess_seconds": round(preprocess_seconds, 4),
        "epochs": epochs,
        "final_test_accuracy": epochs[-1]["test_accuracy"] if epochs else None,
        "fit_start_since_launch": round(fit_start_since_launch, 4),
        "fit_seconds": round(fit_seconds, 4),
        "eval_seconds": round(clock.eval_seconds, 4),
        "wall_seconds": round(process_seconds(), 4),
    }
    write_json_atomic(args.json, result)
    acc = result["final_test_accuracy"]
    print(f"{args.case} seed {args.seed}: test acc {acc:.4f} after {len(epochs)} epochs, "
          f"fit {fit_seconds:.1f}s (eval excluded), load {load_seconds:.1f}s, import {import_seconds:.1f}s, "
          f"wall {result['wall_seconds']:.1f}s, {params:,} params, TF {tf.__version__} "
          f"({result['tf_threads']['intra_op_effective']} threads) -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
