"""The HTML report of one run, built from the run folder alone.

    path = build_report("runs/digits")          # runs/digits/report.html + PNGs + report.json

In a notebook the same parts are at hand one by one; every figure method
returns a matplotlib Figure, which Jupyter shows inline:

    rep = Report.from_run("runs/digits")
    rep.confusion(normalize=True)
    rep.top_losses()                             # list of dicts
    rep.write(sections_extra=[my_section])

The run of a multi-label model (several labels per image) gets a :class:`MultilabelReport`
from the same ``from_run``: mAP, F1, per-label precision-recall curves and label
co-occurrence in place of the confusion matrix.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls import rundir
from imgcls.evaluation.metrics import compute_metrics
from imgcls.evaluation.multilabel import multilabel_metrics, multilabel_rows
from imgcls.evaluation.predictions import (
    SplitPredictions,
    load_run,
    predict_split,
)
from imgcls.io import write_json
from imgcls.models.summary import format_summary, summarize
from imgcls.reports import figures
from imgcls.reports.html import Section, render_page, table

SECTION_TITLES = (
    "Summary",
    "Learning curves",
    "Confusion matrix",
    "Per-class precision, recall and F1",
    "Sample test images",
    "Top losses",
    "Most confused class pairs",
    "The dataset",
    "The model",
    "Config",
    "Environment",
)
MULTILABEL_SECTION_TITLES = (
    "Summary",
    "Learning curves",
    "Per-label precision, recall, F1 and AP",
    "Precision-recall curves per label",
    "Label co-occurrence",
    "Label co-occurrence of the errors",
    "Sample test images",
    "Top losses",
    "The dataset",
    "The model",
    "Config",
    "Environment",
)
_SET_GRID = {"ncols": 6, "cell": 1.8}  # inches per image: label sets make longer titles; 6 a row fill the page
_MAX_TABLE_CLASSES = 50  # larger confusion matrices are left to the figure and report.json
_MAX_FILE_ROWS = 100  # skipped or bad files listed in full up to this many


@dataclass
class Report:
    """Everything the report shows, loaded once from a run folder.

    Attributes:
        run_dir: the run folder.
        preds: the model's predictions on ``preds.split`` (the test split).
        metrics: :meth:`score` of ``preds``: :func:`compute_metrics` (confusion matrix included), or for a
            :class:`MultilabelReport` :func:`multilabel_metrics`.
        history: per-epoch records of metrics.jsonl.
        run_info: run.json ({} when absent).
        dataset_info: dataset.json (rebuilt from the data when absent).
        environment: environment.json ({} when absent).
        config_text: config.yaml as written.
        model_text: the Keras-style model summary.
        model_info: arch, arguments, parameters and checkpoint epoch.
        n_samples, sample_seed: size and seed of the fixed sample of test images.
        n_top_losses: how many top losses are shown.
    """

    run_dir: Path
    preds: SplitPredictions
    metrics: dict
    history: list[dict]
    run_info: dict
    dataset_info: dict
    environment: dict
    config_text: str
    model_text: str
    model_info: dict
    n_samples: int = 32
    sample_seed: int = 0
    n_top_losses: int = 16
    stored_metrics: dict = field(default_factory=dict)  # eval_test.json written by training

    ACCURACY = "accuracy"  # what the accuracy of metrics.jsonl measures
    # The dataset table: its first column's name, its last row's name, its caption.
    DATASET_TABLE = ("class", "total", "Images per class and split")

    @classmethod
    def from_run(cls, run_dir: str | Path, split: str = "test", device: str = "auto", clf_ds=None,
                 logits=None) -> Report:
        """Load the model and data of ``run_dir`` and predict ``split``.

        ``clf_ds``: the (TorchPredictor, ImageDataset) of :func:`load_run`, when the caller has them already;
        ``logits``: the model's on ``split``, when the caller has them already (see :func:`predict_split`).
        """
        run_dir = Path(run_dir)
        clf, ds = clf_ds or load_run(run_dir, device=device)
        preds = predict_split(clf, ds, split, logits)
        # A multi-label model's run folder is read the same way; its figures and sections are others.
        kind = MultilabelReport if preds.multilabel and not issubclass(cls, MultilabelReport) else cls
        metrics = kind.score(preds, clf.meta)
        model_info = {
            "arch": clf.meta.get("arch", "?"),
            "arch_kwargs": clf.meta.get("arch_kwargs", {}),
            "parameters": sum(p.numel() for p in clf.model.parameters()),
            "checkpoint_epoch": clf.meta.get("epoch"),
            "input_shape": list(clf.input_shape),
            "threshold_objective": clf.meta.get("threshold_objective"),
        }
        return kind(
            run_dir=run_dir, preds=preds, metrics=metrics, history=rundir.read_history(run_dir),
            run_info=rundir.read_doc(run_dir / rundir.RUN, "restore it, or train the run again"),
            dataset_info=rundir.read_doc(run_dir / rundir.DATASET, "delete it: the report then describes the data "
                                         "as it reads it now") or ds.record(),
            environment=rundir.read_doc(run_dir / rundir.ENVIRONMENT, "delete it: the report then leaves the "
                                        "machine out"),
            config_text=_read_text(run_dir / rundir.CONFIG),
            model_text=format_summary(summarize(clf.model, clf.input_shape)),
            model_info=model_info,
            stored_metrics=rundir.read_doc(run_dir / f"{rundir.eval_stem(split)}.json",
                                           f"`imgcls evaluate {run_dir} --split {split}` writes it again"),
        )

    # ---- numbers -------------------------------------------------------------------------

    @staticmethod
    def score(preds: SplitPredictions, meta: dict) -> dict:
        """The metrics the report shows, of ``preds`` and the model's checkpoint ``meta``."""
        return compute_metrics(preds.labels, preds.proba(), preds.classes)

    @property
    def classes(self) -> list[str]:
        return self.preds.classes

    def classes_phrase(self) -> str:
        """What the model tells apart, for the summary and the dataset section: "10 classes"."""
        return f"{len(self.classes)} classes"

    @property
    def confusion_matrix(self) -> np.ndarray:
        """int (K, K), rows true class, columns predicted, from :attr:`preds`."""
        return np.asarray(self.metrics["confusion_matrix"], dtype=np.int64)

    @property
    def best_epoch(self) -> int | None:
        return self.run_info.get("best_epoch") or figures.best_epoch_of(self.history)

    def sample_indices(self) -> np.ndarray:
        """A fixed, seeded sample of up to ``n_samples`` indices into the split, sorted."""
        n = len(self.preds.labels)
        rng = np.random.default_rng(self.sample_seed)
        return np.sort(rng.choice(n, size=min(self.n_samples, n), replace=False))

    def top_losses(self) -> list[dict]:
        return figures.top_losses(self.preds, self.n_top_losses)

    def most_confused(self, k: int = 10) -> list[tuple[str, str, int]]:
        return figures.most_confused(self.confusion_matrix, self.classes, k)

    def key_numbers(self) -> dict:
        """The figures of the report as JSON-serialisable data (written as report.json)."""
        m = self.metrics
        return {
            "run": str(self.run_dir), "split": self.preds.split, "n": m["n"], "classes": m["classes"],
            "accuracy": m["accuracy"], "top_k": m["top_k"], "top_k_accuracy": m["top_k_accuracy"],
            "loss": m["loss"], "macro_f1": m["macro_avg"]["f1"], "per_class": m["per_class"],
            "confusion_matrix": m["confusion_matrix"],
            "most_confused": [list(p) for p in self.most_confused()],
            "top_losses": self.top_losses(),
            "sample_indices": self.sample_indices().tolist(),
            "best_epoch": self.best_epoch, "epochs": len(self.history),
        }

    # ---- figures -------------------------------------------------------------------------

    def learning_curves(self):
        return figures.plot_learning_curves(self.history, self.best_epoch)

    def confusion(self, normalize: bool = False):
        return figures.plot_confusion(self.confusion_matrix, self.classes, normalize)

    def per_class(self):
        return figures.plot_per_class(self.metrics)

    def samples(self):
        """The fixed sample of test images, titled with prediction, its probability and the truth."""
        idx = self.sample_indices()
        proba = self.preds.proba()
        pred = proba.argmax(1)
        titles = [f"pred {_short(self.classes[pred[i]])} ({_p(proba[i, pred[i]])})\n"
                  f"true {_short(self.classes[self.preds.labels[i]])}" for i in idx]
        wrong = [bool(pred[i] != self.preds.labels[i]) for i in idx]
        return figures.plot_image_grid(self.preds.images[idx], titles, wrong)

    def top_losses_grid(self):
        """The top-loss images, titled with both classes and their probabilities."""
        rows = self.top_losses()
        if not rows:
            return None
        titles = [f"true {_short(r['true'])} ({_p(r['p_true'])})\npred {_short(r['predicted'])} ({_p(r['p_pred'])})"
                  for r in rows]
        images = self.preds.images[[r["index"] for r in rows]]
        return figures.plot_image_grid(images, titles, [True] * len(rows))

    # ---- sections ------------------------------------------------------------------------

    def sections(self) -> list[Section]:
        """The report's sections, in reading order (titles as in :data:`SECTION_TITLES`)."""
        return [self.summary_section(), self.learning_section(), self.confusion_section(),
                self.per_class_section(), self.samples_section(), self.top_losses_section(),
                self.confused_section(), self.dataset_section(), self.model_section(),
                self.config_section(), self.environment_section()]

    def summary_section(self) -> Section:
        m = self.metrics
        rows = [
            *self._setting_rows(),
            [f"{self.preds.split.capitalize()} accuracy", f"{m['accuracy']:.2%} of {m['n']:,} images"],
            [f"Top-{m['top_k']} accuracy", f"{m['top_k_accuracy']:.2%}"],
            ["Macro F1", f"{m['macro_avg']['f1']:.4f}"],
            [f"{self.preds.split.capitalize()} loss", f"{m['loss']:.4f}"],
            *self._training_rows(),
        ]
        lead = (f"<strong>{m['accuracy']:.2%}</strong> of the {m['n']:,} {html.escape(self.preds.split)} images "
                f"are classified correctly (macro F1 {m['macro_avg']['f1']:.3f}) by "
                f"<code>{html.escape(self.model_info['arch'])}</code> after {self._epochs_run()} epochs.")
        paragraphs = [lead, *self._recorded_note("accuracy", "accuracy", "{:.2%}")]
        return Section("Summary", paragraphs, [table(["Run", self.run_dir.name], rows)])

    def _epochs_run(self) -> int:
        return self.run_info.get("epochs_run", len(self.history))

    def _setting_rows(self) -> list[list[str]]:
        """The summary's first rows: the dataset, the model and the checkpoint."""
        ds = self.dataset_info
        c, h, w = ds.get("image_shape", self.model_info["input_shape"])
        splits = ", ".join(f"{k} {v['images']:,}" for k, v in ds.get("splits", {}).items())
        final = self.run_info.get("final_checkpoint", "best")
        ckpt_epoch = self.model_info["checkpoint_epoch"]
        return [
            ["Dataset", f"{ds.get('name', '?')}: {self.classes_phrase()}, images {c}×{h}×{w} (C×H×W); {splits}"],
            ["Model", f"{self.model_info['arch']}, {self.model_info['parameters']:,} parameters"],
            ["Checkpoint", f"{final}" + (f" (epoch {ckpt_epoch})" if ckpt_epoch is not None else "")],
        ]

    def _training_rows(self) -> list[list[str]]:
        """The summary's last rows: epochs, training time and throughput."""
        info = self.run_info
        stopped = " (stopped early)" if info.get("stopped_early") else ""
        train_s = sum(r.get("train_seconds", 0.0) for r in self.history)
        speeds = [r["images_per_sec"] for r in self.history if r.get("images_per_sec")]
        monitor = info.get("monitor", "val_loss")
        return [
            ["Epochs", f"{self._epochs_run()}{stopped}; best epoch {self.best_epoch} by {monitor}"],
            ["Training time", _duration(train_s) + (f" (data loading {_duration(info['data_seconds'])})"
                                                  if info.get("data_seconds") is not None else "")],
            ["Throughput", f"{np.median(speeds):,.0f} training images/s (median over epochs)" if speeds else "-"],
        ]

    def _recorded_note(self, key: str, name: str, fmt: str) -> list[str]:
        """A note when training recorded another value of ``metrics[key]`` (eval_test.json) than the report's."""
        stored, now = self.stored_metrics.get(key), self.metrics[key]
        if stored is None or now is None or abs(stored - now) <= 1e-9:
            return []
        return [(f"Note: training recorded a {self.preds.split} {name} of {fmt.format(stored)}; "
                 f"the figures here are recomputed from the checkpoint now and differ.")]

    def learning_section(self) -> Section:
        if not self.history:
            return Section("Learning curves", ["This run folder has no metrics.jsonl."])
        if len(self.history) == 1 and self.history[0].get("stage") == "head":
            r = self.history[0]
            val = (f", validation loss {r['val_loss']:.4f} and {self.ACCURACY} {r['val_accuracy']:.2%}"
                   if "val_loss" in r else "")
            return Section("Learning curves", [(
                f"Only the classifier was trained, on the frozen pretrained network's features (stage 1 of transfer "
                f"learning, L2 strength {r.get('head_l2', float('nan')):g} chosen on the validation split): training "
                f"loss {r['train_loss']:.4f} and {self.ACCURACY} {r['train_accuracy']:.2%}{val}. There are no "
                f"epochs to plot; `imgcls train --epochs N` or `--time-budget` adds fine-tuning epochs.")])
        text = (f"Loss and {self.ACCURACY} on the training and validation splits after each epoch, and the "
                "learning rate. The dotted line marks the best epoch; a validation loss that rises while "
                "the training loss falls is overfitting.")
        return Section("Learning curves", [text], figures=[("learning_curves", self.learning_curves())])

    def confusion_section(self) -> Section:
        text = ("Rows are the true class, columns the predicted class; the diagonal holds the correct "
                "predictions. The row-normalised matrix shows, for each true class, where its images went "
                "(its diagonal is the recall).")
        tables = []
        if len(self.classes) <= _MAX_TABLE_CLASSES:
            counts = table(["true \\ predicted", *self.classes],
                           [[c, *row] for c, row in zip(self.classes, self.metrics["confusion_matrix"])])
            tables.append(f"<details class='confusion-counts'><summary>The counts as a table</summary>{counts}</details>")
        return Section("Confusion matrix", [text], tables,
                       [("confusion_counts", self.confusion()), ("confusion_normalized", self.confusion(True))])

    def per_class_section(self) -> Section:
        m = self.metrics
        rows = [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in m["per_class"]]
        for avg in ("macro_avg", "weighted_avg"):
            a = m[avg]
            rows.append([avg.replace("_", " "), a["precision"], a["recall"], a["f1"], a["support"]])
        text = ("Precision: of the images predicted as the class, the fraction that are. Recall: of the "
                "images of the class, the fraction found. F1: their harmonic mean. Support: test images of the class.")
        return Section("Per-class precision, recall and F1", [text],
                       [table(["class", "precision", "recall", "F1", "support"], rows)],
                       [("per_class", self.per_class())])

    def samples_section(self) -> Section:
        idx = self.sample_indices()
        wrong = int((self.preds.proba()[idx].argmax(1) != self.preds.labels[idx]).sum())
        text = (f"A fixed random sample (seed {self.sample_seed}) of {len(idx)} {html.escape(self.preds.split)} "
                f"images with the predicted class, its probability and the true class; "
                f"{_wrong_phrase(wrong)}.")
        return Section("Sample test images", [text], figures=[("test_samples", self.samples())])

    def top_losses_section(self) -> Section:
        rows = self.top_losses()
        if not rows:
            return Section("Top losses", [f"No {html.escape(self.preds.split)} image is misclassified."])
        text = (f"The {len(rows)} wrong predictions the model was most sure of: highest loss −log p(true class) "
                f"first. Each title gives the true class with its probability, then the predicted class with its "
                f"own. Mislabelled images and ambiguous classes tend to show up here.")
        with_paths = any(r["path"] for r in rows)
        header = ["#", "index", "true", "predicted", "p(true)", "p(predicted)", "loss"] + (["path"] if with_paths else [])
        body = [[n, r["index"], r["true"], r["predicted"], r["p_true"], r["p_pred"], r["loss"]]
                + ([r["path"] or ""] if with_paths else []) for n, r in enumerate(rows, 1)]
        return Section("Top losses", [text], [table(header, body)], [("top_losses", self.top_losses_grid())])

    def confused_section(self) -> Section:
        pairs = self.most_confused()
        if not pairs:
            return Section("Most confused class pairs", ["No image was confused with another class."])
        support = self.confusion_matrix.sum(1)
        index = {c: i for i, c in enumerate(self.classes)}
        rows = [[t, p, n, f"{n / support[index[t]]:.1%}"] for t, p, n in pairs]
        return Section("Most confused class pairs",
                       ["The largest off-diagonal cells of the confusion matrix."],
                       [table(["true class", "predicted as", "images", "share of true class"], rows)])

    def dataset_section(self) -> Section:
        ds = self.dataset_info
        c, h, w = ds.get("image_shape", self.model_info["input_shape"])
        splits = ds.get("splits", {})
        source = (f"Source: <code>{html.escape(str(ds.get('name', '?')))}</code>. {self.classes_phrase()}; "
                  f"every image is {w}×{h} pixels with {c} channel{'s' if c != 1 else ''}, as the model sees it.")
        paragraphs = [source]
        paragraphs += [f"Note: {html.escape(str(n))}" for n in ds.get("notes", [])]
        copies = next((r["test_copies"] for r in self.history if r.get("test_copies")), 0)
        if copies:
            paragraphs.append(f"<strong>{copies} test image{'s are' if copies != 1 else ' is a'} "
                              f"cop{'ies' if copies != 1 else 'y'} of images the run trained or validated on</strong>: "
                              f"the test figures here are optimistic. <code>imgcls inspect</code> names them, with "
                              f"the other problems of the data, and <code>--exclude</code> leaves them out.")
        names = list(splits)
        unit, total, caption = self.DATASET_TABLE
        rows = [[cls, *(splits[s]["per_class"][i] for s in names), sum(splits[s]["per_class"][i] for s in names)]
                for i, cls in enumerate(ds.get("classes", self.classes))]
        rows.append([total, *(splits[s]["images"] for s in names), sum(splits[s]["images"] for s in names)])
        tables = [table([unit, *names, "all"], rows, caption=caption)]
        for key, what, name in (("skipped", "Skipped files (not images, or hidden)", "path"),
                                ("bad", "Images that could not be decoded", "path"),
                                ("excluded", "Images left out by --exclude", "file")):
            files = ds.get(key, [])
            if files:
                more = len(files) - _MAX_FILE_ROWS
                caption = f"{what}: {len(files)}" + (f", the first {_MAX_FILE_ROWS} shown" if more > 0 else "")
                tables.append(table([name, "reason"], [[f[name], f["reason"]] for f in files[:_MAX_FILE_ROWS]],
                                    caption=caption))
            elif key != "excluded":
                paragraphs.append(f"{what}: none.")
        return Section("The dataset", paragraphs, tables)

    def model_section(self) -> Section:
        info = self.model_info
        kwargs = ", ".join(f"{k}={v}" for k, v in info["arch_kwargs"].items())
        text = (f"<code>{html.escape(info['arch'])}</code>({html.escape(kwargs)}): "
                f"{info['parameters']:,} parameters. Output shapes are channels-first, (None, C, H, W).")
        return Section("The model", [text], [_pre(self.model_text)])

    def config_section(self) -> Section:
        text = "config.yaml of the run; <code>imgcls train --config config.yaml</code> repeats it."
        return Section("Config", [text], [_pre(self.config_text or "(no config.yaml)")])

    def environment_section(self) -> Section:
        if not self.environment:
            return Section("Environment", ["This run folder has no environment.json."])
        rows = [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in self.environment.items()]
        return Section("Environment", ["Where the model was trained (environment.json)."],
                       [table(["key", "value"], rows)])

    # ---- output --------------------------------------------------------------------------

    def write(self, out_dir: str | Path | None = None, sections_extra: list[Section] | None = None) -> Path:
        """Write report.html, its figures as PNGs and report.json into ``out_dir`` (default: the run folder)."""
        out_dir = Path(out_dir) if out_dir is not None else self.run_dir
        sections = self.sections() + list(sections_extra or [])
        title = f"Report: {self.run_dir.name}"
        page = render_page(title, sections, out_dir)
        write_json(out_dir / "report.json", self.key_numbers())
        return page


