"""Multi-label datasets: label CSVs read and refused, found in a source, matched to images; iterative splits."""

import time

import numpy as np
import pytest

from imgcls.data.multilabel import (
    MAX_LABELS,
    find_label_file,
    iterative_split,
    label_counts_line,
    match_rows,
    read_label_csv,
)
from imgcls.errors import DataError


def read(text: str, source: str = "labels.csv"):
    return read_label_csv(text.encode("utf-8"), source)


def refusal(text: str | bytes, source: str = "labels.csv") -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    with pytest.raises(DataError) as info:
        read_label_csv(data, source)
    return str(info.value)


# ----------------------------------------------------------------------------
# The two forms


def test_list_form_with_spaces():
    table = read("filename,labels\na.jpg,cat dog\nb.jpg,\n\nc.jpg,  dog  \n")
    assert table.form == "list"
    assert table.labels == ["cat", "dog"]
    assert table.files == ["a.jpg", "b.jpg", "c.jpg"]
    assert table.rows == [2, 3, 5]  # the blank line 4 is skipped but counted
    np.testing.assert_array_equal(table.targets, [[1, 1], [0, 0], [0, 1]])
    assert table.targets.dtype == np.uint8
    assert table.source == "labels.csv"


def test_list_form_with_semicolons_keeps_inner_spaces():
    table = read("Image_ID,Tags\na.jpg,red shoe; hat\nb.jpg,hat\nc.jpg,red shoe;\n")
    assert table.labels == ["hat", "red shoe"]
    np.testing.assert_array_equal(table.targets, [[1, 1], [1, 0], [0, 1]])


def test_columns_form_reorders_labels_and_reads_every_spelling_of_0_1():
    table = read("file,tulip,Rose,daisy\na.jpg,1,0,TRUE\nb.jpg,0.0,yes,no\nc.jpg,false,1.0,0\n")
    assert table.form == "columns"
    assert table.labels == ["Rose", "daisy", "tulip"]  # sorted; column j of targets is labels[j]
    np.testing.assert_array_equal(table.targets, [[0, 1, 1], [1, 0, 0], [1, 0, 0]])


def test_windows_line_endings_keep_line_numbers():
    table = read_label_csv(b"filename,labels\r\na.jpg,x\r\n\r\nb.jpg,y\r\n", "labels.csv")
    assert table.rows == [2, 4] and table.files == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("delimiter", ["\t", ";"])
def test_tab_and_semicolon_delimiters(delimiter):
    table = read(f"filename{delimiter}cat{delimiter}dog\na.jpg{delimiter}1{delimiter}0\nb.jpg{delimiter}1{delimiter}1\n")
    assert table.labels == ["cat", "dog"]
    np.testing.assert_array_equal(table.targets, [[1, 0], [1, 1]])


def test_list_form_ignores_other_columns_and_takes_the_first_filename_column():
    table = read("id,width,path,labels\n7,640,a.jpg,x\n8,480,b.jpg,y x\n")
    assert table.files == ["7", "8"]
    np.testing.assert_array_equal(table.targets, [[1, 0], [1, 1]])


# ----------------------------------------------------------------------------
# Encodings


def test_utf8_bom_and_utf16_with_bom_are_read():
    text = "filename,labels\ncafé.jpg,crème brûlée\n"
    for data in (b"\xef\xbb\xbf" + text.encode("utf-8"), text.encode("utf-16"), b"\xfe\xff" + text.encode("utf-16-be")):
        table = read_label_csv(data, "labels.csv")
        assert table.files == ["café.jpg"] and table.labels == ["brûlée", "crème"]


def test_latin1_refused_with_line_byte_and_fix():
    message = refusal("filename,labels\na.jpg,x\ncafé.jpg,y\n".encode("latin-1"))
    assert "labels.csv line 3" in message and "0xe9" in message and "save it as UTF-8" in message


def test_utf16_without_bom_refused():
    message = refusal("filename,labels\na.jpg,x\n".encode("utf-16-le"))
    assert "labels.csv" in message and "UTF-8" in message


# ----------------------------------------------------------------------------
# Refusals: each names the file, the line and the row's image


def test_no_filename_column():
    message = refusal("picture,labels\na.jpg,x\n")
    assert "no filename column" in message and "['picture', 'labels']" in message and "image_id" in message


