"""The page of ``imgcls inspect``: inspect.html, the inspection's findings with their images, in one file.

It owns the page only: the header (what was inspected, the summary, the checks not run, the images per split and
class), then one section per problem type in the contract's order, each a table of findings with the image (and,
for a pair, the other image) side by side, sortable by score.  The page is self-contained (every thumbnail a
base64 JPEG data URI, the style and the sorting script inline, nothing fetched), readable on a 390 px wide phone
(tables scroll inside their own box), and every piece of text from the data is escaped.  Finding the problems,
inspect.json and issues.csv belong to the inspection itself.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.io import write_atomic

# The contract's problem types, in its order, with a section title and a line on what each means.
PROBLEMS = {
    "exact_duplicate": ("Exact duplicates", "identical pixels, same class and split"),
    "near_duplicate": ("Near duplicates", "a resized, re-encoded, cropped or mirrored copy, same class and split"),
    "conflicting_label": ("Conflicting labels", "a (near-)copy filed under another class"),
    "leakage": ("Leakage across splits", "a (near-)copy in another split: the evaluation has seen it in training"),
    "label_error": ("Likely label errors", "the rest of the data suggests another class"),
    "outlier": ("Outliers", "unlike the other images of its class"),
    "dark": ("Too dark", ""),
    "bright": ("Too bright", ""),
    "low_contrast": ("Low contrast", ""),
    "blurry": ("Blurry", ""),
    "grayscale": ("Grayscale", "no colour in a colour dataset"),
    "tiny": ("Tiny", "very few pixels"),
    "extreme_aspect": ("Extreme aspect ratio", ""),
    "small_class": ("Small classes", "too few images of the class"),
}
PAIR_PROBLEMS = ("exact_duplicate", "near_duplicate", "conflicting_label", "leakage")
MAX_ROWS = 300  # findings shown per section; the rest are in issues.csv
THUMB_PX = 112  # longest side of a thumbnail
JPEG_QUALITY = 80

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:0 auto;padding:.5em;
color:#222;overflow-wrap:break-word}
h1{font-size:1.4em;border-bottom:2px solid #333}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .4em;
vertical-align:top;text-align:left}th{background:#f2f2f2}td.num,th.num{text-align:right;white-space:nowrap}
.thumbs{display:flex;gap:4px;min-width:max-content}
img.t{display:block;max-width:112px;max-height:112px;width:auto;height:auto}
.none{display:inline-block;width:64px;padding:.5em 0;font-size:.75em;color:#777;border:1px dashed #bbb;text-align:center}
.file{min-width:12em;max-width:22em;overflow-wrap:anywhere}.detail{min-width:8em}.split{color:#666;font-size:.85em}.note{color:#555;font-style:italic}
th button{font:inherit;font-weight:bold;background:none;border:0;padding:0;cursor:pointer}
nav a{margin-right:.8em;white-space:nowrap}
@media (max-width:480px){img.t{max-width:64px;max-height:64px}.none{width:48px}.file{min-width:8em}}
"""

# Clicking a score header sorts its section's rows by score, descending first time from the page's order.
_SCRIPT = """
document.querySelectorAll('th.score button').forEach(function (b) {
  b.addEventListener('click', function () {
    var th = b.parentNode, body = th.closest('table').tBodies[0];
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (x, y) {
      var d = parseFloat(x.dataset.score) - parseFloat(y.dataset.score);
      return asc ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    b.textContent = asc ? 'score \\u25B4' : 'score \\u25BE';
  });
});
"""