class MultilabelReport(Report):
    """The report of a multi-label run (several labels per image), which :meth:`Report.from_run` builds for one.

    ``metrics`` is :func:`multilabel_metrics` of the test split at the per-label thresholds stored with the
    model (fitted on val when training ended; 0.5 each without them).  The learning curves, the dataset, the
    model, the config and the environment are the single-label report's sections.
    """

    ACCURACY = "exact-set accuracy"
    DATASET_TABLE = ("label", "images", "Images carrying each label, per split (an image counts under each label)")

    @staticmethod
    def score(preds: SplitPredictions, meta: dict) -> dict:
        return multilabel_metrics(preds.labels, preds.proba(), preds.classes, meta.get("thresholds"))

    def classes_phrase(self) -> str:
        return f"{len(self.classes)} labels (several per image)"

    # ---- numbers -------------------------------------------------------------------------

    @property
    def thresholds(self) -> list[float]:
        """The L per-label thresholds the predicted sets are decided with."""
        return self.metrics["thresholds"]

    def predicted_sets(self) -> np.ndarray:
        """bool (N, L): the labels whose probability reaches their threshold."""
        return self.preds.proba() >= np.asarray(self.thresholds)

    def top_losses(self) -> list[dict]:
        return figures.multilabel_top_losses(self.preds, self.thresholds, self.n_top_losses)

    def most_missed_for(self, k: int = 10) -> list[tuple[str, str, int]]:
        """The ``k`` largest cells of the error co-occurrence: (missed label, label predicted wrongly, images)."""
        return figures.most_confused(self.metrics["error_cooccurrence"], self.classes, k)

    def key_numbers(self) -> dict:
        m = self.metrics
        scalars = {k: v for k, v in m.items() if not isinstance(v, (list, dict))}
        return {
            "run": str(self.run_dir), "split": self.preds.split, **scalars, "labels": m["labels"],
            "thresholds": m["thresholds"], "per_label": m["per_label"],
            "cooccurrence": m["cooccurrence"], "error_cooccurrence": m["error_cooccurrence"],
            "missed": m["missed"], "false_alarms": m["false_alarms"],
            "top_losses": self.top_losses(),
            "sample_indices": self.sample_indices().tolist(),
            "best_epoch": self.best_epoch, "epochs": len(self.history),
        }

    # ---- figures -------------------------------------------------------------------------

    def per_label(self):
        return figures.plot_per_label(self.metrics)

    def pr_curves(self):
        return figures.plot_pr_curves(self.preds.proba(), self.preds.labels, self.classes, self.thresholds)

    def cooccurrence(self, errors: bool = False):
        """The label co-occurrence of the split's true sets, or (``errors``) of its missed and false labels."""
        if errors:
            return figures.plot_cooccurrence(self.metrics["error_cooccurrence"], self.classes,
                                             "Missed (row) while predicted wrongly (column)",
                                             "label predicted wrongly", "label missed")
        return figures.plot_cooccurrence(self.metrics["cooccurrence"], self.classes,
                                         "Images carrying both labels")

    def samples(self):
        """The fixed sample of test images, titled with the predicted set over the true set."""
        idx = self.sample_indices()
        pred, true = self.predicted_sets(), self.preds.labels == 1
        titles = [f"pred {_set_title(self.classes, pred[i])}\ntrue {_set_title(self.classes, true[i])}" for i in idx]
        wrong = [bool((pred[i] != true[i]).any()) for i in idx]
        return figures.plot_image_grid(self.preds.images[idx], titles, wrong, **_SET_GRID)

    def top_losses_grid(self):
        """The top-loss images, titled with the true set over the predicted set; a red frame where they differ."""
        rows = self.top_losses()
        if not rows:
            return None
        titles = [f"true {_names_title(r['true'])}\npred {_names_title(r['predicted'])}" for r in rows]
        images = self.preds.images[[r["index"] for r in rows]]
        return figures.plot_image_grid(images, titles, [r["wrong"] for r in rows], **_SET_GRID)

    # ---- sections ------------------------------------------------------------------------

    def sections(self) -> list[Section]:
        """The report's sections, in reading order (titles as in :data:`MULTILABEL_SECTION_TITLES`)."""
        return [self.summary_section(), self.learning_section(), self.per_label_section(), self.pr_section(),
                self.cooccurrence_section(), self.errors_section(), self.samples_section(),
                self.top_losses_section(), self.dataset_section(), self.model_section(), self.config_section(),
                self.environment_section()]

    def summary_section(self) -> Section:
        m, split = self.metrics, self.preds.split
        fitted = self.model_info.get("threshold_objective")
        rows = [
            *self._setting_rows(),
            [f"{split.capitalize()} mAP", f"{_score(m['map'])} (mean over the labels of their average precision)"],
            ["Micro F1", f"{m['micro_f1']:.4f}"],
            ["Macro F1", f"{m['macro_f1']:.4f}"],
            ["Exact-set accuracy", f"{m['subset_accuracy']:.2%} of {m['n']:,} images"],
            ["Hamming loss", f"{m['hamming_loss']:.4f} (share of wrong label decisions)"],
            [f"{split.capitalize()} loss", f"{m['loss']:.4f} (binary cross-entropy, mean over labels)"],
            ["Thresholds", f"one per label, fitted on val (objective {fitted})" if fitted else "0.5 for every label"],
            *self._training_rows(),
        ]
        lead = (f"mAP <strong>{_score(m['map'])}</strong> over the {len(self.classes)} labels of the {m['n']:,} "
                f"{html.escape(split)} images (micro F1 {m['micro_f1']:.3f}, macro F1 {m['macro_f1']:.3f}); the "
                f"predicted set is exactly the true set for {m['subset_accuracy']:.2%} of them. Model "
                f"<code>{html.escape(self.model_info['arch'])}</code>, after {self._epochs_run()} epochs.")
        paragraphs = [lead, *self._recorded_note("map", "mAP", "{:.4f}")]
        return Section("Summary", paragraphs, [table(["Run", self.run_dir.name], rows)])

    def per_label_section(self) -> Section:
        rows = [[r["label"].replace("_avg", " avg") if r["threshold"] == "" else r["label"], r["precision"],
                 r["recall"], r["f1"], _blank(r["ap"]), r["support"], r["predicted"], r["threshold"]]
                for r in multilabel_rows(self.metrics)]
        text = ("A label is predicted for an image when its probability reaches the label's threshold. Precision: "
                "of the images it is predicted for, the fraction that carry it. Recall: of the images carrying it, "
                "the fraction found. F1: their harmonic mean. AP (average precision): the area under the label's "
                "precision-recall curve, which no threshold moves. Support: test images carrying the label; "
                "predicted: images it is predicted for. The micro average pools every label decision; the macro "
                "average weighs the labels equally (its AP is the mAP).")
        return Section("Per-label precision, recall, F1 and AP", [text],
                       [table(["label", "precision", "recall", "F1", "AP", "support", "predicted", "threshold"],
                              rows)],
                       [("per_label", self.per_label())])

    def pr_section(self) -> Section:
        text = ("One panel per label: precision against recall on the test split as the label's threshold moves "
                "from high to low, its AP in the title. The dot marks the threshold the model decides with.")
        return Section("Precision-recall curves per label", [text], figures=[("pr_curves", self.pr_curves())])

    def cooccurrence_section(self) -> Section:
        n = self.metrics["n"]
        text = (f"How often two labels come together in the true sets of the {n:,} test images: each cell counts "
                f"the images carrying both the row label and the column label; the diagonal counts the images "
                f"carrying the label; {self.metrics['empty_true']:,} images carry none.")
        return Section("Label co-occurrence", [text], self._matrix_tables(self.metrics["cooccurrence"], "label"),
                       [("label_cooccurrence", self.cooccurrence())])

    def errors_section(self) -> Section:
        m = self.metrics
        text = ("Which labels the model takes for which: each cell counts the test images on which the row label "
                "was missed while the column label was predicted wrongly (missed label (row) while this label was "
                "predicted wrongly (column)). The diagonal is empty: a label cannot be missed and predicted wrongly "
                "on one image.")
        if not any(map(any, m["error_cooccurrence"])):
            text += (" No image here had a label missed while another was predicted wrongly: every wrong set "
                     "lacks labels or has labels too many, not both.")
        tables = [table(["label", "missed", "predicted wrongly"],
                        [[c, a, b] for c, a, b in zip(self.classes, m["missed"], m["false_alarms"])],
                        caption="Label errors on the test split")]
        pairs = self.most_missed_for()
        if pairs:
            tables.append(table(["missed label", "while predicted wrongly", "images"], [list(p) for p in pairs],
                                caption="The largest cells"))
        tables += self._matrix_tables(m["error_cooccurrence"], "missed \\ predicted wrongly")
        return Section("Label co-occurrence of the errors", [text], tables,
                       [("error_cooccurrence", self.cooccurrence(errors=True))])

    def _matrix_tables(self, matrix: list[list[int]], corner: str) -> list[str]:
        """A label-by-label matrix as a folded table, up to :data:`_MAX_TABLE_CLASSES` labels."""
        if len(self.classes) > _MAX_TABLE_CLASSES:
            return []
        counts = table([corner, *self.classes], [[c, *row] for c, row in zip(self.classes, matrix)])
        return [f"<details><summary>The counts as a table</summary>{counts}</details>"]

    def samples_section(self) -> Section:
        idx = self.sample_indices()
        wrong = int((self.predicted_sets()[idx] != (self.preds.labels[idx] == 1)).any(1).sum())
        text = (f"A fixed random sample (seed {self.sample_seed}) of {len(idx)} {html.escape(self.preds.split)} "
                f"images, each titled with its predicted set of labels over its true set; {_wrong_phrase(wrong)}.")
        return Section("Sample test images", [text], figures=[("test_samples", self.samples())])

    def top_losses_section(self) -> Section:
        rows = self.top_losses()
        if not rows:
            return Section("Top losses", [f"The {html.escape(self.preds.split)} split has no images."])
        text = (f"The {len(rows)} {html.escape(self.preds.split)} images with the highest loss (the binary "
                f"cross-entropy, mean over the labels), highest first, right sets included; each title gives the "
                f"true set over the predicted set, with a red frame where they differ. The worst label is the one "
                f"that adds the most to the loss, with its probability. Mislabelled images tend to show up here.")
        with_paths = any(r["path"] for r in rows)
        header = ["#", "index", "true", "predicted", "worst label", "p(worst)", "loss"] + (["path"] if with_paths
                                                                                           else [])
        body = [[n, r["index"], _names_cell(r["true"]), _names_cell(r["predicted"]), r["worst"], r["p_worst"],
                 r["loss"]] + ([r["path"] or ""] if with_paths else []) for n, r in enumerate(rows, 1)]
        return Section("Top losses", [text], [table(header, body)], [("top_losses", self.top_losses_grid())])


