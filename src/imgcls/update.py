"""Update a trained run in seconds: more photos of its classes, new classes, or both, without training again.

    update_run(parent, folder, console)   imgcls train --update RUN --data FOLDER, imgcls.train(update=RUN, data=FOLDER)
      -> read_parent                      the run folder; refused unless stage 1 alone trained it (head-first)
      -> the data                         the parent's data as it trained on it (its config, seed and splits), then
                                          FOLDER split the same way (seeded, stratified), its classes appended
                                          (imgcls.data.registry: load_added, merge_added): FOLDER's images
                                          already in the parent's data left out in the same class, refused
                                          under another (a class renamed)
      -> the backbone                     the weights the parent's config names, checked against its checkpoint
      -> stage 1                          the classifier refitted on frozen features: the parent's images' from the
                                          feature cache, only FOLDER's through the backbone
      -> a new run folder                 checkpoints, metrics, run.json naming the parent, eval_test.json, report
      -> the comparison                   the parent and the updated run on the old test images, the new, all

Only a run trained head-first is updated: its backbone is the pretrained one, frozen, so the features cached when
it trained still describe it.  A fine-tuned run's backbone moved; its cached features describe the pretrained
weights, not it, so its update is refused (train on the old and new photos together instead).

The classes are the parent's in their order, then the new ones (sorted, as a folder's are): every class keeps its
index, so the parent's rows of the classifier stay its first rows, and class indices kept elsewhere (a labels
table, predictions stored by index) stay right.  The classifier is fitted with the parent's settings (views, label
smoothing, class weights, tta); it reads the pooled stages the parent's read, and the L2 search starts at the
parent's strength, from the parent's classifier (three fits where that strength is still the best, against
five to eight from the strongest down): both choices cost seconds, and on 100 photos more they rarely change.

Nothing is written before every check has passed and the classifier is fitted, and a failure while the new run
folder is written removes it; the parent's folder is only read.
"""

from __future__ import annotations

import copy
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from imgcls import rundir, terminal
from imgcls.checkpoint import is_multilabel, load_model
from imgcls.config import RunConfig
from imgcls.data.base import ImageDataset
from imgcls.data.registry import build_dataset_blocks, load_added, merge_added
from imgcls.driver import Finished, analyse, make_config
from imgcls.errors import CheckpointError, ConfigError, DataError
from imgcls.evaluation.evaluate import evaluate_model
from imgcls.evaluation.metrics import format_report, save_metrics
from imgcls.inference import resolve_runtime, scoring_runtime
from imgcls.models.pretrained import classifier_layer
from imgcls.rundir import CONFIG, RunFolder, environment
from imgcls.training.trainer import (
    HeadStart,
    feature_store,
    fit_head,
    keep_head,
    keep_rejection,
    prepare,
    stage1_passes,
)
from imgcls.training.transfer import FeatureStore, backbone_digest

# What an update may be given beside RUN: the folder to add, and where the new run goes and how it ends.
UPDATE_OPTIONS = ("data", "out", "name", "report")


@dataclass
class Parent:
    """The run an update starts from, as its folder holds it."""

    path: Path
    cfg: RunConfig
    info: dict  # run.json
    head: dict  # its stage-1 record in metrics.jsonl
    model: torch.nn.Module  # its final checkpoint's model
    meta: dict


@dataclass
class Added:
    """The folder an update adds, split (:func:`imgcls.data.registry.load_added`) and merged into the parent's data."""

    folder: str
    ds: ImageDataset  # its splits, labels in its own classes
    kept: int  # its images the update trains, validates or tests on: those the parent's data lacks

    def record(self, classes: list[str], old: list[str]) -> dict:
        """What run.json says was added."""
        return {"folder": self.folder, "images": {k: len(v) for k, v in self.ds.splits.items()},
                "new_classes": [c for c in classes if c not in old],
                "more_photos_of": [c for c in self.ds.classes if c in old],
                "left_out_already_in_parent": sum(len(v) for v in self.ds.splits.values()) - self.kept}


