"""The analyses' figures (reliability diagrams, precision-recall curves, layer probes) are real PNGs
with the panels and titles that carry their numbers."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from imgcls.evaluation.calibration import softmax
from imgcls.evaluation.thresholds import tune_thresholds
from imgcls.plots import figure_png
from imgcls.reports.figures import plot_pr_curves, plot_probes, plot_reliability


def test_plot_reliability_png():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, size=(3000, 5))
    labels = softmax(logits).argmax(axis=1)
    fig = plot_reliability(4 * logits, labels, temperature=4.0)
    assert len(fig.axes) == 2
    assert "ECE" in fig.axes[0].get_title() and "ECE" in fig.axes[1].get_title()
    assert figure_png(fig).startswith(b"\x89PNG")


@pytest.mark.parametrize("k", [3, 5])
def test_plot_pr_curves_png(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, size=300)
    proba = softmax(2.0 * np.eye(k)[labels] + rng.normal(size=(300, k)))
    classes = [f"c{i}" for i in range(k)]
    out = tune_thresholds(proba, labels, classes, "f1")
    fig = plot_pr_curves(proba, labels, classes, out["thresholds"])
    assert len(fig.axes) == k
    assert all("AP" in ax.get_title() for ax in fig.axes)
    assert figure_png(fig).startswith(b"\x89PNG")


def test_plot_probes_png():
    rows = [{"stage": f"features.block{i}", "channels": 16 * (i + 1), "accuracy": 0.4 + 0.2 * i,
             "cumulative_accuracy": 0.45 + 0.2 * i, "chance": 1 / 3} for i in range(3)]
    fig = plot_probes(rows)
    assert isinstance(fig, Figure)
    assert "chance (0.33)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert figure_png(fig).startswith(b"\x89PNG")
    assert isinstance(plot_probes(rows, chance=0.5), Figure)
