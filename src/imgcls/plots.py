"""Figure helpers at the bottom of the package: a matplotlib Figure without pyplot, its PNG, safe labels, an
image grid as one picture.

Every module that draws (evaluation, explain, reports) starts here, so that
none of them reaches up into another for a helper.  matplotlib is imported
when a figure is made, not with this module.
"""

from __future__ import annotations

import io

import numpy as np


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


def draw_image_grid(fig, images, titles: list[str], wrong: list[bool], ncols: int, grid: tuple[int, int], band: int,
                    fontsize: float, wrong_colour: str = "#c0392b", fill: bool = False) -> None:
    """Draw images with a title each in the bottom-left ``grid`` (width, height) px of ``fig`` (no layout
    engine): one picture (:func:`image_grid_canvas`) on axes of exactly its size, so that each of its pixels
    is one of the figure's, and the titles as the figure's texts (red when ``wrong``).  A 32-image grid
    renders in 0.28 s, against 0.62 s as 32 axes."""
    width, height = (round(v * fig.dpi) for v in fig.get_size_inches())
    canvas, boxes = image_grid_canvas(images, wrong, ncols, grid[0], grid[1], band, wrong_colour, fill)
    ax = fig.add_axes((0.0, 0.0, grid[0] / width, grid[1] / height))
    ax.set_axis_off()
    ax.imshow(canvas, interpolation="nearest", aspect="auto")
    for (x, y), title, bad in zip(boxes, titles, wrong):
        fig.text(x / width, (grid[1] - (y - band / 2)) / height, plain(title), ha="center", va="center",
                 fontsize=fontsize, color=wrong_colour if bad else "black")


def image_grid_canvas(images, wrong: list[bool], ncols: int, width: int, height: int, band: int,
                      wrong_colour: str = "#c0392b", fill: bool = False) -> tuple[np.ndarray, list[tuple[float, int]]]:
    """An image grid as one picture: uint8 (height, width, 3), white, with each image (uint8 (H, W, C), C 1 or 3)
    fitted (its aspect kept) below a ``band`` of px left for its title, framed 3 px in ``wrong_colour`` (hex)
    when wrong and 1 px grey else; and the (centre x, top y) in px of each image's cell below its band.  Images of 64 px or less are enlarged by a whole number of
    pixel repetitions (their pixels stay sharp), those that fit are drawn as they are (``fill``: enlarged to
    the cell), larger ones shrunk with Lanczos."""
    from PIL import Image

    canvas = np.full((height, width, 3), 255, np.uint8)
    n = len(images)
    nrows = max(1, -(-n // ncols))
    cw, ch = width / ncols, height / nrows
    side = max(1, int(min(cw, ch - band)) - 8)  # 4 px around each image for its frame
    red = np.array([int(wrong_colour[i:i + 2], 16) for i in (1, 3, 5)], np.uint8)
    boxes = []
    for i, image in enumerate(np.asarray(images)):
        row, col = divmod(i, ncols)
        rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        h, w = rgb.shape[:2]
        if max(h, w) <= 64:  # small: each pixel repeated a whole number of times, sharp
            factor = max(1, side // max(h, w))
            fitted = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
        elif max(h, w) <= side and not fill:  # fits: as it is, pixel for pixel
            fitted = rgb
        else:
            scale = side / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            fitted = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.LANCZOS))
        size = (fitted.shape[1], fitted.shape[0])
        x0 = int(col * cw + (cw - size[0]) / 2)
        y0 = int(row * ch + band + (ch - band - size[1]) / 2)
        thick, colour = (3, red) if wrong[i] else (1, np.array([191, 191, 191], np.uint8))
        canvas[max(0, y0 - thick):y0 + size[1] + thick, max(0, x0 - thick):x0 + size[0] + thick] = colour
        canvas[y0:y0 + size[1], x0:x0 + size[0]] = fitted
        boxes.append((col * cw + cw / 2, int(row * ch + band)))
    return canvas, boxes
