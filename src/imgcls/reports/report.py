"""The HTML report of one run, built from the run folder alone.

    path = build_report("runs/digits")          # runs/digits/report.html + PNGs + report.json

In a notebook the same parts are at hand one by one; every figure method
returns a matplotlib Figure, which Jupyter shows inline:

    rep = Report.from_run("runs/digits")
    rep.confusion(normalize=True)
    rep.top_losses()                             # list of dicts
    rep.write(sections_extra=[my_section])
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls import rundir
from imgcls.evaluation.metrics import compute_metrics
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
_MAX_TABLE_CLASSES = 50  # larger confusion matrices are left to the figure and report.json
_MAX_FILE_ROWS = 100  # skipped or bad files listed in full up to this many


@dataclass
class Report:
    """Everything the report shows, loaded once from a run folder.

    Attributes:
        run_dir: the run folder.
        preds: the model's predictions on ``preds.split`` (the test split).
        metrics: :func:`compute_metrics` of ``preds`` (confusion matrix included).
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
        metrics = compute_metrics(preds.labels, preds.proba(), preds.classes)
        model_info = {
            "arch": clf.meta.get("arch", "?"),
            "arch_kwargs": clf.meta.get("arch_kwargs", {}),
            "parameters": sum(p.numel() for p in clf.model.parameters()),
            "checkpoint_epoch": clf.meta.get("epoch"),
            "input_shape": list(clf.input_shape),
        }
        return cls(
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

    @property
    def classes(self) -> list[str]:
        return self.preds.classes

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
        m, info, ds = self.metrics, self.run_info, self.dataset_info
        c, h, w = ds.get("image_shape", self.model_info["input_shape"])
        splits = ", ".join(f"{k} {v['images']:,}" for k, v in ds.get("splits", {}).items())
        epochs = info.get("epochs_run", len(self.history))
        stopped = " (stopped early)" if info.get("stopped_early") else ""
        train_s = sum(r.get("train_seconds", 0.0) for r in self.history)
        speeds = [r["images_per_sec"] for r in self.history if r.get("images_per_sec")]
        final = info.get("final_checkpoint", "best")
        ckpt_epoch = self.model_info["checkpoint_epoch"]
        rows = [
            ["Dataset", f"{ds.get('name', '?')}: {len(self.classes)} classes, images {c}×{h}×{w} (C×H×W); {splits}"],
            ["Model", f"{self.model_info['arch']}, {self.model_info['parameters']:,} parameters"],
            ["Checkpoint", f"{final}" + (f" (epoch {ckpt_epoch})" if ckpt_epoch is not None else "")],
            [f"{self.preds.split.capitalize()} accuracy", f"{m['accuracy']:.2%} of {m['n']:,} images"],
            [f"Top-{m['top_k']} accuracy", f"{m['top_k_accuracy']:.2%}"],
            ["Macro F1", f"{m['macro_avg']['f1']:.4f}"],
            [f"{self.preds.split.capitalize()} loss", f"{m['loss']:.4f}"],
            ["Epochs", f"{epochs}{stopped}; best epoch {self.best_epoch} by {info.get('monitor', 'val_loss')}"],
            ["Training time", _duration(train_s) + (f" (data loading {_duration(info['data_seconds'])})"
                                                  if info.get("data_seconds") is not None else "")],
            ["Throughput", f"{np.median(speeds):,.0f} training images/s (median over epochs)" if speeds else "-"],
        ]
        lead = (f"<strong>{m['accuracy']:.2%}</strong> of the {m['n']:,} {html.escape(self.preds.split)} images "
                f"are classified correctly (macro F1 {m['macro_avg']['f1']:.3f}) by "
                f"<code>{html.escape(self.model_info['arch'])}</code> after {epochs} epochs.")
        paragraphs = [lead]
        stored = self.stored_metrics.get("accuracy")
        if stored is not None and abs(stored - m["accuracy"]) > 1e-9:
            paragraphs.append(f"Note: training recorded a {self.preds.split} accuracy of {stored:.2%}; "
                              f"the figures here are recomputed from the checkpoint now and differ.")
        return Section("Summary", paragraphs, [table(["Run", self.run_dir.name], rows)])

    def learning_section(self) -> Section:
        if not self.history:
            return Section("Learning curves", ["This run folder has no metrics.jsonl."])
        if len(self.history) == 1 and self.history[0].get("stage") == "head":
            r = self.history[0]
            val = f", validation loss {r['val_loss']:.4f} and accuracy {r['val_accuracy']:.2%}" if "val_loss" in r else ""
            return Section("Learning curves", [
                f"Only the classifier was trained, on the frozen pretrained network's features (stage 1 of transfer "
                f"learning, L2 strength {r.get('head_l2', float('nan')):g} chosen on the validation split): training "
                f"loss {r['train_loss']:.4f} and accuracy {r['train_accuracy']:.2%}{val}. There are no epochs to plot; "
                f"`imgcls train --epochs N` or `--time-budget` adds fine-tuning epochs."])
        text = ("Loss and accuracy on the training and validation splits after each epoch, and the "
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
        source = (f"Source: <code>{html.escape(str(ds.get('name', '?')))}</code>. {len(self.classes)} classes; "
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
        rows = [[cls, *(splits[s]["per_class"][i] for s in names), sum(splits[s]["per_class"][i] for s in names)]
                for i, cls in enumerate(ds.get("classes", self.classes))]
        rows.append(["total", *(splits[s]["images"] for s in names), sum(splits[s]["images"] for s in names)])
        tables = [table(["class", *names, "all"], rows, caption="Images per class and split")]
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
