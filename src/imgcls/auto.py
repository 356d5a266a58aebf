"""What ``imgcls train --data FOLDER`` does with no other flags: an approach chosen from the data and the machine.

``--model auto`` (the default) looks at the data before anything is decoded
(the folder's listing and the headers of a few dozen images) and at the
machine, and picks:

* **photos** (a folder or zip whose images are at least 48 pixels on their
  shorter side): on a CPU, EfficientNet-Lite2 with its ImageNet weights at
  128x128 (160 where the photos' median shorter side is 160 or more;
  ``--fast``: Lite0 at 128), its classifier reading the pooled outputs of
  stage 2 to the head convolution (or the head alone, by val loss); on a GPU,
  Lite0 at 224x224.  RGB (a gray image's channel repeated), stage 1 of
  transfer learning (the classifier fitted on the frozen backbone's cached
  features, with their mirror images; the mirror image kept at prediction
  time where val says so) and, where it pays within the time there is,
  fine-tuning: on a GPU, or on a CPU when ``--time-budget`` or ``--epochs``
  is given, with the backbone at a tenth of the learning rate, BatchNorm
  statistics frozen, photo augmentation and early stopping on val.  The
  line says how long stage 1 should take, from a timed batch of the frozen
  pass;
* **small images** (the built-in digits, MNIST, CIFAR and folders of images
  under 48 pixels): ``fastnet_small`` trained from scratch, which is both
  better and faster there (ImageNet features of an 8x8 digit are noise).

The choice is a layer of settings under the user's own: any flag or config
value given wins over it.  The resolved settings go into config.yaml, with
the one line saying what was chosen and why under ``auto``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from imgcls.data.folder import read_layout
from imgcls.data.images import open_image
from imgcls.data.sources import open_source
from imgcls.errors import ImgclsError
from imgcls.models.pretrained import models_with_weights
from imgcls.models.registry import create_model, model_options

PHOTO_MIN_SIDE = 48  # pixels: a median shorter side at least this is a photo, worth ImageNet features
SCRATCH_MODEL = "fastnet_small"
# The backbone on each kind of machine.  A CPU fits the classifier on frozen features (stage 1), where Lite2
# at 128 px beat Lite0 on every folder measured (79.3% against 77.4% on flowers.zip, median of 3 seeds; 82.7
# against 78.3 on 64 px CIFAR-10 photos; 98.5 against 97.0 on 64 px MNIST photos) for 1.2x the wall time; a GPU
# fine-tunes Lite0 at 224 px (not measured against Lite2 there).
PHOTO_MODEL = {"cpu": "efficientnet_lite2", "cuda": "efficientnet_lite0"}
# Image side, pixels.  On a CPU 128 (3.4x the images/s of 224, for 1-3 points less on flowers.zip, whose photos are
# 128x128), or 160 where the photos have the detail (a median shorter side of 160 or more) at 1.6x the cost of 128.
PHOTO_SIDE = {"cuda": 224, "cpu": 128}
CPU_DETAIL_SIDE = 160
FAST_MODEL = "efficientnet_lite0"  # --fast: 77.4% on flowers.zip in 28 s, against 79.3% in 34 s for Lite2
PROBE_IMAGES = 48  # image headers read to size up a folder
RATE_IMAGES = 8  # images of each timed batch of the frozen pass (two batches: the first builds oneDNN's kernels)
# Frozen passes per photo in stage 1: 80% train x its views (the photo, and its mirror for one label per image),
# 10% val and 10% test x 2 (tta auto scores their mirror images too).
TRAIN_SHARE = 0.8
MULTI_STAGE_HEAD = 7  # EfficientNet-Lite's stages 2 to 7 and its head convolution, pooled

# Built-in datasets: (images, median shorter side) without reading them.
_BUILTIN = {"digits": (1797, 8), "mnist": (70000, 28), "fashion-mnist": (70000, 28), "cifar10": (60000, 32),
            "cifar100": (60000, 32)}


@dataclass(frozen=True)
class DataProbe:
    """What a look at the data found, before decoding it."""

    images: int
    classes: int
    median_side: int  # the median shorter side of the sampled images, pixels
    median_size: tuple[int, int]  # median (height, width) of the sampled images
    sampled: int
    multilabel: bool = False  # a CSV gives several labels per image (``classes`` counts the labels)


def probe_data(dataset: str, follow_links: bool = False, labels: str | None = None) -> DataProbe | None:
    """Size up ``dataset`` (a built-in name, a folder or a zip) from its listing and a few image headers.

    None when the data cannot be read: the normal loading path then reports why.
    """
    if dataset in _BUILTIN:
        images, side = _BUILTIN[dataset]
        return DataProbe(images, 10, side, (side, side), 0)

    try:
        with open_source(Path(dataset).expanduser(), follow_links) as source:
            layout = read_layout(source, labels)
            rels = [rel for items in layout.items.values() for rel, _ in items]
            sizes = [s for s in (_header_size(source, rel) for rel in _spread(rels, PROBE_IMAGES)) if s]
    except (ImgclsError, OSError):
        return None
    if not sizes:
        return None
    heights, widths = zip(*sizes)
    return DataProbe(len(rels), len(layout.classes), int(statistics.median(min(s) for s in sizes)),
                     (int(statistics.median(heights)), int(statistics.median(widths))), len(sizes),
                     layout.targets is not None)


def _spread(items: list, n: int) -> list:
    """Up to ``n`` items evenly spread over ``items`` (so every class folder is sampled)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _header_size(source, rel: str) -> tuple[int, int] | None:
    """(height, width) from the header of ``rel``; None where it cannot be read (loading then reports it)."""
    try:
        with open_image(source.read(rel), rel) as img:
            return img.height, img.width
    except (ImgclsError, OSError, ValueError):
        return None


