"""The training loop: reads top to bottom.

    fit(cfg, dataset, run)
      -> prepare(...)          model, optimiser, schedule, data on the device
      -> for each epoch:
           train_one_epoch(...)   shuffled batches, augmentation, bf16 autocast
           validate(...)          loss and accuracy on the val split
           save checkpoints       best (by the monitored metric) and last (+ training state)
      -> evaluate the final weights on the test split

Every random draw of epoch ``e`` comes from generators seeded with
``(seed, e)``, so a run resumed after epoch ``k`` takes exactly the steps an
uninterrupted run takes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: F401 (the loss is imgcls.training.losses'; tests reach F through here)

from imgcls import __version__, rundir, terminal
from imgcls.auto import forward_rate
from imgcls.checkpoint import load_state, read_checkpoint, save_checkpoint, update_meta
from imgcls.config import TTA_AUTO, RunConfig, parse_duration
from imgcls.data.augment import build_augment, resize_batch
from imgcls.data.base import ImageDataset
from imgcls.data.quality import copy_pairs
from imgcls.errors import ConfigError, TrainingError
from imgcls.evaluation.evaluate import evaluate_model
from imgcls.evaluation.metrics import cross_entropy, format_report, save_metrics
from imgcls.evaluation.multilabel import binary_cross_entropy, mean_average_precision
from imgcls.evaluation.thresholds import tune_thresholds
from imgcls.inference import (
    Runtime,
    channel_stats,
    normalization_tensors,
    predict_logits,
    predict_proba,
    proba_from_logits,
    resolve_runtime,
    scoring_runtime,
    to_input,
)
from imgcls.models import ImageClassifier, create_model
from imgcls.models.pretrained import LoadReport, classifier_layer, load_weights
from imgcls.recipes import get_recipe
from imgcls.rundir import RunFolder, environment
from imgcls.training.callbacks import Callbacks, EpochEnd
from imgcls.training.losses import classification_loss, count_correct
from imgcls.training.optim import (
    EarlyStopping,
    Lookahead,
    LRSchedule,
    Muon,
    build_optimizer,
    class_weight_tensor,
    param_groups,
)
from imgcls.training.progress import EpochProgress
from imgcls.training.rejection import (
    check_outside,
    fit_rejection,
    logits_and_features,
    write_record,
)
from imgcls.training.strategy import OneProcess
from imgcls.training.transfer import (
    FeatureStore,
    fit_linear_head,
    fit_stage_head,
    frozen_pass,
    label_tensor,
    last_stage_directions,
)


@dataclass
class TrainState:
    """Everything one epoch reads and updates."""

    cfg: RunConfig
    runtime: Runtime
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | Muon | None  # None when no epoch will run (stage 1 only)
    schedule: LRSchedule
    tracker: EarlyStopping
    augment: object
    meta: dict
    x_train: torch.Tensor  # uint8 (N, H, W, C) on the device
    y_train: torch.Tensor  # int64 (N,) on the device
    class_weights: torch.Tensor | None
    lookahead: Lookahead | None = None
    flip_half: torch.Tensor | None = None  # altflip: bool (N,), the images mirrored in even epochs
    low_res: tuple[int, int] | None = None  # progressive resizing: (H, W) of the first low_res_steps steps
    low_res_steps: int = 0
    weights_report: LoadReport | None = None  # what the pretrained weights matched
    dataset: ImageDataset | None = None  # set by fit, for callbacks
    hooks: Callbacks = field(default_factory=Callbacks)  # set by fit: see imgcls.training.callbacks
    strategy: OneProcess = field(default_factory=OneProcess)  # one process, or several (imgcls.training.strategy)
    deadline: float | None = None  # time.perf_counter() by which an epoch stops taking steps (--time-budget)
    val_logits: torch.Tensor | None = None  # stage 1's on the val split, from the frozen features
    features: FeatureStore | None = None  # stage 1's frozen features: its runner (and ONNX Runtime export) reused
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    history: list[dict] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int:
        return _steps_per_epoch(len(self.y_train), self.cfg.train.batch_size, self.strategy.world)


@dataclass
class TrainResult:
    run: RunFolder
    history: list[dict]
    test_metrics: dict
    final_checkpoint: str
    seconds: float
    test_logits: np.ndarray | None = None  # of the final checkpoint on the test split, before any temperature
    val_logits: np.ndarray | None = None  # of the final checkpoint on the val split, when training has them


# Augmentations that move or hide part of the picture: with several labels per image, one can take a labelled
# object out of the picture while its label stays (imgcls.auto leaves them out of multi-label runs).
LABEL_CUTTING_AUGMENTS = ("zoom", "translate", "crop", "cutout")
# Training images the data-dependent initialisation (ImageClassifier.init_from_data) sees.
INIT_SAMPLE = 5000
# A --time-budget below this share of stage 1's estimate is refused: the estimate times PyTorch, and ONNX Runtime
# runs the frozen pass up to 3x faster (benchmarks/README.md), so a budget a little short may still do.
STAGE1_BUDGET_SHARE = 0.5


def _steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    # A last batch of one image is dropped (BatchNorm cannot train on it), and under
    # DDP one that leaves a process fewer than two; the shuffle changes every epoch,
    # so no image is left out every time.
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 * world else 0)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63)


def low_res_size(t, image_shape) -> tuple[int, int] | None:
    """The (H, W) that progressive resizing trains on first, or None when it is off."""
    if t.low_res_scale >= 1.0 or t.low_res_epochs <= 0:
        return None
    _, h, w = image_shape
    return max(1, round(h * t.low_res_scale)), max(1, round(w * t.low_res_scale))


def check_compatible(cfg: RunConfig, ds: ImageDataset, strategy: OneProcess | None = None
                     ) -> tuple[RunConfig, list[str]]:
    """Refuse, before any training, what the config and data cannot do together.

    Returns:
        (the config resolved for this data, a new object where a setting had to
        follow the data (``cfg`` itself otherwise), notes for the user saying
        which settings and why).
    """
    t = cfg.train
    notes = []
    if cfg.recipe:
        get_recipe(cfg.recipe).check(ds)
    if t.monitor == "val_map" and not ds.multilabel:
        raise ConfigError(f"monitor val_map is the mean average precision of data with several labels per image, "
                          f"and {ds.name} has one class per image; monitor val_loss or val_accuracy")
    if t.monitor == "val_map" and "val" not in ds.splits:
        raise ConfigError("monitor val_map needs a validation split; set --val-fraction above 0 or monitor train_loss")
    if t.monitor.startswith("val_") and "val" not in ds.splits:
        if t.early_stopping or t.schedule == "plateau":
            raise ConfigError(f"monitor {t.monitor!r} needs a validation split; set --val-fraction above 0 "
                              f"or monitor train_loss")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, monitor=t.monitor.replace("val_", "train_")))
        t = cfg.train
        notes.append(f"no val split: the best checkpoint is chosen by {t.monitor}")
    if isinstance(t.class_weights, list) and len(t.class_weights) != ds.num_classes:
        raise ConfigError(f"class_weights has {len(t.class_weights)} values but the dataset has "
                          f"{ds.num_classes} classes ({', '.join(ds.classes)})")
    if t.epochs > 0:
        (strategy or OneProcess()).check_batch(t.batch_size)
    if t.epochs > 0 and t.batch_size > len(ds.splits["train"]):
        n = len(ds.splits["train"])
        raise ConfigError(f"batch_size {t.batch_size} is larger than the {n} training images of {ds.name}; "
                          f"give --batch-size {n} or less, or add images")
    c, h, w = ds.image_shape
    # Building the model once refuses an unknown name, option or too-small input before a run folder exists.
    model = create_model(cfg.model.name, in_chans=c, num_classes=ds.num_classes, img_size=(h, w),
                         **cfg.model.options)
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)  # refuses unknown weights or a file that does not fit, before a run folder exists
    build_augment(t.augment, (h, w))
    check_outside(cfg.data, ds, t.seed)
    cutting = [a for a in (t.augment if isinstance(t.augment, list) else []) if a.split(":")[0] in LABEL_CUTTING_AUGMENTS]
    if ds.multilabel and cutting:
        notes.append(f"--augment {','.join(cutting)} can cut a labelled object out of the picture, and its label "
                     f"would still say it is there; kept as asked")
    low = low_res_size(t, ds.image_shape)
    if low is not None:
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(2, c, *low))
        except (RuntimeError, ConfigError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"low_res_scale {t.low_res_scale:g} would train model {cfg.model.name!r} on "
                              f"{low[0]}x{low[1]} images (the data is {h}x{w}), and it cannot take them ({reason}); "
                              f"use a model that pools globally (such as fastnet) or a scale nearer 1, "
                              f"or turn progressive resizing off with low_res_scale 1") from e
    if t.head_first and t.time_budget:
        notes.append(_stage1_estimate(cfg, ds, model))
    return cfg, notes


def _stage1_estimate(cfg: RunConfig, ds: ImageDataset, model: torch.nn.Module) -> str:
    """The line that says how long stage 1 should take here; ConfigError when ``--time-budget`` leaves too little.

    The frozen pass is timed in PyTorch on a few random images at the data's size; stage 1 runs it through
    ONNX Runtime where that is faster, so the estimate errs long.
    """
    t = cfg.train
    views = _views(t)
    scored = 2 if t.tta == TTA_AUTO else 1  # tta auto scores the mirror images of val (and maybe of test) too
    passes = len(ds.splits["train"]) * len(views) + scored * sum(len(ds.splits[k]) for k in ("val", "test")
                                                                   if k in ds.splits)
    rate = forward_rate(model, ds.image_shape, resolve_runtime(t.device).device.type)
    seconds = passes / rate
    line = (f"stage 1 should take at most about {seconds:.0f}s here: {passes:,} frozen passes "
            f"({len(ds.splits['train']):,} training images x {len(views)} views, then val and test"
            f"{', each with its mirror image' if scored == 2 else ''}) at "
            f"{rate:.0f} images/s or more")
    if t.time_budget and parse_duration(t.time_budget) < STAGE1_BUDGET_SHARE * seconds:
        raise ConfigError(f"--time-budget {t.time_budget} is too short for stage 1 of this run, which needs about "
                          f"{seconds:.0f}s on this machine ({passes:,} frozen passes at {rate:.0f} images/s); give "
                          f"--time-budget {math.ceil(seconds / 10) * 10 + 10:.0f}s or more, or leave it out")
    return line


def prepare(cfg: RunConfig, ds: ImageDataset, runtime: Runtime, strategy: OneProcess | None = None) -> TrainState:
    """Build model, optimiser, schedule and device data for ``ds`` (this process's, under DDP)."""
    t = cfg.train
    strategy = strategy or OneProcess()
    c, h, w = ds.image_shape
    torch.manual_seed(t.seed)
    model = create_model(cfg.model.name, in_chans=c, num_classes=ds.num_classes, img_size=(h, w),
                         **cfg.model.options)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train = ds.splits["train"]
    x_train = torch.from_numpy(train.images).to(runtime.device)
    weights_report, norm = None, None
    if cfg.model.weights:
        weights_report, norm = load_weights(model, cfg.model.weights)
    norm = norm or channel_stats(train.images)  # a pretrained set's own normalisation, else the data's
    # Data-dependent initialisation (fastnet's patch whitening) from a seeded sample of training images;
    # it may freeze parameters, so it comes before the optimiser is built.
    if type(model).init_from_data is not ImageClassifier.init_from_data:  # a float copy of 5,000 images is not free
        sample = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(t.seed))[:INIT_SAMPLE]
        model.init_from_data(to_input(x_train[sample.to(runtime.device)], *normalization_tensors(norm, runtime.device),
                                      runtime.channels_last))
    meta = {
        "arch": model.arch,
        "arch_kwargs": model.arch_kwargs,
        "classes": list(ds.classes),
        "input_shape": [c, h, w],
        "normalize": norm,
        "resize": cfg.data.resize,
        "tta": "none" if t.tta == TTA_AUTO else t.tta,  # auto: stage 1 may choose flip (fit_head)
        "dataset": ds.name,
        "imgcls_version": __version__,
    }
    if ds.multilabel:
        meta["task"] = "multilabel"  # a sigmoid per label (imgcls.checkpoint.is_multilabel)
    if weights_report is not None:
        meta["pretrained"] = weights_report.to_dict()
    if t.sync_bn:
        model = strategy.sync_batchnorm(model)  # before the optimiser: on the CPU it builds new layers
    # A run that ends at stage 1 takes no optimiser step; building one would import torch._dynamo (1 s).
    optimizer = build_optimizer(param_groups(model, t), t, runtime.bf16) if t.epochs > 0 else None
    steps = _steps_per_epoch(len(train), t.batch_size, strategy.world)
    weights = class_weight_tensor(t.class_weights, train.labels, ds.num_classes)
    augment = build_augment(t.augment, (h, w))
    low_res = low_res_size(t, ds.image_shape)
    return TrainState(
        cfg=cfg, runtime=runtime, model=model, optimizer=optimizer, schedule=LRSchedule(t, steps),
        tracker=EarlyStopping(t.monitor, t.patience, t.min_delta), augment=augment,
        meta=meta, x_train=x_train, y_train=torch.from_numpy(train.labels).to(runtime.device),
        class_weights=None if weights is None else weights.to(runtime.device),
        lookahead=Lookahead(model, t.epochs * steps) if t.lookahead else None,
        flip_half=(torch.rand(len(train), generator=torch.Generator().manual_seed(t.seed)) < 0.5).to(runtime.device)
        if augment.alternating_flip else None,
        low_res=low_res, low_res_steps=round(t.low_res_epochs * steps) if low_res else 0,
        weights_report=weights_report, strategy=strategy,
    )


