"""Symbolic links in a data folder: none pulls in files from elsewhere unasked, hides real files, or doubles them."""

import os

import numpy as np
import pytest
from PIL import Image

from imgcls.data.cache import cache_key
from imgcls.data.folder import load_folder
from imgcls.errors import DataError


def _images(folder, n, value):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def data(tmp_path):
    """root/a (3 images), root/b (2 images), and outside/ (4 images) beside root."""
    root = tmp_path / "root"
    _images(root / "a", 3, 10)
    _images(root / "b", 2, 100)
    _images(tmp_path / "outside", 4, 200)
    return root


def test_a_class_linked_out_of_the_folder_is_refused_naming_the_link_and_the_flag(data):
    (data / "c").symlink_to(data.parent / "outside", target_is_directory=True)
    with pytest.raises(DataError) as exc:
        load_folder(data)
    message = str(exc.value)
    assert "\n" not in message
    assert f"c -> {data.parent / 'outside'}" in message and "--follow-links" in message
    with pytest.raises(DataError, match="lead"):
        cache_key(data)  # the cache key lists the folder too: refused before anything is decoded


def test_a_file_linked_out_of_the_folder_is_refused(data):
    (data / "a" / "x.png").symlink_to(data.parent / "outside" / "0.png")
    with pytest.raises(DataError, match=r"1 link leads out of the folder \(a/x.png -> "):
        load_folder(data)


def test_follow_links_reads_them(data):
    (data / "c").symlink_to(data.parent / "outside", target_is_directory=True)
    ds = load_folder(data, follow_links=True)
    assert ds.classes == ["a", "b", "c"]
    assert np.bincount(ds.splits["all"].labels).tolist() == [3, 2, 4]
    assert cache_key(data, follow_links=True) != cache_key(data / "a")


def test_a_class_linked_to_its_sibling_is_refused_and_never_hides_the_real_class(data):
    # Before: whichever of a/ and its link was listed first hid the other, and a/ "held no image".
    (data / "z").symlink_to(data / "a", target_is_directory=True)
    with pytest.raises(DataError, match=r"z/ is a link to a/, which is read already: its images would be read twice"):
        load_folder(data)
    (data / "z").unlink()
    (data / "0").symlink_to(data / "a", target_is_directory=True)  # listed before a/ in any order
    with pytest.raises(DataError, match=r"0/ is a link to a/"):
        load_folder(data, follow_links=True)


def test_links_to_files_inside_and_loops_are_skipped_with_reasons(data):
    (data / "b" / "dup.png").symlink_to(data / "a" / "0.png")  # the same image in two classes
    (data / "a" / "loop").symlink_to(data, target_is_directory=True)
    (data / "b" / "gone.png").symlink_to(data / "nowhere.png")
    ds = load_folder(data)
    assert np.bincount(ds.splits["all"].labels).tolist() == [3, 2]
    reasons = {os.path.relpath(s.path, data): s.reason for s in ds.skipped}
    assert reasons["b/dup.png"] == "a link to a/0.png, read under its own path"
    assert reasons["a/loop"] == "a link to a folder above it (a loop)"
    assert reasons["b/gone.png"].startswith("a broken link")


def test_two_links_to_one_outside_folder_are_refused_even_when_followed(data):
    (data / "c").symlink_to(data.parent / "outside", target_is_directory=True)
    (data / "d").symlink_to(data.parent / "outside", target_is_directory=True)
    with pytest.raises(DataError, match=r"[cd]/ is a link to the folder [cd]/ leads to"):
        load_folder(data, follow_links=True)


def test_a_data_folder_that_is_itself_a_link_reads_normally(data, tmp_path):
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    ds = load_folder(tmp_path / "link")
    assert np.bincount(ds.splits["all"].labels).tolist() == [3, 2]