def machine_kind(device: str = "auto") -> str:
    """``cuda`` or ``cpu``: where training will run."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def choose(dataset: str, user: dict, follow_links: bool = False, model: str | None = None,
           labels: str | None = None) -> tuple[dict, str]:
    """The settings ``--model auto`` stands for on ``dataset``, and the line that says why.

    Args:
        dataset: what ``--data`` names.
        user: the flat options the user set (``epochs``, ``time_budget``, ``device``, ...), which the
            choice takes into account and never overrides.
        follow_links: read links that lead out of a ``dataset`` folder.
        model: a model the user named (``--model``) with no ``--pretrained``: on photos it starts from its
            ImageNet weights with the photo settings (the line says so), when it has such weights; otherwise
            nothing is chosen for it (``({}, None)``).

    Returns:
        (flat settings as the CLI flags name them, one line for the user and config.yaml).
    """
    if model is not None and model not in models_with_weights():
        return {}, None
    probe = probe_data(dataset, follow_links, labels)
    if model is not None and (probe is None or probe.median_side < PHOTO_MIN_SIDE):
        return {}, None  # small images: the named model trains as it is, from scratch
    if probe is None or probe.median_side < PHOTO_MIN_SIDE:
        what = "its images could not be sized up" if probe is None else \
            f"{probe.images:,} images of about {probe.median_size[0]}x{probe.median_size[1]}"
        return {"model": SCRATCH_MODEL}, (f"{dataset}: {what} -> {SCRATCH_MODEL} trained from scratch "
                                          f"(small images; pretrained ImageNet features need photos of "
                                          f"{PHOTO_MIN_SIDE}+ pixels); override with --model")
    kind = machine_kind(str(user.get("device") or "auto"))
    fast = bool(user.get("fast"))
    side = PHOTO_SIDE["cpu" if fast else kind]
    if (kind == "cpu" or fast) and probe.median_side >= CPU_DETAIL_SIDE:
        side = CPU_DETAIL_SIDE
    backbone = model or (FAST_MODEL if fast else PHOTO_MODEL[kind])
    settings = {
        "model": backbone, "pretrained": "imagenet", "head_first": True, "image_size": [side, side],
        "channels": 3, "resize": "stretch", "tta": "auto",
        # Stage 1 fits on the photos' features and their mirror images', except with several labels per image:
        # there the mirror view gave nothing (mAP 0.824 / 0.827 / 0.839 without it, 0.829 / 0.826 / 0.838 with it,
        # on three seeds of the flower mosaics) for a quarter of the run's time (benchmarks/README.md).
        "augment": [] if probe.multilabel else ["hflip"],
        # The classifier reads the pooled outputs of stage 2 to the head convolution when val prefers them
        # (stage 1 fits both readings): 76.7% against 75.1% on flowers.zip, 78.0 against 70.0 on 64 px CIFAR-10
        # photos (benchmarks/README.md).
        "model_option": _photo_options(backbone),
        # Fine-tuning, when it runs: Adam at 1e-3 for the new classifier, a tenth for the backbone.
        "optimizer": "adam", "lr": 1e-3, "backbone_lr_scale": 0.1, "early_stopping": True,
        "monitor": "val_loss", "patience": 2, "schedule": "constant",
        # 32, or half of the about 80% of the images that train, for a folder of a few dozen.
        "batch_size": max(2, min(32, int(probe.images * 0.8) // 2)),
    }
    finetune = not fast and (kind == "cuda" or user.get("time_budget") is not None
                             or user.get("epochs") is not None or user.get("head_first") is False)
    if finetune:
        settings["epochs"] = 30 if user.get("time_budget") is not None else 5
        # Photo augmentation: mirror, zoom and shift (a random-resized-crop in small), mild colour jitter.  Not
        # zoom and shift with several labels per image: they can push a labelled object out of the picture.
        settings["augment"] = ["hflip", "jitter:0.1"] if probe.multilabel else \
            ["hflip", "zoom:0.15", "translate:" + str(max(1, side // 16)), "jitter:0.1"]
        if kind == "cpu":  # Lite0's depthwise convolutions train slower in bf16 on a CPU: 61 against 73 images/s
            settings["precision"] = "fp32"
        epochs = user.get("epochs") if isinstance(user.get("epochs"), int) else settings["epochs"]
        settings["warmup_epochs"] = 1.0 if epochs >= 3 else 0.0  # the new classifier settles before the backbone moves
        plan = "stage 1 then fine-tuning with early stopping on val"
        if user.get("time_budget") is not None:
            plan += f" within {user['time_budget']}"
    else:
        settings["epochs"] = 0
        mirror = "hflip" in settings["augment"]
        seconds, rate = stage1_seconds(backbone, side, probe.images, settings["model_option"],
                                       views=2 if mirror else 1)
        where = "--fast" if fast else "on this CPU"
        plan = (f"stage 1 only ({where}): the classifier on frozen features of the photos"
                f"{' and their mirror images' if mirror else ''}, "
                f"about {seconds:.0f}s of frozen passes here at most ({rate:.0f} images/s timed); "
                + ("without --fast the backbone is " + PHOTO_MODEL[kind] if fast else
                   f"less: --fast ({FAST_MODEL}); more: --time-budget 10m fine-tunes after it"))
    what = (f"{backbone} (named) starts from its ImageNet weights (--pretrained none: from random weights)"
            if model else f"{backbone} pretrained on ImageNet")
    line = (f"{dataset}: {probe.images:,} photos of about {probe.median_size[0]}x{probe.median_size[1]} "
            f"{'with' if probe.multilabel else 'in'} "
            f"{f'{probe.classes} labels (several per image)' if probe.multilabel else f'{probe.classes} classes'} -> "
            f"{what} at {side}x{side} on the {kind}; "
            f"{plan}; override with --model, --image-size, --epochs")
    return settings, line


def forward_rate(model, image_shape: tuple[int, int, int], device: str = "cpu") -> float:
    """Images/s of ``model``'s eval forward pass in PyTorch (fp32, channels_last) at ``image_shape`` (C, H, W).

    Two batches of ``RATE_IMAGES`` random images, the second timed: about 0.1 s for EfficientNet-Lite2 at 128 px
    on 2 AVX2 cores.  Stage 1 runs its frozen pass through ONNX Runtime where that is faster (1.5 to 3 times,
    benchmarks/README.md), so a time from this rate errs long.
    """
    import time

    import torch

    model = model.eval().to(device, memory_format=torch.channels_last)
    x = torch.randn(RATE_IMAGES, *image_shape, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return RATE_IMAGES / max(time.perf_counter() - started, 1e-6)


def passes_per_image(views: int) -> float:
    """Stage 1's frozen passes per photo of a folder when each training photo is seen in ``views`` views."""
    return TRAIN_SHARE * views + (1 - TRAIN_SHARE) * 2


def stage1_seconds(model: str, side: int, images: int, options: dict, views: int = 2) -> tuple[float, float]:
    """(seconds, images/s): the most stage 1's frozen passes over ``images`` photos (``views`` of each training
    photo) should take on this CPU, from ``model`` timed at ``side`` x ``side`` (random weights: the speed does
    not depend on them)."""
    import torch

    with torch.random.fork_rng():  # the timing draws random weights and pixels; the run's seeds stay untouched
        torch.manual_seed(0)
        net = create_model(model, in_chans=3, num_classes=2, img_size=(side, side), **options)
        rate = forward_rate(net, (3, side, side))
    return images * passes_per_image(views) / rate, rate


def _photo_options(model: str) -> dict:
    """The model options of the photo settings that ``model`` takes: BatchNorm statistics frozen, and (EfficientNet-
    Lite) the classifier reading several stages."""
    takes = model_options(model) or {}
    wanted = {"freeze_bn": True, "head_stages": MULTI_STAGE_HEAD}
    return {k: v for k, v in wanted.items() if k in takes}