def train_one_epoch(s: TrainState, progress: EpochProgress) -> dict:
    """One pass over the shuffled training split; returns train_loss, train_accuracy, lr, images_per_sec.

    Under DDP every process draws the same order of global batches and trains
    on its own slice of each; the figures returned are the global batch's.
    """
    t, many = s.cfg.train, s.strategy
    model, rt = s.model, s.runtime
    model.train()
    model.start_epoch(s.epoch)
    net = many.wrap(model)  # after start_epoch: DDP fixes the set of trained parameters when built
    seed = _epoch_seed(t.seed, s.epoch)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(many.model_seed(seed))  # dropout and other in-model randomness
    order = torch.randperm(len(s.y_train), generator=gen).to(rt.device)
    aug_gen = many.augment_draws(gen, seed)
    mean, std = normalization_tensors(s.meta["normalize"], rt.device)
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    right = torch.zeros((), device=rt.device, dtype=torch.int64)
    seen, start, lr = 0, time.perf_counter(), t.lr
    # Only a model that overrides the contract's apply_constraints pays a call per step.
    own = getattr(type(model), "apply_constraints", ImageClassifier.apply_constraints)
    constrain = model.apply_constraints if own is not ImageClassifier.apply_constraints else None
    steps = s.steps_per_epoch
    for i in range(steps):
        if s.deadline is not None and i % many.check_every == 0 and i > 0 and \
                many.broadcast(time.perf_counter() > s.deadline):  # the main process's clock decides for all
            steps = i  # the time budget is spent: this epoch ends early (see fit)
            break
        batch = order[i * t.batch_size:(i + 1) * t.batch_size]
        idx = many.shard(batch)  # the whole batch in one process
        x = to_input(s.x_train[idx], mean, std, rt.channels_last)
        y = s.y_train[idx]
        if s.augment:
            flip = (s.flip_half[idx] ^ bool(s.epoch % 2)) if s.augment.alternating_flip else None
            x = s.augment(x, aug_gen, flip)
        if s.step < s.low_res_steps:
            x = resize_batch(x, s.low_res)
        lr = s.schedule.apply(s.optimizer, s.step)
        with rt.autocast():
            logits = net(x)
        loss = many.batch_loss(logits, y, s.y_train[batch], s.class_weights, t.label_smoothing)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        s.optimizer.step()
        if constrain is not None:
            constrain()
        s.step += 1
        if s.lookahead is not None:
            s.lookahead.after_step(model, s.step)
        # A process's loss is its share of the global batch's mean (see batch_loss).
        loss_sum += loss.detach() * (len(batch) / many.world)
        right += count_correct(logits, y)
        seen += len(y)
        if i % 20 == 0 or i == steps - 1:
            # One host sync every 20 steps (and under DDP one all-reduce): it feeds the progress bar,
            # and every process catches a NaN at the same step.
            loss_total, correct_total, seen_total = many.all_sum(
                torch.stack([loss_sum, right.double(), torch.tensor(float(seen), device=rt.device,
                                                                        dtype=torch.float64)])).tolist()
            mean_loss = loss_total / seen_total
            if not math.isfinite(mean_loss):
                raise TrainingError(f"the training loss became {mean_loss} at epoch {s.epoch + 1}, step {i + 1}; "
                                    f"try a lower --lr (now {t.lr:g}) or --grad-clip")
            rate = seen_total / (time.perf_counter() - start)
            progress.update(i + 1, mean_loss, correct_total / seen_total, rate)
            if s.hooks:
                s.hooks.call("on_step", s, {"step": s.step, "epoch": s.epoch + 1, "train_loss": mean_loss,
                                            "train_accuracy": correct_total / seen_total, "lr": lr,
                                            "images_per_sec": rate})
    if steps < s.steps_per_epoch:  # stopped early: the totals of the steps after the last sync
        loss_total, correct_total, seen_total = many.all_sum(
            torch.stack([loss_sum, right.double(), torch.tensor(float(seen), device=rt.device,
                                                                    dtype=torch.float64)])).tolist()
    seconds = time.perf_counter() - start
    record = {"train_loss": loss_total / seen_total, "train_accuracy": correct_total / seen_total, "lr": lr,
              "train_seconds": round(seconds, 3), "images_per_sec": round(seen_total / seconds, 1)}
    if steps < s.steps_per_epoch:
        record["steps"] = steps  # fewer than an epoch's: the time budget ran out
    return record


