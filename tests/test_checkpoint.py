"""The checkpoint format: round trips, no pickle, atomic writes, clear errors."""

import json

import pytest
import torch

import imgcls.checkpoint as ckpt
from imgcls.checkpoint import load_model, read_checkpoint, save_checkpoint
from imgcls.errors import CheckpointError
from imgcls.models import create_model

META = {"arch": "fastnet_small", "arch_kwargs": {}, "classes": ["a", "b", "c"], "input_shape": [1, 8, 8],
        "normalize": {"mean": [0.5], "std": [0.25]}}


def small_model():
    torch.manual_seed(0)
    model = create_model("fastnet_small", in_chans=1, num_classes=3, img_size=(8, 8))
    model.arch_kwargs = dict(model.arch_kwargs)
    return model


def test_round_trip_weights_meta_and_optimizer_state(tmp_path):
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    meta = dict(META, arch_kwargs=model.arch_kwargs)
    path = save_checkpoint(tmp_path / "last.safetensors", model, meta, train_state={"epoch": 3, "optimizer": opt.state_dict()})
    state, back = read_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    assert back["classes"] == ["a", "b", "c"] and back["format_version"] == ckpt.FORMAT_VERSION
    restored = torch.optim.Adam(small_model().parameters(), lr=0.5)
    restored.load_state_dict(back["train_state"]["optimizer"])
    assert restored.param_groups[0]["lr"] == 0.01
    saved_state = opt.state_dict()["state"]
    assert set(restored.state_dict()["state"]) == set(saved_state)
    for pid, entry in saved_state.items():
        assert torch.equal(restored.state_dict()["state"][pid]["exp_avg"], entry["exp_avg"])
    loaded, _ = load_model(path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(loaded(x), model.eval()(x))


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    path = save_checkpoint(tmp_path / "best.safetensors", model, dict(META, epoch=1))

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, model, dict(META, epoch=2))
    assert read_checkpoint(path)[1]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x80\x04\x95 this could be a pickle")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_a_newer_format_asks_for_an_upgrade(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "x.safetensors", small_model(), META)
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", 99)
    path = save_checkpoint(tmp_path / "y.safetensors", small_model(), META)
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", 1)
    with pytest.raises(CheckpointError, match="format version 99; this imgcls reads versions up to 1"):
        read_checkpoint(path)


def test_metadata_is_plain_json_in_the_header(tmp_path):
    path = save_checkpoint(tmp_path / "x.safetensors", small_model(), META)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert json.loads(header["__metadata__"]["imgcls"])["arch"] == "fastnet_small"


def test_run_folder_without_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path)


@pytest.mark.parametrize("text, why", [
    ('{"final_checkpoint": "be', "it is not JSON"),
    ("[1, 2]", "it holds a JSON list, not an object"),
    ('{"final_checkpoint": "worst"}', 'its final_checkpoint must be one of best, last, got "worst"'),
    ('{"final_checkpoint": null}', "its final_checkpoint must be one of best, last, got null"),
])
def test_a_damaged_run_json_is_refused_in_one_line_naming_it(tmp_path, capsys, text, why):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(CheckpointError) as refused:
        ckpt.find_checkpoint(tmp_path)
    said = str(refused.value)
    assert said == (f"{tmp_path / 'run.json'} is damaged: {why}; "
                    f"restore it, or name the checkpoint (--checkpoint best or last)")
    from imgcls.cli import main

    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run.json") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _tensor_data_offset(path) -> int:
    """Where a safetensors file's tensor bytes start (8-byte header length, then the JSON header)."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_bytes_in_the_weights_are_refused_naming_the_file(tmp_path, where, capsys):
    model = small_model()
    path = save_checkpoint(tmp_path / "best.safetensors", model, dict(META, arch_kwargs=model.arch_kwargs))
    data = bytearray(path.read_bytes())
    start = _tensor_data_offset(path)
    at = {"first": start, "middle": (start + len(data)) // 2, "last": len(data) - 4}[where]
    data[at:at + 4] = bytes(b ^ 0x5A for b in data[at:at + 4])  # a 4-byte flip: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"best\.safetensors is damaged"):
        load_model(path)
    from imgcls.cli import main

    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "Traceback" not in err


def test_a_checkpoint_written_before_checksums_loads_with_one_note(tmp_path, capsys):
    from safetensors.torch import save_file

    model = small_model()
    path = tmp_path / "old.safetensors"
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    doc = dict(META, arch_kwargs=model.arch_kwargs, format_version=1)  # as imgcls wrote it before: no checksum
    save_file(tensors, str(path), metadata={ckpt.META_KEY: json.dumps(doc)})
    for _ in range(2):
        loaded, meta = load_model(path)
    assert ckpt.CHECKSUM_KEY not in meta
    assert capsys.readouterr().err.count("written before imgcls stored checksums") == 1
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    ckpt.update_meta(path, {"temperature": 1.5})  # saving it again adds the checksum
    assert ckpt.CHECKSUM_KEY in json.loads(read_header(path)[ckpt.META_KEY])


def read_header(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def _with_meta(tmp_path, raw: str):
    """A checkpoint with sound tensors (and their checksum) and the metadata document ``raw``."""
    from safetensors.torch import save_file

    model = small_model()
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={ckpt.META_KEY: raw})
    return path


def _meta(**changes) -> str:
    doc = dict(META, arch_kwargs={}, format_version=1)
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v != "DROP"})


@pytest.mark.parametrize("raw, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "is a list, not a mapping"),
    ("null", "is a NoneType, not a mapping"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (_meta(classes="DROP"), "'classes' must be a list"),
    (_meta(classes=None), "'classes' must be a list"),
    (_meta(input_shape="DROP"), "'input_shape' must be"),
    (_meta(input_shape=[1, 10**9, 10**9]), "'input_shape' must be"),
    (_meta(arch_kwargs=[1]), "'arch_kwargs' must be a mapping"),
    (_meta(temperature=-1.0), "'temperature' must be a positive number"),
    (_meta(temperature=0), "'temperature' must be a positive number"),
    (_meta(temperature="warm"), "'temperature' must be a positive number"),
    (_meta(normalize={"mean": [0.5], "std": [0.0]}), "positive 'std'"),
    (_meta(normalize={"mean": ["a"], "std": [1.0]}), "positive 'std'"),
    (_meta(thresholds=[0.5]), "'thresholds' must be 3 numbers"),
])
def test_metadata_that_would_crash_or_mislead_is_refused_naming_the_file(tmp_path, raw, words):
    path = _with_meta(tmp_path, raw)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert words in str(err.value) and "bad.safetensors" in str(err.value)
    assert len(str(err.value)) < 400


def test_a_nan_temperature_is_refused_by_every_command(tmp_path, capsys):
    from imgcls.cli import main

    path = _with_meta(tmp_path, _meta(temperature=float("nan")))
    for argv in (["evaluate", str(path)], ["export", str(path), "--out", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "'temperature' must be a positive number" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    model = small_model()
    meta = dict(META, arch_kwargs=model.arch_kwargs)
    path = save_checkpoint(tmp_path / "last.safetensors", model, meta)
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match="the disk is full") as err:
        save_checkpoint(path, model, meta)
    assert "previous last.safetensors is kept" in str(err.value) and str(tmp_path) in str(err.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temporary file left behind
