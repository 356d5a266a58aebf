"""The page of a cross-validation: each fold's figures, their mean and spread, and a chart."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from imgcls.evaluation.cv import LABELS, metric_names
from imgcls.plots import new_figure
from imgcls.reports.html import Section, render_page, table


def write_cv_page(result: dict, cv_dir: Path) -> Path:
    """Write report.html (table and chart) of ``result`` (cv.json's content) into ``cv_dir``; returns the page."""
    names = metric_names(result)
    header = ["fold", *(LABELS[m] for m in names), "train", "val", "held out", "epochs", "seconds"]
    rows = [[f"fold {f['fold']}", *(f[m] for m in names), f["train_images"], f["val_images"],
             f["held_out_images"], f["epochs"], f["train_seconds"]] for f in result["per_fold"]]
    rows.append(["mean ± std", *(f"{result['mean'][m]:.4f} ± {result['std'][m]:.4f}" for m in names),
                 "", "", "", "", ""])
    links = ", ".join(f"<a href='{f['run']}/'>{f['run']}</a>" for f in result["per_fold"])
    method = (
        f"{result['folds']} stratified folds of the {result['pooled_images']} pooled "
        f"{' + '.join(result['pooled_from'])} images of {html.escape(result['dataset'])}, seed {result['seed']}; "
        f"model {html.escape(result['model'])}. Each fold's model trains on the other folds "
        f"(val fraction {result['val_fraction']:g} of them held out for validation) and is scored on its own fold. "
        f"The dataset's test split ({result['test_split_images']} images) is not used. Std is the population "
        f"standard deviation over the folds.")
    about = Section("Folds", paragraphs=[method, f"Run folders: {links}."],
                    tables=[table(header, rows, caption="held-out fold metrics")])
    first, second = _charted(result)
    chart = Section(f"{LABELS[first][0].upper() + LABELS[first][1:]} and {LABELS[second]} per fold",
                    figures=[("cv_folds", plot_cv(result))])
    return render_page(f"Cross-validation: {result['model']} on {result['dataset']}", [about, chart], cv_dir)



def plot_cv(result: dict):
    """Each fold's accuracy and macro F1 (multi-label: mAP and macro F1) as points, with their mean (dashed) and
    ± std (band)."""
    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    folds = np.array([f["fold"] for f in result["per_fold"]])
    first, second = _charted(result)
    for offset, metric, color, marker in ((-0.06, first, "tab:blue", "o"), (0.06, second, "tab:orange", "s")):
        values = np.array([f[metric] for f in result["per_fold"]])
        mean, std = result["mean"][metric], result["std"][metric]
        ax.plot(folds + offset, values, marker, color=color, markersize=7,
                label=f"{LABELS[metric]}: {mean:.4f} ± {std:.4f}")
        ax.axhline(mean, color=color, linestyle="--", linewidth=1)
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xticks(folds, [f"fold {f}" for f in folds])
    ax.set_xlim(folds[0] - 0.5, folds[-1] + 0.5)
    ax.set_ylabel("on the held-out fold")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2)
    ax.set_title(f"{result['folds']}-fold cross-validation (dashed: mean, band: mean ± std)")
    return fig


def _charted(result: dict) -> tuple[str, str]:
    """The two figures the chart shows: accuracy and macro F1, or for several labels per image mAP and macro F1."""
    return (metric_names(result)[0], "macro_f1")
