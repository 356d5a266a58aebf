"""The figures of tune.html, drawn from the study's summary rows (study.json's ``trials``) and its space.

    history_figure     the metric of every trial by number, and the best so far
    importance_figure  Optuna's parameter importances
    parallel_figure    parallel coordinates: one axis per parameter and one for the metric, a line per trial
    slice_figure       the metric against one parameter (one figure per parameter)

Which trials each shows: complete ones with their value; pruned ones (history, slices) as grey crosses at the
value they had when stopped, an earlier epoch's and so not comparable with the complete ones (the parallel
coordinates leave them out); failed and interrupted ones have no value and are left out of all of them.
A categorical parameter is drawn as its categories, in the space's order, evenly spaced; a log-scaled range on
a log axis.
"""

from __future__ import annotations

import math

from imgcls.plots import new_figure, plain

_SHOWN = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:grey")}
_LABEL_CHARS = 24  # a category's label is cut to this many characters on the parallel axes
_TICK = {"fontsize": 7, "va": "center", "ha": "left", "color": "0.2", "zorder": 4,
         "bbox": {"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 0.5}}  # readable over the lines


def history_figure(summary: dict):
    """The metric of every trial by number (complete, pruned), and the best so far."""
    fig = new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    rows = sorted(summary["trials"], key=lambda r: r["trial"])
    for state, (marker, colour) in _SHOWN.items():
        points = [(r["trial"], r["value"]) for r in rows if r["state"] == state and r["value"] is not None]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=colour, label=state)
    best, line = None, []
    better = max if summary["direction"] == "maximize" else min
    for r in rows:
        if r["state"] == "complete" and r["value"] is not None:
            best = r["value"] if best is None else better(best, r["value"])
        if best is not None:
            line.append((r["trial"], best))
    if line:
        ax.step(*zip(*line), where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(summary["metric"])
    ax.set_title("optimisation history (pruned: the value when stopped)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return fig


def importance_figure(importances: dict):
    fig = new_figure(6.0, 0.5 + 0.4 * len(importances))
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh([plain(n) for n in names], [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (Optuna's default evaluator)")
    ax.set_title("parameter importances")
    return fig


def valued(rows: list[dict], states=("complete", "pruned")) -> list[dict]:
    """The rows in ``states`` that have a metric value, by trial number."""
    return sorted((r for r in rows if r["state"] in states and r["value"] is not None), key=lambda r: r["trial"])


def _label(value) -> str:
    text = plain(value)
    return text if len(text) <= _LABEL_CHARS else text[:_LABEL_CHARS - 1] + "…"


def _scale(param, value) -> float | None:
    """``value`` of ``param`` on its parallel axis, 0 (low, first choice) to 1 (high, last choice)."""
    if param.kind == "categorical":
        index = param.index(value)
        count = len(param.choices)
        return None if index is None else (0.5 if count == 1 else index / (count - 1))
    if not isinstance(value, (int, float)):
        return None
    low, high, v = float(param.low), float(param.high), float(value)
    if param.log:
        low, high, v = math.log10(low), math.log10(high), math.log10(max(v, 1e-300))
    return min(max((v - low) / (high - low), 0.0), 1.0)


def _axis_ticks(param) -> list[tuple[float, str]]:
    """(position, label) of the ticks of ``param``'s parallel axis."""
    if param.kind == "categorical":
        return [(_scale(param, c), _label(c)) for c in param.choices]
    low, high = float(param.low), float(param.high)
    middle = math.sqrt(low * high) if param.log else (low + high) / 2
    return [(_scale(param, v), f"{v:.3g}") for v in (low, middle, high)]


def parallel_figure(summary: dict, space: dict):
    """Parallel coordinates of the complete trials: one axis per parameter, the metric's last, a line per trial
    coloured by its metric (brighter is better); the best trial's line drawn thick."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    names = list(space)
    rows = [r for r in valued(summary["trials"], ("complete",)) if all(n in r["params"] for n in names)]
    values = [r["value"] for r in rows]
    low, high = min(values), max(values)
    if high - low < 1e-12:  # one trial, or all alike: a visible span around the value
        low, high = low - 0.5 * (abs(low) or 1) * 0.01, high + 0.5 * (abs(high) or 1) * 0.01
    maximize = summary["direction"] == "maximize"
    cmap = colormaps["viridis" if maximize else "viridis_r"]
    norm = Normalize(low, high)
    fig = new_figure(max(6.0, 1.4 * (len(names) + 1)), 4.4)
    ax = fig.add_subplot()
    xs = list(range(len(names) + 1))
    for x in xs:
        ax.axvline(x, color="0.6", linewidth=0.8, zorder=1)
    # Worse trials first, so the better ones lie on top.
    best = summary.get("best_trial")
    for r in sorted(rows, key=lambda r: r["value"] if maximize else -r["value"]):
        ys = [_scale(space[n], r["params"][n]) for n in names] + [(r["value"] - low) / (high - low)]
        if None in ys:
            continue
        thick = r["trial"] == best
        ax.plot(xs, ys, color=cmap(norm(r["value"])), linewidth=2.6 if thick else 1.2, alpha=1.0 if thick else 0.8,
                zorder=3 if thick else 2)
    for x, name in enumerate(names):
        for y, text in _axis_ticks(space[name]):
            ax.text(x + 0.04, y, text, **_TICK)
    for frac in (0.0, 0.5, 1.0):
        ax.text(xs[-1] + 0.04, frac, f"{low + frac * (high - low):.4g}", **_TICK)
    ax.set_xticks(xs, [plain(n) for n in names] + [summary["metric"]], rotation=15, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.15, xs[-1] + 0.7)
    ax.set_ylim(-0.06, 1.06)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"parallel coordinates: {len(rows)} complete trials (thick: the best)")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=summary["metric"], pad=0.01)
    return fig


def slice_figure(summary: dict, name: str, param):
    """The metric against parameter ``name``: complete trials as dots, pruned ones as grey crosses at the value
    when stopped, the best trial as a star; a log-scaled range on a log axis, choices as categories."""
    fig = new_figure(6.0, 3.0)
    ax = fig.add_subplot()
    categorical = param.kind == "categorical"
    rows = [r for r in valued(summary["trials"]) if name in r["params"]]

    def position(r) -> float | None:
        value = r["params"][name]
        if not categorical:
            return float(value) if isinstance(value, (int, float)) else None
        index = param.index(value)
        # A small, fixed spread within the category, so that trials of the same choice stay apart.
        return None if index is None else index + ((r["trial"] * 0.618) % 1.0 - 0.5) * 0.3

    for state, (marker, colour) in _SHOWN.items():
        points = [(position(r), r["value"]) for r in rows if r["state"] == state and position(r) is not None]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=colour, label=state, zorder=2)
    best = next((r for r in rows if r["trial"] == summary.get("best_trial")), None)
    if best is not None and position(best) is not None:
        ax.scatter([position(best)], [best["value"]], marker="*", s=160, color="tab:orange", label="best",
                   zorder=3)
    if categorical:
        ax.set_xticks(range(len(param.choices)), [_label(c) for c in param.choices], fontsize=8)
        ax.set_xlim(-0.5, len(param.choices) - 0.5)
    else:
        ax.set_xlim(*_padded(float(param.low), float(param.high), param.log))
        if param.log:
            ax.set_xscale("log")
    ax.set_xlabel(plain(name) + (" (log scale)" if param.log else " (choices)" if categorical else ""))
    ax.set_ylabel(summary["metric"])
    ax.set_title(f"{plain(name)}: {summary['metric']} of each trial")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    return fig


def _padded(low: float, high: float, log: bool) -> tuple[float, float]:
    """The axis limits of a range: its bounds and a little more, so that points at a bound are whole."""
    if log:
        return low / (high / low) ** 0.03, high * (high / low) ** 0.03
    pad = (high - low) * 0.03
    return low - pad, high + pad
