"""Analyses of a trained run, each reading the run folder alone: what the CLI's
``report``, ``calibrate``, ``thresholds`` and ``probe`` commands call.

Fitted results (temperature, thresholds) are stored in the run's final
checkpoint, so ``predict`` and serving use them, and as JSON in the run folder.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from imgcls import rundir
from imgcls.checkpoint import find_checkpoint, update_meta
from imgcls.errors import ConfigError, DataError
from imgcls.evaluation.calibration import expected_calibration_error, fit_temperature
from imgcls.evaluation.metrics import cross_entropy
from imgcls.evaluation.predictions import load_run, predict_split
from imgcls.evaluation.probes import probe_layers
from imgcls.evaluation.thresholds import parse_objective, tune_thresholds
from imgcls.explain.explain import explain_arrays, plot_explanations
from imgcls.io import write_json
from imgcls.reports.figures import plot_pr_curves, plot_probes, plot_reliability
from imgcls.reports.html import Section, table
from imgcls.reports.report import Report

MULTILABEL_CALIBRATION = (
    "calibration is not done for a multi-label model: its decisions are the per-label thresholds fitted on val "
    "(imgcls thresholds RUN), which a temperature would move, and mAP does not depend on it")
MULTILABEL_PROBES = (
    "layer probes fit a single-label classifier (one class per image) to each stage's features; probes for a "
    "multi-label model (one per label) are not written yet")


def _held_out(ds) -> str:
    # Fitting on the test split would make its figures optimistic; val is what it is for.
    if "val" not in ds.splits:
        raise DataError("this run has no val split to fit on; train with --val-fraction above 0")
    return "val"


def calibrate(run_dir: str | Path, clf_ds=None, test_logits=None, val_logits=None) -> dict:
    """Fit temperature scaling on the val split and store it with the model.

    Returns {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"} measured on val,
    plus the same on test.  ``test_logits``, ``val_logits``: as for :func:`report`.
    """

    run_dir = Path(run_dir)
    clf, ds = clf_ds or load_run(run_dir)
    if clf.multilabel:
        raise ConfigError(MULTILABEL_CALIBRATION)
    held_out = _held_out(ds)
    val = predict_split(clf, ds, held_out, val_logits if held_out == "val" else None)
    temperature = fit_temperature(val.logits, val.labels)
    result = {"temperature": temperature, "fitted_on": "val"}
    for split in ("val", "test"):
        preds = val if split == "val" else predict_split(clf, ds, "test", test_logits)
        before, after = preds.proba(1.0), preds.proba(temperature)
        result[split] = {"ece_before": expected_calibration_error(before, preds.labels),
                         "ece_after": expected_calibration_error(after, preds.labels),
                         "nll_before": cross_entropy(before, preds.labels),
                         "nll_after": cross_entropy(after, preds.labels)}
    update_meta(find_checkpoint(run_dir), {"temperature": temperature})
    write_json(run_dir / rundir.CALIBRATION, result)
    clf.meta["temperature"] = temperature
    return result


def tune(run_dir: str | Path, objective: str = "f1", clf_ds=None) -> dict:
    """Tune one threshold per class on the val split (calibrated probabilities) and store them."""
    parse_objective(objective)
    run_dir = Path(run_dir)
    clf, ds = clf_ds or load_run(run_dir)
    val = predict_split(clf, ds, _held_out(ds))
    result = tune_thresholds(val.proba(), val.labels, clf.classes, objective)
    result["fitted_on"] = "val"
    update_meta(find_checkpoint(run_dir), {"thresholds": result["thresholds"], "threshold_objective": objective})
    write_json(run_dir / rundir.THRESHOLDS, result)
    clf.meta["thresholds"] = result["thresholds"]
    return result


def probe(run_dir: str | Path, max_train: int = 5000, max_eval: int = 5000, clf_ds=None) -> list[dict]:
    """Linear probes of every convolutional stage (per layer and cumulative)."""
    run_dir = Path(run_dir)
    clf, ds = clf_ds or load_run(run_dir)
    if clf.multilabel:
        raise ConfigError(MULTILABEL_PROBES)
    held_out = "val" if "val" in ds.splits else "test"
    rows = probe_layers(clf.model, clf.meta, ds.splits["train"], ds.splits[held_out], clf.runtime,
                        max_train=max_train, max_eval=max_eval)
    write_json(run_dir / rundir.PROBES, {"held_out": held_out, "rows": rows})
    return rows


PROBE_MIN_HELD_OUT = 100  # held-out images below which the report leaves the layer probes out


def report_probe_images(input_shape) -> int:
    """Images per split the report's probes use: 2,000 up to 32x32, fewer for larger images (300 from 83x83).

    The forward passes cost in proportion to the pixels; ``imgcls probe`` takes more when asked.
    """
    _, h, w = input_shape
    return int(min(2000, max(300, 2000 * 32 * 32 / max(1, h * w))))


def calibration_section(run_dir: Path, val) -> Section:
    result = rundir.read_doc(run_dir / rundir.CALIBRATION, f"`imgcls calibrate {run_dir}` writes it again")
    rows = [[split, r["ece_before"], r["ece_after"], r["nll_before"], r["nll_after"]]
            for split, r in result.items() if isinstance(r, dict)]
    return Section(
        "Calibration",
        [(f"Temperature scaling, fitted on the validation split: T = {result['temperature']:.3f}. "
          "Probabilities shown by predict and the web app are divided by T before the softmax; "
          "the expected calibration error (ECE) is the gap between confidence and accuracy.")],
        [table(["split", "ECE before", "ECE after", "NLL before", "NLL after"], rows)],
        [("calibration_reliability", plot_reliability(val.logits, val.labels, result["temperature"]))],
    )


def thresholds_section(run_dir: Path, val) -> Section:
    path = run_dir / rundir.THRESHOLDS
    stored = path.is_file()
    result = (rundir.read_doc(path, f"`imgcls thresholds {run_dir}` writes it again") if stored
              else tune_thresholds(val.proba(), val.labels, val.classes, "f1"))
    rows = [[r["class"], r["threshold"], r["precision"], r["recall"], r["f1"]] for r in result["per_class"]]
    if val.multilabel:
        note = ("stored with the model: predict, serving and the test figures above decide with them" if stored
                else "not stored: run `imgcls thresholds RUN` to store them with the model")
        return Section(
            "Per-label thresholds",
            [(f"One threshold per label, tuned on the validation split for objective {result['objective']} "
              f"({note}): a label is predicted when its probability reaches its threshold. The report draws the "
              "precision-recall curves with these thresholds marked once, on the test split, under "
              "'Precision-recall curves per label'.")],
            [table(["label", "threshold", "precision", "recall", "F1"], rows, "on the validation split")])
    note = ("stored with the model; `imgcls predict --thresholds` answers 'unknown' when no class clears its threshold"
            if stored else "not stored: run `imgcls thresholds RUN` to store them with the model")
    return Section(
        "Per-class thresholds",
        [f"One-vs-rest thresholds tuned on the validation split for objective {result['objective']} ({note})."],
        [table(["class", "threshold", "precision", "recall", "F1"], rows, "on the validation split")],
        [("thresholds_pr_curves", plot_pr_curves(val.proba(), val.labels, val.classes, result["thresholds"]))],
    )


def ood_section(run_dir: Path) -> Section | None:
    """How well the stored out-of-distribution score tells the classes from other images (ood.json), or None."""
    path = run_dir / rundir.OOD
    if not path.is_file():
        return None
    doc = rundir.read_doc(path, "train the run again to measure it")
    rows = [[name, m["auroc"], m["far"], m["frr"], m["threshold"]] for name, m in doc["measured"].items()]
    kept = doc["measured"][doc["score"]]
    text = (
        f"Every prediction also gets a score of how much the image looks like the training images; below the "
        f"threshold, predict and the web page answer <strong>unknown</strong>. Kept: <code>{doc['score']}</code>, "
        f"threshold {doc['threshold']:.4f}, which rejects {kept['frr']:.1%} of the {doc['val_images']:,} val images "
        f"and accepts {kept['far']:.1%} of {html.escape(doc['against'])} (AUROC {kept['auroc']:.3f}). "
        f"AUROC: the chance that a val image scores above an outside one. Give <code>--ood FOLDER</code> at "
        f"training to measure against images like those the model will meet.")
    return Section("Images that are none of the classes", [text],
                   [table(["score", "AUROC", "accepted outside (FAR)", "rejected val (FRR)", "threshold"], rows,
                          "on the val split and the outside images")])


def probes_section(run_dir: Path, clf, ds, run_probes: bool = True) -> Section:
    if clf.multilabel:
        return Section("What each layer has learned", [f"Not shown: {MULTILABEL_PROBES}."])
    path = run_dir / rundir.PROBES
    held_out = len(ds.splits["val" if "val" in ds.splits else "test"])
    if not path.is_file() and not run_probes:
        return Section("What each layer has learned", [(
            "Layer probes (a linear classifier on each convolutional stage's pooled output) are not run when "
            "training ends, to keep the run short; `imgcls probe RUN` runs them, and `imgcls report RUN` then "
            "shows them here.")])
    if not path.is_file() and held_out < PROBE_MIN_HELD_OUT:
        return Section("What each layer has learned", [(
            f"Layer probes need at least {PROBE_MIN_HELD_OUT} held-out images to say anything (each image here would "
            f"move a probe's accuracy by {1 / max(held_out, 1):.0%}); this run has {held_out}. "
            f"`imgcls probe RUN` runs them anyway.")])
    n = report_probe_images(clf.input_shape)
    doc = (rundir.read_doc(path, f"`imgcls probe {run_dir}` writes it again") if path.is_file()
           else {"held_out": None, "rows": probe(run_dir, n, n, (clf, ds))})
    rows = doc["rows"]
    return Section(
        "What each layer has learned",
        [("A linear classifier (logistic regression) on the global-average-pooled output of each convolutional "
          "stage, fitted on training images and scored on held-out images: per stage, and cumulative "
          "(all stages up to that one together).")],
        [table(["stage", "channels", "accuracy", "cumulative accuracy"],
               [[r["stage"], r["channels"], r["accuracy"], r["cumulative_accuracy"]] for r in rows])],
        [("probes", plot_probes(rows))],
    )


def gradcam_section(clf, rep) -> Section:
    """Grad-CAM of sample and top-loss test images, through the same function as `imgcls explain`."""
    preds = rep.preds
    figures = []
    picks = {"gradcam_samples": rep.sample_indices()[:8],
             "gradcam_top_losses": [row["index"] for row in rep.top_losses()[:8]]}
    for stem, index in picks.items():
        index = np.asarray(index, dtype=np.int64)
        if len(index):
            exp = explain_arrays(clf.model, clf.meta, preds.images[index], method="gradcam", device=None)
            figures.append((stem, plot_explanations(exp)))
    at = f"Grad-CAM at layer <code>{clf.model.gradcam_layer}</code>"
    if clf.multilabel:  # explain_arrays' "predicted" is the largest logit: the most probable label
        text = (f"{at} for each image's most probable label (named in its title, with its probability), not for "
                "every label of its set: first for eight of the sample images above, then for the top losses. Red "
                "marks the regions that raised that label's score the most; `imgcls explain RUN IMAGES --target "
                "LABEL` draws the map of any one label.")
    else:
        text = (f"{at} for the predicted class: first for eight of the sample images above, then for the top "
                "losses. Red marks the regions that raised the predicted class's score the most; `imgcls explain "
                "RUN IMAGES` draws the same maps for any image.")
    return Section("Where the model looks (Grad-CAM)", [text], [], figures)


def report(run_dir: str | Path, clf_ds=None, test_logits=None, val_logits=None, probes: bool = True) -> Path:
    """Write ``report.html`` (and every figure as PNG) in the run folder; returns its path.

    ``test_logits``, ``val_logits``: the final checkpoint's on the test and
    val splits, when the caller has them (training does), so those splits are
    not run through the model again.  ``probes``: run the layer probes when
    the run has none stored (training leaves them to ``imgcls probe``).
    """
    run_dir = Path(run_dir)
    clf, ds = clf_ds or load_run(run_dir)
    rep = Report.from_run(run_dir, clf_ds=(clf, ds), logits=test_logits)
    extra = [gradcam_section(clf, rep)]
    if "val" in ds.splits:
        val = predict_split(clf, ds, "val", val_logits)  # one pass over val serves both sections
        if (run_dir / rundir.CALIBRATION).is_file() and not clf.multilabel:  # calibrate refuses multi-label
            extra.append(calibration_section(run_dir, val))
        extra.append(thresholds_section(run_dir, val))
    ood = ood_section(run_dir)
    if ood is not None:
        extra.append(ood)
    extra.append(probes_section(run_dir, clf, ds, probes))
    return rep.write(sections_extra=extra)
