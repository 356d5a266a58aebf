"""inspect.html: one self-contained file (every thumbnail a data URI of the right image, each file encoded once),
data text escaped, sections in the contract's order with their counts, at most 300 rows a section, and in a real
browser at 390 px: no horizontal page scroll, every image decoded, and a click on a score header reverses the order.
"""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from imgcls.reports.inspection import MAX_ROWS, PROBLEMS, write_inspect_page

CLASSES = ["daisy", "roses", "tulips"]
SCRIPT_NAME = "roses/a<script>alert(1)</script>.jpg"
CONTROL_NAME = "daisy/bell\x07\x1b[31m.jpg"
UNREADABLE = "tulips/broken.jpg"
N_BLURRY = 400


def finding(problem, file, split="train", label="daisy", score=0.5, suggested=None, paired=None,
            paired_split=None, detail=""):
    return {"problem": problem, "file": file, "split": split, "label": label, "score": score,
            "suggested_label": suggested, "paired_file": paired, "paired_split": paired_split, "detail": detail}


def fake_result() -> dict:
    rng = np.random.default_rng(0)
    blurry_scores = rng.permutation(N_BLURRY) / N_BLURRY  # distinct, so a reversed order is unambiguous
    findings = [  # not in the contract's order: the page puts them in it
        finding("outlier", "tulips/odd.jpg", label="tulips", score=0.71, detail="far from its class"),
        finding("exact_duplicate", "daisy/2.jpg", score=1.0, paired="daisy/1.jpg", paired_split="train",
                detail="identical pixels"),
        finding("exact_duplicate", "daisy/3.jpg", score=0.9, paired="daisy/1.jpg", paired_split="train",
                detail="identical pixels"),
        finding("leakage", "test/roses/9.jpg", split="test", label="roses", score=0.97, paired="roses/4.jpg",
                paired_split="train", detail="cosine 0.97, labels differ <b>"),
        finding("label_error", SCRIPT_NAME, label="roses", score=0.931, suggested="tulips", detail="p=0.93"),
        finding("dark", CONTROL_NAME, score=0.4, detail="mean brightness 12"),
        finding("dark", UNREADABLE, label="tulips", score=0.8, detail="mean brightness 3"),
        *(finding("blurry", f"daisy/blur_{i:03d}.jpg", score=float(s), detail="laplacian variance 4")
          for i, s in enumerate(blurry_scores)),
    ]
    return {"data": "flowers<i>.zip", "path": "runs/flowers-inspect", "classes": CLASSES,
            "counts": {"train": {"daisy": 600, "roses": 500, "tulips": 400},
                       "val": {"daisy": 60, "roses": 50, "tulips": 40}, "test": {"daisy": 61, "roses": 51, "tulips": 41}},
            "summary": ["exact duplicates: 2 pairs", "label errors: 1 image <suspicious>"],
            "skipped": ["outliers: not checked: class 'x<y' has 1 image"], "seconds": 4.2, "findings": findings}


EXPECTED_ORDER = ["exact_duplicate", "leakage", "label_error", "outlier", "dark", "blurry"]
EXPECTED_COUNTS = {"exact_duplicate": 2, "leakage": 1, "label_error": 1, "outlier": 1, "dark": 2, "blurry": N_BLURRY}


class Thumbnails:
    """Each file a flat image of its own colour (None for UNREADABLE); counts the reads."""

    def __init__(self):
        self.colours, self.calls = {}, {}
        self.rng = np.random.default_rng(1)

    def __call__(self, file: str):
        self.calls[file] = self.calls.get(file, 0) + 1
        if file == UNREADABLE:
            return None
        colour = self.colours.setdefault(file, self.rng.integers(0, 256, 3))
        shape = (150, 200) if len(self.colours) % 2 else (220, 90)  # landscape and portrait
        return np.broadcast_to(colour.astype(np.uint8), (*shape, 3)).copy()


