"""The HTML report of a multi-label run: training ends by writing it, and its numbers match independent
computations (scikit-learn's metrics on the model's own test probabilities)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
)

import imgcls
from imgcls import analysis
from imgcls.errors import ConfigError
from imgcls.evaluation.predictions import SplitPredictions
from imgcls.reports.figures import multilabel_top_losses, plot_pr_curves
from imgcls.reports.report import MULTILABEL_SECTION_TITLES, MultilabelReport, Report

LABELS = ["blue", "green", "red"]  # the model's label order (sorted); each a colour channel
ANALYSIS_TITLES = ["Where the model looks (Grad-CAM)", "Per-label thresholds", "What each layer has learned"]


def _write_squares(root, n: int = 96, seed: int = 0) -> None:
    """16x16 images with a 5x5 square of each colour an image carries (each with probability one half)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        image = rng.integers(20, 50, (16, 16, 3), dtype=np.uint8)
        carried = [name for name in LABELS if rng.random() < 0.5]
        for name in carried:
            y, x = rng.integers(0, 11, 2)
            image[y:y + 5, x:x + 5] = 40
            image[y:y + 5, x:x + 5, "rgb".index(name[0])] = 230
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        rows.append(f"images/{i:03d}.png," + " ".join(carried))
    (root / "labels.csv").write_text("filename,labels\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir_env, one_thread):
    """A one-epoch multi-label run whose training writes the report, and its test split scored independently."""
    root = tmp_path_factory.mktemp("ml") / "squares"
    _write_squares(root)
    result = imgcls.train(data=str(root), out=str(root.parent / "runs"), name="squares", epochs=1, batch_size=16,
                          model_option={"widths": [8, 16, 16]}, quiet=True)
    clf = imgcls.load(result.path)
    test = clf.dataset().splits["test"]
    proba = clf.proba_of_arrays(test.images)
    thresholds = np.asarray(clf.meta["thresholds"])
    page = result.path / "report.html"
    return {"run": result.path, "html": page.read_text(), "json": json.loads((result.path / "report.json").read_text()),
            "targets": test.labels, "proba": proba, "predicted": proba >= thresholds, "classes": clf.classes,
            "paths": test.paths}


class _Tables(HTMLParser):
    """The h2 titles of a page, and the rows of text cells of each table under its section's title."""

    def __init__(self):
        super().__init__()
        self.h2, self.tables = [], {}
        self._where, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self.h2.append("")
            self._where = "h2"
        elif tag == "table":
            self.tables.setdefault(self.h2[-1], []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self._where = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self.h2[-1]][-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._where == "h2":
            self.h2[-1] += data
        elif self._cell is not None:
            self._cell += data


def _parse(text: str) -> _Tables:
    parser = _Tables()
    parser.feed(text)
    return parser


def test_training_ends_with_the_multilabel_report_and_every_section(run):
    parsed = _parse(run["html"])
    assert run["classes"] == LABELS
    assert parsed.h2 == [*MULTILABEL_SECTION_TITLES, *ANALYSIS_TITLES]  # no calibration: refused for multi-label
    assert "not written yet" in run["html"]  # the layer probes say why they are left out
    assert "3 labels (several per image)" in run["html"]


def test_map_and_per_label_scores_match_sklearn(run):
    y, proba, pred = run["targets"], run["proba"], run["predicted"]
    assert y.shape == proba.shape == (len(y), 3) and 0 < y.sum() < y.size
    carried = [j for j in range(3) if y[:, j].any()]
    expected_map = np.mean([average_precision_score(y[:, j], proba[:, j]) for j in carried])
    assert run["json"]["map"] == pytest.approx(expected_map, abs=1e-9)
    assert f"mAP <strong>{expected_map:.4f}</strong>" in run["html"]
    assert run["json"]["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert run["json"]["subset_accuracy"] == pytest.approx(np.mean((y == pred).all(1)))
    assert run["json"]["hamming_loss"] == pytest.approx(np.mean(y != pred))
    rows = _parse(run["html"]).tables["Per-label precision, recall, F1 and AP"][0]
    assert rows[0] == ["label", "precision", "recall", "F1", "AP", "support", "predicted", "threshold"]
    assert [r[0] for r in rows[1:]] == [*LABELS, "micro avg", "macro avg"]
    for j, row in enumerate(rows[1:4]):
        assert float(row[1]) == pytest.approx(precision_score(y[:, j], pred[:, j], zero_division=0), abs=5e-5)
        assert float(row[2]) == pytest.approx(recall_score(y[:, j], pred[:, j], zero_division=0), abs=5e-5)
        assert int(row[5]) == y[:, j].sum() and int(row[6]) == pred[:, j].sum()
    assert rows[-1][4] == f"{expected_map:.4f}"  # the macro AP is the mAP


def test_cooccurrence_of_the_data_and_of_the_errors(run):
    y, pred = run["targets"].astype(np.int64), run["predicted"]
    missed, false = (y == 1) & ~pred, pred & (y == 0)
    assert run["json"]["cooccurrence"] == (y.T @ y).tolist()
    assert run["json"]["error_cooccurrence"] == (missed.T.astype(int) @ false.astype(int)).tolist()
    for stem in ("label_cooccurrence", "error_cooccurrence", "pr_curves", "per_label"):
        with Image.open(run["run"] / f"{stem}.png") as im:
            assert im.format == "PNG" and min(im.size) > 100
        assert f"alt='{stem}'" in run["html"]
    assert "missed label (row) while this label was predicted wrongly (column)" in run["html"]


def test_top_losses_are_the_highest_mean_binary_cross_entropies_with_their_label_sets(run):
    y, proba, pred = run["targets"], run["proba"].clip(1e-12, 1 - 1e-12), run["predicted"]
    loss = -(y * np.log(proba) + (1 - y) * np.log(1 - proba)).mean(1)
    rows = run["json"]["top_losses"]
    expected = np.argsort(-loss, kind="stable")[:16]
    assert len(rows) == min(16, len(y))
    assert [r["loss"] for r in rows] == pytest.approx(loss[expected], rel=1e-5)
    for r in rows:
        i = r["index"]
        assert r["true"] == [LABELS[j] for j in np.flatnonzero(y[i])]
        assert r["predicted"] == [LABELS[j] for j in np.flatnonzero(pred[i])]
        assert r["wrong"] == bool((y[i] != pred[i]).any())
        assert r["path"] == run["paths"][i]
    table = _parse(run["html"]).tables["Top losses"][0]
    assert table[0][:4] == ["#", "index", "true", "predicted"]
    first = rows[0]
    assert table[1][2:4] == [", ".join(first["true"]) or "(none)", ", ".join(first["predicted"]) or "(none)"]


def test_the_report_pieces_for_a_notebook_and_probes_refused(run):
    rep = Report.from_run(run["run"])
    assert isinstance(rep, MultilabelReport)
    for fig in (rep.learning_curves(), rep.per_label(), rep.pr_curves(), rep.cooccurrence(),
                rep.cooccurrence(errors=True), rep.samples(), rep.top_losses_grid()):
        assert isinstance(fig, Figure)
    with pytest.raises(ConfigError, match="multi-label"):
        analysis.probe(run["run"])


def test_multilabel_top_losses_rank_every_image_by_mean_binary_cross_entropy():
    logits = np.array([[4.0, -4.0], [0.0, 0.0], [-3.0, 3.0], [6.0, 6.0]], dtype=np.float32)
    labels = np.array([[1, 0], [1, 1], [1, 0], [1, 1]], dtype=np.uint8)
    preds = SplitPredictions("test", logits, labels, np.zeros((4, 4, 4, 1), np.uint8), None, ["a", "b"],
                             multilabel=True)
    rows = multilabel_top_losses(preds, [0.5, 0.5], k=3)
    # Image 2 has both labels wrong (loss 3.05), image 1 both at even odds (0.69), image 0 (0.018) is less sure
    # than image 3 (0.0025).
    assert [r["index"] for r in rows] == [2, 1, 0]
    assert rows[0] == {"index": 2, "true": ["a"], "predicted": ["b"], "wrong": True,
                       "loss": pytest.approx(np.log1p(np.exp(3.0))), "worst": "a",
                       "p_worst": pytest.approx(1 / (1 + np.exp(3.0))), "path": None}
    assert rows[1]["predicted"] == ["a", "b"] and not rows[1]["wrong"]  # 0.5 reaches a threshold of 0.5


def test_pr_curves_take_a_label_matrix():
    proba = np.array([[0.9, 0.8], [0.8, 0.7], [0.1, 0.6]])
    labels = np.array([[1, 0], [1, 1], [0, 1]])  # label b: the negative image scores highest
    fig = plot_pr_curves(proba, labels, ["a", "b"], [0.5, 0.65])
    # b: precision 1/2 at recall 1/2, then 2/3 at recall 1: AP = (1/2 + 2/3) / 2 = 0.583.
    assert [ax.get_title() for ax in fig.axes] == ["a: AP 1.000", "b: AP 0.583"]
