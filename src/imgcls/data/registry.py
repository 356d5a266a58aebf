"""The dataset registry and the one entry point, :func:`build_dataset`.

A built-in dataset is added in exactly one place: the ``_BUILTIN`` table.
Anything else given as ``--data`` is a path to a folder or ``.zip`` of class
folders.  Every source comes out as an :class:`ImageDataset` with ``train``,
``val`` (unless ``val_fraction`` is 0) and ``test`` splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.data.base import ImageDataset, Split, label_counts
from imgcls.data.cache import cache_key, file_digest, load_cached
from imgcls.data.download import data_dir
from imgcls.data.exclude import exclude_images
from imgcls.data.folder import load_folder
from imgcls.data.multilabel import iterative_split
from imgcls.data.official import load_official
from imgcls.data.quality import pixel_digests
from imgcls.errors import DataError
from imgcls.startup import collector_paused

CACHE_FORMAT = 1


def load_digits() -> ImageDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn).

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and the digit per
    row) without importing scikit-learn, which takes 0.9 s of a run that only measures against the digits; through
    ``sklearn.datasets.load_digits`` where that file is not found."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    shipped = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if shipped is not None and shipped.is_file():
        rows = np.loadtxt(shipped, delimiter=",", dtype=np.float64)
        counts, target = rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        counts, target = bunch.images, bunch.target
    # Pixel values are counts 0..16 of an 4x4 block; scale to the 0..255 of an image.
    images = np.rint(counts * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ImageDataset("digits", [str(c) for c in range(10)], {"all": Split(images, target)})


def _official(name: str) -> Callable[[], ImageDataset]:
    def load() -> ImageDataset:
        return load_official(name)

    load.__doc__ = f"{name}, downloaded from its official source and checksummed"
    return load


_BUILTIN: dict[str, Callable[[], ImageDataset]] = {
    "digits": load_digits,
    "mnist": _official("mnist"),
    "fashion-mnist": _official("fashion-mnist"),
    "cifar10": _official("cifar10"),
    "cifar100": _official("cifar100"),
}


def dataset_names() -> list[str]:
    return list(_BUILTIN)


def build_dataset(cfg, seed: int = 0, progress: bool = False) -> ImageDataset:
    """Load ``cfg.dataset`` and make its train/val/test splits; then the folders ``cfg.added``, each split the
    same way, after its images (:func:`load_added`, :func:`merge_added`).

    Args:
        cfg: a :class:`imgcls.config.DataConfig`.
        seed: seed of the stratified split (the same seed gives the same split).
        progress: show a progress bar while decoding images.
    """
    return build_dataset_blocks(cfg, seed, progress)[0]


def build_dataset_blocks(cfg, seed: int = 0, progress: bool = False) -> tuple[ImageDataset, dict[str, list[int]]]:
    """:func:`build_dataset`, and per split the rows where the images of each folder of ``cfg.added`` start (the
    images of ``cfg.dataset`` come first): the blocks a run updated from this data cached its features in."""
    source = cfg.dataset
    size = tuple(cfg.image_size) if cfg.image_size else None
    with collector_paused():  # a path per image: tens of thousands of objects that live for the run
        if source in _BUILTIN:
            ds = _load_builtin(source, cfg.cache)
            ds = adapt_images(ds, size, cfg.channels)
            ds.layout = ds.layout or "built-in"
        else:
            ds = _load_path(Path(source).expanduser(), cfg, size, progress)
        ds = complete_splits(ds, cfg.val_fraction, cfg.test_fraction, seed)
    if getattr(cfg, "exclude", None):
        ds = exclude_images(ds, cfg.exclude, source)
    starts: dict[str, list[int]] = {name: [] for name in ds.splits}
    for folder in getattr(cfg, "added", None) or ():
        for name, split in ds.splits.items():
            starts[name].append(len(split))
        ds = merge_added(ds, load_added(folder, cfg, ds, seed, progress))
    return ds, starts


def load_added(folder: str, cfg, like: ImageDataset, seed: int = 0, progress: bool = False) -> ImageDataset:
    """A folder of photos added to the dataset ``like`` (``imgcls train --update``), split as ``cfg`` splits data.

    Its images are decoded at ``like``'s size and channels (and cached as any folder's); it may hold a single
    class; val and test are carved from it class by class with ``cfg``'s fractions and ``seed``, unless it has
    split folders, and a folder too small to give a test image keeps every image for training (with a warning).
    Its classes are its own: :func:`merge_added` maps them onto ``like``'s.

    Raises:
        DataError: the folder does not exist, holds no image, has no class folders, or has several labels per
            image where ``like`` has one class per image (or the other way round).
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise DataError(f"the folder to add, {folder}, does not exist; give a folder (or .zip) of class folders, "
                        f"one per class, new or already in the run")
    c, h, w = like.image_shape
    with collector_paused():
        added = _load_path(path, cfg, (h, w), progress, channels=c, labels=None, min_classes=1)
        if added.multilabel != like.multilabel:
            kinds = ("several labels per image", "one class per image")
            raise DataError(f"the folder to add, {folder}, has {kinds[not added.multilabel]} and {like.name} has "
                            f"{kinds[not like.multilabel]}; give it in the same form (class folders)")
        return complete_splits(added, cfg.val_fraction, cfg.test_fraction, seed, require_test=False)


