"""Tests for imgcls.data.official: files in the official formats, made here and served locally."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from imgcls.data import download, official
from imgcls.data.official import (
    OFFICIAL,
    OFFICIAL_NAMES,
    idx_layout,
    load_official,
    read_idx,
    unpickle_restricted,
)
from imgcls.errors import ConfigError, DataError, DownloadError


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)


def closed_port_url() -> str:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------ file makers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in IDX: 0, 0, type 0x08, ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data))


def make_mnist(folder: Path, rng, n_train=20, n_test=10):
    """Write the four official MNIST files into folder; return the arrays and the md5s."""
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_gz(folder / name, idx_bytes(array))
    md5s = tuple(md5_of(folder / name) for name in arrays)
    return list(arrays.values()), md5s


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]


class Py2StylePickler(pickle._Pickler):
    """Writes pickles the way Python 2 wrote the official CIFAR files.

    Every str and bytes becomes a BINSTRING (loaded back as bytes with
    encoding="bytes") and numpy's reconstruct function is named by its old
    path numpy.core.multiarray.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def py3_pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def cifar_batch(images_hwc: np.ndarray, labels: np.ndarray, label_key: bytes) -> dict:
    """A batch dict as in the official files: data (N, 3072) uint8 in CHW order."""
    data = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072).copy()
    return {b"batch_label": b"testing batch", label_key: [int(x) for x in labels], b"data": data}


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def random_images(rng, n):
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def make_cifar10(path: Path, rng):
    """Write cifar-10-python.tar.gz (py2-style pickles); return (train images, train labels, test images, test labels)."""
    members, train_x, train_y = {}, [], []
    for i in range(1, 6):
        x, y = random_images(rng, 2), rng.integers(0, 10, 2)
        members[f"cifar-10-batches-py/data_batch_{i}"] = py2_pickle(cifar_batch(x, y, b"labels"))
        train_x.append(x)
        train_y.append(y)
    test_x, test_y = random_images(rng, 3), rng.integers(0, 10, 3)
    members["cifar-10-batches-py/test_batch"] = py2_pickle(cifar_batch(test_x, test_y, b"labels"))
    names = [n.encode() for n in OFFICIAL["cifar10"].classes]
    members["cifar-10-batches-py/batches.meta"] = py2_pickle({b"label_names": names, b"num_vis": 3072})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    write_tar(path, members)
    return np.concatenate(train_x), np.concatenate(train_y), test_x, test_y


def make_cifar100(path: Path, rng):
    """Write cifar-100-python.tar.gz (standard protocol-2 pickles); return arrays and the class names."""
    train_x, train_y = random_images(rng, 4), rng.integers(0, 100, 4)
    test_x, test_y = random_images(rng, 2), rng.integers(0, 100, 2)
    names = [f"class_{i:03d}" for i in range(100)]

    def batch(x, y):
        return {**cifar_batch(x, y, b"fine_labels"), b"coarse_labels": [0] * len(y), b"filenames": [b"a.png"] * len(y)}

    write_tar(
        path,
        {
            "cifar-100-python/train": py3_pickle(batch(train_x, train_y)),
            "cifar-100-python/test": py3_pickle(batch(test_x, test_y)),
            "cifar-100-python/meta": py3_pickle({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}),
        },
    )
    return train_x, train_y, test_x, test_y, names


def cifar_spec(name: str, archive: Path, base_url: str):
    spec = OFFICIAL[name]
    layout = dataclasses.replace(spec.layout, archive=official.RemoteFile(archive.name, md5_of(archive)))
    return dataclasses.replace(spec, base_urls=(base_url,), layout=layout)


# ------------------------------------------------------------------ tests


