"""``--exclude FILE``: images left out of every split, with the reason each one was listed.

The list is the ``issues.csv`` of ``imgcls inspect`` (its ``file`` column, and ``problem`` as the reason), any
CSV with a ``file`` column, or a text file of one path per line.  Paths are relative to ``--data`` (the folder,
or inside the zip), as inspect writes them; a full path that starts with ``--data`` is accepted too.  The images
are taken out after the splits are made, so every other image stays in the split it had.
"""

from __future__ import annotations

import csv
from pathlib import Path

from imgcls.data.base import ImageDataset, Split
from imgcls.errors import DataError

SHOWN = 3  # unmatched paths named in a note


def read_exclude_list(path: str | Path) -> dict[str, str]:
    """{path relative to the data: why it is listed} from ``path`` (see the module docstring)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--exclude {path} cannot be read ({type(exc).__name__}: {exc}); give a CSV with a file "
                        f"column (such as the issues.csv of imgcls inspect) or a text file of one path per line"
                        ) from None
    lines = text.splitlines()
    if lines and "file" in next(csv.reader(lines[:1])):
        rows = csv.DictReader(lines)
        listed = {}
        for row in rows:
            if row.get("file"):
                reason = row.get("problem") or "listed"
                listed[row["file"]] = f"{listed[row['file']]}, {reason}" if row["file"] in listed else reason
        return listed
    return {line.strip(): "listed" for line in lines if line.strip() and not line.startswith("#")}


def exclude_images(ds: ImageDataset, exclude: str | Path, root: str) -> ImageDataset:
    """``ds`` without the images ``exclude`` lists; ``root`` is the --data path its image paths start with.

    Raises:
        DataError: the list names none of the dataset's images (it was made for other data), or no training
            image would be left.
    """
    listed = read_exclude_list(exclude)
    prefix = str(Path(root).expanduser()).rstrip("/") + "/"
    wanted = {(p if p.startswith(prefix) else prefix + p.lstrip("/")): why for p, why in listed.items()}
    dropped, splits = [], {}
    for name, split in ds.splits.items():
        if split.paths is None:
            raise DataError(f"--exclude {exclude}: the images of {ds.name} have no file names to match")
        keep = [i for i, p in enumerate(split.paths) if p not in wanted]
        dropped += [{"file": p.removeprefix(prefix), "split": name, "reason": wanted[p]}
                    for p in split.paths if p in wanted]
        splits[name] = Split(split.images[keep], split.labels[keep], [split.paths[i] for i in keep],
                             None if split.sizes is None else split.sizes[keep])
    if listed and not dropped:
        raise DataError(f"--exclude {exclude} lists {len(listed):,} files and none is an image of {ds.name} "
                        f"(the first: {next(iter(listed))!r}); give the list made for this data (imgcls inspect "
                        f"{ds.name})")
    if "train" in splits and not len(splits["train"]):
        raise DataError(f"--exclude {exclude} leaves no training image of {ds.name}")
    found = {prefix + d["file"] for d in dropped}
    unmatched = [p for p in wanted if p not in found]
    notes = [*ds.notes, f"{len(dropped):,} images left out as --exclude {exclude} lists them" + (
        f"; {len(unmatched):,} listed files are not in the data ({', '.join(unmatched[:SHOWN])})"
        if unmatched else "")]
    return ImageDataset(ds.name, list(ds.classes), splits, skipped=ds.skipped, bad=ds.bad, notes=notes,
                        layout=ds.layout, excluded=dropped)