def merge_added(base: ImageDataset, added: ImageDataset) -> ImageDataset:
    """``base`` with the images of ``added`` (:func:`load_added`) after its own in every split.

    The classes are ``base``'s, in their order, then those of ``added`` that ``base`` lacks, in its order: a
    class keeps its index, so the rows of a classifier trained on ``base`` are the first rows of one trained on
    both.  An image of ``added`` that ``base`` holds already (the same pixels) is left out: with a note in the
    same class, with a warning naming both under another (``base``'s label stands).  A split of ``added`` that
    ``base`` has not (val, where ``base`` holds none out) joins train.

    Raises:
        DataError: a class of ``added`` is mostly (``RENAMED_SHARE``) images ``base`` has under another class, as
            a class renamed would be, naming them; or ``added`` has no image that ``base`` lacks.
    """
    classes = list(base.classes) + [c for c in added.classes if c not in base.classes]
    table = np.array([classes.index(c) for c in added.classes], dtype=np.int64)
    extra, same, other = _new_images(base, added, table)
    notes = [*base.notes, *(f"{added.name}: {n}" for n in added.notes)]
    if same:
        notes.append(f"{added.name}: {_images(len(same))} of it {'is' if len(same) == 1 else 'are'} already in "
                     f"{base.name}, in the same class, and left out ({', '.join(same[:SHOWN_COPIES])})")
    if other:
        notes.append(f"warning: {_images(len(other))} of {added.name} {'is' if len(other) == 1 else 'are'} already "
                     f"in {base.name} under another class, and left out ({base.name}'s label stands): {'; '.join(other[:SHOWN_COPIES])}"
                     f"{'; ...' if len(other) > SHOWN_COPIES else ''}")
    for name in [k for k in extra if k not in base.splits]:
        extra["train"] = _joined(extra["train"], extra.pop(name))
        notes.append(f"{added.name}: its {name} images join train, as {base.name} holds out no {name} split")
    splits = {name: _joined(split, extra[name]) if name in extra else split for name, split in base.splits.items()}
    return ImageDataset(base.name, classes, splits, skipped=[*base.skipped, *added.skipped],
                        bad=[*base.bad, *added.bad], notes=notes,
                        layout=f"{base.layout}; added {added.name}: {added.layout}", excluded=base.excluded)


SHOWN_COPIES = 5  # images named in a refusal or a note of merge_added
# A class of an added folder is taken for a class renamed when at least this share of its images are images of the
# data under another class; fewer (a photo filed twice, as flowers.zip has a rose among its tulips) are left out
# with a warning, as the data's own label stands.
RENAMED_SHARE = 0.5


