"""The decoded-array cache: hits, keys that follow the content, damaged entries."""

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data.cache import cache_key, load_cached, source_key
from imgcls.data.folder import load_folder


def png(color, size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


FILES = {
    "train/cats/a.png": png((255, 0, 0)),
    "train/cats/b.png": png((250, 0, 0)),
    "train/dogs/a.png": png((0, 0, 255)),
    "train/dogs/notes.txt": b"skipped",
    "train/dogs/bad.png": b"not a png",
    "test/dogs/t.png": png((0, 0, 250)),
}


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return path


class CountingBuild:
    """A build function that counts its calls."""

    def __init__(self, path):
        self.path, self.calls = path, 0

    def __call__(self):
        self.calls += 1
        return load_folder(self.path)


def test_second_load_comes_from_the_cache(tmp_path):
    source = write_zip(tmp_path / "d.zip", FILES)
    build = CountingBuild(source)
    key = cache_key(source, image_size=None, channels=None)
    first, hit1 = load_cached(key, build, tmp_path / "decoded")
    second, hit2 = load_cached(key, build, tmp_path / "decoded")
    assert (hit1, hit2, build.calls) == (False, True, 1)
    assert second.name == first.name and second.classes == first.classes
    assert list(second.splits) == list(first.splits) == ["train", "test"]
    for name, split in first.splits.items():
        np.testing.assert_array_equal(second.splits[name].images, split.images)
        np.testing.assert_array_equal(second.splits[name].labels, split.labels)
        assert second.splits[name].images.dtype == np.uint8
        assert second.splits[name].paths == split.paths
    assert second.skipped == first.skipped and len(second.skipped) == 1
    assert second.bad == first.bad and len(second.bad) == 1
    assert second.notes == first.notes
    assert second.layout == first.layout == "train/ -> train (3 images), test/ -> test (1)"
    entry = tmp_path / "decoded" / key
    assert sorted(p.suffix for p in entry.iterdir()) == [".json", ".npy", ".npy", ".npy", ".npy"]
    assert [p.name for p in (tmp_path / "decoded").iterdir()] == [key]  # no temporary folder left


def test_zip_key_follows_its_content(tmp_path):
    source = write_zip(tmp_path / "d.zip", FILES)
    before = source_key(source)
    assert source_key(source) == before
    with zipfile.ZipFile(source, "a") as zf:
        zf.writestr("train/cats/c.png", png((1, 2, 3)))
    assert source_key(source) != before
    same_names = write_zip(tmp_path / "e.zip", {**FILES, "train/cats/a.png": png((0, 255, 0))})
    assert source_key(same_names) != source_key(write_zip(tmp_path / "f.zip", FILES))


def test_zip_with_data_in_front_still_has_a_key(tmp_path):
    source = write_zip(tmp_path / "d.zip", FILES)
    prefixed = tmp_path / "sfx.zip"
    prefixed.write_bytes(b"#!/bin/sh\nexit 0\n" + source.read_bytes())
    assert zipfile.is_zipfile(prefixed)
    assert len(source_key(prefixed)) == 64


def test_folder_key_follows_its_content(tmp_path):
    root = tmp_path / "d"
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    before = source_key(root)
    (root / "train/cats/c.png").write_bytes(png((1, 2, 3)))
    added = source_key(root)
    assert added != before
    stamp = (root / "train/cats/a.png").stat().st_mtime_ns + 10**9
    os.utime(root / "train/cats/a.png", ns=(stamp, stamp))
    assert source_key(root) != added


def test_options_change_the_key(tmp_path):
    source = write_zip(tmp_path / "d.zip", FILES)
    assert cache_key(source, image_size=(8, 8)) != cache_key(source, image_size=(16, 16))
    assert cache_key(source, image_size=(8, 8)) == cache_key(source, image_size=(8, 8))


# The last two are what a power cut can leave, since entries are not fsynced: files renamed into place
# whose data never reached the disk (zero length, or zeros).
@pytest.mark.parametrize("damage", ["truncate_images", "garbage_json", "flip_byte", "missing_file", "empty_files",
                                    "zeroed_images"])
def test_damaged_entry_is_rebuilt(tmp_path, damage):
    source = write_zip(tmp_path / "d.zip", FILES)
    build = CountingBuild(source)
    key = cache_key(source)
    cache_dir = tmp_path / "decoded"
    original, _ = load_cached(key, build, cache_dir)
    images = cache_dir / key / "0-images.npy"
    if damage == "truncate_images":
        images.write_bytes(images.read_bytes()[:-20])
    elif damage == "garbage_json":
        (cache_dir / key / "meta.json").write_text("{not json")
    elif damage == "flip_byte":
        data = bytearray(images.read_bytes())
        data[-1] ^= 0xFF
        images.write_bytes(bytes(data))
    elif damage == "empty_files":
        for f in (cache_dir / key).iterdir():
            f.write_bytes(b"")
    elif damage == "zeroed_images":
        images.write_bytes(bytes(images.stat().st_size))
    else:
        images.unlink()
    rebuilt, hit = load_cached(key, build, cache_dir)
    assert not hit and build.calls == 2
    np.testing.assert_array_equal(rebuilt.splits["train"].images, original.splits["train"].images)
    again, hit = load_cached(key, build, cache_dir)
    assert hit and build.calls == 2
    np.testing.assert_array_equal(again.splits["train"].images, original.splits["train"].images)


def test_entry_of_the_format_before_the_layout_line_is_rebuilt_with_it(tmp_path):
    source = write_zip(tmp_path / "d.zip", FILES)
    build = CountingBuild(source)
    cache_dir = tmp_path / "decoded"
    load_cached("a" * 32, build, cache_dir)
    meta_file = cache_dir / ("a" * 32) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["layout"]
    meta_file.write_text(json.dumps({**meta, "format": 1}))
    rebuilt, hit = load_cached("a" * 32, build, cache_dir)
    assert not hit and build.calls == 2 and rebuilt.layout.startswith("train/ -> train")
    assert json.loads(meta_file.read_text())["layout"] == rebuilt.layout


def test_an_edited_class_list_in_meta_json_is_not_trusted(tmp_path):
    source = write_zip(tmp_path / "d.zip", FILES)
    build = CountingBuild(source)
    cache_dir = tmp_path / "decoded"
    original, _ = load_cached("a" * 32, build, cache_dir)
    meta_file = cache_dir / ("a" * 32) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["classes"] = list(reversed(meta["classes"]))  # every label would name the other class
    meta_file.write_text(json.dumps(meta))
    rebuilt, hit = load_cached("a" * 32, build, cache_dir)
    assert not hit and build.calls == 2 and rebuilt.classes == original.classes
    assert load_cached("a" * 32, build, cache_dir)[1]


def test_entry_for_another_key_is_not_trusted(tmp_path):
    source = write_zip(tmp_path / "d.zip", FILES)
    build = CountingBuild(source)
    cache_dir = tmp_path / "decoded"
    load_cached("a" * 32, build, cache_dir)
    (cache_dir / ("a" * 32)).rename(cache_dir / ("b" * 32))
    _, hit = load_cached("b" * 32, build, cache_dir)
    assert not hit and build.calls == 2
    meta = json.loads((cache_dir / ("b" * 32) / "meta.json").read_text())
    assert meta["key"] == "b" * 32


def test_unwritable_cache_is_a_note_not_a_failure(tmp_path):
    source = write_zip(tmp_path / "d.zip", FILES)
    blocker = tmp_path / "decoded"
    blocker.write_text("a file where the cache folder should be")
    dataset, hit = load_cached(cache_key(source), CountingBuild(source), blocker)
    assert not hit and len(dataset.splits["train"]) == 3
    assert any("could not be cached" in n for n in dataset.notes)


def test_a_hit_maps_the_entry_and_writing_to_it_never_reaches_the_entry(tmp_path):
    # The images of a hit are the entry's file, mapped copy-on-write: nothing is read into fresh memory.
    source = write_zip(tmp_path / "d.zip", FILES)
    key = cache_key(source, image_size=None, channels=None)
    first, _ = load_cached(key, CountingBuild(source), tmp_path / "decoded")
    second, hit = load_cached(key, CountingBuild(source), tmp_path / "decoded")
    images = second.splits["train"].images
    assert hit and isinstance(images, np.memmap) and Path(images.filename).parent == tmp_path / "decoded" / key
    images[0] = 0  # allowed (training code may write in place), and private to this process
    third, hit3 = load_cached(key, CountingBuild(source), tmp_path / "decoded")
    assert hit3
    np.testing.assert_array_equal(third.splits["train"].images, first.splits["train"].images)
    assert third.splits["train"].images[0].any()


def test_each_images_own_size_is_kept_through_the_cache_and_the_splits(tmp_path):
    files = {"train/cats/wide.png": png((255, 0, 0), (40, 10)), "train/cats/b.png": png((250, 0, 0), (6, 5)),
             "train/dogs/a.png": png((0, 0, 255), (7, 9)), "test/dogs/t.png": png((0, 0, 250), (6, 5))}
    source = write_zip(tmp_path / "d.zip", files)
    build = CountingBuild(source)
    key = cache_key(source, image_size=None, channels=None)
    first, _ = load_cached(key, build, tmp_path / "decoded")
    second, hit = load_cached(key, build, tmp_path / "decoded")
    assert hit
    for ds in (first, second):
        own = {p.rsplit("/", 1)[1]: tuple(s) for split in ds.splits.values() for p, s in zip(split.paths, split.sizes)}
        assert own == {"wide.png": (10, 40), "b.png": (5, 6), "a.png": (9, 7), "t.png": (5, 6)}  # (height, width)
    train = second.splits["train"]
    picked = train.subset(np.array([1, 0]))
    assert picked.sizes.tolist() == train.sizes[[1, 0]].tolist() and picked.paths == [train.paths[1], train.paths[0]]
