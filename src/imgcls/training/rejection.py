"""After training: the out-of-distribution score a run keeps, fitted and measured (see :mod:`imgcls.ood`).

The score's threshold rejects 5% of the val images (``imgcls.ood.FRR``; ``--ood-frr`` sets another share); how
well it separates the classes from images that are none of them is measured against ``--ood FOLDER`` when given,
else against images imgcls has at hand: scikit-learn's digits (upscaled) for a model of anything else, uniform
noise for a model of digits.  The features of a stage-1 run come from the feature cache its stage 1 filled; a
fine-tuned run computes those of its val images and of a sample of its training images once.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import numpy as np
import torch

from imgcls import rundir
from imgcls.data.base import ImageDataset
from imgcls.data.inputs import load_image_inputs
from imgcls.data.quality import pixel_digests
from imgcls.data.registry import adapt_images, load_digits
from imgcls.errors import ConfigError, DataError
from imgcls.inference import predict_logits, scoring_runtime
from imgcls.models.pretrained import classifier_layer
from imgcls.ood import (
    BANK_IMAGES,
    FRR,
    K,
    choose,
    entry_record,
    feature_directions,
    knn_score,
    logit_scores,
)
from imgcls.training.transfer import FeatureStore

OUTSIDE_IMAGES = 300  # images from outside the classes that the measurement takes (the first, or a seeded sample)
MIN_VAL = 20  # val images below which no threshold is fitted: 5% of fewer is not one image
DIGIT_DATASETS = ("digits", "mnist", "fashion-mnist")  # built-in data whose models are measured against noise
ACCEPTED_SHOWN = 20  # --ood images taken for the classes' own, named in ood.json


# The --ood images last checked, for the dataset they were checked against (a weak reference: a dataset
# that is gone matches nothing): the check before training and the measurement after it decode the folder once.
_checked: dict = {}


def outside_images(data_cfg, ds: ImageDataset, seed: int = 0) -> tuple[np.ndarray, str, list[str] | None]:
    """uint8 (N, H, W, C) images from outside the classes at ``ds``'s size, what they are, and their names
    (``--ood``'s files; None for images at hand).

    Raises:
        DataError: ``--ood`` names no readable images, or images of the training data itself (named).
    """
    c, h, w = ds.image_shape
    rng = np.random.default_rng(seed)
    folder = getattr(data_cfg, "ood", None)
    if folder:
        key = (str(folder), (c, h, w), data_cfg.resize, seed)
        if _checked.get("key") == key and _checked["dataset"]() is ds:
            return _checked["images"]
        names, images, bad = load_image_inputs([folder], channels=c, size=(h, w), resize=data_cfg.resize)
        if not len(images):
            why = f" ({bad[0].path}: {bad[0].reason})" if bad else ""
            raise DataError(f"--ood {folder}: no image could be read{why}; give a folder or zip of images that are "
                            f"none of the classes")
        check_overlap(names, images, ds, folder)
        pick = np.sort(rng.permutation(len(images))[:OUTSIDE_IMAGES])
        found = images[pick], f"{len(pick):,} images of {folder}", [names[i] for i in pick]
        _checked.update(key=key, dataset=weakref.ref(ds), images=found)
        return found
    if ds.name in DIGIT_DATASETS:
        return rng.integers(0, 256, (OUTSIDE_IMAGES, h, w, c), dtype=np.uint8), \
            f"{OUTSIDE_IMAGES} images of uniform noise (the model is one of digits)", None
    digits = load_digits().splits["all"]
    pick = np.sort(rng.permutation(len(digits))[:OUTSIDE_IMAGES])
    small = ImageDataset("digits", [], {"all": digits.subset(pick)})
    return adapt_images(small, (h, w), c).splits["all"].images, \
        f"{OUTSIDE_IMAGES} of scikit-learn's digits, upscaled (give --ood FOLDER for photos of your own)", None


STAGE1_TTA = {"none": (), "flip": ("hflip",)}  # a stage-1 run's test-time views beyond the image: their cached features


def logits_and_features(model, images: np.ndarray, tta: str, norm: dict, store: FeatureStore | None, scoring,
                        batch_size: int, split: str = "outside") -> tuple[torch.Tensor, np.ndarray]:
    """The model's logits (N, K), test-time views averaged, and pooled features (N, F) of uint8 images.

    ``store``: the frozen features of a model whose backbone stage 1 left as it was: the features come from its
    cache (or are computed into it: the digits measured against are the same for every run of a backbone) and
    the logits from the classifier alone, as stage 1 fitted it; None: through the whole model. ``split``: the
    store's name for the images (an update's splits are cached block by block)."""
    if store is None or tta not in STAGE1_TTA:
        return predict_logits(model, images, norm, scoring, batch_size, tta, features=True)
    pooled = store.features(split, images)[0]
    _, layer = classifier_layer(model)
    views = [pooled] + [store.features(split, images, view)[0] for view in STAGE1_TTA[tta]]
    with torch.no_grad():
        logits = torch.stack([layer(torch.from_numpy(np.asarray(v, np.float32))) for v in views]).mean(0)
    return logits, pooled


def check_overlap(names: list[str], images: np.ndarray, ds: ImageDataset, folder: str) -> None:
    """Refuse ``--ood`` images that are pixel for pixel images of the dataset: they are in its classes."""
    own = set()
    for split in ds.splits.values():
        own.update(pixel_digests(split.images))
    same = [name for name, digest in zip(names, pixel_digests(images)) if digest in own]
    if same:
        listed = ", ".join(same[:5]) + (f" and {len(same) - 5:,} more" if len(same) > 5 else "")
        raise DataError(f"--ood {folder}: {len(same):,} of its {len(names):,} images are images of the training "
                        f"data ({listed}); an out-of-distribution folder holds images of none of the classes: "
                        f"remove them, or give another folder")


def fit_rejection(model, meta: dict, ds: ImageDataset, data_cfg, *, store: FeatureStore, stage1: bool, val_logits,
                  device, batch_size: int, seed: int, say) -> dict | None:
    """Measure MSP, energy and kNN on val against images from outside the classes, and return the ``ood`` entry
    to store with the model (``score``, ``threshold``, ``k``, kNN's ``bank``, what was measured), or None
    without a val split to fit on.

    ``store``: the frozen features of ``model`` (:class:`imgcls.training.transfer.FeatureStore`); ``stage1``: the
    final weights are stage 1's, so the training and val features are in its cache; ``val_logits``: the final
    weights' on val when at hand (stage 1's), else computed.
    """
    if "val" not in ds.splits or len(ds.splits["val"]) < MIN_VAL:
        say(f"out-of-distribution: no threshold (a val split of {MIN_VAL}+ images is needed to fit one)")
        return None
    started = time.perf_counter()
    outside, against, names = outside_images(data_cfg, ds, seed)
    norm, tta = meta["normalize"], meta.get("tta", "none")
    train, val = ds.splits["train"], ds.splits["val"]
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:BANK_IMAGES])
    scoring = scoring_runtime(device)
    if stage1:  # the cache holds the training and val images' features: no pass
        bank = store.features("train", train.images)[0][pick]
        val_pooled = store.features("val", val.images)[0]
    else:  # a fine-tuned model: the sample of training images and val, through the model as predict sees them
        bank = predict_logits(model, train.images[pick], norm, scoring, batch_size, features=True)[1]
        val_logits, val_pooled = predict_logits(model, val.images, norm, scoring, batch_size, tta, features=True)
    if val_logits is None and not ds.multilabel:
        val_logits = predict_logits(model, val.images, norm, scoring, batch_size, tta)
    # With several labels per image only kNN is measured: a low top probability there means "none of the labels",
    # which is an answer, not an unknown image; so the outside images need no logits and no mirror images.
    out_logits, out_pooled = logits_and_features(model, outside, "none" if ds.multilabel else tta, norm,
                                                 store if stage1 else None, scoring, batch_size)
    bank = feature_directions(bank).astype(np.float16).astype(np.float32)  # as it is stored
    inside = {"knn": knn_score(feature_directions(val_pooled), bank)}
    out = {"knn": knn_score(feature_directions(out_pooled), bank)}
    if not ds.multilabel:
        inside.update(logit_scores(np.asarray(val_logits)))
        out.update(logit_scores(out_logits.numpy()))
    frr = getattr(data_cfg, "ood_frr", FRR)
    choice = choose(inside, out, frr)
    best = choice["measured"][choice["score"]]
    others = [f"{k} {v['auroc']:.3f}" for k, v in choice["measured"].items() if k != choice["score"]]
    say(f"out-of-distribution: {choice['score']} kept (AUROC {best['auroc']:.3f} against {against}: "
        f"{best['far']:.1%} of them accepted, {best['frr']:.1%} of val rejected"
        f"{'; ' + ', '.join(others) if others else ''}) in {time.perf_counter() - started:.1f}s")
    entry = {"score": choice["score"], "threshold": choice["threshold"], "frr_target": frr, "against": against,
             "measured": choice["measured"], "val_images": len(val)}
    if names is not None:  # --ood's images the kept score takes for the classes' own: maybe in-class images
        accepted = np.flatnonzero(out[choice["score"]] >= choice["threshold"])
        entry["accepted"] = [names[i] for i in accepted[:ACCEPTED_SHOWN]]
        if len(accepted):
            say(f"out-of-distribution: {len(accepted):,} of the --ood images score like the classes' own (for "
                f"example {names[accepted[0]]}); if some are of the classes, leave them out of --ood (ood.json "
                f"lists the first {ACCEPTED_SHOWN})")
    if choice["score"] == "knn":
        entry.update(k=K, bank=torch.from_numpy(bank).to(torch.float16))  # 1,000 x 2,120: 4 MB
    return entry


def write_record(run, entry: dict) -> None:
    """``ood.json``: the stored entry without its bank of features."""
    run.write_json(rundir.OOD, entry_record(entry))


def check_outside(data_cfg, ds: ImageDataset, seed: int = 0) -> None:
    """Refuse, before training starts, an ``--ood`` that is not a folder or zip, holds no readable image, or holds
    images of the training data (see :func:`outside_images`; ``seed`` the run's, whose sample it keeps)."""
    folder = getattr(data_cfg, "ood", None)
    if not folder:
        return
    if not Path(folder).expanduser().exists():
        raise ConfigError(f"--ood {folder}: no such folder or zip; give images that are none of the classes")
    outside_images(data_cfg, ds, seed)