class Page(HTMLParser):
    """Sections (problem, count, h2, rows of [score, [img alt/src]]), every img, and every link or source."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections, self.images, self.refs, self._h2 = [], [], [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("src", "href", "action", "srcset", "poster", "data") and v]
        if tag == "section":
            self.sections.append({"problem": a["data-problem"], "count": int(a["data-count"]), "h2": "", "rows": []})
        elif tag == "tr" and "data-score" in a:
            self.sections[-1]["rows"].append({"score": float(a["data-score"]), "images": []})
        elif tag == "img":
            self.images.append(a)
            if self.sections and self.sections[-1]["rows"]:
                self.sections[-1]["rows"][-1]["images"].append(a)
        self._h2 = tag == "h2"

    def handle_data(self, data):
        if self._h2 and self.sections:
            self.sections[-1]["h2"] += data

    def handle_endtag(self, tag):
        self._h2 = False if tag == "h2" else self._h2


def decode(src: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert src.startswith(prefix), src[:40]
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))).convert("RGB")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    thumbs = Thumbnails()
    result = fake_result()
    path = write_inspect_page(result, thumbs, folder)
    text = path.read_text(encoding="utf-8")
    return {"folder": folder, "path": path, "text": text, "page": Page(text), "thumbs": thumbs, "result": result}


def test_one_self_contained_file(written):
    assert written["path"] == written["folder"] / "inspect.html"
    assert sorted(p.name for p in written["folder"].iterdir()) == ["inspect.html"]
    text, page = written["text"], written["page"]
    assert 'name="viewport"' in text or "name='viewport'" in text
    assert not re.search(r"https?:|<link|@import|url\(|<iframe|<object", text, re.IGNORECASE)
    assert all(ref.startswith(("data:image/jpeg;base64,", "#")) for ref in page.refs), page.refs
    assert page.images and all(img["src"].startswith("data:image/jpeg;base64,") for img in page.images)


def test_each_shown_file_is_its_own_thumbnail_encoded_once(written):
    page, thumbs = written["page"], written["thumbs"]
    shown = {f["file"] for f in written["result"]["findings"] if f["problem"] != "blurry"}
    shown |= {f["paired_file"] for f in written["result"]["findings"] if f["paired_file"]}
    blurry = sorted((f for f in written["result"]["findings"] if f["problem"] == "blurry"), key=lambda f: -f["score"])
    shown |= {f["file"] for f in blurry[:MAX_ROWS]}
    assert set(thumbs.calls) == shown  # the 100 blurry findings past the cap are not read
    assert all(n == 1 for n in thumbs.calls.values())
    by_alt = {}
    for img in page.images:
        by_alt.setdefault(img["alt"], set()).add(img["src"])
    visible = {f.replace("\x07", "\\x07").replace("\x1b", "\\x1b"): f for f in shown - {UNREADABLE}}
    assert set(by_alt) == set(visible)  # control characters shown as \xNN
    for alt, srcs in by_alt.items():
        file = visible[alt]
        assert len(srcs) == 1  # the same data URI wherever the file appears
        picture = decode(next(iter(srcs)))
        assert 96 <= max(picture.size) <= 128, picture.size
        mean = np.asarray(picture, dtype=float).reshape(-1, 3).mean(0)
        assert np.abs(mean - thumbs.colours[file]).max() < 6, (file, mean, thumbs.colours[file])
    assert written["text"].count(next(iter(by_alt["daisy/1.jpg"]))) == 2  # paired in both duplicate findings


def test_pairs_side_by_side_and_the_unreadable_file_a_placeholder(written):
    sections = {s["problem"]: s for s in written["page"].sections}
    for problem, (file, other) in {"exact_duplicate": ("daisy/2.jpg", "daisy/1.jpg"),
                                   "leakage": ("test/roses/9.jpg", "roses/4.jpg")}.items():
        assert [i["alt"] for i in sections[problem]["rows"][0]["images"]] == [file, other]
    assert [len(r["images"]) for r in sections["dark"]["rows"]] == [0, 1]  # UNREADABLE scores 0.8, first
    assert "cannot be read" in written["text"]
    assert "test/roses/9.jpg <span class='split'>(test, roses)</span><br>roses/4.jpg" in written["text"]


def test_data_text_is_escaped_and_control_characters_made_visible(written):
    text = written["text"]
    assert "<script>alert" not in text and text.count("<script") == 1  # the page's own sorting script
    assert "a&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in text
    assert "flowers&lt;i&gt;.zip" in text and "<i>" not in text and "<b>" not in text
    assert "&lt;suspicious&gt;" in text and "class &#x27;x&lt;y&#x27;" in text
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text)
    assert "bell\\x07\\x1b[31m.jpg" in text
    assert any(img["alt"] == SCRIPT_NAME for img in written["page"].images)  # escaped, not mangled


def test_sections_in_the_contracts_order_with_counts_and_the_row_cap(written):
    sections = written["page"].sections
    assert [s["problem"] for s in sections] == EXPECTED_ORDER
    assert EXPECTED_ORDER == [p for p in PROBLEMS if p in EXPECTED_ORDER]
    for s in sections:
        assert s["count"] == EXPECTED_COUNTS[s["problem"]]
        assert s["h2"].endswith(f"({EXPECTED_COUNTS[s['problem']]})"), s["h2"]
        assert len(s["rows"]) == min(MAX_ROWS, s["count"])
        scores = [r["score"] for r in s["rows"]]
        assert scores == sorted(scores, reverse=True)
    blurry = next(s for s in sections if s["problem"] == "blurry")
    assert min(r["score"] for r in blurry["rows"]) == (N_BLURRY - MAX_ROWS) / N_BLURRY  # the highest 300
    assert f"Showing the {MAX_ROWS} highest-scored of {N_BLURRY}; the other {N_BLURRY - MAX_ROWS} are in issues.csv" \
        in written["text"]
    assert written["text"].count("are in issues.csv") == 1
    assert ">0.931<" in written["text"] and ">1.000<" in written["text"]  # scores with 3 decimals


def test_header_summary_skipped_and_counts(written):
    text = written["text"]
    assert "exact duplicates: 2 pairs" in text and "Checks not run" in text
    for cls, row in {"daisy": (600, 60, 61, 721), "roses": (500, 50, 51, 601), "tulips": (400, 40, 41, 481)}.items():
        assert f"<td>{cls}</td>" + "".join(f"<td class='num'>{v}</td>" for v in row) in text
    assert "".join(f"<th class='num'>{v:,}</th>" for v in (1500, 150, 153, 1803)) in text


def test_no_findings_and_a_failed_write_leaves_the_old_page(tmp_path):
    empty = {**fake_result(), "findings": [], "summary": []}
    path = write_inspect_page(empty, Thumbnails(), tmp_path)
    old = path.read_text(encoding="utf-8")
    assert "<section" not in old and "no problems found" in old

    def failing(file):
        raise OSError("disk gone")

    with pytest.raises(OSError):
        write_inspect_page(fake_result(), failing, tmp_path)
    assert path.read_text(encoding="utf-8") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect.html"]


def test_renders_at_390_px_and_sorts_by_score(written, browser, tmp_path):
    scores_js = "p => Array.from(document.querySelectorAll(`section[data-problem=${p}] tbody tr`))" \
                ".map(r => parseFloat(r.cells[2].textContent))"
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(written["path"].resolve().as_uri(), wait_until="load")
        width = page.evaluate("document.documentElement.scrollWidth")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        page.screenshot(path=str(tmp_path / "inspect-390.png"), full_page=False)
        orders = {}
        for problem in ("blurry", "exact_duplicate"):
            before = page.evaluate(scores_js, problem)
            page.click(f"section[data-problem={problem}] th.score button")
            after = page.evaluate(scores_js, problem)
            page.click(f"section[data-problem={problem}] th.score button")
            orders[problem] = (before, after, page.evaluate(scores_js, problem))
    finally:
        page.close()
    assert width <= 390, width
    assert len(images) == len(written["page"].images)
    assert all(complete and natural > 0 for _, complete, natural in images), images
    for problem, (before, after, again) in orders.items():
        assert len(before) == min(MAX_ROWS, EXPECTED_COUNTS[problem]) and before == sorted(before, reverse=True)
        assert after == before[::-1], problem
        assert again == before, problem
