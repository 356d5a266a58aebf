"""benchmarks/own_photos.py's split file and benchmarks/common.py's hardware class (no TensorFlow, no training)."""

from __future__ import annotations

import importlib
import os
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def bench():
    """The benchmark modules, imported from benchmarks/ (peer_keras sets two TF variables at import: undone)."""
    before = {k: os.environ.get(k) for k in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")}
    sys.path.insert(0, str(BENCHMARKS))
    try:
        mods = {name: importlib.import_module(name) for name in ("common", "own_photos", "peer_keras")}
    finally:
        sys.path.remove(str(BENCHMARKS))
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
    return types.SimpleNamespace(**mods)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 3 class folders (12, 10, 8 images, each a different flat colour) and a zip of it."""
    root = tmp_path_factory.mktemp("photos")
    folder = root / "mine"
    for c, (name, count) in enumerate(zip(CLASSES, (12, 10, 8))):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            colour = (40 * c + 10, 7 * i, 100)
            fmt = "PNG" if i % 2 else "JPEG"
            Image.new("RGB", (10 + i, 9), colour).save(folder / name / f"im {i}.{fmt.lower()}", fmt)
    archive = root / "mine.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, Path("mine") / path.relative_to(folder))  # a top folder, as a zip of mine/ has
    return folder, archive


def _read(bench, ref: str) -> bytes:
    archive, member = bench.peer_keras.split_reference(ref)
    if archive is None:
        return Path(member).read_bytes()
    with zipfile.ZipFile(archive) as zf:
        return zf.read(member)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_split_file_lists_imgcls_split_as_readable_entries(bench, photos, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "own-cache"))  # the session's cache holds other tests' entries
    folder, archive = photos
    source = folder if kind == "folder" else archive
    seed = 3
    ds = bench.own_photos.imgcls_split(str(source), seed)
    doc = bench.own_photos.split_document(ds)

    assert doc["classes"] == list(CLASSES)
    splits = ds.splits
    assert len(doc["train"]) == len(splits["train"]) + len(splits["val"]) and len(doc["test"]) == len(splits["test"])
    assert [y for _, y in doc["test"]] == splits["test"].labels.tolist()
    assert sorted(y for _, y in doc["train"]) == sorted(splits["train"].labels.tolist() + splits["val"].labels.tolist())
    # Every entry reads back the very file imgcls decoded, and its label is its class folder's.
    for ref, label in doc["train"] + doc["test"]:
        if kind == "zip":
            assert ref.startswith(f"{archive}::mine/")
        rel = ref.rpartition("::")[2].removeprefix("mine/") if kind == "zip" else str(Path(ref).relative_to(folder))
        assert _read(bench, ref) == (folder / rel).read_bytes()
        assert rel.split("/")[0] == CLASSES[label]
    # The same split as `imgcls train --seed 3` keeps in dataset.json; another seed draws another test split.
    assert bench.own_photos.split_mismatches(doc, ds.record()) == []
    other = bench.own_photos.split_document(bench.own_photos.imgcls_split(str(source), seed + 1))
    assert sorted(r for r, _ in other["test"]) != sorted(r for r, _ in doc["test"])
    # The benchmark's split never fills imgcls's cache (the imgcls runs must find it empty).
    assert not any(Path(os.environ["IMGCLS_DATA_DIR"]).rglob("meta.json"))


def test_peer_reads_the_split_file(bench, photos):
    """peer_keras's folder loader turns split-file entries (zip and plain) into labelled 64x64 images."""
    folder, archive = photos
    doc = bench.own_photos.split_document(bench.own_photos.imgcls_split(str(archive), 0))
    items = doc["test"] + [[str(folder / "owl" / "im 1.png"), 2]]

    class OpError(Exception):
        pass

    def decode_image(data, channels, expand_animations):
        raise OpError  # take the PIL path, as for a format TF does not read

    def resize(arr, size, method):
        out = np.asarray(Image.fromarray(arr).resize(size[::-1], Image.BILINEAR), dtype=np.float32)
        return types.SimpleNamespace(numpy=lambda: out)

    tf = types.SimpleNamespace(image=types.SimpleNamespace(decode_image=decode_image, resize=resize),
                               errors=types.SimpleNamespace(OpError=OpError))
    x, y = bench.peer_keras.load_folder_split(items, None, (64, 64), tf)
    assert x.shape == (len(items), 64, 64, 3) and x.dtype == np.float32
    assert y.tolist() == [label for _, label in items]
    # Flat colours survive the resize: the red channel is the class's (40 c + 10), JPEG give or take 3.
    assert np.allclose(x[:, 32, 32, 0], [40 * label + 10 for _, label in items], atol=3)


def test_split_mismatches_name_the_split_that_differs(bench, photos):
    ds = bench.own_photos.imgcls_split(str(photos[0]), 0)
    doc = bench.own_photos.split_document(ds)
    record = ds.record()
    record["splits"]["test"]["per_class"][0] += 1
    problems = bench.own_photos.split_mismatches(doc, record)
    assert len(problems) == 1 and problems[0].startswith("test:")


def test_reference_outside_the_zip_is_refused(bench, photos):
    _, archive = photos
    members = bench.own_photos.zip_members(archive)
    assert bench.own_photos.to_reference(f"{archive}/mine/cat/im 0.jpeg", str(archive), members) == \
        f"{archive}::mine/cat/im 0.jpeg"
    with pytest.raises(ValueError, match="not inside"):
        bench.own_photos.to_reference("/elsewhere/cat/im 0.jpeg", str(archive), members)
    with pytest.raises(ValueError, match="not a member"):
        bench.own_photos.to_reference(f"{archive}/mine/cat/none.jpeg", str(archive), members)


def test_peer_zip_reference_survives_double_colons(bench, tmp_path):
    archive = tmp_path / "a::b.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x::y/1.png", b"data")
    assert bench.peer_keras.split_reference(f"{archive}::x::y/1.png") == (str(archive), "x::y/1.png")
    assert bench.peer_keras.split_reference(str(tmp_path / "no::zip.png")) == (None, str(tmp_path / "no::zip.png"))


