"""Pretrained weights: the download of an original file, the cache, users' files, and real ImageNet weights."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from imgcls.data import download
from imgcls.errors import CheckpointError, ConfigError, DownloadError
from imgcls.models import create_model, resnet_imagenet
from imgcls.models.pretrained import (
    IMAGENET_NORMALIZE,
    apply_state,
    load_weights,
    models_with_weights,
    read_state_file,
    weights_dir,
)
from imgcls.tensorfile import DamagedFile, load_checked

# A sample of torchvision's ResNet state-dict keys, written out from its published models.
TORCHVISION_KEYS = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.1.bn2.running_var",
                    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
                    "layer4.1.conv2.weight", "fc.weight", "fc.bias"]


@pytest.fixture(autouse=True)
def no_mirrors(monkeypatch):
    monkeypatch.delenv(download.WEIGHTS_MIRROR_ENV, raising=False)
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


def closed_port_url() -> str:
    """A base URL on a port nothing listens on, so a connection is refused at once."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(folder: Path):
    """An HTTP server on 127.0.0.1 for ``folder``, in a thread; yields (base URL, requested paths)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", httpd.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the test HTTP server did not stop"


def torchvision_names(state: dict) -> dict:
    """imgcls's ImageNet ResNet names -> torchvision's (written here independently of the module's converter)."""
    out = {}
    for key, value in state.items():
        for old, new in ((".shortcut.conv.", ".downsample.0."), (".shortcut.bn.", ".downsample.1.")):
            key = key.replace(old, new)
        for old, new in (("features.stem.conv.", "conv1."), ("features.stem.bn.", "bn1."),
                         ("features.layer", "layer"), ("head.fc.", "fc.")):
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# The ImageNet ResNets' architecture


def test_resnet_imagenet_parameter_counts_are_torchvisions():
    counts = {name: sum(p.numel() for p in create_model(name, 3, 1000, (224, 224)).parameters())
              for name in ("resnet18_imagenet", "resnet50_imagenet")}
    assert counts == {"resnet18_imagenet": 11_689_512, "resnet50_imagenet": 25_557_032}


@pytest.mark.parametrize("name,keys", [("resnet18_imagenet", 122), ("resnet50_imagenet", 320)])
def test_torchvision_keys_map_onto_every_key(name, keys):
    own = create_model(name, 3, 1000, (224, 224)).state_dict()
    assert len(own) == keys  # torchvision's resnet18 / resnet50 state dicts hold 122 / 320 tensors
    as_torchvision = torchvision_names(own)
    assert set(TORCHVISION_KEYS) <= set(as_torchvision)
    converted = resnet_imagenet.convert_torchvision(as_torchvision, None)
    assert converted.keys() == own.keys()


def test_resnet_imagenet_takes_32_pixels_and_refuses_smaller():
    model = create_model("resnet18_imagenet", 3, 10, (32, 40)).eval()
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 32, 40)).shape == (1, 512, 1, 2)
    with pytest.raises(ConfigError, match="'resnet50_imagenet' needs images of at least 32x32, got 31x64"):
        create_model("resnet50_imagenet", 3, 10, (31, 64))


def test_the_official_file_is_asked_for_by_its_url_and_sha256_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(resnet_imagenet, "fetch_file", lambda *args, **kwargs: calls.append((args, kwargs)))
    resnet_imagenet.download_original("resnet18_imagenet")
    resnet_imagenet.download_original("resnet50_imagenet")
    assert calls == [
        (("resnet18-f37072fd.pth", ["https://download.pytorch.org/models/resnet18-f37072fd.pth"],
          tmp_path / "weights" / "original" / "resnet18-f37072fd.pth", "sha256:f37072fd"),
         {"mirror_env": "IMGCLS_WEIGHTS_MIRROR"}),
        (("resnet50-0676ba61.pth", ["https://download.pytorch.org/models/resnet50-0676ba61.pth"],
          tmp_path / "weights" / "original" / "resnet50-0676ba61.pth", "sha256:0676ba61"),
         {"mirror_env": "IMGCLS_WEIGHTS_MIRROR"}),
    ]


# ---------------------------------------------------------------------------
# Downloading an original file from a mirror (a real HTTP server on 127.0.0.1)


