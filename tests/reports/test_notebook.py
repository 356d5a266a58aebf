"""Figures render inline in Jupyter without pyplot: IPython finds a PNG for them."""

import numpy as np
import pytest

from imgcls.reports.figures import plot_confusion


def test_a_figure_gives_ipython_a_png():
    formatters = pytest.importorskip("IPython.core.formatters")
    fig = plot_confusion(np.array([[3, 1], [0, 4]]), ["cat", "dog"], normalize=False)
    data, _ = formatters.DisplayFormatter().format(fig)
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