def test_table_holds_the_official_checksums_and_urls():
    assert OFFICIAL_NAMES == ("mnist", "fashion-mnist", "cifar10", "cifar100")
    mnist = OFFICIAL["mnist"]
    assert mnist.layout.train_images == official.RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873")
    assert mnist.layout.test_labels.md5 == "ec29112dd5afa0611ce80d1b7f02629c"
    assert mnist.base_urls[0] == "http://yann.lecun.com/exdb/mnist/"
    assert OFFICIAL["cifar10"].layout.archive.md5 == "c58f30108f718f92721af3b95e74349a"
    assert OFFICIAL["cifar100"].layout.archive.md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert OFFICIAL["fashion-mnist"].classes[0] == "T-shirt/top" and len(OFFICIAL["fashion-mnist"].classes) == 10


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="cifar100.*mnist"):
        load_official("imagenet")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(server, tmp_path, name):
    url, served, _ = server
    arrays, md5s = make_mnist(served, np.random.default_rng(0))
    spec = dataclasses.replace(OFFICIAL[name], base_urls=(url + "/",), layout=idx_layout(md5s))
    ds = load_official(name, spec=spec)
    assert set(ds.splits) == {"train", "test"}
    assert ds.classes == list(OFFICIAL[name].classes)
    train, test = ds.splits["train"], ds.splits["test"]
    assert train.images.shape == (20, 28, 28, 1) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[..., 0], arrays[0])
    np.testing.assert_array_equal(train.labels, arrays[1])
    np.testing.assert_array_equal(test.images[..., 0], arrays[2])
    assert test.labels.dtype == np.int64
    np.testing.assert_array_equal(test.labels, arrays[3])
    assert (tmp_path / "data" / name / "train-images-idx3-ubyte.gz").exists()


def test_mirror_uses_dataset_subfolder(server, monkeypatch):
    url, served, requests = server
    _, md5s = make_mnist(served / "mnist", np.random.default_rng(1))
    spec = dataclasses.replace(OFFICIAL["mnist"], base_urls=(closed_port_url(),), layout=idx_layout(md5s))
    monkeypatch.setenv(download.MIRROR_ENV, url)
    ds = load_official("mnist", spec=spec)
    assert len(ds.splits["train"]) == 20
    assert requests[0] == "/mnist/train-images-idx3-ubyte.gz" and len(requests) == 4
    load_official("mnist", spec=spec)
    assert len(requests) == 4  # cached files are not fetched again


def test_cifar10_round_trip_transposes_chw_to_hwc(server, tmp_path):
    url, served, _ = server
    archive = served / "cifar-10-python.tar.gz"
    train_x, train_y, test_x, test_y = make_cifar10(archive, np.random.default_rng(2))
    ds = load_official("cifar10", spec=cifar_spec("cifar10", archive, url + "/"))
    train = ds.splits["train"]
    assert train.images.shape == (10, 32, 32, 3) and train.images.flags.c_contiguous
    np.testing.assert_array_equal(train.images, train_x)
    np.testing.assert_array_equal(train.labels, train_y)
    np.testing.assert_array_equal(ds.splits["test"].images, test_x)
    np.testing.assert_array_equal(ds.splits["test"].labels, test_y)
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10