def validate(s: TrainState, ds: ImageDataset) -> dict:
    """Loss and accuracy on the val split, and the seconds it took (empty dict when there is none)."""
    if "val" not in ds.splits:
        return {}
    val = ds.splits["val"]
    started = time.perf_counter()
    # Under DDP each process scores its own slice of val; every process gets the whole.
    proba = s.strategy.gather_rows(lambda lo, hi: predict_proba(
        s.model, val.images[lo:hi], s.meta["normalize"], s.runtime, s.cfg.train.eval_batch_size,
        tta=s.meta["tta"], multilabel=val.multilabel), len(val))
    if val.multilabel:  # exact-set accuracy at one half, and mAP (the figure multi-label runs are judged by)
        return {"val_loss": binary_cross_entropy(proba, val.labels),
                "val_accuracy": float(((proba >= 0.5) == (val.labels > 0)).all(1).mean()),
                "val_map": mean_average_precision(val.labels, proba), "val_seconds": round(time.perf_counter() - started, 3)}
    return {"val_loss": cross_entropy(proba, val.labels), "val_accuracy": float((proba.argmax(1) == val.labels).mean()),
            "val_seconds": round(time.perf_counter() - started, 3)}


@dataclass
class TimeBudget:
    """``--time-budget``: seconds from when the data began to load to the end of the test scoring.

    An epoch starts only when a useful part of it fits, and stops taking steps
    when what is left would not score val and test; so a run whose epochs are
    slower than expected still ends within the budget (give or take a step and
    the scoring estimate).
    """

    seconds: float
    zero: float  # time.perf_counter() when the budget's clock started

    def remaining(self) -> float:
        return self.zero + self.seconds - time.perf_counter()

    def reserve(self, s: TrainState, ds: ImageDataset) -> float:
        """Seconds kept back to score val and test: 1.2 x the last val pass scaled to both splits (before one,
        stage 1's frozen passes per image; 0 when neither ran)."""
        scored = len(ds.splits["test"]) + (len(ds.splits["val"]) if "val" in ds.splits else 0)
        timed = [r for r in s.history if r.get("val_seconds")]
        if timed:
            per_image = timed[-1]["val_seconds"] / max(1, len(ds.splits["val"]))
        else:
            head = [r for r in s.history if r.get("stage") == "head"]
            per_image = 1.0 / head[-1]["images_per_sec"] if head and head[-1].get("images_per_sec") else 0.0
        return 1.2 * per_image * scored

    def deadline(self, s: TrainState, ds: ImageDataset) -> float:
        """The time.perf_counter() after which the epoch takes no more steps."""
        return self.zero + self.seconds - self.reserve(s, ds)

    def allows_epoch(self, s: TrainState, say) -> bool:
        """Whether another epoch is worth starting: a quarter of the last one's training time is left."""
        epoch_seconds = [r["train_seconds"] for r in s.history if r.get("stage") != "head"]
        left = self.remaining()
        need = 0.25 * epoch_seconds[-1] if epoch_seconds else 0.0
        if s.strategy.broadcast(left > need):  # the main process's clock decides for all
            return True
        say(f"time budget: {s.cfg.train.time_budget} leaves {max(left, 0):.0f}s, too little for another epoch "
            f"(one takes about {epoch_seconds[-1] if epoch_seconds else 0:.0f}s); stopping after epoch {s.epoch}")
        return False


