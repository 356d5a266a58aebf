"""The HTML report: its numbers match independent computations, its figures are real PNGs,
user text is escaped, and it renders in a browser with every image loaded."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import confusion_matrix

import imgcls
from imgcls.evaluation.predictions import SplitPredictions
from imgcls.reports.figures import (
    most_confused,
    plot_confusion,
    plot_image_grid,
    top_losses,
)
from imgcls.reports.html import Section
from imgcls.reports.report import SECTION_TITLES, Report, build_report

SMALL = {"model_option": {"widths": [8, 16, 16]}, "quiet": True, "report": False}
FIGURE_STEMS = ["learning_curves", "confusion_counts", "confusion_normalized", "per_class", "test_samples", "top_losses"]
ODD_CLASS = "<b>&"


@pytest.fixture(scope="module")
def digits(tmp_path_factory, data_dir_env):
    """A tiny digits run with its report, and the model's test predictions computed independently."""
    run = imgcls.train(out=str(tmp_path_factory.mktemp("runs")), name="digits", epochs=3, **SMALL)
    page = build_report(run.path)
    clf = imgcls.load(run.path)
    test = clf.dataset().splits["test"]
    proba = clf.proba_of_arrays(test.images)
    return {"run": run.path, "page": page, "html": page.read_text(), "labels": test.labels,
            "proba": proba, "classes": clf.classes}