def test_cifar_pixel_channels_land_in_place(server):
    url, served, _ = server
    archive = served / "cifar-10-python.tar.gz"
    rng = np.random.default_rng(3)
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 5, 7] = (10, 200, 30)  # red, green, blue of pixel (row 5, column 7)
    members = {f"cifar-10-batches-py/data_batch_{i}": py2_pickle(cifar_batch(image, [i], b"labels")) for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = py2_pickle(cifar_batch(random_images(rng, 1), [0], b"labels"))
    members["cifar-10-batches-py/batches.meta"] = py2_pickle({b"label_names": [b"x"] * 10})
    write_tar(archive, members)
    ds = load_official("cifar10", spec=cifar_spec("cifar10", archive, url + "/"))
    images = ds.splits["train"].images
    assert images[0, 5, 7].tolist() == [10, 200, 30]
    assert images.sum() == 5 * (10 + 200 + 30)
    assert ds.splits["train"].labels.tolist() == [1, 2, 3, 4, 5]


def test_cifar100_reads_fine_labels_and_names_from_meta(server):
    url, served, _ = server
    archive = served / "cifar-100-python.tar.gz"
    train_x, train_y, test_x, test_y, names = make_cifar100(archive, np.random.default_rng(4))
    ds = load_official("cifar100", spec=cifar_spec("cifar100", archive, url + "/"))
    assert ds.classes == names
    np.testing.assert_array_equal(ds.splits["train"].images, train_x)
    np.testing.assert_array_equal(ds.splits["train"].labels, train_y)
    np.testing.assert_array_equal(ds.splits["test"].images, test_x)
    np.testing.assert_array_equal(ds.splits["test"].labels, test_y)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for raw in (pickle.dumps({b"data": Exploit()}, protocol=2), py2_pickle({b"data": Exploit()})):
        with pytest.raises(DataError, match="refusing to load .*system"):
            unpickle_restricted(raw, "evil")
    assert not (tmp_path / "pwned").exists()


def test_restricted_unpickler_refuses_other_codecs():
    raw = pickle.dumps({"x": b"abc"}, protocol=2).replace(b"latin1", b"rot_13")
    with pytest.raises(DataError, match="latin1"):
        unpickle_restricted(raw, "evil")


def test_malicious_batch_in_archive_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url, served, _ = server
    archive = served / "cifar-10-python.tar.gz"
    make_cifar10(archive, np.random.default_rng(5))
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    members["cifar-10-batches-py/data_batch_3"] = py2_pickle({b"data": Exploit(), b"labels": []})
    write_tar(archive, members)
    with pytest.raises(DataError, match="data_batch_3"):
        load_official("cifar10", spec=cifar_spec("cifar10", archive, url + "/"))
    assert not (tmp_path / "pwned").exists()


def test_truncated_idx_raises_data_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_gz(path, idx_bytes(np.zeros((20, 28, 28), np.uint8))[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        read_idx(path)


def test_truncated_idx_via_load_official(server):
    url, served, _ = server
    make_mnist(served, np.random.default_rng(6))
    write_gz(served / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(10, np.uint8))[:-1])
    md5s = tuple(md5_of(served / f.name) for f in OFFICIAL["mnist"].layout.files())
    spec = dataclasses.replace(OFFICIAL["mnist"], base_urls=(url + "/",), layout=idx_layout(md5s))
    with pytest.raises(DataError, match="t10k-labels"):
        load_official("mnist", spec=spec)


def test_idx_header_is_parsed(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + np.arange(6, dtype=">i4").tobytes())
    array = read_idx(path)  # not gzip'd, int32 big-endian
    assert array.shape == (2, 3) and array.tolist() == [[0, 1, 2], [3, 4, 5]]
    path.write_bytes(bytes([1, 2, 0x08, 1, 0, 0, 0, 0]))
    with pytest.raises(DataError, match="magic"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 0]))
    with pytest.raises(DataError, match="type code 0x42"):
        read_idx(path)


def test_corrupt_gzip_raises_data_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-20])
    with pytest.raises(DataError, match="x.gz"):
        read_idx(path)


def test_no_download_and_missing_file_names_the_path(tmp_path):
    with pytest.raises(DownloadError, match=str(tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz")):
        load_official("mnist", download=False)


def test_offline_error_names_destination_and_md5(tmp_path):
    spec = dataclasses.replace(OFFICIAL["mnist"], base_urls=(closed_port_url(),))
    with pytest.raises(DownloadError) as info:
        load_official("mnist", root=tmp_path / "elsewhere", spec=spec)
    message = str(info.value)
    assert str(tmp_path / "elsewhere" / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message
    # One error names every missing file, not only the first.
    assert message.startswith("4 files of mnist are missing or wrong")
    for remote in spec.layout.files():
        assert str(tmp_path / "elsewhere" / "mnist" / remote.name) in message and remote.md5 in message