def _train_state_dict(s: TrainState) -> dict:
    state = {"epoch": s.epoch, "step": s.step, "optimizer": {} if s.optimizer is None else s.optimizer.state_dict(),
             "schedule": s.schedule.state_dict(), "tracker": s.tracker.state_dict()}
    if s.lookahead is not None:
        state["lookahead"] = s.lookahead.state_dict()
    return state


def _restore(s: TrainState, run: RunFolder | None) -> None:
    """Load model, optimiser, schedule and tracker state from ``checkpoints/last``.

    Under DDP the process that holds the run folder reads it and sends the
    rest what they need (other nodes need not see the folder).
    """
    state = meta = history = None
    if s.strategy.is_main:
        state, meta = read_checkpoint(run.checkpoint("last"))
        load_state(s.model, state, run.checkpoint("last"))
        run.truncate_metrics(meta["train_state"]["epoch"])
        history = run.read_metrics()
    state, meta, history = s.strategy.broadcast((state, meta, history))
    if not s.strategy.is_main:
        s.model.load_state_dict(state)
    ts = meta["train_state"]
    if s.optimizer is not None and ts["optimizer"]:  # {}: saved before any step, a fresh optimiser is the same
        s.optimizer.load_state_dict(ts["optimizer"])
    s.schedule.load_state_dict(ts["schedule"])
    s.tracker.load_state_dict(ts["tracker"])
    if s.lookahead is not None:
        s.lookahead.load_state_dict(ts["lookahead"])
    s.epoch, s.step = ts["epoch"], ts["step"]
    s.meta["normalize"] = meta["normalize"]
    s.meta["tta"] = meta.get("tta", s.meta["tta"])  # as stage 1 chose it (tta auto)
    s.history = history