class _Collector(HTMLParser):
    """Start tags, images, and the confusion-count table of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.h2 = [], [], []
        self.confusion_rows, self._in_confusion, self._row, self._cell, self._in_h2 = [], False, None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(attrs)
        elif tag == "h2":
            self._in_h2, self.h2 = True, self.h2 + [""]
        elif tag == "details" and "confusion-counts" in (attrs.get("class") or ""):
            self._in_confusion = True
        elif self._in_confusion and tag == "tr":
            self._row = []
        elif self._in_confusion and tag == "td":
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        elif tag == "details":
            self._in_confusion = False
        elif tag == "td" and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row:
            self.confusion_rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_h2:
            self.h2[-1] += data


def _parse(text: str) -> _Collector:
    parser = _Collector()
    parser.feed(text)
    return parser


def test_confusion_matrix_matches_sklearn_on_independent_predictions(digits):
    expected = confusion_matrix(digits["labels"], digits["proba"].argmax(1), labels=range(len(digits["classes"])))
    assert np.trace(expected) < expected.sum(), "the tiny model should make some mistakes for this test to bite"
    stored = json.loads((digits["run"] / "report.json").read_text())
    assert np.array_equal(np.array(stored["confusion_matrix"]), expected)
    # The counts table in the page itself.
    rows = _parse(digits["html"]).confusion_rows
    assert [r[0] for r in rows] == digits["classes"]
    assert np.array_equal(np.array([[int(v.replace(",", "")) for v in r[1:]] for r in rows]), expected)
    assert stored["accuracy"] == pytest.approx(np.trace(expected) / expected.sum())


def test_top_losses_are_the_highest_loss_wrong_predictions(digits):
    labels, proba = digits["labels"], digits["proba"]
    loss = -np.log(proba[np.arange(len(labels)), labels])
    wrong = np.flatnonzero(proba.argmax(1) != labels)
    expected = sorted(wrong, key=lambda i: -loss[i])[:16]
    for got in (json.loads((digits["run"] / "report.json").read_text())["top_losses"],):
        assert len(got) == len(expected) > 0
        # Same losses in the same (descending) order; ties may swap indices, so compare values.
        assert [r["loss"] for r in got] == pytest.approx([loss[i] for i in expected], rel=1e-6)
        for r in got:
            i = r["index"]
            assert i in wrong
            assert r["loss"] == pytest.approx(loss[i], rel=1e-6)
            assert r["true"] == digits["classes"][labels[i]]
            assert r["predicted"] == digits["classes"][proba[i].argmax()] != r["true"]
            assert r["p_true"] == pytest.approx(proba[i, labels[i]], rel=1e-6)
            assert r["p_pred"] == pytest.approx(proba[i].max(), rel=1e-6)


def _preds(proba: np.ndarray, labels: list[int]) -> SplitPredictions:
    k = proba.shape[1]
    return SplitPredictions("test", np.log(proba).astype(np.float32), np.array(labels), np.zeros((len(labels), 4, 4, 1), np.uint8),
                            [f"img{i}.png" for i in range(len(labels))], [f"c{j}" for j in range(k)])


def test_top_losses_leave_out_right_predictions_even_with_a_higher_loss():
    proba = np.full((4, 10), 1e-6)
    proba[0] = 0.85 / 9
    proba[0, 0] = 0.15  # right (0.15 beats 0.094 each) yet a loss of 1.90
    proba[1, [3, 4]] = [0.45, 0.55]  # wrong, loss 0.80
    proba[2, [5, 6]] = [0.30, 0.70]  # wrong, loss 1.20
    proba[3, 7] = 1.0  # right and sure
    proba /= proba.sum(1, keepdims=True)
    preds = _preds(proba, [0, 3, 5, 7])
    assert proba[0].argmax() == 0 and -np.log(proba[0, 0]) > -np.log(proba[2, 5])
    rows = top_losses(preds, k=16)
    assert [r["index"] for r in rows] == [2, 1]
    assert rows[0]["true"] == "c5" and rows[0]["predicted"] == "c6" and rows[0]["path"] == "img2.png"
    assert rows[0]["p_true"] == pytest.approx(proba[2, 5], rel=1e-5)
    assert rows[0]["p_pred"] == pytest.approx(proba[2, 6], rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(-np.log(proba[2, 5]), rel=1e-5)
    assert [r["index"] for r in top_losses(preds, k=1)] == [2]


def test_most_confused_lists_off_diagonal_cells_by_count():
    cm = np.array([[5, 2, 0], [7, 1, 3], [0, 3, 9]])
    assert most_confused(cm, ["a", "b", "c"], k=3) == [("b", "a", 7), ("b", "c", 3), ("c", "b", 3)]
    assert most_confused(np.eye(3, dtype=int), ["a", "b", "c"]) == []


def test_every_section_and_every_figure_is_there(digits):
    page = digits["page"]
    parsed = _parse(digits["html"])
    assert parsed.h2 == list(SECTION_TITLES)
    assert [img["alt"] for img in parsed.imgs] == FIGURE_STEMS
    for img in parsed.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        png = base64.b64decode(img["src"][len(prefix):], validate=True)
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        beside = page.parent / f"{img['alt']}.png"
        assert beside.read_bytes() == png
    text = digits["html"]
    assert "fastnet_small" in text and "Total params:" in text  # the model summary
    assert "optimizer: adam" in text  # config.yaml
    assert "torch" in text and "python" in text  # environment.json


def test_report_pieces_are_figures_for_a_notebook(digits, data_dir_env):
    rep = Report.from_run(digits["run"])
    for fig in (rep.learning_curves(), rep.confusion(), rep.confusion(normalize=True), rep.per_class(),
                rep.samples(), rep.top_losses_grid()):
        assert isinstance(fig, Figure)
    assert len(rep.sample_indices()) == 32
    assert np.array_equal(rep.sample_indices(), Report.from_run(digits["run"]).sample_indices())
    assert rep.confusion_matrix.sum() == len(digits["labels"])


def test_confusion_figure_drops_cell_text_for_many_classes():
    few = plot_confusion(np.eye(10, dtype=int) * 3, [str(i) for i in range(10)], normalize=False)
    assert len(few.axes[0].texts) == 100
    many = plot_confusion(np.eye(60, dtype=int), [f"class{i}" for i in range(60)], normalize=True)
    assert len(many.axes[0].texts) == 0


def test_image_grid_marks_wrong_ones_in_red():
    images = np.zeros((3, 8, 8, 1), np.uint8)
    images[2] = 200  # a light grey one
    fig = plot_image_grid(images, ["a", "b", "$c$"], [False, True, False], ncols=8)
    titles = fig.texts
    assert [t.get_text() for t in titles] == ["a", "b", r"\$c\$"]  # a dollar in a name is not read as mathtext
    assert titles[1].get_color() != titles[0].get_color()
    (canvas,) = [im.get_array() for ax in fig.axes for im in ax.images]
    assert canvas.shape[:2] == tuple(round(v * fig.dpi) for v in fig.get_size_inches()[::-1])
    # Each 8 px image, enlarged by a whole number of repetitions, framed: red around the wrong one.
    red = np.all(canvas == [0xC0, 0x39, 0x2B], axis=-1)
    third = canvas.shape[1] // 3
    assert red[:, third:2 * third].sum() > 100 and not red[:, :third].any() and not red[:, 2 * third:].any()
    light = np.all(canvas == 200, axis=-1)  # grey pixels stay grey: the same value in every channel
    assert light[:, 2 * third:].sum() == (canvas.shape[1] // 3 - 8) // 8 * 8 * ((canvas.shape[1] // 3 - 8) // 8 * 8)


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory, data_dir_env):
    """A folder dataset with a class named like HTML, trained for 2 epochs, reported with an extra section."""
    root = tmp_path_factory.mktemp("odd") / "photos"
    rng = np.random.default_rng(0)
    for name, level in ((ODD_CLASS, 200), ("plain", 50)):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    run = imgcls.train(data=str(root), out=str(root.parent / "runs"), name="odd", epochs=2, batch_size=8, **SMALL)
    out = root.parent / "elsewhere"
    page = build_report(run.path, sections_extra=[Section("Extra <section>", ["added by the caller"])], out_dir=out)
    return {"run": run.path, "page": page, "html": page.read_text()}


def test_class_names_and_paths_are_escaped(odd_names):
    text = odd_names["html"]
    assert ODD_CLASS not in text
    assert html.escape(ODD_CLASS) in text
    parsed = _parse(text)
    assert "b" not in parsed.tags  # no tag was injected by the class name
    assert [r[0] for r in parsed.confusion_rows] == [ODD_CLASS, "plain"]  # decoded back to the name


def test_extra_sections_follow_and_out_dir_is_honoured(odd_names):
    parsed = _parse(odd_names["html"])
    assert parsed.h2 == [*SECTION_TITLES, "Extra <section>"]
    assert odd_names["page"].parent.name == "elsewhere"
    assert (odd_names["page"].parent / "report.json").is_file()
    assert not (odd_names["run"] / "report.html").exists()


def test_report_renders_in_chromium_with_every_image_loaded(digits, tmp_path, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(digits["page"].resolve().as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    finally:
        page.close()
    assert [alt for alt, _, _ in images] == FIGURE_STEMS
    assert all(complete and width > 0 for _, complete, width in images), images
    assert headings == list(SECTION_TITLES)
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.size[0] == 1200 and shot.size[1] > 3000
    assert re.search(r"\d+\.\d+% of \d+ images", digits["html"])