def _new_images(base: ImageDataset, added: ImageDataset, table: np.ndarray
                ) -> tuple[dict[str, Split], list[str], list[str]]:
    """The splits of ``added`` (labels mapped through ``table``) without the images ``base`` holds already; the
    paths of those left out in the same class, and of those left out under another; DataError as
    :func:`merge_added` says."""
    seen: dict[bytes, tuple[int, str]] = {}
    for split in base.splits.values():
        for d, label, path in zip(pixel_digests(split.images), split.labels.tolist(), _names(split)):
            seen.setdefault(d, (label, path))
    splits, same, other = {}, [], []
    clashing = np.zeros(len(added.classes), np.int64)  # per class of added: its images base has under another
    for name, split in added.splits.items():
        labels, keep = table[split.labels], []
        for i, (d, label, path) in enumerate(zip(pixel_digests(split.images), labels.tolist(), _names(split))):
            if d not in seen:
                keep.append(i)
            elif seen[d][0] == label:
                same.append(path)
            else:
                other.append(f"{path} ({added.classes[split.labels[i]]}) is {seen[d][1]} ({base.classes[seen[d][0]]})")
                clashing[split.labels[i]] += 1
        kept = split.subset(np.array(keep, dtype=np.int64))
        splits[name] = Split(kept.images, labels[keep], kept.paths, kept.sizes)
    sizes = sum(label_counts(s.labels, len(added.classes)) for s in added.splits.values())
    renamed = [c for c, n, k in zip(added.classes, sizes, clashing) if k and k >= RENAMED_SHARE * n]
    if renamed:
        raise DataError(f"{added.name}: class {', '.join(renamed)} holds images that {base.name} has under another "
                        f"class ({_images(len(other))} in all), as a class renamed would: "
                        f"{'; '.join(other[:SHOWN_COPIES])}{'; ...' if len(other) > SHOWN_COPIES else ''}; keep "
                        f"each photo in the class folder it has, under the class's own name, or leave it out")
    if not any(len(split) for split in splits.values()):
        raise DataError(f"{added.name} adds no image: all {_images(len(same) + len(other))} in it are already in "
                        f"{base.name}")
    return splits, same, other


def _images(n: int) -> str:
    return f"{n:,} image" if n == 1 else f"{n:,} images"


def _names(split: Split) -> list[str]:
    return split.paths if split.paths is not None else [f"image {i}" for i in range(len(split))]


def _joined(first: Split, second: Split) -> Split:
    """The images of ``first``, then those of ``second``, as one split."""
    paths = first.paths + second.paths if first.paths is not None and second.paths is not None else None
    sizes = np.concatenate([first.sizes, second.sizes]) if first.sizes is not None and second.sizes is not None \
        else None
    return Split(np.concatenate([first.images, second.images]), np.concatenate([first.labels, second.labels]),
                 paths, sizes)


def _cache_dir() -> Path:
    return data_dir() / "decoded"


def _load_builtin(name: str, use_cache: bool) -> ImageDataset:
    if name == "digits" or not use_cache:
        return _BUILTIN[name]()

    # Official files are verified by checksum, so the name identifies the content.
    key = hashlib.sha256(f"official:{name}:{CACHE_FORMAT}".encode()).hexdigest()[:32]
    ds, _ = load_cached(key, _BUILTIN[name], _cache_dir())
    return ds


_FROM_CFG = object()  # _load_path's channels and labels: cfg's own