def test_missing_label_column_names_both_forms():
    message = refusal("filename\na.jpg\n")
    assert "missing column" in message and "['filename']" in message
    assert "filename,labels" in message and "filename,<label1>,<label2>" in message and "0/1" in message


def test_mixed_separators():
    message = refusal("filename,labels\na.jpg,red shoe;hat\nb.jpg,cat dog\n")
    assert "line 3 (b.jpg) mixes separators" in message and "line 2" in message


@pytest.mark.parametrize(("cell", "bad"), [('"red,shoe"', ","), ('"a;red,shoe"', ","), ('"a|red,shoe"', ",")])
def test_label_holding_a_separator(cell, bad):
    message = refusal(f"filename,labels\na.jpg,x\nb.jpg,{cell}\n")
    assert f"labels.csv line 3 (b.jpg): label 'red{bad}shoe' holds a '{bad}'" in message
    assert "separated by spaces, ';' or '|'" in message


def test_bars_separate_labels_and_words_name_the_columns():
    # ChestX-ray14's Data_Entry_2017.csv: "Image Index", "Finding Labels" split by '|', and columns of other facts.
    table = read("Image Index,Finding Labels,Follow-up #,Patient ID\n00000001_000.png,Cardiomegaly,0,1\n"
                 "00000001_001.png,Cardiomegaly|Emphysema,1,1\n00000002_000.png,No Finding,0,2\n")
    assert table.form == "list" and table.files == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    assert table.labels == ["Cardiomegaly", "Emphysema", "No Finding"]  # a label may hold a space after '|'
    np.testing.assert_array_equal(table.targets, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    both = refusal("filename,labels\na.jpg,x;y\nb.jpg,x|y\n")
    assert "line 2 separates labels with ';' and line 3 with '|'" in both


def test_value_not_0_1_names_line_file_column_and_value():
    message = refusal("filename,cat,dog\na.jpg,1,0\nb.jpg,0,2\n")
    assert "line 3 (b.jpg), column 'dog': '2' is not 0 or 1" in message


def test_empty_value_and_unnamed_label_column():
    assert "line 2 (a.jpg), column 'dog': an empty cell" in refusal("filename,cat,dog\na.jpg,1,\n")
    assert "column 3 has no name" in refusal("filename,cat,\na.jpg,1,0\n")


def test_wrong_cell_count_names_the_line():
    message = refusal("filename,labels\na.jpg,x\nb.jpg,x,y\n")
    assert "line 3 has 3 cells" in message and "has 2" in message


def test_duplicate_filename_names_both_lines():
    message = refusal("filename,labels\na.jpg,x\nb.jpg,y\n a.jpg ,z\n")
    assert "lines 2 and 4 both name 'a.jpg'" in message


def test_empty_filename_and_no_rows_and_no_labels():
    assert "line 3: the filename cell is empty" in refusal("filename,labels\na.jpg,x\n,y\n")
    assert "no data rows" in refusal("filename,labels\n\n")
    assert "has a label" in refusal("filename,labels\na.jpg,\nb.jpg,\n")


def test_unclosed_quote_names_the_line():
    assert "line 3" in refusal('filename,labels\na.jpg,x\n"b.jpg,y\nc.jpg,z\n')


def test_ten_thousand_labels_refused():
    rows = "".join(f"img{i}.jpg,id{i}\n" for i in range(10_000))
    message = refusal("filename,labels\n" + rows)
    assert "10,000 distinct labels" in message and f"{MAX_LABELS:,}" in message and "'id0'" in message
    assert "right column" in message


def test_max_labels_accepted():
    rows = "".join(f"img{i}.jpg,l{i}\n" for i in range(MAX_LABELS))
    assert len(read("filename,labels\n" + rows).labels) == MAX_LABELS


# ----------------------------------------------------------------------------
# Finding the CSV


def test_find_label_file():
    assert find_label_file(["labels.csv", "a/1.jpg"]) == "labels.csv"
    assert find_label_file(["mydata/Labels.CSV", "mydata/img/1.jpg", "__MACOSX/mydata/._Labels.CSV"]) == \
        "mydata/Labels.CSV"
    # Kaggle: train.csv is known by name beside test.csv and sample_submission.csv
    assert find_label_file(["train.csv", "test.csv", "sample_submission.csv", "train_images/1.jpg"]) == "train.csv"
    assert find_label_file(["meta.csv", "img/1.jpg"]) == "meta.csv"  # the only CSV, any name
    assert find_label_file(["img/1.jpg", "img/notes.csv"]) == "img/notes.csv"  # inside a wrapping folder
    assert find_label_file(["cats/1.jpg", "dogs/1.jpg", "dogs/notes.csv"]) is None  # inside a class folder
    assert find_label_file(["cats/1.jpg", "dogs/1.jpg"]) is None


@pytest.mark.parametrize("files", [["a.csv", "b.csv", "img/1.jpg"], ["labels.csv", "tags.csv"]])
def test_find_label_file_refuses_a_tie(files):
    with pytest.raises(DataError) as info:
        find_label_file(files)
    assert all(f in str(info.value) for f in files if f.endswith(".csv")) and "--labels FILE" in str(info.value)


# ----------------------------------------------------------------------------
# Matching rows to images


IMAGES = ["data/train/a.jpg", "data/train/b.png", "data/train/sub/c.jpg", "data/other/c.jpg", "data/d.jpg"]


def test_match_by_path_tail_stem_and_absolute_path():
    table = read("image_id,labels\ntrain/sub/c.jpg,x\nb,y\ndata/d.jpg,x\n./a.jpg,\n"
                 "C:\\Users\\me\\data\\other\\c.jpg,y\n")
    rows = match_rows(table, IMAGES, "photos.zip")
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, [3, 1, 0, 4, 2])


