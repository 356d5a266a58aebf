"""The official small benchmark datasets: where they live and how to read them.

MNIST and Fashion-MNIST are four gzip'd IDX files each; CIFAR-10 and
CIFAR-100 are one ``.tar.gz`` of Python-2 pickles each.  Files are downloaded
to ``<root>/<dataset>/<file>`` (root defaults to :func:`data_dir`) and
checked against the md5 sums published with the datasets (the same ones
torchvision checks).  A mirror (``mirror=`` or ``$IMGCLS_DATASET_MIRROR``) is
expected to use that same layout, ``<mirror>/<dataset>/<file>``, because MNIST
and Fashion-MNIST share file names; serving a data dir over HTTP makes one.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import tarfile
import types
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.data.base import ImageDataset, Split
from imgcls.data.download import (
    compute_md5,
    data_dir,
    fetch_file,
    join_url,
    resolve_mirror,
)
from imgcls.errors import DataError, DownloadError, unknown_name


@dataclass(frozen=True)
class RemoteFile:
    """One published file and its md5."""

    name: str
    md5: str


@dataclass(frozen=True)
class IdxLayout:
    """MNIST-style data: four gzip'd IDX files (images N x H x W uint8, labels N uint8)."""

    train_images: RemoteFile
    train_labels: RemoteFile
    test_images: RemoteFile
    test_labels: RemoteFile

    def files(self) -> tuple[RemoteFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


@dataclass(frozen=True)
class CifarLayout:
    """CIFAR-style data: a tar.gz of pickled batches, each ``{data: (N, 3072) uint8 CHW, <label_key>: [int]}``."""

    archive: RemoteFile
    folder: str  # the folder inside the archive that holds the batches
    train_batches: tuple[str, ...]
    test_batches: tuple[str, ...]
    meta: str
    label_key: str  # "labels" in CIFAR-10, "fine_labels" in CIFAR-100
    names_key: str  # key of the class names in the meta file

    def files(self) -> tuple[RemoteFile, ...]:
        return (self.archive,)


@dataclass(frozen=True)
class OfficialSpec:
    """An official dataset: base URLs tried in order, file layout and class names.

    ``classes`` empty means the names are read from the dataset's own meta file.
    """

    name: str
    base_urls: tuple[str, ...]
    layout: IdxLayout | CifarLayout
    classes: tuple[str, ...] = ()


def idx_layout(md5s: tuple[str, str, str, str]) -> IdxLayout:
    """Build the MNIST file layout from the md5s of train images, train labels, test images, test labels."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return IdxLayout(*(RemoteFile(n, m) for n, m in zip(names, md5s)))


# URLs and md5s as published by the dataset authors; checked against
# torchvision/datasets/mnist.py and cifar.py.
OFFICIAL = types.MappingProxyType(
    {
        "mnist": OfficialSpec(
            name="mnist",
            base_urls=("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
            layout=idx_layout(
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                )
            ),
            classes=tuple(str(d) for d in range(10)),
        ),
        "fashion-mnist": OfficialSpec(
            name="fashion-mnist",
            base_urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            layout=idx_layout(
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                )
            ),
            classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ),
        "cifar10": OfficialSpec(
            name="cifar10",
            base_urls=("https://www.cs.toronto.edu/~kriz/",),
            layout=CifarLayout(
                archive=RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
                folder="cifar-10-batches-py",
                train_batches=tuple(f"data_batch_{i}" for i in range(1, 6)),
                test_batches=("test_batch",),
                meta="batches.meta",
                label_key="labels",
                names_key="label_names",
            ),
            classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        ),
        "cifar100": OfficialSpec(
            name="cifar100",
            base_urls=("https://www.cs.toronto.edu/~kriz/",),
            layout=CifarLayout(
                archive=RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
                folder="cifar-100-python",
                train_batches=("train",),
                test_batches=("test",),
                meta="meta",
                label_key="fine_labels",
                names_key="fine_label_names",
            ),
        ),
    }
)
OFFICIAL_NAMES = tuple(OFFICIAL)


def load_official(
    name: str,
    root: Path | None = None,
    download: bool = True,
    mirror: str | None = None,
    spec: OfficialSpec | None = None,
) -> ImageDataset:
    """Download (if needed) and decode an official dataset.

    Args:
        name: one of :data:`OFFICIAL_NAMES`.
        root: folder that holds ``<name>/<file>``; defaults to :func:`data_dir`.
        download: fetch missing or corrupt files; if False they must be present.
        mirror: base URL tried before the official ones (``<mirror>/<name>/<file>``).
        spec: use this description instead of the table entry (tests, private copies).

    Returns:
        An ImageDataset with splits ``train`` and ``test``: images uint8
        (N, H, W, C), (N, 28, 28, 1) for MNIST-style data and (N, 32, 32, 3)
        for CIFAR; labels int64 (N,).
    """
    if spec is None:
        if name not in OFFICIAL:
            raise unknown_name("dataset", name, OFFICIAL_NAMES)
        spec = OFFICIAL[name]
    folder = Path(root if root is not None else data_dir()) / spec.name
    paths = obtain_files(spec, folder, download, mirror)
    if isinstance(spec.layout, IdxLayout):
        splits, classes = read_idx_splits(spec.layout, paths), list(spec.classes)
    else:
        splits, classes = read_cifar_archive(spec.layout, paths[spec.layout.archive.name], spec.classes)
    for split_name, split in splits.items():
        check_labels(split, len(classes), f"{spec.name} {split_name}")
    return ImageDataset(name=spec.name, classes=classes, splits=splits)


def obtain_files(spec: OfficialSpec, folder: Path, download: bool, mirror: str | None) -> dict[str, Path]:
    """Return file name -> local path for every file of ``spec``, downloading as allowed."""
    base = resolve_mirror(mirror)
    dataset_mirror = join_url(base, spec.name) if base else None
    paths, failures = {}, []
    for remote in spec.layout.files():
        dest = folder / remote.name
        try:
            if download:
                urls = [join_url(u, remote.name) for u in spec.base_urls]
                fetch_file(remote.name, urls, dest, remote.md5, mirror=dataset_mirror)
            else:
                check_present(dest, remote.md5)
        except DownloadError as exc:
            # Keep going, so that one error names every file that is missing or wrong.
            failures.append(str(exc))
        paths[remote.name] = dest
    if len(failures) == 1:
        raise DownloadError(failures[0])
    if failures:
        raise DownloadError(f"{len(failures)} files of {spec.name} are missing or wrong:\n\n" + "\n\n".join(failures))
    return paths


def check_present(dest: Path, md5: str) -> None:
    """Raise DownloadError unless ``dest`` exists with checksum ``md5`` (the download=False path)."""
    if not dest.exists():
        raise DownloadError(f"{dest} is missing and download=False; put the file there (md5 {md5}) or allow downloading")
    actual = compute_md5(dest)
    if actual != md5:
        raise DownloadError(f"the existing file at {dest} is corrupt (md5 {actual}, expected {md5}); delete it or allow downloading")


def check_labels(split: Split, num_classes: int, what: str) -> None:
    """Raise DataError if a label of ``split`` is outside [0, num_classes)."""
    if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
        raise DataError(f"{what}: labels range {split.labels.min()}..{split.labels.max()}, expected 0..{num_classes - 1}")


# ---------------------------------------------------------------- IDX files

# IDX type codes (third byte of the magic number) to big-endian numpy dtypes.
IDX_DTYPES = types.MappingProxyType({0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"})


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip'd or not) into an array of the shape and dtype its header gives.

    Raises:
        DataError: bad magic number, unknown type code, or a data size that
            does not match the header (a truncated file).
    """
    raw = read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file: its magic number {raw[:4].hex()} does not start with 0000")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x}; known codes: {known}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the file holds {len(raw) - header}; "
            "the file is truncated or corrupt, delete it to download it again"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def read_maybe_gzip(path: Path) -> bytes:
    """Return the bytes of ``path``, decompressed if it is gzip'd."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            return Path(path).read_bytes()
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read {path}: {error}") from error


def read_idx_splits(layout: IdxLayout, paths: dict[str, Path]) -> dict[str, Split]:
    """Read the train and test splits of an MNIST-style dataset; images (N, H, W, 1) uint8."""
    pairs = {"train": (layout.train_images, layout.train_labels), "test": (layout.test_images, layout.test_labels)}
    return {split: read_idx_pair(paths[img.name], paths[lab.name]) for split, (img, lab) in pairs.items()}


def read_idx_pair(images_path: Path, labels_path: Path) -> Split:
    """Read an IDX image file (N, H, W) uint8 and its IDX label file (N,) into a Split."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise DataError(f"{labels_path}: expected {len(images)} labels to match {images_path}, got shape {labels.shape}")
    return Split(images[..., None], labels.astype(np.int64))


# ------------------------------------------------------------ CIFAR archives


def reconstruct_function():
    """Return numpy's ndarray reconstruction function (``numpy.core`` or ``numpy._core``, by version)."""
    return np.ndarray.__reduce__(np.zeros(0, np.uint8))[0]


def encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` limited to latin-1: how Python 3 writes bytes in protocol-2 pickles."""
    if encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise DataError(f"refusing _codecs.encode with encoding {encoding!r} in a pickle; only latin1 is allowed")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and nothing else.

    CIFAR batches are pickles, and a pickle can call any importable function,
    so only the globals that the official files use are allowed.
    """

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return reconstruct_function()
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): encode_latin1}
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise DataError(
            f"refusing to load {module}.{name} from a pickle; only numpy arrays "
            "(numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype) are allowed"
        )


def unpickle_restricted(raw: bytes, where: str) -> dict[str, object]:
    """Unpickle a CIFAR batch or meta file with :class:`RestrictedUnpickler`.

    Keys come back as ``str`` (the official Python-2 files give bytes).
    """
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError as error:
        raise DataError(f"{where}: {error}") from error
    except Exception as error:  # a damaged pickle can raise almost anything
        raise DataError(f"{where}: not a readable pickle ({type(error).__name__}: {error})") from error
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_tar_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """Return the bytes of the named members of a tar.gz, read in one pass (no extraction)."""
    wanted, found = set(members), {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # One sequential pass: random access into a gzip stream re-decompresses from the start.
            for info in tar:
                if info.name in wanted and info.isfile():
                    found[info.name] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read archive {archive}: {error}") from error
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"archive {archive} lacks {', '.join(missing)}; expected the official CIFAR python archive")
    return found


def read_cifar_archive(
    layout: CifarLayout, archive: Path, classes: tuple[str, ...]
) -> tuple[dict[str, Split], list[str]]:
    """Read train and test splits, images (N, 32, 32, 3) uint8, and the class names.

    Class names are ``classes`` if given, else the meta file's ``names_key``.
    """
    member = {b: f"{layout.folder}/{b}" for b in (*layout.train_batches, *layout.test_batches, layout.meta)}
    raw = read_tar_members(archive, list(member.values()))
    splits = {}
    for split, batches in (("train", layout.train_batches), ("test", layout.test_batches)):
        parts = [decode_cifar_batch(raw[member[b]], layout.label_key, f"{archive}:{member[b]}") for b in batches]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        # Stored as CHW planes; one contiguous copy makes the array truly NHWC.
        images = np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        splits[split] = Split(images, labels)
    if not classes:
        classes = read_cifar_names(raw[member[layout.meta]], layout.names_key, f"{archive}:{member[layout.meta]}")
    return splits, list(classes)


def decode_cifar_batch(raw: bytes, label_key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (data (N, 3072) uint8 in CHW order, labels (N,) int64) of one pickled batch."""
    batch = unpickle_restricted(raw, where)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: expected 'data' as uint8 (N, 3072), got {got}")
    if labels is None:
        raise DataError(f"{where}: no {label_key!r} key; keys are {sorted(batch)}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{where}: {labels.shape} labels for {len(data)} images")
    return data, labels


def read_cifar_names(raw: bytes, names_key: str, where: str) -> list[str]:
    """Return the class names stored under ``names_key`` in a CIFAR meta pickle."""
    names = unpickle_restricted(raw, where).get(names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{where}: no class names under {names_key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
