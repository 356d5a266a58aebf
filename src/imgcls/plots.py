"""Figure helpers at the bottom of the package: a matplotlib Figure without pyplot, its PNG, safe labels.

Every module that draws (evaluation, explain, reports) starts here, so that
none of them reaches up into another for a helper.  matplotlib is imported
when a figure is made, not with this module.
"""

from __future__ import annotations

import io


def new_figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib Figure on the Agg canvas (no display needed, no global pyplot state).

    The figure shows itself inline in Jupyter even when pyplot was never imported
    (IPython calls its ``_repr_png_``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        def _repr_png_(self) -> bytes:
            return figure_png(self)

    fig = NotebookFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """PNG bytes of a matplotlib Figure."""
    buf = io.BytesIO()
    # zlib level 1: a fifth of the encoding time of the default 6 (0.5 s of a report's 11 figures) for larger files.
    fig.savefig(buf, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def plain(text) -> str:
    """``text`` for a matplotlib label: a ``$`` in a class name is shown, not read as mathtext."""
    return str(text).replace("$", r"\$")