def test_match_refuses_ambiguous_missing_and_unlisted_together():
    table = read("filename,labels\nc.jpg,x\nA.jpg,y\nzz.jpg,y\ndata/d.jpg,x\nd,y\n")
    with pytest.raises(DataError) as info:
        match_rows(table, IMAGES, "photos.zip")
    message = str(info.value)
    assert "line 2 names 'c.jpg', which matches 2 images: data/train/sub/c.jpg, data/other/c.jpg" in message
    assert "line 3 names 'A.jpg', which is not in photos.zip (data/train/a.jpg differs only in case)" in message
    assert "line 4 names 'zz.jpg', which is not in photos.zip" in message
    assert "lines 5 and 6 both name data/d.jpg" in message
    assert "photos.zip: 4 images have no row in labels.csv" in message
    assert "data/train/b.png" in message and "silently dropped" in message and "empty label set" in message


def test_unlisted_images_are_counted_beyond_ten():
    table = read("filename,labels\n0.jpg,x\n")
    with pytest.raises(DataError, match=r"15 images have no row .* and 5 more"):
        match_rows(table, [f"{i}.jpg" for i in range(16)], "photos")


# ----------------------------------------------------------------------------
# Iterative stratification


def long_tail(seed: int, rows: int = 300) -> np.ndarray:
    """Twelve labels from 120 rows down to 3, placed at random; some rows get none."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((rows, 12), dtype=np.uint8)
    for j, count in enumerate([120, 90, 70, 50, 35, 25, 18, 12, 8, 5, 4, 3]):
        targets[rng.choice(rows, count, replace=False), j] = 1
    return targets


@pytest.mark.parametrize("fractions", [[1 / 3, 1 / 3], [0.1, 0.1], [0.15, 0.25], [0.2]])
def test_iterative_split_keeps_sizes_and_label_shares(fractions):
    shares = np.array([1 - sum(fractions), *fractions])
    for seed in range(10):
        targets = long_tail(seed)
        parts = iterative_split(targets, fractions, np.random.default_rng(seed))
        assert len(parts) == len(shares)
        assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(targets)))
        sizes = np.array([len(p) for p in parts])
        assert np.abs(sizes - shares * len(targets)).max() <= 1
        counts = np.array([targets[p].sum(axis=0) for p in parts])
        wanted = shares[:, None] * targets.sum(axis=0)
        assert np.all(counts[wanted >= 1] >= 1)  # a part meant to get one of a label gets it
        assert np.abs(counts - wanted).max() <= 4
        assert np.abs(counts - wanted)[:, 4:].max() <= 1  # the rarer labels, dealt first, within a row


def test_sizes_hold_when_every_row_has_a_label():
    # No label-free rows to fill the parts at the end: dealing by label alone drifts by a few rows.
    rng = np.random.default_rng(5)
    targets = (rng.random((1000, 20)) < 0.3).astype(np.uint8)
    targets[:, 0] = 1
    wanted = np.array([[0.7], [0.1], [0.2]]) * targets.sum(axis=0)
    for seed in range(5):
        parts = iterative_split(targets, [0.1, 0.2], np.random.default_rng(seed))
        assert [len(p) for p in parts] == [700, 100, 200]
        order = np.random.default_rng(seed).permutation(1000)
        at_random = [order[:700], order[700:800], order[800:]]
        deviation = [np.abs(np.array([targets[p].sum(axis=0) for p in split]) - wanted).sum()
                     for split in (parts, at_random)]
        assert deviation[0] < 0.7 * deviation[1]  # dense labels are evened out less well, still better than chance


def test_label_with_three_rows_reaches_each_of_three_parts():
    targets = long_tail(0)
    parts = iterative_split(targets, [1 / 3, 1 / 3], np.random.default_rng(0))
    assert [int(targets[p, 11].sum()) for p in parts] == [1, 1, 1]


def test_iterative_split_beats_a_random_split():
    targets = long_tail(1)
    deviation = []
    for split in ("iterative", "random"):
        if split == "iterative":
            parts = iterative_split(targets, [0.2, 0.2], np.random.default_rng(0))
        else:
            order = np.random.default_rng(0).permutation(len(targets))
            parts = [order[:180], order[180:240], order[240:]]
        counts = np.array([targets[p].sum(axis=0) for p in parts])
        deviation.append(np.abs(counts - np.array([[0.6], [0.2], [0.2]]) * targets.sum(axis=0)).sum())
    assert deviation[0] < deviation[1] / 3


def test_iterative_split_is_deterministic_and_seeded():
    targets = long_tail(2)
    a = iterative_split(targets, [0.2, 0.1], np.random.default_rng(7))
    b = iterative_split(targets, [0.2, 0.1], np.random.default_rng(7))
    c = iterative_split(targets, [0.2, 0.1], np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_every_label_keeps_a_row_in_part_0():
    # Held-out parts larger than part 0, and labels of one and two rows.
    targets = np.zeros((40, 5), dtype=np.uint8)
    targets[0, 0] = 1
    targets[[1, 2], 1] = 1
    targets[3:20, 2] = 1
    targets[[4, 5], 3] = 1
    targets[10:30, 4] = 1
    for seed in range(20):
        parts = iterative_split(targets, [0.4, 0.4], np.random.default_rng(seed))
        assert targets[parts[0]].any(axis=0).all()
        assert [len(p) for p in parts] == [8, 16, 16]


def test_iterative_split_edge_cases():
    empty = iterative_split(np.zeros((0, 3), dtype=np.uint8), [0.2], np.random.default_rng(0))
    assert [len(p) for p in empty] == [0, 0]
    none = iterative_split(np.zeros((10, 3), dtype=np.uint8), [0.2, 0.0], np.random.default_rng(0))
    assert [len(p) for p in none] == [8, 2, 0]
    with pytest.raises(ValueError, match="sum below 1"):
        iterative_split(np.zeros((10, 3)), [0.6, 0.4], np.random.default_rng(0))


def test_iterative_split_is_fast():
    rng = np.random.default_rng(0)
    targets = (rng.random((10_000, 100)) < 0.5 / np.arange(1, 101)).astype(np.uint8)
    start = time.perf_counter()
    parts = iterative_split(targets, [0.1, 0.1], np.random.default_rng(1))
    assert time.perf_counter() - start < 1.0
    assert [len(p) for p in parts] == [8000, 1000, 1000]


# ----------------------------------------------------------------------------
# The summary line


def test_label_counts_line():
    targets = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)
    line = label_counts_line(targets, ["rose", "daisy", "tulip"])
    assert line == "3 labels, 1.4 per image on average (0 to 3); 1 image has no label; rarest: tulip 1, rose 2"
    assert "no label" not in label_counts_line(targets[[0, 1, 3]], ["rose", "daisy", "tulip"])