def _keep_epoch(s: TrainState, run: RunFolder, record: dict, is_best: bool, say) -> None:
    """Add an epoch's record (stage 1's too) to the history and metrics.jsonl, write its checkpoints, say it,
    then call the callbacks' on_epoch_end."""
    s.history.append(record)
    if not s.strategy.is_main:
        return
    run.append_metrics(record)
    _save_epoch(s, run, record, is_best)
    say(_epoch_line(record, is_best))
    s.hooks.call("on_epoch_end", s, record)


def keep_head(s: TrainState, run: RunFolder | None, record: dict, say) -> None:
    """Keep stage 1's record (:func:`fit_head`) as epoch 0: the test-time augmentation it chose (tta auto, for
    every process), the history, and in the main process metrics.jsonl, the checkpoints and its line."""
    s.meta["tta"] = record.get("tta", s.meta["tta"])
    _keep_epoch(s, run, record, s.tracker.update(0, record), say)


def _save_epoch(s: TrainState, run: RunFolder, record: dict, is_best: bool) -> None:
    meta = dict(s.meta, epoch=s.epoch, metrics=record, created=_dt.datetime.now().isoformat(timespec="seconds"))
    if is_best:
        save_checkpoint(run.checkpoint("best"), s.model, meta)
    save_checkpoint(run.checkpoint("last"), s.model, meta, train_state=_train_state_dict(s))