def update_run(parent: str | Path, overrides: dict, console) -> Finished:
    """A new run: ``parent``'s classifier refitted on its data and the folder ``overrides["data"]`` together.

    Args:
        parent: the run folder to update (a head-first run: stage 1 only).
        overrides: flat options: ``data`` (the folder of photos to add, one folder per class: new classes or
            more photos of the run's own; or train/val/test folders of them), and optionally ``out`` (the
            folder the new run goes in; default the parent's), ``name`` (default ``<parent>-update``) and
            ``report``.  Every other setting is the parent's.
        console: where the lines go.

    Returns:
        The new run: its folder, config, history and test metrics.

    Raises:
        CheckpointError: ``parent`` is not a finished run folder, was fine-tuned, predicts several labels per
            image, is a cross-validation fold, or its backbone is not the weights its config names.
        DataError: the folder does not exist or holds no new image, or holds images of the parent's under
            another class; the parent's own data cannot be read as it was.
        ConfigError: an option other than those above, or no folder.
    """
    started = time.perf_counter()
    folder = _check_options(parent, overrides)
    log = _Log(console)
    old = read_parent(parent)
    cfg = _updated_config(old, folder, overrides)
    base, blocks, ds, added, data_seconds = _load_data(old, folder, cfg)
    _check_class_weights(cfg, old, ds)
    for line in ds.summary_lines():
        log(line)
    runtime = resolve_runtime(cfg.train.device, cfg.train.precision, cfg.train.channels_last)
    s = prepare(cfg, ds, runtime)  # the model with the weights the config names, its classifier new
    s.dataset = ds
    s.meta["normalize"] = old.meta["normalize"]  # the parent's: a weights file's is the data's own, measured once
    _check_backbone(old, s.model)
    blocks = {name: [*blocks.get(name, []), len(split)] for name, split in base.splits.items()}  # the new, last
    store = feature_store(s, ds, log, passes=stage1_passes(old.cfg.train, base), blocks=blocks)  # parent's runner
    record = fit_head(s, ds, log, store, _head_start(old))
    logits = _test_logits(store, ds, s.model, s.meta["tta"])
    parent_logits = _test_logits(store, ds, old.model, old.meta.get("tta", "none"))
    log(f"update: {store.computed:,} images through the frozen backbone (each view of those with no features in "
        f"the cache: the {added.kept:,} new ones{_flip_note(s.meta, old)}), the rest from the feature cache")
    rows = comparison(ds, len(base.splits["test"]), len(old.meta["classes"]), logits, parent_logits)
    return _write_run(cfg, old, added, ds, s, record, logits, rows, log,
                      {"data": data_seconds, "started": started, "passes": store.computed}, store)


# ----------------------------------------------------------------------------
# The parent and its options


def _check_options(parent, overrides: dict) -> str:
    """The folder to add; ConfigError for an option an update does not take."""
    extra = sorted(k for k, v in overrides.items() if v is not None and k not in UPDATE_OPTIONS)
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise ConfigError(f"an update keeps the settings of the run it updates ({parent}); it takes only --data "
                          f"(the folder to add), --out, --name and --report/--no-report (got {flags})")
    folder = overrides.get("data")
    if not folder:
        raise ConfigError(f"--update {parent} needs --data FOLDER: a folder of the photos to add, one folder per "
                          f"class (new classes, or more photos of the run's own)")
    return str(folder)


def read_parent(path: str | Path) -> Parent:
    """The run an update starts from; CheckpointError when it cannot be updated, saying why."""
    path = Path(path)
    if not path.is_dir() or not (path / CONFIG).is_file():
        what = "does not exist" if not path.exists() else "is not a run folder (no config.yaml)"
        raise CheckpointError(f"--update {path} {what}; give the folder of a finished run (runs/<name>)")
    info = rundir.read_doc(path / rundir.RUN, "train the run again")
    if not info:
        raise CheckpointError(f"--update {path} has not finished training (no {rundir.RUN}); update a finished run")
    cfg = make_config(path / CONFIG)
    history = rundir.read_history(path)
    tuned = [r for r in history if r.get("stage") != "head"]
    if not cfg.train.head_first or not history or history[0].get("stage") != "head":
        raise CheckpointError(
            f"run {path} was not trained head-first (no stage 1 on a frozen pretrained backbone), so there are no "
            f"cached features to refit its classifier on; an update refits a head-first run (imgcls train "
            f"--head-first --epochs 0, the default for photos on a CPU); train on the old and new photos together "
            f"instead")
    if tuned or info.get("epochs_run", 0):
        raise CheckpointError(
            f"run {path} was fine-tuned ({len(tuned) or info.get('epochs_run')} epochs after stage 1): its backbone "
            f"moved away from the pretrained weights, so the features cached when it trained no longer describe "
            f"it, and refitting its classifier would pass every image through it again; train on the old and new "
            f"photos together instead, or update a run trained head-first alone (--epochs 0)")
    if (path / rundir.FOLD).is_file():
        raise CheckpointError(f"run {path} is a fold of a cross-validation, trained on part of its data; update a "
                              f"run trained on the whole of it")
    model, meta = load_model(path)
    if is_multilabel(meta):
        raise CheckpointError(f"run {path} gives several labels per image; an update adds class folders to a run "
                              f"of one class per image, and does not take labels CSVs yet")
    return Parent(path, cfg, info, history[0], model, meta)


