"""Multi-label datasets: a CSV of labels beside a folder (or zip) of images.

Two forms of CSV are read, both with a filename column (``filename``,
``image_id``, ``path``, ... in any case):

* ``list``: ``filename,labels`` where the labels of each image are separated
  by spaces, or by ``;`` or ``|`` (then a label may hold inner spaces: ``red shoe;hat``;
  with ``|``, as ChestX-ray14's ``Atelectasis|Effusion`` and ``No Finding``, a cell
  without one is one label); other columns are left alone;
* ``columns``: ``filename,<label1>,<label2>,...`` with a 0/1 value per label.

:func:`read_label_csv` parses the bytes into a :class:`LabelTable`,
:func:`find_label_file` picks the CSV of a source, :func:`match_rows` pairs
its rows with the source's images, :func:`iterative_split` makes splits that
keep every label's share, and :func:`label_counts_line` describes the labels.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from imgcls.data.images import has_image_extension
from imgcls.data.layout import split_of, visible_dir
from imgcls.errors import DataError

MAX_LABELS = 1000  # distinct labels accepted; 10,000 distinct labels is almost surely a wrong column (ids)
LABEL_FILE_NAMES = ("labels.csv", "train.csv", "multilabel.csv", "tags.csv", "annotations.csv")

FILENAME_COLUMNS = ("filename", "file", "file_name", "image", "image_name", "image_id", "img", "path", "name",
                    "fname", "id")
LABELS_COLUMNS = ("labels", "label", "tags", "tag", "classes", "class", "categories", "category", "target", "targets")

_TRUE = frozenset({"1", "1.0", "true", "yes"})
_FALSE = frozenset({"0", "0.0", "false", "no"})
_FORBIDDEN = ",;|"  # characters no label may hold: they read as separators
_SHOWN = 10  # problems listed one by one in an error; the rest are counted
_SEPARATORS = (";", "|")  # a file whose labels cells hold one of these separates labels by it, not by spaces
_FORMS = ("accepted forms: filename,labels (the labels of each image separated by spaces, ';' or '|') "
          "or filename,<label1>,<label2>,... (a 0/1 value per label)")


@dataclass
class LabelTable:
    """The rows of a label CSV.

    Attributes:
        labels: sorted distinct label names; column ``j`` of ``targets`` is ``labels[j]``.
        files: the filename cell of each data row, as written (stripped), in file order; length R.
        targets: uint8 array, shape (R, L), 1 where the row's image has the label.
        rows: 1-based line number in the CSV of each data row (the header is line 1), for messages.
        form: ``"list"`` (filename,labels) or ``"columns"`` (one 0/1 column per label).
        source: the CSV's display name, for messages.
    """

    labels: list[str]
    files: list[str]
    targets: np.ndarray
    rows: list[int]
    form: str
    source: str


# ----------------------------------------------------------------------------
# Reading the CSV


def read_label_csv(data: bytes, source: str) -> LabelTable:
    """Parse the bytes of a label CSV (UTF-8 with or without BOM, or UTF-16 with a BOM).

    The delimiter is ``,``, or ``\\t`` or ``;`` where the header has that and
    no comma.  Blank lines are skipped.

    Args:
        data: the file's bytes.
        source: its display name (``labels.csv``, ``photos.zip:labels.csv``), for messages.

    Returns:
        a :class:`LabelTable` with R data rows and L labels.

    Raises:
        DataError: the file is not UTF-8/UTF-16, has no filename column or no
            label column, a row has the wrong number of cells, an empty or
            repeated filename, a label holding a separator, a value that is
            not 0/1, more than :data:`MAX_LABELS` labels, no data row or no
            label at all.  Each message names the line and the file of the row.
    """
    text = _decode(data, source)
    delimiter = _delimiter(text)
    header, body = _parse_rows(text, delimiter, source)
    name_col = _column(header, FILENAME_COLUMNS)
    if name_col is None:
        raise DataError(f"{source}: no filename column; the header is {header}; expected one of "
                        f"{', '.join(FILENAME_COLUMNS)} (any case)")
    _check_body(body, header, name_col, source)
    if not body:
        raise DataError(f"{source}: no data rows below the header {header}")
    labels_col = _column(header, LABELS_COLUMNS, skip=name_col)
    if labels_col is not None:
        labels, targets = _list_form(body, name_col, labels_col, source)
        form = "list"
    elif len(header) > 1:
        labels, targets = _columns_form(header, body, name_col, source)
        form = "columns"
    else:
        raise DataError(f"{source}: missing column: the header is {header}, with no labels column; {_FORMS}")
    if not targets.any():
        raise DataError(f"{source}: none of the rows ({len(body):,}) has a label; {_FORMS}")
    return LabelTable(labels, [row[name_col] for _, row in body], targets, [line for line, _ in body], form, source)


def _column(header: list[str], names: tuple[str, ...], skip: int | None = None) -> int | None:
    """The column whose header is one of ``names`` (any case); else the one with such a word in it (``Image
    Index``, ``Finding Labels``), the earlier of ``names`` first; None without either."""
    keys = [cell.lower() for cell in header]
    exact = next((i for i, key in enumerate(keys) if key in names and i != skip), None)
    if exact is not None:
        return exact
    words = [set("".join(c if c.isalnum() else " " for c in key).split()) for key in keys]
    return next((i for name in names for i, have in enumerate(words) if name in have and i != skip), None)


def _decode(data: bytes, source: str) -> str:
    """The text of ``data``: UTF-8 (a BOM is dropped) or UTF-16 with a BOM."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: starts with a UTF-16 byte-order mark but byte {exc.start:,} is not "
                            "UTF-16 (a cut-off file?); save it as UTF-8") from None
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{source} line {line}: holds NUL bytes (UTF-16 without a byte-order mark, or not a "
                        "text file?); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        begin = data.rfind(b"\n", 0, exc.start) + 1
        end = data.find(b"\n", exc.start)
        shown = data[begin: end if end >= 0 else len(data)][:80].decode("utf-8", "backslashreplace").rstrip("\r")
        raise DataError(f"{source} line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 (in {shown!r}); the "
                        "file is likely Latin-1 or Windows-1252: save it as UTF-8") from None


def _delimiter(text: str) -> str:
    """``,``, or ``\\t`` or ``;`` where the first non-blank line has that and no comma."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if "," not in first:
        for delimiter in ("\t", ";"):
            if delimiter in first:
                return delimiter
    return ","


def _parse_rows(text: str, delimiter: str, source: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The stripped header cells, and (line number, stripped cells) of each non-blank row below it."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    body: list[tuple[int, list[str]]] = []
    end = 0  # the line the previous row ended on
    for cells in reader:
        line, end = end + 1, reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if end > line:
            raise DataError(f"{source} line {line}: a quoted cell runs on to line {end} (an unclosed '\"'?)")
        cells = [cell.strip() for cell in cells]
        if header is None:
            header = cells
        else:
            body.append((line, cells))
    if header is None:
        raise DataError(f"{source} is empty; {_FORMS}")
    return header, body


def _check_body(body: list[tuple[int, list[str]]], header: list[str], name_col: int, source: str) -> None:
    """Refuse rows with the wrong number of cells, empty filenames and filenames given twice."""
    first_line: dict[str, int] = {}
    for line, cells in body:
        if len(cells) != len(header):
            raise DataError(
                f"{source} line {line} has {len(cells)} cells where the header {header} has {len(header)} "
                f"(row {cells[:4]}{' ...' if len(cells) > 4 else ''}); a cell holding the delimiter must be quoted")
        name = cells[name_col]
        if not name:
            raise DataError(f"{source} line {line}: the {header[name_col]} cell is empty")
        if name in first_line:
            raise DataError(f"{source}: lines {first_line[name]} and {line} both name {name!r}; give each image "
                            "one row, with all its labels")
        first_line[name] = line


def _list_form(body, name_col: int, labels_col: int, source: str) -> tuple[list[str], np.ndarray]:
    """Sorted labels and (R, L) uint8 targets of the ``filename,labels`` form."""
    first = {sep: next((line for line, cells in body if sep in cells[labels_col]), None) for sep in _SEPARATORS}
    used = [sep for sep in _SEPARATORS if first[sep] is not None]
    if len(used) > 1:
        raise DataError(f"{source}: line {first[';']} separates labels with ';' and line {first['|']} with '|'; "
                        f"separate them one way in the whole file")
    sep = used[0] if used else None
    sets = []
    for line, cells in body:
        cell, where = cells[labels_col], f"{source} line {line} ({cells[name_col]})"
        if sep is None:
            names = cell.split()
        elif sep == ";" and sep not in cell and len(cell.split()) > 1:  # "red shoe": one label or two?
            raise DataError(
                f"{where} mixes separators: {cell!r} has spaces but no {sep!r}, while line {first[sep]} separates "
                f"labels with {sep!r}; write {sep.join(cell.split())!r} for {len(cell.split())} labels, or "
                f"{cell + sep!r} for one label holding spaces")
        else:
            names = [name.strip() for name in cell.split(sep) if name.strip()]
        for name in names:
            bad = next((c for c in _FORBIDDEN if c in name), None)
            if bad:
                raise DataError(f"{where}: label {name!r} holds a {bad!r}; labels are separated by spaces, ';' "
                                f"or '|'")
        sets.append(names)
    labels = sorted({name for names in sets for name in names})
    _check_label_count(labels, source, "the labels column")
    index = {name: j for j, name in enumerate(labels)}
    targets = np.zeros((len(sets), len(labels)), dtype=np.uint8)
    rows = [i for i, names in enumerate(sets) for _ in names]
    targets[rows, [index[name] for names in sets for name in names]] = 1
    return labels, targets


def _columns_form(header: list[str], body, name_col: int, source: str) -> tuple[list[str], np.ndarray]:
    """Sorted labels and (R, L) uint8 targets of the ``filename,<label1>,<label2>,...`` form."""
    columns = [i for i in range(len(header)) if i != name_col]
    for i in columns:
        if not header[i]:
            raise DataError(f"{source}: header column {i + 1} has no name; {header} names every label column")
    names = [header[i] for i in columns]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{source}: the header names label column(s) {repeated} twice; {header}")
    _check_label_count(sorted(names), source, "the header")
    known: dict[str, int] = {}  # each distinct cell read once: a few values over R x L cells
    flags = []
    for line, cells in body:
        for i in columns:
            if cells[i] not in known:
                known[cells[i]] = _flag(cells[i], f"{source} line {line} ({cells[name_col]}), column {header[i]!r}")
        flags.append([known[cells[i]] for i in columns])
    values = np.array(flags, dtype=np.uint8).reshape(len(body), len(columns))
    order = sorted(range(len(names)), key=names.__getitem__)
    return [names[c] for c in order], values[:, order]


def _flag(value: str, where: str) -> int:
    """1 or 0 from ``1``, ``1.0``, ``true``, ``yes`` or ``0``, ``0.0``, ``false``, ``no`` (any case)."""
    key = value.lower()
    if key in _TRUE:
        return 1
    if key in _FALSE:
        return 0
    shown = "an empty cell" if not value else f"{value!r}"
    raise DataError(f"{where}: {shown} is not 0 or 1; in the filename,<label1>,<label2>,... form every label "
                    "column holds 0/1 (also 0.0/1.0, true/false, yes/no); a column that is not a label must be "
                    "removed")


def _check_label_count(labels: list[str], source: str, where: str) -> None:
    if len(labels) > MAX_LABELS:
        shown = ", ".join(repr(label) for label in labels[:5])
        raise DataError(f"{source}: {where} gives {len(labels):,} distinct labels, more than the {MAX_LABELS:,} "
                        f"accepted; is it the right column? (ids or file names give every row a label of its own) "
                        f"the first labels are {shown}, ...")


# ----------------------------------------------------------------------------
# Finding the CSV and pairing its rows with images


def find_label_file(files: list[str]) -> str | None:
    """The label CSV among the files of a folder or zip, or None when there is no CSV.

    Only CSVs at the top, or inside single folders wrapping everything
    (``mydata/labels.csv``), count; hidden and ``__MACOSX`` files are passed
    over.  One named as in :data:`LABEL_FILE_NAMES` (any case) is taken;
    otherwise a single CSV of any name.

    Args:
        files: relative POSIX paths of every file of the source.

    Raises:
        DataError: several CSVs qualify equally.
    """
    visible = [f for f in files if visible_dir(f)]
    prefix = _wrapping_prefix(visible)
    csvs = sorted(f for f in visible if f.startswith(prefix) and "/" not in f[len(prefix):]
                  and f.lower().endswith(".csv"))
    named = [f for f in csvs if f[len(prefix):].lower() in LABEL_FILE_NAMES]
    candidates = named or csvs
    if len(candidates) > 1:
        raise DataError(f"found {len(candidates)} CSV files that could hold the labels ({', '.join(candidates)}) "
                        "and cannot tell which; pick one with --labels FILE")
    return candidates[0] if candidates else None


def find_split_label_files(files: list[str]) -> dict[str, str]:
    """The label CSV of each split folder, when the labels come one CSV per split (``train/_classes.csv``,
    ``valid/_classes.csv``, ``test/_classes.csv``, as Roboflow exports them): split folder (``train/``, with
    any wrapping folders before it) to the CSV in it, as :func:`find_label_file` picks one there.  Empty when
    the split folders hold no CSV.

    Raises:
        DataError: a split folder holds several CSVs that could be its labels.
    """
    visible = [f for f in files if visible_dir(f)]
    prefix = _wrapping_prefix(visible)
    tops = sorted({f[len(prefix):].split("/", 1)[0] for f in visible if "/" in f[len(prefix):]})
    found = {}
    for top in (t for t in tops if split_of(t)):
        inner = f"{prefix}{top}/"
        rel = find_label_file([f[len(inner):] for f in visible if f.startswith(inner)])
        if rel is not None:
            found[inner] = inner + rel
    return found


def merge_tables(tables: dict[str, LabelTable]) -> LabelTable:
    """One table of the per-split tables of :func:`find_split_label_files` (folder prefix to its table): each
    row's file named from the top (``train/`` + its cell), the labels the union of theirs."""
    labels = sorted({name for t in tables.values() for name in t.labels})
    _check_label_count(labels, ", ".join(t.source for t in tables.values()), "the label CSVs together")
    column = {name: j for j, name in enumerate(labels)}
    files, rows, parts = [], [], []
    for prefix, t in tables.items():
        files += [prefix + f.replace("\\", "/").removeprefix("./").lstrip("/") for f in t.files]
        rows += t.rows
        part = np.zeros((len(t.files), len(labels)), np.uint8)
        part[:, [column[name] for name in t.labels]] = t.targets
        parts.append(part)
    forms = {t.form for t in tables.values()}
    return LabelTable(labels, files, np.concatenate(parts), rows, forms.pop() if len(forms) == 1 else "mixed",
                      " + ".join(t.source for t in tables.values()))


def _wrapping_prefix(files: list[str]) -> str:
    """``''`` or ``a/b/``: the single folders every file sits inside."""
    prefix = ""
    while files:
        tops = {f[len(prefix):].split("/", 1)[0] for f in files}
        if len(tops) != 1 or any("/" not in f[len(prefix):] for f in files):
            return prefix
        prefix += tops.pop() + "/"
    return prefix


def match_rows(table: LabelTable, images: list[str], where: str) -> np.ndarray:
    """The table row of each image.

    A row's filename cell (``\\`` read as ``/``; a leading ``./`` or ``/``
    dropped) names an image by its relative path, by the end of it on a ``/``
    boundary (``b.jpg`` or ``a/b.jpg`` for ``data/a/b.jpg``), by its stem when
    the cell has no image extension (Kaggle's ``image_id``), or as an
    absolute path whose end is an image's relative path.

    Args:
        table: from :func:`read_label_csv`.
        images: relative POSIX paths of the candidate images, length N.
        where: the folder or zip, for messages.

    Returns:
        int64 array, shape (N,): the index into ``table.files`` of each image.

    Raises:
        DataError: a row names no image or several, two rows name one image,
            or an image has no row; every such problem is listed in one message.
    """
    lookup = _ImageLookup(images)
    found = np.full(len(images), -1, dtype=np.int64)
    problems: list[str] = []
    for r, cell in enumerate(table.files):
        hits = lookup.find(cell)
        line = table.rows[r]
        if not hits:
            hint = lookup.case_hint(cell) if len(problems) < _SHOWN else ""  # only the listed ones
            problems.append(f"line {line} names {cell!r}, which is not in {where}{hint}")
        elif len(hits) > 1:
            shown = ", ".join(images[i] for i in hits[:3]) + (" ..." if len(hits) > 3 else "")
            problems.append(f"line {line} names {cell!r}, which matches {len(hits)} images: {shown}; "
                            "write more of its path")
        elif found[hits[0]] >= 0:
            other = int(found[hits[0]])
            problems.append(f"lines {table.rows[other]} and {line} both name {images[hits[0]]} "
                            f"(as {table.files[other]!r} and {cell!r})")
        else:
            found[hits[0]] = r
    sections = [_listed(problems, f"{table.source} has {len(problems):,} rows that do not name one image each:")]
    sections.append(_unmatched(table, images, found, where))
    message = "\n".join(s for s in sections if s)
    if message:
        raise DataError(message)
    return found


class _ImageLookup:
    """Image indices by relative path, by every end of it on a ``/`` boundary, and by those ends' stems."""

    def __init__(self, images: list[str]) -> None:
        self.full = {path: i for i, path in enumerate(images)}
        self.tails: dict[str, list[int]] = {}
        self.stems: dict[str, list[int]] = {}
        self.images = images
        self.folded: dict[str, int] | None = None  # lower-cased tail -> an image, for a hint
        for i, path in enumerate(images):
            parts = path.split("/")
            for k in range(len(parts)):
                tail = "/".join(parts[k:])
                self.tails.setdefault(tail, []).append(i)
                dot = parts[-1].rfind(".")
                if dot > 0:
                    self.stems.setdefault(tail[: len(tail) - len(parts[-1]) + dot], []).append(i)

    def find(self, cell: str) -> list[int]:
        """The images ``cell`` names: one, several (ambiguous) or none."""
        key = _normalise(cell)
        if key in self.full:
            return [self.full[key]]
        if key in self.tails:
            return self.tails[key]
        if not has_image_extension(key.rpartition("/")[2]) and key in self.stems:
            return self.stems[key]
        parts = key.split("/")
        for k in range(1, len(parts)):  # an absolute path: its end may be an image's relative path
            tail = "/".join(parts[k:])
            if tail in self.full:
                return [self.full[tail]]
        return []

    def case_hint(self, cell: str) -> str:
        """`` (images/A.jpg differs only in case)`` where an image is so named, else ``''``."""
        if self.folded is None:  # built on the first miss only
            self.folded = {}
            for tail, hits in self.tails.items():
                self.folded.setdefault(tail.lower(), hits[0])
        hit = self.folded.get(_normalise(cell).lower())
        return f" ({self.images[hit]} differs only in case)" if hit is not None else ""


def _normalise(cell: str) -> str:
    key = cell.strip().replace("\\", "/")
    while key.startswith(("./", "/")):
        key = key[2:] if key.startswith("./") else key[1:]
    return key


def _unmatched(table: LabelTable, images: list[str], found: np.ndarray, where: str) -> str:
    """The section of the message listing the images without a row, or ``''``."""
    missing = [images[i] for i in np.flatnonzero(found < 0)]
    if not missing:
        return ""
    empty_row = f"{missing[0]}," if table.form == "list" else f"{missing[0]}," + ",".join("0" * len(table.labels))
    shown = ", ".join(missing[:_SHOWN]) + (f" ... and {len(missing) - _SHOWN:,} more" if len(missing) > _SHOWN
                                           else "")
    noun, they = ("image has", "it") if len(missing) == 1 else ("images have", "they")
    return (f"{where}: {len(missing):,} {noun} no row in {table.source}: {shown}; {they} would otherwise be "
            f"silently dropped: add a row with an empty label set for each ({empty_row!r}), or remove the files")


def _listed(problems: list[str], title: str) -> str:
    """``title`` and up to :data:`_SHOWN` of ``problems``, one per line, then how many more; ``''`` for none."""
    if not problems:
        return ""
    lines = [title] + [f"  {p}" for p in problems[:_SHOWN]]
    if len(problems) > _SHOWN:
        lines.append(f"  ... and {len(problems) - _SHOWN:,} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Splits and counts


def iterative_split(targets: np.ndarray, fractions: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Split rows so that each part keeps every label's share: part 0 keeps the rest, part i+1 gets ``fractions[i]``.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas 2011, "On the
    stratification of multi-label data"): the label with the fewest remaining
    rows is dealt out first, each of its rows to the part that still wants
    the most of that label (then the most rows; then chance).  Rows without a
    label fill the parts' remaining sizes; a few rows are then moved so that
    part i+1 holds ``round(fractions[i] * R)`` rows.  Every label with a row
    keeps one in part 0, as :func:`imgcls.data.registry.stratified_split`
    keeps a class.  Labels dealt late (the commonest) drift most from their
    share where most rows hold several labels.

    Args:
        targets: 0/1 array, shape (R, L).
        fractions: the share of all rows each part after the first gets; their sum below 1.
        rng: the only source of chance (the same state gives the same split).

    Returns:
        ``len(fractions) + 1`` sorted int64 arrays of row indices, together each row once.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"fractions must be at least 0 and sum below 1, got {fractions}")
    targets = np.asarray(targets).astype(bool)
    if targets.ndim != 2:
        raise ValueError(f"targets must be 2-D (rows, labels), got shape {targets.shape}")
    shares = np.array([1.0 - sum(fractions), *fractions])
    order = rng.permutation(len(targets))  # rows are dealt in a random order, not the file's
    shuffled = targets[order]
    part = _deal_labelled(shuffled, shares, rng)
    _deal_unlabelled(part, shares, rng)
    _balance_sizes(shuffled, part, shares)
    _keep_one_in_first(shuffled, part, rng)
    owner = np.empty(len(targets), dtype=np.int64)
    owner[order] = part
    return [np.flatnonzero(owner == j).astype(np.int64) for j in range(len(shares))]


def _deal_labelled(targets: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The part of each row with a label (-1 for the rest), the rarest label's rows dealt first."""
    rows, n_labels = targets.shape
    weights = targets.astype(np.float64)
    wanted = shares[:, None] * targets.sum(axis=0)[None, :]  # (parts, L): rows of each label each part still wants
    wanted[shares == 0] = -np.inf  # a part of share 0 gets nothing
    wanted_rows = shares * rows  # (parts,): rows each part still wants
    left = targets.sum(axis=0)  # (L,): rows of each label not dealt yet
    tiebreak = rng.permutation(n_labels)
    part = np.full(rows, -1, dtype=np.int64)
    undealt = np.ones(rows, dtype=bool)
    while left.any():
        label = int(np.argmin(np.where(left > 0, left * n_labels + tiebreak, np.iinfo(np.int64).max)))
        for r in np.flatnonzero(targets[:, label] & undealt):
            j = _best_part(wanted[:, label].tolist(), wanted_rows.tolist(), rng)
            part[r], undealt[r] = j, False
            wanted[j] -= weights[r]
            wanted_rows[j] -= 1
            left -= targets[r]
    return part


def _best_part(wanted: list[float], wanted_rows: list[float], rng: np.random.Generator) -> int:
    """The part wanting the most of the label; ties: the most rows; then chance."""
    top = max(wanted)
    tied = [j for j, w in enumerate(wanted) if w >= top - 1e-9]
    if len(tied) > 1:
        most = max(wanted_rows[j] for j in tied)
        tied = [j for j in tied if wanted_rows[j] >= most - 1e-9]
    return tied[0] if len(tied) == 1 else tied[int(rng.integers(len(tied)))]


def _deal_unlabelled(part: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> None:
    """Give the rows of ``part`` still -1 to the parts furthest below their size, one at a time."""
    free = np.flatnonzero(part < 0)
    if not len(free):
        return
    sizes = np.bincount(part[part >= 0], minlength=len(shares)).astype(np.float64)
    short = np.where(shares > 0, shares * len(part) - sizes, -np.inf).tolist()
    order = rng.permutation(len(shares)).tolist()  # which of two equally short parts fills first
    counts = [0] * len(shares)
    for _ in range(len(free)):
        j = max(order, key=lambda k: short[k])
        counts[j] += 1
        short[j] -= 1
    part[free] = np.repeat(np.arange(len(shares)), counts)  # free rows are already in random order


def _balance_sizes(targets: np.ndarray, part: np.ndarray, shares: np.ndarray) -> None:
    """Move rows from parts over their size to parts under it, those that best even out the labels first.

    A part's size is ``round(share * R)`` (part 0: the rest), as in
    :func:`imgcls.data.registry.stratified_split`.  Dealing by label lets the
    sizes drift by a few rows where few rows have no label.  A row holding
    the last example of a label in its part is not moved.
    """
    sizes = [round(float(share) * len(part)) for share in shares[1:]]
    goal = np.array([len(part) - sum(sizes), *sizes])
    counts = np.array([targets[part == j].sum(axis=0) for j in range(len(shares))], dtype=np.float64)
    wanted = shares[:, None] * targets.sum(axis=0)[None, :]
    while True:
        excess = np.bincount(part, minlength=len(shares)) - goal
        over, under = int(np.argmax(excess)), int(np.argmin(excess))
        if excess[over] <= 0 or excess[under] >= 0:
            return
        rows = np.flatnonzero(part == over)
        movable = rows[~(targets[rows] & (counts[over] <= 1)).any(axis=1)]
        if not len(movable):
            return
        gain = (counts[over] - wanted[over]) + (wanted[under] - counts[under])  # (L,): how much a move helps
        row = movable[int(np.argmax(targets[movable] @ gain))]  # rows are in random order: ties fall by chance
        part[row] = under
        counts[over] -= targets[row]
        counts[under] += targets[row]


def _keep_one_in_first(targets: np.ndarray, part: np.ndarray, rng: np.random.Generator) -> None:
    """Move a row into part 0 for every label with rows but none there, and a spare row of part 0 out instead."""
    for label in np.flatnonzero(targets.any(axis=0)):
        having = np.flatnonzero(targets[:, label])
        counts = np.bincount(part[having], minlength=int(part.max()) + 1)
        if counts[0]:
            continue
        j = int(np.argmax(counts))  # from the part holding most of the label
        first = np.flatnonzero(part == 0)
        part[having[part[having] == j][0]] = 0
        scarce = targets[first].sum(axis=0) < 2  # labels part 0 cannot spare a row of
        spare = first[~(targets[first] & scarce).any(axis=1)]
        if len(spare):  # keep the sizes: a spare row with the fewest labels goes to part j
            held = targets[spare].sum(axis=1)
            fewest = spare[held == held.min()]
            part[fewest[int(rng.integers(len(fewest)))]] = j


def label_counts_line(targets: np.ndarray, labels: list[str]) -> str:
    """One line for a person: ``5 labels, 1.8 per image on average (0 to 4); 12 images have no label; rarest:
    tulip 40, rose 51``.

    Args:
        targets: 0/1 array, shape (R, L).
        labels: the name of each column, length L.
    """
    targets = np.asarray(targets).astype(bool)
    per_image = targets.sum(axis=1)
    per_label = targets.sum(axis=0)
    line = f"{len(labels):,} label{'' if len(labels) == 1 else 's'}"
    if len(per_image):
        line += f", {per_image.mean():.1f} per image on average ({per_image.min()} to {per_image.max()})"
    bare = int((per_image == 0).sum())
    if bare:
        line += f"; {bare:,} image{' has' if bare == 1 else 's have'} no label"
    if len(labels):
        rarest = np.argsort(per_label, kind="stable")[:2]
        line += "; rarest: " + ", ".join(f"{labels[j]} {per_label[j]:,}" for j in rarest)
    return line