def fit(cfg: RunConfig, ds: ImageDataset, run: RunFolder | None, console, resume: bool = False,
        data_seconds: float | None = None, on_epoch_end=None, callbacks=(),
        strategy: OneProcess | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``ds`` into ``run``; evaluate the final weights on the test split.

    ``strategy``: how many processes train (:mod:`imgcls.training.strategy`; default one).  When several do,
    every process calls ``fit``; only the main one has a ``run`` (the others pass None), writes to it, speaks,
    and calls the callbacks.

    ``callbacks``: objects with any of the hooks of :mod:`imgcls.training.callbacks`.
    ``on_epoch_end(state, record)``, if given, is one more such hook, called
    after each epoch's checkpoint is written (stage 1's too, as epoch 0), with
    the :class:`TrainState` (model, meta, runtime, dataset) and the epoch's
    metrics record; it may read the model but not change it.
    """
    t = cfg.train
    runtime = resolve_runtime(t.device, t.precision, t.channels_last)
    many = strategy or OneProcess()
    many.check_device(runtime.device)
    s = prepare(cfg, ds, runtime, many)
    s.dataset = ds
    if many.is_main:
        s.hooks = Callbacks([*callbacks, EpochEnd(on_epoch_end) if on_epoch_end is not None else None])
    if resume:
        _restore(s, run)
    say = _sayer(console, run) if many.is_main else (lambda line: None)
    if many.is_main:
        run.write_json(rundir.ENVIRONMENT, environment(runtime, many.world))
        run.write_json(rundir.DATASET, ds.record())
    say(f"model {cfg.model.name}: {sum(p.numel() for p in s.model.parameters()):,} parameters; {runtime.describe()}"
        + many.describe(t.batch_size, t.sync_bn))
    if s.weights_report is not None:
        say(s.weights_report.summary())
    if resume and many.is_main:
        say(f"resuming {run.path} after epoch {s.epoch} of {t.epochs}")
    if s.low_res_steps > s.step:
        say(f"progressive resizing: steps {s.step + 1} to {s.low_res_steps} of {t.epochs * s.steps_per_epoch} train "
            f"on {s.low_res[0]}x{s.low_res[1]} images, the rest at {ds.image_shape[1]}x{ds.image_shape[2]}")
    s.hooks.call("on_train_start", s, run)
    started = time.perf_counter()
    stopped_early = False
    if t.head_first and not resume:
        # The main process fits the head; the others get it when DDP is built for epoch 1, or with the final
        # weights.
        record = many.broadcast(fit_head(s, ds, say) if many.is_main else None)
        keep_head(s, run, record, say)
    budget = TimeBudget(parse_duration(t.time_budget), started - (data_seconds or 0.0)) if t.time_budget else None
    while s.epoch < t.epochs:
        if budget is not None and not budget.allows_epoch(s, say):
            stopped_early = True
            break
        s.deadline = None if budget is None else budget.deadline(s, ds)
        with EpochProgress(console, s.steps_per_epoch, s.epoch + 1, t.epochs) as progress:
            record = train_one_epoch(s, progress)
        record.update(validate(s, ds))
        s.epoch += 1
        record = {"epoch": s.epoch, **record}
        is_best = s.tracker.update(s.epoch, record)
        s.schedule.end_epoch(record)
        _keep_epoch(s, run, record, is_best, say)
        if "steps" in record:
            say(f"time budget: {t.time_budget} is spent; epoch {s.epoch} stopped after {record['steps']} of "
                f"{s.steps_per_epoch} steps")
            stopped_early = True
            break
        if t.early_stopping and s.tracker.should_stop:
            say(f"early stopping: {t.monitor} has not improved for {t.patience} epochs "
                f"(best {s.tracker.best:.4f} at epoch {s.tracker.best_epoch})")
            stopped_early = True
            break
    final = "best" if t.restore_best else "last"
    state, final_meta = read_checkpoint(run.checkpoint(final)) if many.is_main else (None, {})
    s.model.load_state_dict(many.broadcast(state))
    final_epoch = final_meta.get("epoch")  # on the main process, which alone reads the checkpoint
    stage1 = final_epoch == 0  # the final weights are stage 1's
    if ds.multilabel and many.is_main:
        _fit_label_thresholds(s, ds, run, final, stage1, say)
    if many.is_main:
        _fit_rejection(s, ds, run, final, stage1, say)
    # Test metrics as `imgcls evaluate` computes them, so both report the same figures; under DDP each
    # process scores its own slice of the test split, every image once.
    test, scoring = ds.splits["test"], scoring_runtime(runtime.device)
    if many.world == 1 and s.features is not None and stage1:
        # Stage 1's weights: the classifier on the test split's cached frozen features (the copy check computed
        # them), the same logits as the whole model's to float rounding, without a second pass in PyTorch.
        logits = logits_and_features(s.model, test.images, s.meta.get("tta", "none"), s.meta["normalize"],
                                     s.features, scoring, t.eval_batch_size, split="test")[0].numpy()
    else:
        logits = many.gather_rows(lambda lo, hi: predict_logits(
            s.model, test.images[lo:hi], s.meta["normalize"], scoring, t.eval_batch_size, s.meta.get("tta", "none")
        ).numpy(), len(test))
    seconds = time.perf_counter() - started
    if not many.is_main:
        return TrainResult(run, s.history, {}, final, seconds)
    metrics, test_logits = evaluate_model(s.model, s.meta, test, ds.classes, scoring, t.eval_batch_size, t.top_k,
                                          logits=torch.from_numpy(logits))
    save_metrics(metrics, run.path, rundir.eval_stem("test"))
    say(format_report(metrics, title=f"test split, {final} checkpoint (epoch {final_epoch}):"))
    run.write_json(rundir.RUN, {
        "final_checkpoint": final, "epochs_run": s.epoch, "stopped_early": stopped_early,
        "best_epoch": s.tracker.best_epoch, "monitor": t.monitor, "best_value": s.tracker.best,
        "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_avg"]["f1"],
        **({"test_map": metrics["map"]} if ds.multilabel else {}),
        "data_seconds": None if data_seconds is None else round(data_seconds, 2),
        "train_seconds_this_session": round(seconds, 2),
        "parameters": sum(p.numel() for p in s.model.parameters()),
    })
    say(f"run folder: {run.path}")
    # The final weights are stage 1's: its val logits (from the frozen features) spare calibration a val pass.
    val_logits = s.val_logits.numpy() if stage1 and s.val_logits is not None else None
    result = TrainResult(run, s.history, metrics, final, seconds, test_logits, val_logits)
    s.hooks.call("on_train_end", s, result)
    return result


def _fit_label_thresholds(s: TrainState, ds: ImageDataset, run: RunFolder, final: str, stage1: bool, say) -> None:
    """Multi-label: one threshold per label, fitted on val by F1, stored with the final checkpoint (and in
    thresholds.json), so that the test figures, predict and serving decide with them.  Without val, 0.5 each.
    ``stage1``: the final weights are stage 1's (its val logits serve)."""
    if "val" not in ds.splits or not len(ds.splits["val"]):
        say("no val split: every label's threshold is 0.5")
        return
    val = ds.splits["val"]
    logits = s.val_logits if stage1 and s.val_logits is not None else predict_logits(
        s.model, val.images, s.meta["normalize"], scoring_runtime(s.runtime.device), s.cfg.train.eval_batch_size,
        s.meta.get("tta", "none"))
    tuned = tune_thresholds(proba_from_logits(logits, multilabel=True), val.labels, ds.classes, "f1")
    tuned["fitted_on"] = "val"
    s.meta.update(thresholds=tuned["thresholds"], threshold_objective="f1")
    update_meta(run.checkpoint(final), {"thresholds": tuned["thresholds"], "threshold_objective": "f1"})
    run.write_json(rundir.THRESHOLDS, tuned)
    say(f"thresholds: one per label, fitted on val by F1 ({min(tuned['thresholds']):.2f} to "
        f"{max(tuned['thresholds']):.2f}); `imgcls thresholds RUN --objective precision=0.9` fits others")