def test_peer_parameter_count_follows_the_class_count(bench):
    assert bench.peer_keras.tutorial_cnn_params(32, 32, 3, 10) == 122_570  # the cifar10 case's, as asserted there
    assert bench.peer_keras.tutorial_cnn_params(64, 64, 3, 5) - bench.peer_keras.tutorial_cnn_params(64, 64, 3, 4) == 65


CPUINFO = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 {}\n\nprocessor\t: 1\nflags\t\t: fpu\n"


@pytest.mark.parametrize("flags, cls, expected", [
    ("avx2", "native", "AVX2 only"),
    ("avx2", "avx2", "AVX2 only"),
    ("avx2 avx512f", "native", "AVX512 (no BF16)"),
    ("avx2 avx512f avx512_bf16", "native", "AVX512-BF16"),
    ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "native", "AMX"),
    ("avx2 avx512f avx512_bf16", "avx2",
     "AVX2 only (emulated via ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA on a CPU with avx512_bf16)"),
    ("avx2 avx512f avx512_bf16 amx_bf16", "avx2",
     "AVX2 only (emulated via ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA on a CPU with amx_bf16)"),
    ("sse4_2", "native", "below AVX2"),
])
def test_hardware_class_from_flags_and_env(bench, flags, cls, expected):
    env = bench.common.cpu_class_env(cls)
    probe = {"capability": "AVX2" if cls == "avx2" else "AVX512", "cuda": False, "cuda_device": None,
             "onednn_isa": "Intel AVX2"}
    hw = bench.common.hardware_class(env, cpuinfo=CPUINFO.format(flags), probe=probe)
    assert hw["class"] == expected
    assert hw["cpu"] == "Test CPU 9000"
    assert hw["flags"]["avx512_bf16"] == ("avx512_bf16" in flags.split())
    assert hw["onednn_max_isa"] == ("AVX2" if cls == "avx2" else "unset (all the CPU has)")
    assert expected in bench.common.hardware_line(hw)


def test_cpu_class_env_caps_both_libraries(bench):
    env = bench.common.cpu_class_env("avx2")
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert bench.common.cpu_class_env("native") == {}
    assert bench.common.classify_hardware({"avx2", "avx512_bf16"}, env, cuda=True) == "CUDA"
    only_aten = {"ATEN_CPU_CAPABILITY": "avx2"}
    assert bench.common.classify_hardware({"avx2", "avx512f", "avx512_bf16"}, only_aten) == \
        "AVX512-BF16 (partly capped: only ATEN_CPU_CAPABILITY=AVX2)"
    with pytest.raises(ValueError, match="avx512"):
        bench.common.cpu_class_env("avx512")


@pytest.mark.parametrize("cls, start_env, expected", [
    ("avx2", {}, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ("native", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, {}),  # a shell's caps are dropped
])
def test_a_benchmark_enters_its_cpu_class_before_torch_reads_the_caps(cls, start_env, expected):
    import json
    import subprocess

    script = (f"import sys, os, json; sys.path.insert(0, {str(BENCHMARKS)!r}); import common; "
              f"common.enter_cpu_class({cls!r}); import torch; "
              "print(json.dumps({'env': {k: os.environ[k] for k in common.CPU_CLASSES['avx2'] if k in os.environ}, "
              "'capability': torch.backends.cpu.get_cpu_capability()}))")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", script], env={**env, **start_env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["env"] == expected
    if cls == "avx2":
        assert doc["capability"] == "AVX2"


def test_the_plain_fine_tune_peer_stops_at_its_wall_time_and_scores_the_test_images(bench, photos, tmp_path):
    """peer_finetune.py on the split file: with a wall time already spent it takes no step, scores val once
    (its first epoch) and the test images, and writes its figures."""
    import json
    import subprocess

    _, archive = photos
    doc = bench.own_photos.split_document(bench.own_photos.imgcls_split(str(archive), 0))
    split = tmp_path / "split.json"
    split.write_text(json.dumps(doc))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "peer_finetune.py"), "--split-file", str(split),
                           "--seconds", "0.01", "--size", "64", "--json", str(out)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["steps"], result["epochs"], result["best_epoch"]) == (0, 1, 1)
    assert result["n_test"] == len(doc["test"]) and result["n_train"] + result["n_val"] == len(doc["train"])
    assert result["n_val"] == len(CLASSES)  # 10% of each class, at least one
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert "plain fine-tune: test accuracy" in proc.stdout