def write_inspect_page(result: dict, thumbnail: Callable[[str], np.ndarray | None], folder: Path) -> Path:
    """Write ``folder/inspect.html`` of ``result`` (inspect.json's content), whole or not at all; returns it.

    ``thumbnail(file)`` gives a finding's ``file`` or ``paired_file`` as a uint8 (H, W, 3) image, or None when it
    cannot be read; each distinct file is read and encoded once.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = group_findings(result.get("findings", []))
    thumbs = _Thumbnails(thumbnail)
    title = f"Inspection of {_text(result.get('data', ''))}"
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{title}</title><style>{_STYLE}</style></head><body><h1>{title}</h1>",
             _header(result, groups)]
    parts += [_section(i, problem, findings, thumbs) for i, (problem, findings) in enumerate(groups.items())]
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return write_atomic(folder / "inspect.html", "".join(parts), fsync=False)


def group_findings(findings: list[dict]) -> dict[str, list[dict]]:
    """The findings by problem, the contract's problems first in its order, then any other in order of appearance;
    within one, highest score first."""
    groups: dict[str, list[dict]] = {p: [] for p in PROBLEMS}
    for f in findings:
        groups.setdefault(str(f.get("problem", "")), []).append(f)
    return {p: sorted(fs, key=lambda f: -_score(f)) for p, fs in groups.items() if fs}


def _text(value) -> str:
    """``value`` as escaped HTML text: control characters and undecodable bytes made visible, never raw."""
    s = "" if value is None else str(value)
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates of undecodable file names
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s))


def _score(finding: dict) -> float:
    try:
        score = float(finding.get("score"))
    except (TypeError, ValueError):
        return float("nan")
    return score if np.isfinite(score) else float("nan")


def _header(result: dict, groups: dict[str, list[dict]]) -> str:
    """What was inspected, the summary, the checks not run, the images per split and class, and the contents."""
    seconds = result.get("seconds")
    about = f"{len(result.get('classes', []))} classes"
    if isinstance(seconds, (int, float)):
        about += f", inspected in {seconds:.1f} s"
    if result.get("path"):
        about += f"; inspect.json and issues.csv are in {_text(result['path'])}"
    parts = [f"<p>{about}.</p><h2>Summary</h2>", _list(result.get("summary", []), "no problems found")]
    parts += ["<h2>Checks not run</h2>", _list(result.get("skipped", []), "none: every check ran")]
    parts += ["<h2>Images per split and class</h2>", _counts_table(result)]
    if groups:
        links = "".join(f"<a href='#s{i}'>{_title(p)} ({len(fs)})</a>" for i, (p, fs) in enumerate(groups.items()))
        parts.append(f"<nav>{links}</nav>")
    return "".join(parts)


def _list(lines: list, empty: str) -> str:
    if not lines:
        return f"<p class='note'>{empty}</p>"
    return "<ul>" + "".join(f"<li>{_text(line)}</li>" for line in lines) + "</ul>"


def _counts_table(result: dict) -> str:
    """One row per class, one column per split (train, val, test first), and the totals."""
    counts = result.get("counts") or {}
    splits = [s for s in ("train", "val", "test") if s in counts] + [s for s in counts if s not in
                                                                      ("train", "val", "test")]
    classes = list(result.get("classes") or [])
    classes += [c for s in splits for c in counts[s] if c not in classes]
    head = "<th>class</th>" + "".join(f"<th class='num'>{_text(s)}</th>" for s in splits) + "<th class='num'>all</th>"
    rows = []
    for c in classes:
        n = [int(counts[s].get(c, 0)) for s in splits]
        rows.append(f"<tr><td>{_text(c)}</td>" + "".join(f"<td class='num'>{v:,}</td>" for v in [*n, sum(n)]) + "</tr>")
    totals = [sum(int(v) for v in counts[s].values()) for s in splits]
    rows.append("<tr><th>all</th>" + "".join(f"<th class='num'>{v:,}</th>" for v in [*totals, sum(totals)]) + "</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def _title(problem: str) -> str:
    return _text(PROBLEMS[problem][0] if problem in PROBLEMS else problem.replace("_", " ").capitalize())


def _section(index: int, problem: str, findings: list[dict], thumbs: _Thumbnails) -> str:
    """One problem's heading with its count, a line on what it means, and its table of (at most MAX_ROWS) findings."""
    pair = problem in PAIR_PROBLEMS
    meaning = PROBLEMS.get(problem, ("", ""))[1]
    parts = [f"<section id='s{index}' data-problem='{_text(problem)}' data-count='{len(findings)}'>",
             f"<h2>{_title(problem)} ({len(findings):,})</h2>"]
    if meaning:
        parts.append(f"<p>{_text(meaning)}.</p>")
    if len(findings) > MAX_ROWS:
        parts.append(f"<p class='note cap'>Showing the {MAX_ROWS} highest-scored of {len(findings):,}; "
                     f"the other {len(findings) - MAX_ROWS:,} are in issues.csv.</p>")
    head = (f"<th>image{'s' if pair else ''}</th><th>file{'s' if pair else ''}</th>"
            "<th class='num score' aria-sort='descending'><button type='button'>score \u25be</button></th>"
            "<th>suggested label</th><th>detail</th>")
    rows = "".join(_row(f, pair, thumbs) for f in findings[:MAX_ROWS])
    parts.append(f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")
    return "".join(parts) + "</section>"


def _row(finding: dict, pair: bool, thumbs: _Thumbnails) -> str:
    """A finding's row: its image(s) side by side, file(s) with split and label, score, suggested label, detail."""
    files = [finding.get("file")]
    names = [(f"{_text(finding.get('file'))} <span class='split'>({_text(finding.get('split'))}, "
              f"{_text(finding.get('label'))})</span>")]
    if pair or finding.get("paired_file"):
        files.append(finding.get("paired_file"))
        names.append(f"{_text(finding.get('paired_file'))} <span class='split'>({_text(finding.get('paired_split'))})"
                     "</span>")
    images = "".join(thumbs.img(f) for f in files)
    score = _score(finding)
    shown = "" if np.isnan(score) else f"{score:.3f}"
    return (f"<tr data-score='{-1.0 if np.isnan(score) else score!r}'><td><div class='thumbs'>{images}</div></td>"
            f"<td class='file'>{'<br>'.join(names)}</td><td class='num'>{shown}</td>"
            f"<td>{_text(finding.get('suggested_label') or '')}</td><td class='detail'>{_text(finding.get('detail') or '')}</td></tr>")


class _Thumbnails:
    """Each distinct file's thumbnail, read and encoded once, as an ``<img>`` with a data URI (or a placeholder)."""

    def __init__(self, thumbnail: Callable[[str], np.ndarray | None]):
        self.thumbnail = thumbnail
        self.uris: dict[str, str | None] = {}

    def img(self, file) -> str:
        if file is None:
            return "<span class='none'>no file</span>"
        file = str(file)
        if file not in self.uris:
            self.uris[file] = data_uri(self.thumbnail(file))
        uri = self.uris[file]
        if uri is None:
            return "<span class='none'>cannot be read</span>"
        return f"<img class='t' alt='{_text(file)}' src='{uri}'>"


def data_uri(image: np.ndarray | None) -> str | None:
    """``image`` (H, W[, C]) shrunk to at most THUMB_PX a side, as a base64 JPEG data URI; None when it is none."""
    if image is None:
        return None
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., :3] if a.shape[2] != 1 else a[..., 0]
    if a.ndim not in (2, 3) or a.size == 0:
        return None
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0, 255).astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    picture.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