def _load_path(path: Path, cfg, size, progress: bool, *, channels=_FROM_CFG, labels=_FROM_CFG,
               min_classes: int = 2) -> ImageDataset:
    if not path.exists():
        raise DataError(
            f"--data {cfg.dataset!r} is neither a built-in dataset ({', '.join(_BUILTIN)}) "
            f"nor an existing folder or .zip file"
        )
    channels = cfg.channels if channels is _FROM_CFG else channels
    labels = getattr(cfg, "labels", None) if labels is _FROM_CFG else labels

    def build() -> ImageDataset:
        return load_folder(path, image_size=size, channels=channels, on_bad_image=cfg.on_bad_image,
                           resize=cfg.resize, progress=progress, follow_links=cfg.follow_links,
                           labels=labels, min_classes=min_classes)

    if not cfg.cache:
        return build()

    extra = {"labels": file_digest(labels)} if labels else {}  # a CSV outside the folder: its content counts
    key = cache_key(path, image_size=size, channels=channels, resize=cfg.resize, format=CACHE_FORMAT,
                    follow_links=cfg.follow_links, **extra)
    ds, from_cache = load_cached(key, build, _cache_dir())
    if from_cache:
        ds.notes.append("decoded images came from the cache (--no-cache decodes again)")
    if cfg.on_bad_image == "error" and ds.bad:
        # A cached entry built under "skip" still knows which images were bad.
        listed = "; ".join(f"{b.path}: {b.reason}" for b in ds.bad)
        raise DataError(f"{len(ds.bad)} images in {path} cannot be decoded (--on-bad-image error): {listed}")
    return ds


def adapt_images(ds: ImageDataset, size: tuple[int, int] | None, channels: int | None) -> ImageDataset:
    """Resize and convert the channels of an in-memory dataset (a no-op when they already match)."""
    for name, split in ds.splits.items():
        images = split.images
        if channels is not None and images.shape[-1] != channels:
            images = _convert_channels(images, channels)
        if size is not None and images.shape[1:3] != size:
            images = _resize(images, size)
        ds.splits[name] = Split(images, split.labels, split.paths, split.sizes)
    return ds


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    # ITU-R 601 luma, as PIL's convert("L").
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = []
    for start in range(0, len(images), 4096):  # chunks bound the float copy's memory
        x = torch.from_numpy(images[start:start + 4096]).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else images


def complete_splits(ds: ImageDataset, val_fraction: float, test_fraction: float, seed: int,
                    require_test: bool = True) -> ImageDataset:
    """Give ``ds`` train, test and (if ``val_fraction`` > 0) val splits, stratified by class.

    Layout ``<class>/<image>`` arrives as one split ``all``; layout ``train/...``
    may lack ``val`` or ``test``, which are then carved out of ``train``.
    What was carved is added to ``ds.layout`` (``; val carved from train``),
    and a class too small to give a carved split an image gets a warning in
    ``ds.notes``.

    Raises:
        DataError: the train split is empty, or the test split is (unless not ``require_test``: a folder that
            adds a few photos to a run's data may give none).
    """
    rng = np.random.default_rng(seed)
    splits = dict(ds.splits)
    flat = "all" in splits
    carved: dict[str, float] = {}  # split carved -> the share of each class's remaining images it took
    if flat:
        whole = splits.pop("all")
        parts = split_by_label(whole.labels, [test_fraction], rng)
        splits["train"], splits["test"] = whole.subset(parts[0]), whole.subset(parts[1])
        ds.notes.append(f"no train/test folders: held out {test_fraction:.0%} of {_each(whole)} for testing (seed {seed})")
        carved["test"] = test_fraction
    elif "test" not in splits:
        train = splits["train"]
        parts = split_by_label(train.labels, [test_fraction], rng)
        splits["train"], splits["test"] = train.subset(parts[0]), train.subset(parts[1])
        ds.notes.append(f"no test split: held out {test_fraction:.0%} of {_each(train, 'training ')} for testing "
                        f"(seed {seed})")
        carved["test"] = test_fraction
    if "val" not in splits and val_fraction > 0:
        train = splits["train"]
        # val_fraction is a share of all images, so it is rescaled to the remaining training images.
        share = min(val_fraction / (1.0 - test_fraction) if flat else val_fraction, 0.9)
        parts = split_by_label(train.labels, [share], rng)
        splits["train"], splits["val"] = train.subset(parts[0]), train.subset(parts[1])
        ds.notes.append(f"no val split: held out {share:.0%} of {_each(train, 'training ')} for validation (seed {seed})")
        carved["val"] = share
    _check_carved(ds, splits, carved, {"val": val_fraction, "test": test_fraction}, require_test)
    ds.splits = {k: splits[k] for k in ("train", "val", "test") if k in splits}
    if carved:  # "test and val carved out" of one folder per class; "val carved from train" of split folders
        what = " and ".join(carved) + (" carved out" if flat else " carved from train")
        ds.layout = f"{ds.layout}; {what}" if ds.layout else what
    return ds