@pytest.fixture(scope="module")
def torchvision_file():
    """(bytes, state) of a ResNet-18 state dict saved with torch.save under torchvision's names."""
    torch.manual_seed(1)
    model = create_model("resnet18_imagenet", 3, 1000, (224, 224))
    with torch.no_grad():  # running statistics that differ from a new model's
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    state = torchvision_names(model.state_dict())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), model.state_dict()


@pytest.fixture
def weights_env(monkeypatch, tmp_path):
    """A fresh data dir, and the official URL on a closed port so that no test reaches the internet."""
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "data"))
    served = tmp_path / "served"
    served.mkdir()

    def point_at(data: bytes) -> resnet_imagenet.TorchvisionFile:
        # The file's own hash prefix is registered for resnet18_imagenet, and it is served under its real-style name.
        original = resnet_imagenet.TorchvisionFile("resnet18", hashlib.sha256(data).hexdigest()[:8],
                                                   base_url=closed_port_url())
        monkeypatch.setitem(resnet_imagenet.ORIGINALS, "resnet18_imagenet", original)
        return original

    return served, point_at


def test_download_verify_convert_and_cache(torchvision_file, weights_env, monkeypatch):
    data, expected = torchvision_file
    served, point_at = weights_env
    original = point_at(data)
    (served / original.name).write_bytes(data)
    with serving(served) as (url, requests):
        monkeypatch.setenv(download.WEIGHTS_MIRROR_ENV, url)
        torch.manual_seed(2)
        model = create_model("resnet18_imagenet", 3, 1000, (224, 224))
        assert not state_equal(model.state_dict(), expected)
        report, normalize = load_weights(model, "imagenet")
        path = weights_dir() / "original" / original.name
        assert requests == [f"/{original.name}"]
        assert path.read_bytes() == data
        assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(original.sha256_prefix)
        assert torch.load(path, weights_only=True).keys() == torchvision_names(expected).keys()
        assert report.matched == sorted(expected) and not report.missing and not report.unexpected
        assert not report.new_head and not report.adapted
        assert state_equal(model.state_dict(), expected)
        assert normalize == IMAGENET_NORMALIZE
        cache = weights_dir() / "resnet18_imagenet-imagenet.safetensors"
        cached, meta = load_checked(cache)
        assert state_equal(cached, expected) and meta["original"] == original.name
        # A second load reads the cache: no request, even with the original gone.
        path.unlink()
        again = create_model("resnet18_imagenet", 1, 10, (64, 64))
        report = load_weights(again, "imagenet")[0]
        assert requests == [f"/{original.name}"]
        assert sorted(report.new_head) == ["head.fc.bias", "head.fc.weight"]
        assert report.adapted == ["features.stem.conv.weight"]
        stem = expected["features.stem.conv.weight"].sum(1, keepdim=True)
        torch.testing.assert_close(again.features.stem.conv.weight, stem)


def test_a_corrupted_download_is_refused_and_nothing_is_kept(torchvision_file, weights_env, monkeypatch):
    data, _ = torchvision_file
    served, point_at = weights_env
    original = point_at(data)
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF
    (served / original.name).write_bytes(bytes(corrupted))
    with serving(served) as (url, requests):
        monkeypatch.setenv(download.WEIGHTS_MIRROR_ENV, url)
        with pytest.raises(DownloadError) as info:
            load_weights(create_model("resnet18_imagenet", 3, 1000, (224, 224)), "imagenet")
    message = str(info.value)
    assert requests == [f"/{original.name}"]
    assert f"expected sha256 starting {original.sha256_prefix}" in message
    assert f"got sha256 {hashlib.sha256(corrupted).hexdigest()}" in message
    folder = weights_dir() / "original"
    assert list(folder.iterdir()) == []  # neither the final name nor a temporary file
    assert not (weights_dir() / "resnet18_imagenet-imagenet.safetensors").exists()


def test_offline_error_says_where_to_put_the_file_and_its_checksum(torchvision_file, weights_env, monkeypatch):
    data, _ = torchvision_file
    _, point_at = weights_env
    original = point_at(data)
    mirror = closed_port_url()
    monkeypatch.setenv(download.WEIGHTS_MIRROR_ENV, mirror)
    with pytest.raises(DownloadError) as info:
        load_weights(create_model("resnet18_imagenet", 3, 1000, (224, 224)), "imagenet")
    message = str(info.value)
    dest = weights_dir() / "original" / original.name
    assert f"could not download {original.name}" in message
    assert mirror + original.name in message and original.url in message
    assert f"put the file at {dest} (expected sha256 starting {original.sha256_prefix})" in message
    assert "$IMGCLS_WEIGHTS_MIRROR" in message
    assert list(dest.parent.iterdir()) == []