def _updated_config(old: Parent, folder: str, overrides: dict) -> RunConfig:
    """The parent's config with ``folder`` added to its data, in the folder and under the name asked for."""
    cfg = copy.deepcopy(old.cfg)
    cfg.data.added = [*cfg.data.added, folder]
    base = re.sub(r"-update(-\d+)?$", "", old.path.name) + "-update"  # parent-update, parent-update-2, ...
    cfg = replace(cfg, out_dir=str(overrides.get("out") or old.path.parent), name=overrides.get("name") or base,
                  report=cfg.report if overrides.get("report") is None else bool(overrides["report"]))
    cfg.validate()
    return cfg


def _check_class_weights(cfg: RunConfig, old: Parent, ds: ImageDataset) -> None:
    weights = cfg.train.class_weights
    if isinstance(weights, list) and len(weights) != ds.num_classes:
        raise ConfigError(f"run {old.path} weighs its {len(weights)} classes one by one (class_weights), and the "
                          f"update has {ds.num_classes} ({', '.join(ds.classes[len(weights):])} added); train "
                          f"with class_weights balanced, or with a weight for each class, instead")


def _check_backbone(old: Parent, fresh: torch.nn.Module) -> None:
    """Refuse a parent whose backbone is not the weights its config names (they changed since it trained)."""
    norm = old.meta["normalize"]
    if backbone_digest(fresh, norm) != backbone_digest(old.model, norm):
        raise CheckpointError(
            f"the backbone of run {old.path} differs from the weights its config names ({old.cfg.model.weights}): "
            f"they changed since it trained, so its cached features and its classifier describe other weights; "
            f"train a new run on the old and new photos together")


def _head_start(old: Parent) -> HeadStart:
    """The parent's classifier, as a start for the new one's fit (its classes keep their rows), its L2 strength and
    the stages it read (recorded where the model pools several)."""
    _, layer = classifier_layer(old.model)
    return HeadStart(layer.weight.detach().clone(), layer.bias.detach().clone(), float(old.head["head_l2"]),
                     old.head.get("head_stages_read"))


# ----------------------------------------------------------------------------
# The data


def _load_data(old: Parent, folder: str, cfg: RunConfig):
    """The parent's data as it trained on it and the rows where its blocks start (see
    :func:`imgcls.data.registry.build_dataset_blocks`); both with ``folder`` added; the seconds it all took."""
    started = time.perf_counter()
    seed = old.cfg.train.seed
    try:
        base, blocks = build_dataset_blocks(old.cfg.data, seed=seed)
    except DataError as exc:
        raise DataError(f"the data run {old.path} trained on cannot be read again ({exc}); run the update where it "
                        f"can be (the run's config.yaml names it as {old.cfg.data.dataset})") from None
    _check_same_data(old, base)
    added = load_added(folder, cfg.data, base, seed)
    ds = merge_added(base, added)
    kept = Added(folder, added, sum(len(v) for v in ds.splits.values()) - sum(len(v) for v in base.splits.values()))
    return base, blocks, ds, kept, time.perf_counter() - started


def _check_same_data(old: Parent, base: ImageDataset) -> None:
    """Refuse parent data that is no longer what the run trained on (its classes or split sizes differ)."""
    said = rundir.read_doc(old.path / rundir.DATASET, "train the run again").get("splits", {})
    now = base.record()["splits"]
    if list(base.classes) != list(old.meta["classes"]) or (said and said != now):
        grown = ", ".join(f"{k} {said.get(k, {}).get('images', 0)} -> {now[k]['images']}" for k in now)
        raise DataError(f"the data of run {old.path} ({old.cfg.data.dataset}) has changed since it trained (classes "
                        f"{', '.join(base.classes)}; images {grown}), so its splits and cached features are not the "
                        f"run's; add the new photos with --data FOLDER and leave the run's own folder as it was")


# ----------------------------------------------------------------------------
# Scores


def _test_logits(store: FeatureStore, ds: ImageDataset, model: torch.nn.Module, tta: str) -> torch.Tensor:
    """(N, K) logits of ``model``'s classifier on the frozen features of ``ds``'s test split (the mean over the
    image and its mirror image with tta flip), as the model gives them."""
    _, layer = classifier_layer(model)
    images = ds.splits["test"].images
    views = ("none", "hflip") if tta == "flip" else ("none",)
    with torch.no_grad():
        out = [layer(torch.from_numpy(store.features("test", images, view)[0])) for view in views]
    return sum(out) / len(out)


def _flip_note(meta: dict, old: Parent) -> str:
    """Why the parent's test images may pass too: test-time flip scores their mirror images, which the parent's
    training scored through the model and did not cache."""
    return ", and the first time the mirror images of the parent's test images" \
        if "flip" in (meta.get("tta"), old.meta.get("tta")) else ""


def _accuracy(logits: torch.Tensor, labels: np.ndarray) -> float | None:
    return float((logits.argmax(1).numpy() == labels).mean()) if len(labels) else None


