"""Folders and zips of class folders: layouts, bad and skipped files, decoding."""

import io
import mmap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data import decode as decode_module
from imgcls.data import sources as sources_module
from imgcls.data.folder import load_folder
from imgcls.data.images import decode_image, to_array
from imgcls.data.inputs import load_image_inputs
from imgcls.data.layout import Layout, describe_layout, detect_layout, split_of
from imgcls.data.registry import complete_splits
from imgcls.data.sources import open_source
from imgcls.errors import ConfigError, DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png(color=RED, size=(8, 6), mode="RGB") -> bytes:
    """A PNG of one colour, ``size`` = (width, height)."""
    return encode(Image.new(mode, size, color))


def truncated_jpeg() -> bytes:
    data = encode(Image.effect_noise((32, 32), 60).convert("RGB"), "JPEG")
    return data[: len(data) // 2]


RANDOM_BYTES = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()


def write_tree(root: Path, files: dict[str, bytes], dirs=()) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel in dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)
    return root


def write_zip(path: Path, files: dict[str, bytes], dirs=(), method=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for rel in dirs:
            zf.writestr(rel.rstrip("/") + "/", b"")
        for rel, data in files.items():
            zf.writestr(rel, data)
    return path


CLASS_FILES = {
    "cats/a.png": png(RED),
    "cats/b.png": png((200, 0, 0)),
    "dogs/a.png": png(BLUE),
    "dogs/c.jpg": png(GREEN),  # a PNG under a .jpg name
}


@pytest.fixture(params=["folder", "zip"])
def make_source(request, tmp_path):
    """Build a folder or a zip (by the test's parameter) from a dict of files."""

    def make(files, dirs=(), name="data"):
        if request.param == "folder":
            return write_tree(tmp_path / name, files, dirs)
        return write_zip(tmp_path / f"{name}.zip", files, dirs)

    return make


def inner(path: str, root: Path) -> str:
    """The part of a reported path inside the folder or zip ``root``."""
    assert path.startswith(f"{root}/")
    return path[len(str(root)) + 1 :]


def test_class_layout(make_source):
    root = make_source(CLASS_FILES)
    ds = load_folder(root)
    assert ds.classes == ["cats", "dogs"] and list(ds.splits) == ["all"]
    split = ds.splits["all"]
    assert split.images.shape == (4, 6, 8, 3) and split.images.dtype == np.uint8
    assert split.labels.tolist() == [0, 0, 1, 1]
    assert [inner(p, root) for p in split.paths] == ["cats/a.png", "cats/b.png", "dogs/a.png", "dogs/c.jpg"]
    assert tuple(split.images[0, 0, 0]) == RED and tuple(split.images[3, 0, 0]) == GREEN
    assert ds.skipped == [] and ds.bad == [] and ds.notes == []


def test_folder_and_zip_give_the_same_arrays(tmp_path):
    files = {**CLASS_FILES, "cats/d.jpg": encode(Image.effect_noise((8, 6), 40).convert("RGB"), "JPEG")}
    a = load_folder(write_tree(tmp_path / "d", files))
    b = load_folder(write_zip(tmp_path / "d.zip", files))
    c = load_folder(write_zip(tmp_path / "deflated.zip", files, method=zipfile.ZIP_DEFLATED))
    for other in (b, c):
        assert other.classes == a.classes
        np.testing.assert_array_equal(other.splits["all"].images, a.splits["all"].images)
        np.testing.assert_array_equal(other.splits["all"].labels, a.splits["all"].labels)


def test_split_layout(make_source):
    files = {f"train/{rel}": data for rel, data in CLASS_FILES.items()}
    files["valid/cats/v.png"] = png(RED)
    files["valid/dogs/v.png"] = png(BLUE)
    files["test/dogs/t.png"] = png(BLUE)  # a test split may lack a class
    ds = load_folder(make_source(files))
    assert ds.classes == ["cats", "dogs"]
    assert list(ds.splits) == ["train", "val", "test"]
    assert len(ds.splits["train"]) == 4 and ds.splits["val"].labels.tolist() == [0, 1]
    assert ds.splits["test"].labels.tolist() == [1]
    assert ds.splits["test"].paths[0].endswith("test/dogs/t.png")


def test_single_wrapping_folder_is_unwrapped(make_source):
    ds = load_folder(make_source({f"mydata/{rel}": d for rel, d in CLASS_FILES.items()}))
    assert ds.classes == ["cats", "dogs"] and len(ds.splits["all"]) == 4
    assert ds.splits["all"].paths[0].endswith("mydata/cats/a.png")
    nested = load_folder(make_source({f"outer/inner/train/{r}": d for r, d in CLASS_FILES.items()}, name="n"))
    assert list(nested.splits) == ["train"] and nested.classes == ["cats", "dogs"]


def test_images_at_the_root_explain_the_layout(make_source):
    with pytest.raises(DataError, match=r"directly in the top folder.*<class>/<image>.*train/<class>/<image>"):
        load_folder(make_source({"a.png": png(), "b.png": png()}))


def test_fewer_than_two_classes(make_source):
    with pytest.raises(DataError, match=r"only \['cats'\].*at least 2 classes"):
        load_folder(make_source({"cats/a.png": png(), "cats/b.png": png()}))
    with pytest.raises(DataError, match=r"only \['cats'\]"):
        load_folder(make_source({"train/cats/a.png": png(), "test/cats/b.png": png()}, name="s"))


def test_empty_class_folder(make_source):
    path = make_source({"cats/a.png": png(), "birds/readme.txt": b"none yet"}, dirs=["dogs"])
    with pytest.raises(DataError, match=r"class folder birds/ holds no image"):
        load_folder(path)


def test_class_with_only_bad_images(make_source):
    path = make_source({"cats/a.png": png(), "dogs/broken.jpg": truncated_jpeg()})
    with pytest.raises(DataError, match=r"class folder dogs/ holds no decodable image(.|\n)*broken\.jpg"):
        load_folder(path)


def test_unknown_class_in_test(make_source):
    files = {"train/cats/a.png": png(), "train/dogs/a.png": png(), "test/zebras/z.png": png()}
    with pytest.raises(DataError, match=r"test/ has class folder\(s\) \['zebras'\] that train/ lacks"):
        load_folder(make_source(files))


def test_split_folders_need_train(make_source):
    with pytest.raises(DataError, match="no train/ folder"):
        load_folder(make_source({"val/cats/a.png": png(), "test/dogs/a.png": png()}))


def under(prefix: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{prefix}/{rel}": data for rel, data in files.items()}


TWO_IMAGES = {"cats/x.png": png(RED), "dogs/y.png": png(BLUE)}


@pytest.mark.parametrize(
    ("train", "other", "split"),
    [
        ("Training", "testing", "test"),
        ("training_set", "test_set", "test"),
        ("train-set", "TEST_SET", "test"),
        ("Train Set", "Test Set", "test"),
        ("trainset", "testset", "test"),
        ("train_data", "test_data", "test"),
        ("TRAIN", "holdout", "test"),
        ("train_images", "eval", "test"),
        ("TrainingData", "Evaluation", "test"),
        ("train_split", "dev", "val"),
        ("train.data", "Validation", "val"),
        ("training-set", "valid_set", "val"),
        ("train", "val_set", "val"),
        ("training", "Dev Set", "val"),
    ],
)
def test_split_folders_are_known_by_any_usual_name(make_source, train, other, split):
    root = make_source({**under(train, CLASS_FILES), **under(other, TWO_IMAGES)})
    ds = load_folder(root)
    assert ds.classes == ["cats", "dogs"] and list(ds.splits) == ["train", split]
    assert ds.splits[split].labels.tolist() == [0, 1]
    assert inner(ds.splits[split].paths[0], root) == f"{other}/cats/x.png"
    assert ds.layout == f"{train}/ -> train (4 images), {other}/ -> {split} (2)"


@pytest.mark.parametrize("name", ["cats", "trainer", "contest", "data", "images", "set", "valley", "tests2", "dev_ops"])
def test_ordinary_folder_names_are_not_splits(name):
    assert split_of(name) is None


def test_split_folders_under_a_wrapping_folder(make_source):
    root = make_source({**under("dataset/training_set", CLASS_FILES), **under("dataset/test_set", TWO_IMAGES)})
    ds = load_folder(root)
    assert ds.classes == ["cats", "dogs"] and list(ds.splits) == ["train", "test"]
    assert inner(ds.splits["train"].paths[0], root) == "dataset/training_set/cats/a.png"
    assert ds.layout == "dataset/training_set/ -> train (4 images), dataset/test_set/ -> test (2)"


def test_a_split_folder_repeated_inside_itself_is_looked_through(make_source):
    # Kaggle's cats-and-dogs zip: training_set/training_set/cats/..., test_set/test_set/dogs/...
    files = {**under("training_set/training_set", CLASS_FILES), **under("test_set/test_set", TWO_IMAGES)}
    ds = load_folder(make_source(files))
    assert ds.classes == ["cats", "dogs"] and list(ds.splits) == ["train", "test"]
    assert ds.layout == "training_set/training_set/ -> train (4 images), test_set/test_set/ -> test (2)"
    wrapped = load_folder(make_source({**under("train/animals", CLASS_FILES), **under("test", TWO_IMAGES)}, name="w"))
    assert wrapped.classes == ["cats", "dogs"] and len(wrapped.splits["train"]) == 4


def test_class_like_folders_one_level_down_are_refused_with_the_tree(make_source):
    files = {**under("part1", CLASS_FILES), **under("part2", TWO_IMAGES)}
    root = make_source(files)
    with pytest.raises(DataError) as info:
        load_folder(root)
    message = str(info.value)
    assert "  part1/ (cats/ 2 images, dogs/ 2 images)\n  part2/ (cats/ 1 image, dogs/ 1 image)\n" in message
    hint = f"--data {root}/part1" if root.is_dir() else f"unzip {root} and give --data <the unzipped folder>/part1"
    assert hint in message and "rename them to train/ and test/" in message


def test_class_like_folders_inside_a_split_are_refused(make_source):
    files = {**under("train/a", CLASS_FILES), **under("train/b", TWO_IMAGES), **under("test", TWO_IMAGES)}
    with pytest.raises(DataError) as info:
        load_folder(make_source(files))
    message = str(info.value)
    assert "  train/a/ (cats/ 2 images, dogs/ 2 images)\n  train/b/ (cats/ 1 image, dogs/ 1 image)\n" in message
    assert "put one folder per class directly in train/ (train/cats/, train/dogs/)" in message


def test_split_folders_inside_class_folders_are_refused(make_source):
    files = {"cats/train/a.png": png(), "cats/train/b.png": png(), "cats/test/c.png": png(), "dogs/train/d.png": png()}
    with pytest.raises(DataError) as info:
        load_folder(make_source(files))
    message = str(info.value)
    assert "  cats/ (test/ 1 image, train/ 2 images)\n  dogs/ (train/ 1 image)\n" in message
    assert "put the split folders at the top" in message


def test_a_class_sorted_into_folders_of_its_own_is_a_class(make_source):
    files = {
        "dogs/2019/a.png": png(BLUE), "dogs/2020/b.png": png(BLUE), "dogs/2020/c.png": png(BLUE),
        "cats/holiday/d.png": png(RED), "cats/e.png": png(RED),
    }  # fmt: skip
    ds = load_folder(make_source(files))
    assert ds.classes == ["cats", "dogs"] and ds.splits["all"].labels.tolist() == [0, 0, 1, 1, 1]
    # Two such classes sharing one folder name (2020/) are still classes: a level of classes has two names at least.
    files = {"dogs/2019/a.png": png(), "dogs/2020/b.png": png(), "cats/2020/c.png": png(), "cats/misc/d.png": png()}
    assert load_folder(make_source(files, name="shared")).classes == ["cats", "dogs"]


def test_split_folders_without_a_train_folder_list_the_train_names(make_source):
    files = {**under("Validation", TWO_IMAGES), **under("testing", TWO_IMAGES)}
    with pytest.raises(DataError, match=r"found Validation/, testing/ but no train/ folder.*training_set"):
        load_folder(make_source(files))


def test_two_folders_for_one_split_are_refused(make_source):
    files = {**under("train", TWO_IMAGES), **under("Training_Set", TWO_IMAGES)}
    with pytest.raises(DataError, match=r"both Training_Set/ and train/ are train folders"):
        load_folder(make_source(files))


def test_layout_line_counts_decoded_images_and_what_was_carved(make_source):
    ds = load_folder(make_source(under("flowers", BAD_FILES)))
    assert ds.layout == "one folder per class (2 classes, 4 images) under flowers/"  # 2 of 6 undecodable
    ds = complete_splits(ds, val_fraction=0.25, test_fraction=0.5, seed=0)
    assert ds.layout == "one folder per class (2 classes, 4 images) under flowers/; test and val carved out"
    assert ds.summary_lines()[1] == f"  layout: {ds.layout}" and ds.record()["layout"] == ds.layout
    split = load_folder(make_source({**under("training", CLASS_FILES), **under("testing", TWO_IMAGES)}, name="s"))
    assert complete_splits(split, 0.25, 0.25, seed=0).layout == (
        "training/ -> train (4 images), testing/ -> test (2); val carved from train"
    )
    plain = load_folder(make_source(CLASS_FILES, name="p"))
    plain = complete_splits(plain, 0.0, 0.5, seed=0)
    assert plain.layout == "one folder per class (2 classes, 4 images); test carved out"


def test_layout_line_uses_thousands_separators():
    layout = Layout(["a", "b"], {"train": [], "test": []}, {}, roots={"train": "training/", "test": "testing/"})
    line = describe_layout(layout, {"train": 1877, "test": 470})
    assert line == "training/ -> train (1,877 images), testing/ -> test (470)"
    flat = Layout(["a", "b", "c", "d", "e"], {"all": []}, {}, roots={"all": "flowers/"})
    assert describe_layout(flat, {"all": 4317}) == "one folder per class (5 classes, 4,317 images) under flowers/"


BAD_FILES = {
    **CLASS_FILES,
    "cats/truncated.jpg": truncated_jpeg(),
    "dogs/noise.png": RANDOM_BYTES,
}


def test_bad_images_are_listed_when_skipped(make_source):
    ds = load_folder(make_source(BAD_FILES), on_bad_image="skip")
    assert len(ds.splits["all"]) == 4
    bad = {Path(b.path).name: b.reason for b in ds.bad}
    assert set(bad) == {"truncated.jpg", "noise.png"}
    assert "not a recognised image" in bad["noise.png"]


def test_bad_images_raise_when_asked(make_source):
    with pytest.raises(DataError, match=r"2 image\(s\) could not be decoded(.|\n)*truncated\.jpg(.|\n)*noise\.png"):
        load_folder(make_source(BAD_FILES), on_bad_image="error")


def test_unknown_bad_image_policy():
    with pytest.raises(ConfigError, match="'ignore'.*skip, error"):
        load_folder("anything", on_bad_image="ignore")


def test_hidden_and_non_image_files_are_counted(make_source):
    files = {
        **CLASS_FILES,
        "cats/.hidden.png": png(),
        ".git/config": b"x",
        "dogs/notes.txt": b"not an image",
        "__MACOSX/cats/._a.png": b"resource fork",
    }
    root = make_source(files)
    ds = load_folder(root)
    assert len(ds.splits["all"]) == 4 and ds.classes == ["cats", "dogs"]
    reasons = {inner(s.path, root): s.reason for s in ds.skipped}
    assert reasons == {
        "cats/.hidden.png": "hidden file",
        ".git/config": "inside a hidden folder",
        "dogs/notes.txt": "not an image (extension)",
        "__MACOSX/cats/._a.png": "macOS metadata (__MACOSX)",
    }


def test_mixed_sizes_use_64_and_say_so(make_source):
    files = {"cats/a.png": png(size=(10, 10)), "cats/b.png": png(size=(20, 30)), "dogs/c.png": png(BLUE)}
    ds = load_folder(make_source(files))
    assert ds.splits["all"].images.shape == (3, 64, 64, 3)
    assert len(ds.notes) == 1 and "varied" in ds.notes[0] and "--image-size" in ds.notes[0]
    assert tuple(ds.splits["all"].images[2, 30, 30]) == BLUE


def test_explicit_image_size(make_source):
    files = {"cats/a.png": png(size=(10, 10)), "cats/b.png": png(size=(20, 30)), "dogs/c.png": png(BLUE)}
    ds = load_folder(make_source(files), image_size=(12, 16), resize="crop")
    assert ds.splits["all"].images.shape == (3, 12, 16, 3) and ds.notes == []
    with pytest.raises(ConfigError, match="resize mode 'zoom'"):
        load_folder(make_source(files, name="x"), resize="zoom")


def test_channels_chosen_from_the_images(make_source):
    gray = {"a/1.png": png(10, mode="L"), "b/1.png": png(200, mode="L")}
    assert load_folder(make_source(gray, name="g")).splits["all"].images.shape == (2, 6, 8, 1)
    mixed = {**gray, "b/2.png": png(RED)}
    images = load_folder(make_source(mixed, name="m")).splits["all"].images
    assert images.shape == (3, 6, 8, 3)
    assert tuple(images[0, 0, 0]) == (10, 10, 10) and tuple(images[2, 0, 0]) == RED
    forced = load_folder(make_source(mixed, name="f"), channels=1).splits["all"].images
    assert forced.shape == (3, 6, 8, 1) and forced[2, 0, 0, 0] == 76  # luma of red


def every_mode_files() -> dict[str, bytes]:
    rgba = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette(list(RED + BLUE) + [0] * (254 * 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "a/rgb.png": png(RED),
        "a/gray.png": png(90, mode="L"),
        "a/rgba.png": encode(rgba),
        "a/palette.gif": encode(palette, "GIF"),
        "b/palette_transparent.png": encode(palette, transparency=1),
        "b/cmyk.tiff": encode(Image.new("CMYK", (8, 6), (0, 0, 0, 0)), "TIFF"),
        "b/sixteen.png": encode(Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))),
        "b/bilevel.bmp": encode(Image.new("1", (8, 6), 1), "BMP"),
        "b/rotated.png": encode(Image.new("RGB", (6, 8), GREEN), exif=exif),  # 6 wide: 8 wide once rotated
    }


def test_every_mode_loads(make_source):
    ds = load_folder(make_source(every_mode_files()))
    assert ds.bad == [] and ds.notes == []
    images = dict(zip((Path(p).name for p in ds.splits["all"].paths), ds.splits["all"].images))
    assert all(a.shape == (6, 8, 3) for a in images.values())
    expected = {
        "rgb.png": RED, "gray.png": (90, 90, 90), "rgba.png": (255, 255, 255), "palette.gif": BLUE,
        "palette_transparent.png": (255, 255, 255), "cmyk.tiff": (255, 255, 255),
        "sixteen.png": (255, 255, 255), "bilevel.bmp": (255, 255, 255), "rotated.png": GREEN,
    }  # fmt: skip
    for name, colour in expected.items():
        assert tuple(images[name][3, 4]) == colour, name


def test_parallel_decoding_matches_serial(tmp_path, monkeypatch):
    files = {f"c{k % 3}/{k:03d}.png": png((k, 255 - k, 7), size=(5, 4)) for k in range(60)}
    files["c0/bad.png"] = RANDOM_BYTES
    path = write_zip(tmp_path / "p.zip", files)
    serial = load_folder(path, workers=1)
    monkeypatch.setattr(decode_module, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(decode_module, "_CHUNK", 7)
    pools = []
    make_executor = decode_module._make_executor
    monkeypatch.setattr(decode_module, "_make_executor", lambda *a: pools.append(1) or make_executor(*a))
    parallel = load_folder(path, workers=2)
    assert pools == [1]
    np.testing.assert_array_equal(parallel.splits["all"].images, serial.splits["all"].images)
    assert parallel.splits["all"].paths == serial.splits["all"].paths
    assert [b.path for b in parallel.bad] == [b.path for b in serial.bad] == [f"{path}/c0/bad.png"]


def _mapped_base(array: np.ndarray):
    """The object that owns ``array``'s memory."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


@pytest.mark.parametrize("odd", ["none", "gray", "size"])
def test_workers_write_into_shared_slots_and_a_whole_group_is_not_copied(tmp_path, monkeypatch, odd):
    # 60 colour images of one size fill every slot: the split is one view of the shared map, not a copy.
    # One grayscale image, or one of another size, sends its chunk back the old way: the same pixels.
    files = {f"c{k % 3}/{k:03d}.png": png((k, 255 - k, 7), size=(5, 4)) for k in range(60)}
    if odd == "gray":
        files["c1/013.png"] = png(90, size=(5, 4), mode="L")
    elif odd == "size":
        files["c1/013.png"] = png((1, 2, 3), size=(9, 4))
    path = write_zip(tmp_path / "p.zip", files)
    serial = load_folder(path, workers=1)
    monkeypatch.setattr(decode_module, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(decode_module, "_CHUNK", 7)
    parallel = load_folder(path, workers=2)
    np.testing.assert_array_equal(parallel.splits["all"].images, serial.splits["all"].images)
    assert parallel.splits["all"].paths == serial.splits["all"].paths
    assert parallel.notes == serial.notes
    assert isinstance(_mapped_base(parallel.splits["all"].images), mmap.mmap) == (odd == "none")


def _zipfile_view(path: Path) -> tuple[list[str], set[str], dict[str, bytes]]:
    """Files, folders and member bytes of a zip as the standard library reads it."""
    with zipfile.ZipFile(path) as zf:
        infos = [(i.filename.replace("\\", "/").lstrip("/"), i) for i in zf.infolist()]
        files = {name: zf.read(info) for name, info in infos if not info.is_dir() and name}
    dirs = {name.rstrip("/") for name, info in infos if info.is_dir()}
    dirs |= {"/".join(f.split("/")[:k]) for f in files for k in range(1, f.count("/") + 1)}
    return sorted(files), dirs, files


@pytest.mark.parametrize("kind", ["plain", "utf8-names", "dir-entries", "data-in-front", "bzip2-member", "zip64"])
def test_a_zip_lists_and_reads_as_zipfile_does(tmp_path, kind):
    # The member list is parsed from the raw central directory; what it cannot read simply it leaves to zipfile.
    files = {"cats/a.png": png(RED), "dogs/b.png": png(BLUE), "dogs/deep/c.png": png(GREEN)}
    path = tmp_path / "d.zip"
    if kind == "utf8-names":
        files = {**files, "chats_été/d.png": png((1, 2, 3)), "狗/e.png": png((4, 5, 6))}  # mixed with ASCII names
    if kind == "dir-entries":  # birds/ is listed only above a folder that has its own entry
        files = {**files, "birds/young/h.png": png((13, 14, 15))}
    write_zip(path, files, dirs=("cats", "empty/inner", "birds/young") if kind == "dir-entries" else ())
    if kind == "data-in-front":
        path.write_bytes(b"#!/bin/sh\nexit 0\n" + path.read_bytes())
    elif kind == "bzip2-member":
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("cats/f.png", png((7, 8, 9)), compress_type=zipfile.ZIP_BZIP2)
    elif kind == "zip64":
        with zipfile.ZipFile(path, "a") as zf, zf.open("dogs/g.png", "w", force_zip64=True) as member:
            member.write(png((10, 11, 12)))
    want_files, want_dirs, want_bytes = _zipfile_view(path)
    parsed = sources_module._parse_members(sources_module.zip_central_directory(path) or b"PK")
    assert (parsed is None) == (kind == "data-in-front")  # the offsets there need zipfile's correction
    with open_source(path) as source:
        assert source.files() == want_files and source.dirs() == want_dirs
        assert {rel: source.read(rel) for rel in source.files()} == want_bytes


def test_a_zip_whose_directory_is_damaged_is_refused_with_its_name(tmp_path):
    path = write_zip(tmp_path / "d.zip", CLASS_FILES)
    data = bytearray(path.read_bytes())
    at = data.rindex(b"PK\x01\x02")  # the last member's central-directory entry
    data[at + 3] = 9  # its signature
    path.write_bytes(bytes(data))
    assert sources_module._parse_members(sources_module.zip_central_directory(path)) is None
    with pytest.raises(DataError, match="d.zip: cannot be read as a zip file"):
        load_folder(path)


def test_unsupported_paths(tmp_path):
    with pytest.raises(DataError, match="no such folder or zip"):
        load_folder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt: not a folder or a zip"):
        load_folder(tmp_path / "notes.txt")


def test_a_truncated_or_empty_zip_is_named_as_such(tmp_path):
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as z:
        for i in range(4):
            z.writestr(f"{'ab'[i % 2]}/{i}.png", png())
    data = whole.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])  # known by its first bytes, whatever its name
    for name in ("cut.zip", "cut.bin"):
        with pytest.raises(DataError, match=rf"{name}: a zip file whose end .* is missing or damaged.*cut short"):
            load_folder(tmp_path / name)
    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.zip: the file is empty \(0 bytes\)"):
        load_folder(tmp_path / "empty.zip")


def _labelled(counts: list[int]):
    from imgcls.data.base import ImageDataset, Split

    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.zeros((len(labels), 2, 2, 1), np.uint8)
    return ImageDataset("mine", [f"c{i}" for i in range(len(counts))], {"all": Split(images, labels)})


def test_a_class_too_small_for_val_and_test_is_warned_of_with_the_size_it_needs():
    ds = complete_splits(_labelled([20, 20, 1, 5]), val_fraction=0.1, test_fraction=0.1, seed=0)
    warnings = [n for n in ds.notes if n.startswith("warning: ")]
    assert warnings == [
        ("warning: 2 classes (c2, c3) got no test image, so test results say nothing of them: "
         "at --test-fraction 0.1 a class needs 6 images for one to be held out"),
        ("warning: 1 class (c2) got no val image, so val results say nothing of it: "
         "at --val-fraction 0.1 a class needs 5 images for one to be held out"),
    ]
    assert "  " + warnings[0] in ds.summary_lines()  # printed as a warning, not as a note
    for counts, split in (([6, 6], "test"), ([5, 20], "val")):  # the sizes named are the least that suffice
        assert (complete_splits(_labelled(counts), 0.1, 0.1, seed=0).splits[split].labels == 0).sum() == 1
        assert not any(n.startswith("warning") for n in complete_splits(_labelled(counts), 0.1, 0.1, 0).notes
                       if f"no {split} image" in n)


def test_an_empty_test_split_says_why():
    with pytest.raises(DataError, match=r"mine has no test folder and --test-fraction 0 holds out no test image.*"
                                        r"give --test-fraction above 0"):
        complete_splits(_labelled([20, 20]), val_fraction=0.1, test_fraction=0.0, seed=0)
    with pytest.raises(DataError, match=r"the test split of mine is empty: --test-fraction 0.1 of each class is "
                                        r"less than one image"):
        complete_splits(_labelled([3, 3]), val_fraction=0.1, test_fraction=0.1, seed=0)


def test_thousands_of_bad_images_are_summarised_not_listed():
    from imgcls.data.base import SHOWN_BAD, SkippedFile

    ds = _labelled([4, 4])
    ds.bad = [SkippedFile(f"z.zip/a/bad{i}.png", "not a recognised image format") for i in range(20_000)]
    lines = ds.summary_lines()
    assert len(lines) < 40 and "  20,000 images could not be decoded and were left out:" in lines
    assert lines[-1] == (f"    ... and {20_000 - SHOWN_BAD:,} more ({20_000 - SHOWN_BAD:,} not a recognised image "
                         'format); a run lists them all under "bad" in its dataset.json')
    assert len(ds.record()["bad"]) == 20_000


def test_progress_bar_runs(tmp_path, capsys):
    ds = load_folder(write_tree(tmp_path / "d", CLASS_FILES), progress=True)
    assert len(ds.splits["all"]) == 4


def test_load_image_inputs(tmp_path):
    single = tmp_path / "one.jpg"
    single.write_bytes(png(RED, size=(10, 10)))  # a PNG named .jpg
    folder = write_tree(tmp_path / "dir", {"x/a.png": png(BLUE), "b.png": png(GREEN), "c.txt": b"x"})
    archive = write_zip(tmp_path / "imgs.zip", {"in/a.png": png(RED), "in/bad.png": RANDOM_BYTES})
    batch = np.zeros((2, 5, 5, 3), dtype=np.float32)
    batch[1] = 1.0
    inputs = [
        str(single),
        folder,
        archive,
        Image.new("L", (3, 3), 255),
        np.full((4, 4), 128, dtype=np.uint8),
        np.zeros((6, 6, 3), dtype=np.uint8),
        batch,
    ]
    names, images, skipped = load_image_inputs(inputs, channels=3, size=(8, 8))
    assert images.shape == (9, 8, 8, 3) and images.dtype == np.uint8
    assert names[0] == str(single) and names[1].endswith("dir/b.png") and names[2].endswith("dir/x/a.png")
    assert names[3].endswith("imgs.zip/in/a.png") and names[4] == "<image 3>" and names[-1] == "<array 6[1]>"
    assert tuple(images[0, 4, 4]) == RED and tuple(images[3, 4, 4]) == RED
    assert tuple(images[-2, 0, 0]) == (0, 0, 0) and tuple(images[-1, 0, 0]) == (255, 255, 255)
    assert {Path(s.path).name for s in skipped} == {"c.txt", "bad.png"}


def test_load_image_inputs_refuses_bad_arrays_and_mixed_sizes():
    with pytest.raises(DataError, match=r"float array must hold values in \[0, 1\]"):
        load_image_inputs([np.full((4, 4), 2.0)], channels=1, size=None)
    with pytest.raises(DataError, match="differ in size"):
        load_image_inputs([np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8)], channels=1, size=None)
    names, images, _ = load_image_inputs([np.zeros((4, 4), np.uint8)], channels=1, size=None)
    assert images.shape == (1, 4, 4, 1)


def test_real_mnist_zip_layout():
    path = SHARED_DATA / "mnist-png.zip"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    with open_source(path) as source:
        layout = detect_layout(source.files(), source.dirs(), str(path))
        assert layout.classes == [str(d) for d in range(10)]
        assert {k: len(v) for k, v in layout.items.items()} == {"train": 60000, "test": 10000}
        for rel, label in layout.items["test"][::2500]:
            img = decode_image(source.read(rel), rel)
            assert to_array(img, 1, None).shape == (28, 28, 1) and rel.split("/")[1] == str(label)


def test_plain_jpegs_load_through_the_shortcut_with_the_pixels_pil_gives(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    files = {f"{c}/{i}.jpg": encode(Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)), "JPEG",
                                    quality=75) for c in ("cats", "dogs") for i in range(4)}
    files["dogs/gray.jpg"] = encode(Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)), "JPEG")
    path = write_zip(tmp_path / "d.zip", files)
    real, taken = decode_module.decode_jpeg_array, []

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(decode_module, "decode_jpeg_array", spy)
    fast = load_folder(path, workers=1)
    monkeypatch.setattr(decode_module, "decode_jpeg_array", lambda *args: None)
    slow = load_folder(path, workers=1)
    # Every file takes the shortcut: the gray one decodes to one channel, as with PIL, and is made RGB
    # with the rest of the dataset afterwards.
    assert taken == [True] * 9
    assert fast.splits["all"].images.shape == (9, 12, 10, 3)
    np.testing.assert_array_equal(fast.splits["all"].images, slow.splits["all"].images)
