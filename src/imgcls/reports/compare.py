"""Several runs side by side: a leaderboard and overlaid validation curves.

    result = compare_runs(["runs/a", "runs/b", "runs/c"])
    print(format_leaderboard(result))
    write_compare(result, Path("compare"))    # compare.html, compare_curves.png, compare.json

Everything is read from the run folders' files (run.json, metrics.jsonl,
eval_test.json, environment.json, config.yaml); no model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from imgcls import rundir
from imgcls.errors import CheckpointError
from imgcls.io import write_json
from imgcls.plots import new_figure
from imgcls.reports.html import Section, render_page, table

# Per-epoch keys kept for the curves.
_CURVE_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def read_run_summary(run_dir: str | Path) -> dict:
    """One run's leaderboard entry; raises CheckpointError when ``run_dir`` is not a run folder.

    Test figures come from eval_test.json (falling back to run.json); a run
    that has not finished has None for them.  ``train_seconds`` is the sum of
    the epochs' training time in metrics.jsonl; ``images_per_sec`` their median.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a run folder: no such folder")
    missing = [name for name in (rundir.CONFIG, rundir.METRICS) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a run folder (no {' or '.join(missing)}); "
                              f"give folders written by `imgcls train`")
    cfg = _read(path, rundir.CONFIG, yaml.safe_load) or {}
    history = rundir.read_history(path)
    info = rundir.read_doc(path / rundir.RUN, f"restore it, or leave {path} out of the comparison")
    test = rundir.read_doc(path / f"{rundir.eval_stem('test')}.json",
                           f"`imgcls evaluate {path} --split test` writes it again")
    env = rundir.read_doc(path / rundir.ENVIRONMENT, "delete it: compare then shows no device for the run")
    model = cfg.get("model") or {}
    speeds = [r["images_per_sec"] for r in history if "images_per_sec" in r]
    return {
        "name": path.name,
        "path": str(path),
        "model": model.get("name"),
        "model_options": model.get("options") or {},
        "dataset": (cfg.get("data") or {}).get("dataset"),
        "finished": bool(info),
        "test_accuracy": test.get("accuracy", info.get("test_accuracy")),
        "test_macro_f1": (test.get("macro_avg") or {}).get("f1", info.get("test_macro_f1")),
        "test_loss": test.get("loss"),
        "test_map": test.get("map", info.get("test_map")),  # several labels per image
        "parameters": info.get("parameters"),
        "epochs": len(history),
        "best_epoch": info.get("best_epoch"),
        "final_checkpoint": info.get("final_checkpoint"),
        "train_seconds": round(float(sum(r.get("train_seconds", 0.0) for r in history)), 3),
        "images_per_sec": float(np.median(speeds)) if speeds else None,
        "device": env.get("gpu") or env.get("cpu") or env.get("device"),
        "bf16": env.get("bf16"),
        "history": [{k: r[k] for k in _CURVE_KEYS if k in r} for r in history],
    }


def compare_runs(run_dirs: list[Path]) -> dict:
    """Read every run and rank them by test accuracy, or test mAP when every finished run has several labels per
    image (best first; unfinished runs last).

    Returns:
        {"leaderboard": [entry, ...], "ranked_by": "test_accuracy" or "test_map"} where each entry is
        :func:`read_run_summary`'s dict plus its ``rank`` (1 = best).
    """
    if not run_dirs:
        raise CheckpointError("compare needs at least one run folder")
    entries = [read_run_summary(d) for d in run_dirs]
    finished = [e for e in entries if e["test_accuracy"] is not None]
    key = "test_map" if finished and all(e["test_map"] is not None for e in finished) else "test_accuracy"
    entries.sort(key=lambda e: (e[key] is None, -(e[key] or 0.0)))
    for rank, entry in enumerate(entries, start=1):
        entry["rank"] = rank
    _unique_labels(entries)
    return {"leaderboard": entries, "ranked_by": key}


def format_leaderboard(result: dict) -> str:
    """The leaderboard as a plain-text table."""
    header, rows = _table(result)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    # Names (run, model, dataset) align left, numbers right.
    return "\n".join("  ".join(f"{v!s:<{w}}" if i in (1, 2, 3) else f"{v!s:>{w}}" for i, (v, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def plot_compare(result: dict):
    """Validation accuracy and loss per epoch, one line per run, overlaid in two panels.

    A run without a val split is drawn from its training curves, dashed.
    """
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(11.0, 4.2)
    ax_acc, ax_loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    any_train = False
    for entry in result["leaderboard"]:
        history = entry["history"]
        has_val = any("val_accuracy" in r for r in history)
        prefix, style = ("val", "-") if has_val else ("train", "--")
        any_train |= not has_val
        label = entry["label"] + ("" if has_val else " (train)")
        epochs = [r["epoch"] for r in history if f"{prefix}_accuracy" in r]
        for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
            ax.plot(epochs, [r[f"{prefix}_{key}"] for r in history if f"{prefix}_{key}" in r], style,
                    marker="o", markersize=3, label=label)
    note = " (dashed: training curve of a run without val)" if any_train else ""
    for ax, title in ((ax_acc, "validation accuracy"), (ax_loss, "validation loss")):
        ax.set_title(title + note, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_acc.legend(fontsize=8, loc="lower right")
    return fig


def write_compare(result: dict, out: Path) -> Path:
    """Write the page (leaderboard and curves) and compare.json; returns the page's path.

    ``out`` is a folder (the page is ``compare.html`` in it) or a ``.html`` path.
    """
    out = Path(out)
    folder, page = (out.parent, out.name) if out.suffix == ".html" else (out, "compare.html")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "compare.json", result)
    header, rows = _table(result)
    ranked = "test mAP" if result.get("ranked_by") == "test_map" else "test accuracy"
    note = (f"Ranked by {ranked}. Training time is the sum of the epochs' training time in metrics.jsonl; "
            "speed is the median of the epochs' training images per second.")
    board = Section("Leaderboard", paragraphs=[note], tables=[table(header, rows)])
    curves = Section("Validation curves", figures=[("compare_curves", plot_compare(result))])
    return render_page(f"Comparison of {len(rows)} runs", [board, curves], folder, page_name=page)


_HEADER = ["rank", "run", "model", "dataset", "test acc", "macro F1", "parameters", "epochs", "train s", "img/s"]


def _table(result: dict) -> tuple[list[str], list[list]]:
    """The leaderboard's header and rows; a test mAP column after test acc when a run has several labels per
    image (its test acc is then the exact-set accuracy)."""
    with_map = any(e.get("test_map") is not None for e in result["leaderboard"])
    header = _HEADER[:4] + (["test mAP"] if with_map else []) + _HEADER[4:]
    return header, [_row(e, with_map) for e in result["leaderboard"]]


def _row(e: dict, with_map: bool = False) -> list:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    return [e["rank"], e["label"], e["model"], e["dataset"], *([num(e.get("test_map"), ".4f")] if with_map else []),
            num(e["test_accuracy"], ".4f"), num(e["test_macro_f1"], ".4f"), num(e["parameters"], ","), e["epochs"],
            num(e["train_seconds"], ".1f"), num(e["images_per_sec"], ",.0f")]


def _unique_labels(entries: list[dict]) -> None:
    # Runs from different out folders may share a name; their paths tell them apart.
    names = [e["name"] for e in entries]
    for e in entries:
        e["label"] = e["path"] if names.count(e["name"]) > 1 else e["name"]


def _read(path: Path, name: str, parse):
    file = path / name
    if not file.is_file():
        return None
    try:
        return parse(file.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file} cannot be read: {exc}") from exc