def _fit_rejection(s: TrainState, ds: ImageDataset, run: RunFolder, final: str, stage1: bool, say) -> None:
    """The out-of-distribution score and its threshold, stored with the final checkpoint (and ood.json): an image
    below it is "unknown" to predict and serving (:mod:`imgcls.training.rejection`)."""
    keep_rejection(s, ds, run, final, s.features or feature_store(s, ds, say), stage1, say)


def keep_rejection(s: TrainState, ds: ImageDataset, run: RunFolder, final: str, store: FeatureStore, stage1: bool,
                   say) -> None:
    """Fit the out-of-distribution score on ``store``'s features and keep it with the checkpoint ``final`` of
    ``run`` (an update of a run calls this too)."""
    entry = fit_rejection(s.model, s.meta, ds, s.cfg.data, store=store, stage1=stage1,
                          val_logits=s.val_logits if stage1 else None, device=s.runtime.device,
                          batch_size=s.cfg.train.eval_batch_size, seed=s.cfg.train.seed, say=say)
    if entry is not None:
        s.meta["ood"] = entry
        update_meta(run.checkpoint(final), {"ood": entry})
        write_record(run, entry)


@dataclass
class HeadStart:
    """Where an update's stage 1 starts from: the classifier of the run it updates (:mod:`imgcls.update`)."""

    weight: torch.Tensor  # (K0, F): the old run's rows, its classes first in the new order
    bias: torch.Tensor  # (K0,)
    l2: float  # the strength the old run chose: the search starts there
    stages: int | None = None  # the pooled stages its classifier read (None: the model pools one)


def stage1_passes(t, ds: ImageDataset) -> int:
    """The frozen passes stage 1 makes over ``ds`` (the test split aside): each view of every training image,
    val and, with tta auto, val's mirror images.  They decide the runner (:meth:`FeatureRunner.create`)."""
    return len(ds.splits["train"]) * len(_views(t)) + (len(ds.splits["val"]) * (2 if t.tta == TTA_AUTO else 1)
                                                       if "val" in ds.splits else 0)


def feature_store(s: TrainState, ds: ImageDataset, say, passes: int | None = None,
                  blocks: dict[str, list[int]] | None = None) -> FeatureStore:
    """The frozen features of stage 1 for ``s.model``: a runner for ``passes`` images (default: stage 1's over
    ``ds``), cached unless the config says not to.  ``blocks``: see :class:`FeatureStore`."""
    _, h, w = ds.image_shape
    passes = stage1_passes(s.cfg.train, ds) if passes is None else passes
    # fp32, as the test split is scored: a head fitted to bf16 features would be scored on others.
    # Lazy: with the features all cached (a tune trial, an update run again), no export.
    runner, cache, backbone = frozen_pass(s.model, scoring_runtime(s.runtime.device), (h, w), s.meta["normalize"],
                                          passes, s.cfg.data.cache)
    return FeatureStore(runner, cache, backbone, say, dict(blocks or {}))


def fit_head(s: TrainState, ds: ImageDataset, say, store: FeatureStore | None = None,
             start: HeadStart | None = None) -> dict:
    """Transfer stage 1: fit the classifier on the frozen backbone's cached features; the epoch-0 record.

    ``store``: where the features come from (default: :func:`feature_store`); ``start``: the classifier an
    update starts from, whose stage reading it keeps and whose L2 strength the search starts at.
    """
    t = s.cfg.train
    started = time.perf_counter()
    views = _views(t)
    train = ds.splits["train"]
    images = stage1_passes(t, ds)
    store = s.features = store or feature_store(s, ds, say)
    runner = store.runner
    parts, hits = [], 0
    for view in views:
        f, hit = store.features("train", train.images, view)
        parts.append(f)
        hits += hit
    x_val = y_val = x_val_flip = None
    if "val" in ds.splits:
        x_val, hit = store.features("val", ds.splits["val"].images)
        y_val = ds.splits["val"].labels
        hits += hit
        if t.tta == TTA_AUTO:
            x_val_flip, hit = store.features("val", ds.splits["val"].images, "hflip")
            hits += hit
    copies = _test_copies(store, ds, [parts[0], x_val], say)
    features_seconds = time.perf_counter() - started
    options = {"class_weights": None if s.class_weights is None else s.class_weights.cpu(),
               "label_smoothing": t.label_smoothing}
    if start is not None:
        options.update(start=start.l2, init=(start.weight, start.bias))
    x_train, y_train = np.concatenate(parts), np.concatenate([train.labels] * len(views))
    widths = _pooled_widths(s.model)
    if len(widths) > 1:  # several stages pooled: the classifier reads all of them, or the last alone
        choice = fit_stage_head(x_train, y_train, ds.num_classes, widths, x_val, y_val,
                                stages=None if start is None else start.stages, **options)
        fit, reads = choice.fit, _stages_line(choice, widths, kept=start is not None)
    else:
        fit, reads = fit_linear_head(x_train, y_train, ds.num_classes, x_val, y_val, **options), ""
    _, layer = classifier_layer(s.model)
    with torch.no_grad():
        layer.weight.copy_(fit.weight)
        layer.bias.copy_(fit.bias)
    tested = ""
    if x_val is not None:
        s.val_logits = fit.logits(x_val)
        if x_val_flip is not None:  # tta auto: the mirror image too where it lowers the val loss
            flip_logits = 0.5 * (s.val_logits + fit.logits(x_val_flip))
            flip_loss = classification_loss(flip_logits, label_tensor(y_val)).item()
            tested = f"; test-time flip {'kept' if flip_loss < fit.val_loss else 'left out'} (val loss " \
                     f"{flip_loss:.4f} with it)"
            if flip_loss < fit.val_loss:
                s.meta["tta"], s.val_logits = "flip", flip_logits
                fit = dataclasses.replace(fit, val_loss=flip_loss, val_accuracy=float(
                    count_correct(flip_logits, label_tensor(y_val)).item() / len(y_val)))
    seconds = time.perf_counter() - started
    cached = f", {hits} of {len(views) + (x_val is not None) + (x_val_flip is not None)} from the cache" if hits else ""
    say(f"stage 1: classifier fitted on frozen {s.cfg.model.name} features of {len(train):,} training images "
        f"x {len(views)} view{'s' if len(views) > 1 else ''} ({' + '.join(views)}) in {seconds:.1f}s "
        f"(features {features_seconds:.1f}s with {runner.name}{cached}){reads}{tested}")
    record = {"epoch": 0, "stage": "head", "train_loss": fit.train_loss, "train_accuracy": fit.train_accuracy,
              "lr": 0.0, "train_seconds": round(seconds, 3), "images_per_sec": round(images / max(seconds, 1e-9), 1),
              "head_l2": fit.l2}
    if len(widths) > 1:
        record["head_stages_read"] = choice.stages
    if copies:
        record["test_copies"] = copies  # test images that are copies of training or val images
    if t.tta == TTA_AUTO:
        record["tta"] = s.meta["tta"]
    if fit.val_loss is not None:
        record.update(val_loss=fit.val_loss, val_accuracy=fit.val_accuracy)
        if ds.multilabel:
            record["val_map"] = mean_average_precision(y_val, proba_from_logits(s.val_logits, multilabel=True))
    return record