def comparison(ds: ImageDataset, n_old: int, old_classes: int, logits: torch.Tensor, parent_logits: torch.Tensor
               ) -> list[dict]:
    """Test accuracy of the parent and the updated run (their logits on ``ds``'s test split): on the parent's
    test images (the first ``n_old``), the new ones and all.  The parent's only where every image is of one of
    its ``old_classes`` classes (the first ones): a class it never saw it cannot name."""
    labels = ds.splits["test"].labels
    rows = []
    for what, part in (("the parent's test images", slice(0, n_old)), ("new test images", slice(n_old, None)),
                       ("all test images", slice(None))):
        y = labels[part]
        known = len(y) > 0 and bool((y < old_classes).all())
        rows.append({"images": what, "count": len(y), "parent": _accuracy(parent_logits[part], y) if known else None,
                     "updated": _accuracy(logits[part], y)})
    return rows


def comparison_lines(rows: list[dict]) -> list[str]:
    """The comparison as a small table."""
    def cell(v):
        return f"{v:8.4f}" if v is not None else f"{'-':>8}"

    lines = [f"  {'test accuracy':<26} {'images':>6}  {'parent':>8}  {'updated':>8}"]
    lines += [f"  {r['images']:<26} {r['count']:>6}  {cell(r['parent'])}  {cell(r['updated'])}" for r in rows]
    return lines


# ----------------------------------------------------------------------------
# The new run folder


class _Log:
    """Says each line, and keeps it for the new run's train.log, which does not exist until the end."""

    def __init__(self, console):
        self.console, self.lines, self.run = console, [], None

    def __call__(self, line: str) -> None:
        terminal.say(self.console, line)
        if self.run is None:
            self.lines.append(line)
        else:
            self.run.log(line)

    def into(self, run: RunFolder) -> None:
        for line in self.lines:
            run.log(line)
        self.run = run


def _write_run(cfg: RunConfig, old: Parent, added: Added, ds: ImageDataset, s, record: dict,
               logits: torch.Tensor, rows: list[dict], log: _Log, took: dict, store: FeatureStore) -> Finished:
    """Write the new run folder whole, or remove it: checkpoints, metrics, run.json, eval_test and the report."""
    run, cfg = RunFolder.create(cfg)
    s.cfg = cfg
    try:
        with run.writing():
            log.into(run)
            log(f"update of {old.path}: {_added_line(added, ds, old)}")
            run.write_json(rundir.ENVIRONMENT, environment(s.runtime))
            run.write_json(rundir.DATASET, ds.record())
            keep_head(s, run, record, log)
            keep_rejection(s, ds, run, "best", store, True, log)  # "unknown" measured on the updated classes
            t = cfg.train
            test = ds.splits["test"]
            metrics, test_logits = evaluate_model(s.model, s.meta, test, ds.classes, scoring_runtime(s.runtime.device),
                                                  t.eval_batch_size, t.top_k, logits=logits)
            save_metrics(metrics, run.path, rundir.eval_stem("test"))
            log(format_report(metrics, title="test split, best checkpoint (epoch 0):"))
            for line in comparison_lines(rows):
                log(line)
            seconds = time.perf_counter() - took["started"]
            run.write_json(rundir.RUN, {
                "final_checkpoint": "best", "epochs_run": 0, "stopped_early": False, "best_epoch": 0,
                "monitor": t.monitor, "best_value": s.tracker.best, "test_accuracy": metrics["accuracy"],
                "test_macro_f1": metrics["macro_avg"]["f1"], "data_seconds": round(took["data"], 2),
                "train_seconds_this_session": round(seconds, 2),
                "parameters": sum(p.numel() for p in s.model.parameters()),
                "parent": str(old.path), "added": added.record(ds.classes, old.meta["classes"]),
                "update": {"frozen_passes": took["passes"], "comparison": rows},
            })
            log(f"run folder: {run.path} (updated from {old.path} in {seconds:.1f}s)")
            if cfg.report:
                analyse(run.path, log.console, test_logits, None if s.val_logits is None else s.val_logits.numpy())
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)  # nothing half-written: the run is whole or not there
        raise
    return Finished(run.path, cfg, s.history, metrics)


def _added_line(added: Added, ds: ImageDataset, old: Parent) -> str:
    rec = added.record(ds.classes, old.meta["classes"])
    sizes = ", ".join(f"{k} {v}" for k, v in rec["images"].items())
    parts = [f"new classes {', '.join(rec['new_classes'])}" if rec["new_classes"] else "",
             f"more photos of {', '.join(rec['more_photos_of'])}" if rec["more_photos_of"] else ""]
    return f"{added.folder} adds {sum(rec['images'].values())} images ({sizes}): " + "; ".join(p for p in parts if p)