def test_no_registered_weights_lists_the_models_that_have_some():
    with pytest.raises(ConfigError) as info:
        load_weights(create_model("fastnet_small", 3, 10, (32, 32)), "imagenet")
    message = str(info.value)
    assert "model 'fastnet_small' has no imagenet weights" in message
    assert {"efficientnet_lite0", "resnet18_imagenet", "resnet50_imagenet"} <= set(models_with_weights())
    assert f"models with imagenet weights: {', '.join(models_with_weights())};" in message


# ---------------------------------------------------------------------------
# A user's weights file (--pretrained PATH)


@pytest.fixture
def resnet8_state():
    torch.manual_seed(3)
    return create_model("resnet8", 3, 10, (32, 32)).state_dict()


def save_safetensors(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_a_safetensors_file_loads_with_its_counts(resnet8_state, tmp_path):
    partial = {k: v for k, v in resnet8_state.items() if not k.startswith("head.fc.")}
    partial["extra.weight"] = torch.ones(3)
    path = save_safetensors(tmp_path / "w.safetensors", partial)
    model = create_model("resnet8", 3, 10, (32, 32))
    report, normalize = load_weights(model, str(path))
    assert normalize is None
    assert report.matched == sorted(k for k in resnet8_state if not k.startswith("head.fc."))
    assert report.missing == ["head.fc.bias", "head.fc.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.to_dict()["matched"] == len(resnet8_state) - 2
    assert torch.equal(model.features.stem.conv.weight, resnet8_state["features.stem.conv.weight"])


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_torch_save_file_loads_plain_or_wrapped(resnet8_state, tmp_path, wrapped):
    state = {f"module.{k}": v for k, v in resnet8_state.items()} if wrapped else resnet8_state
    content = {"state_dict": state, "epoch": 7} if wrapped else state
    path = tmp_path / "w.pth"
    torch.save(content, path)
    model = create_model("resnet8", 3, 10, (32, 32))
    report, _ = load_weights(model, str(path))
    assert report.matched == sorted(resnet8_state) and not report.missing and not report.unexpected
    assert state_equal(model.state_dict(), resnet8_state)


def test_another_architectures_file_names_the_mismatched_keys(tmp_path):
    path = tmp_path / "cifar_resnet18.pth"
    torch.save(create_model("resnet18", 3, 10, (32, 32)).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("resnet18_imagenet", 3, 10, (32, 32)), str(path))
    message = str(info.value)
    assert f"weights {path} do not fit model 'resnet18_imagenet'" in message
    assert "features.stem.conv.weight: file (64, 3, 3, 3), model (64, 3, 7, 7)" in message


@pytest.mark.parametrize("content,match", [
    ("no tensors", "holds no tensors"),
    ("garbage", "cannot be read as safetensors or as a PyTorch state dict"),
])
def test_a_file_without_weights_is_refused_with_its_path(tmp_path, content, match):
    path = tmp_path / "w.pth"
    if content == "no tensors":
        torch.save({"epoch": 3, "lr": 0.1, "names": ["a", "b"]}, path)
    else:
        path.write_bytes(b"\x00not a weights file\xff" * 20)
    with pytest.raises(CheckpointError, match=match) as info:
        load_weights(create_model("resnet8", 3, 10, (32, 32)), str(path))
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------
# The cache of converted weights


def test_a_corrupted_cache_file_is_rebuilt(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path))
    first = create_model("efficientnet_lite0", 3, 1000, (224, 224))
    load_weights(first, "imagenet")
    cache = tmp_path / "weights" / "efficientnet_lite0-imagenet.safetensors"
    data = bytearray(cache.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = (header + len(data)) // 2  # inside the tensor data, past the JSON header
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
    cache.write_bytes(bytes(data))
    with pytest.raises(DamagedFile):
        load_checked(cache)
    capsys.readouterr()
    torch.manual_seed(4)
    second = create_model("efficientnet_lite0", 3, 1000, (224, 224))
    load_weights(second, "imagenet")
    assert f"note: cached weights {cache} were rebuilt: its data does not match its checksum" in capsys.readouterr().out
    assert state_equal(second.state_dict(), first.state_dict())
    load_checked(cache)  # the rebuilt file passes its check


# ---------------------------------------------------------------------------
# Real ImageNet weights: EfficientNet-Lite0 on the sample photos of Debian's darknet package

DARKNET_ENV = "IMGCLS_DARKNET_DATA"
# ImageNet-1k class indices 151 (Chihuahua, n02085620) to 268 (Mexican hairless, n02113978) are dog breeds.
DOG_WNIDS = ("n02085620", "n02113978")


@pytest.fixture(scope="module")
def darknet():
    """(data folder, wnids, names) in the weights' class order; skips when the darknet data is absent."""
    default = Path.home() / ".cache/imgcls-test/darknet/usr/share/darknet/data"
    folder = Path(os.environ.get(DARKNET_ENV) or default).expanduser()
    if not (folder / "imagenet.labels.list").is_file():
        pytest.skip(f"Debian's darknet data is not at {folder} (set ${DARKNET_ENV}; .ci/run extracts it)")
    wnids = (folder / "imagenet.labels.list").read_text().splitlines()[:1000]
    names = (folder / "imagenet.shortnames.list").read_text().splitlines()[:1000]
    order = sorted(range(1000), key=lambda i: wnids[i])
    return folder, [wnids[i] for i in order], [names[i] for i in order]


def photo_checks(model: torch.nn.Module, darknet) -> dict[str, bool]:
    """Each sample photo's check, from lite0's predictions at 224x224."""
    from PIL import Image

    folder, wnids, names = darknet
    batch = []
    for photo in ("eagle", "kite", "dog", "giraffe"):
        image = Image.open(folder / f"{photo}.jpg").convert("RGB").resize((224, 224), Image.BILINEAR)
        batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1))
    x = (torch.stack(batch) / 255 - 0.5) / 0.5
    with torch.no_grad():
        top3 = model.eval()(x).topk(3, dim=1).indices.tolist()
    dogs = range(wnids.index(DOG_WNIDS[0]), wnids.index(DOG_WNIDS[1]) + 1)
    return {
        "eagle": names[top3[0][0]] in ("kite", "bald eagle"),
        "kite": names[top3[1][0]] == "seashore",
        "dog": top3[2][0] in dogs,
        "giraffe": "zebra" in [names[i] for i in top3[3]],
    }