def _test_copies(store: FeatureStore, ds: ImageDataset, features: list, say) -> int:
    """The test images that are copies of a training or val image (imgcls.data.quality.copy_pairs, on the
    features stage 1 computes anyway, and the test split's), said in one line: they make the test accuracy
    optimistic.  Returns their count."""
    if "test" not in ds.splits or not len(ds.splits["test"]):
        return 0
    runner = store.runner
    x_test, _ = store.features("test", ds.splits["test"].images)
    names = [k for k in ("train", "val") if k in ds.splits]
    x = np.concatenate([f for f in features if f is not None] + [x_test])
    seen = sum(len(ds.splits[k]) for k in names)
    pairs = copy_pairs([ds.splits[k].images for k in (*names, "test")], last_stage_directions(x, runner.module.model),
                       across=seen)
    leaked = {p.second for p in pairs}
    if leaked:
        say(f"warning: {len(leaked)} of the {len(ds.splits['test'])} test images are copies of images this run "
            f"trains or validates on, so its test accuracy is optimistic; imgcls inspect {ds.name} names them "
            f"(and --exclude leaves them out)")
    return len(leaked)


def _views(t) -> list[str]:
    """The views of the training images whose features stage 1 fits on: the images, and their mirror images
    when the augmentation mirrors."""
    return ["none"] + (["hflip"] if any(a.split(":")[0] in ("hflip", "altflip") for a in t.augment) else [])


def _pooled_widths(model: torch.nn.Module) -> tuple[int, ...]:
    """Channels of each stage whose pooled output the model's classifier reads (one entry for most models)."""
    k = getattr(model, "head_stages", 1)
    widths = getattr(model, "stage_widths", ())
    return tuple(widths[-k:]) if k > 1 and widths else (getattr(model, "num_features", 0),)


def _stages_line(choice, widths: tuple[int, ...], kept: bool = False) -> str:
    """What stage 1's classifier reads, and the val losses that chose it (``kept``: an update kept the reading
    of the run it updates)."""
    if kept:
        return f"; it reads the last {choice.stages} stages pooled, as the run it updates did"
    losses = ", ".join(f"{choice.tried[k]:.4f} reading {'the last stage' if k == 1 else f'{k} stages'}"
                       for k in sorted(choice.tried, reverse=True))
    read = "the last stage alone" if choice.stages == 1 else f"the last {choice.stages} stages pooled"
    if choice.stages != 1 and choice.tried.get(1, float("inf")) < choice.tried[choice.stages]:
        losses += ": the last stage's lead is within the val split's noise"
    return f"; it reads {read} ({sum(widths[-choice.stages:]):,} features; val loss {losses})" \
        if len(choice.tried) > 1 else f"; it reads the last {choice.stages} stages pooled (no val split to choose)"


def _epoch_line(r: dict, is_best: bool) -> str:
    head = r.get("stage") == "head"
    parts = ["head     " if head else f"epoch {r['epoch']:3d}", f"loss {r['train_loss']:.4f}",
             f"acc {r['train_accuracy']:.4f}"]
    if "val_loss" in r:
        parts += [f"val_loss {r['val_loss']:.4f}", f"val_acc {r['val_accuracy']:.4f}"]
    parts += ([f"L2 {r['head_l2']:g}"] if head else [f"lr {r['lr']:.2e}"])
    parts += [f"{r['images_per_sec']:.0f} img/s", f"{r['train_seconds']:.1f}s"]
    return "  ".join(parts) + ("  *" if is_best else "")


def _sayer(console, run: RunFolder):
    def say(line: str) -> None:
        terminal.say(console, line)
        run.log(line)

    return say