def build_report(run_dir: str | Path, sections_extra: list[Section] | None = None,
                 out_dir: str | Path | None = None, clf_ds=None) -> Path:
    """Write ``report.html`` for a run folder and return its path.

    Args:
        run_dir: a run folder written by ``imgcls train``.
        sections_extra: more sections appended after the standard ones.
        out_dir: where to write (default: the run folder); report.json and one
            PNG per figure are written beside the page.
        clf_ds: the (TorchPredictor, ImageDataset) of :func:`load_run`, to skip loading them again.
    """
    return Report.from_run(run_dir, clf_ds=clf_ds).write(out_dir, sections_extra)


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _p(p: float) -> str:
    """A probability for a title, at most 6 characters: 0.87, 0.004, <0.001."""
    if p >= 0.01:
        return f"{p:.2f}"
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _score(value: float | None) -> str:
    """A score for text, "-" where there is none (mAP with no positive label)."""
    return "-" if value is None else f"{value:.4f}"


def _blank(value):
    """A table cell: "-" for None, else the value as it is."""
    return "-" if value is None else value


_SET_TITLE_LABELS = 3  # labels named in an image's title; more are counted


def _names_title(names: list[str]) -> str:
    """A label set for an image title: "red+blue", "a+b+c+2", "(none)"."""
    if not names:
        return "(none)"
    shown = [_short(n, 8) for n in names[:_SET_TITLE_LABELS]]
    more = len(names) - len(shown)
    return "+".join(shown) + (f"+{more}" if more else "")


def _set_title(labels: list[str], row: np.ndarray) -> str:
    return _names_title([labels[j] for j in np.flatnonzero(row)])


def _names_cell(names: list[str]) -> str:
    return ", ".join(names) if names else "(none)"


def _wrong_phrase(n: int) -> str:
    if n == 0:
        return "all of them are right"
    return f"the {n} wrong one{'s' if n != 1 else ''} {'have' if n != 1 else 'has'} a red title and frame"


def _short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {s:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def _read_text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""