def test_efficientnet_lite0_imagenet_weights_recognise_photos(darknet):
    _, wnids, _ = darknet
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert wnids.index(DOG_WNIDS[0]) == 151 and wnids.index(DOG_WNIDS[1]) == 268
    torch.manual_seed(0)
    untrained = create_model("efficientnet_lite0", 3, 1000, (224, 224))
    assert sum(photo_checks(untrained, darknet).values()) <= 1  # the checks tell weights from noise
    model = create_model("efficientnet_lite0", 3, 1000, (224, 224))
    load_weights(model, "imagenet")
    assert photo_checks(model, darknet) == {"eagle": True, "kite": True, "dog": True, "giraffe": True}


def test_an_imgcls_checkpoint_is_read_as_its_models_state(tmp_path):
    from safetensors.torch import save_file

    model = create_model("fastnet_small", in_chans=1, num_classes=10, img_size=(8, 8))
    state = model.state_dict()
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "best.safetensors"))
    read = read_state_file(tmp_path / "best.safetensors")
    assert read.keys() == state.keys()
    fresh = create_model("fastnet_small", in_chans=1, num_classes=10, img_size=(8, 8))
    assert len(apply_state(fresh, read, "best.safetensors").matched) == len(state)


@pytest.mark.parametrize("damage, words", [
    (lambda s: {k: v * float("nan") if v.is_floating_point() else v for k, v in s.items()}, "NaN or infinite"),
    (lambda s: {k: v.to(torch.int32) for k, v in s.items()}, "whole numbers"),
    (lambda s: dict(list(s.items())[:3]), "fit only 3 of the"),
])
def test_weights_that_would_train_nothing_are_refused(damage, words):
    model = create_model("fastnet_small", in_chans=1, num_classes=10, img_size=(8, 8))
    source = damage(create_model("fastnet_small", in_chans=1, num_classes=10, img_size=(8, 8)).state_dict())
    with pytest.raises(CheckpointError, match=words):
        apply_state(model, source, "w.safetensors")