def _each(split: Split, which: str = "") -> str:
    """What a carved split takes a share of: each class, or with several labels per image, the images spread by
    iterative stratification so that every label gets its share."""
    if split.multilabel:
        return f"the {which}images, each label's share kept by iterative stratification,"
    return f"each {which}class"


def _check_carved(ds: ImageDataset, splits: dict, carved: dict[str, float], asked: dict[str, float],
                  require_test: bool = True) -> None:
    """Refuse an empty train or test split, and warn of the classes a carved split got no image of.

    Every class keeps an image for training, and a carved split takes a
    rounded share of each class: a class of a few images is trained on but
    never validated or tested.  ``asked``: the fractions as the user gave them.
    """
    if len(splits["test"]) == 0 and require_test:
        if "test" in carved and asked["test"] == 0:
            raise DataError(f"{ds.name} has no test folder and --test-fraction 0 holds out no test image; every "
                            "run is evaluated on a test split: give --test-fraction above 0 (0.1 holds out 10% of "
                            "each class) or add a test/ folder")
        raise DataError(f"the test split of {ds.name} is empty: --test-fraction {asked['test']:g} of each class "
                        "is less than one image; add images, or raise --test-fraction")
    if len(splits["train"]) == 0:
        raise DataError(f"the train split of {ds.name} is empty; add images to its train folder")
    shares = list(carved.values())
    for i, name in enumerate(carved):
        have = {k: label_counts(splits[k].labels, ds.num_classes) > 0 for k in ("train", name)}
        missing = [ds.classes[c] for c in np.flatnonzero(have["train"] & ~have[name])]
        if missing:
            listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5:,} more" if len(missing) > 5 else "")
            them = "it" if len(missing) == 1 else "them"
            ds.notes.append(
                f"warning: {len(missing):,} {'class' if len(missing) == 1 else 'classes'} ({listed}) got no {name} "
                f"image, so {name} results say nothing of {them}: at --{name}-fraction {asked[name]:g} a class "
                f"needs {_least_images(shares[: i + 1])} images for one to be held out")


def _least_images(shares: list[float]) -> int:
    """The fewest images a class needs for the last of ``shares``, carved one after another, to take one."""
    for n in range(2, 100_000):
        left = n
        for share in shares:
            taken = _held_out(left, share)
            left -= taken
        if taken >= 1:
            return n
    return 100_000


def _held_out(count: int, share: float) -> int:
    """How many of a class's ``count`` images a split taking ``share`` of them gets: rounded, and at least
    one left behind."""
    return max(min(round(share * count), count - 1), 0)


def split_by_label(labels: np.ndarray, fractions: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    """:func:`stratified_split` for class labels (N,), iterative stratification for a 0/1 label matrix (N, L)
    (:func:`imgcls.data.multilabel.iterative_split`): the same contract."""
    if labels.ndim == 2:
        return iterative_split(labels, fractions, rng)
    return stratified_split(labels, fractions, rng)


def stratified_split(labels: np.ndarray, fractions: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Split indices class by class: part 0 keeps the rest, part i+1 gets ``fractions[i]`` of each class.

    Every class keeps at least one image in part 0 when it has any.
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for i, frac in enumerate(fractions):
            n = min(round(frac * len(idx)), len(idx) - start - 1)
            n = max(n, 0)
            parts[i + 1].append(idx[start:start + n])
            start += n
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]
