"""The training-run driver: the one sequence from a config to a finished run folder.

    train_run(config, overrides)        imgcls train, api.train, every tune trial (api.tune hands it down)
      -> make_config                    defaults, recipe or --model auto, the config, the flags
      -> the strategy                   one process, or DDP when torchrun started this one
      -> trackers                       refused before any data is read when their package or store is missing
      -> build_dataset                  decoded (or mapped from the cache)
      -> one_run(...)                   compatibility check, run folder, fit, report, trackers closed
    cross_validate(cfg, folds)          imgcls cv, api.cross_validate
      -> build_dataset once, the folds  (imgcls.evaluation.cv)
      -> one_run(...) per fold          an ordinary run folder inside the cv folder, tracked as one group
      -> cv.json, cv.csv, folds.npz

Everything after the data is the same for a run and for a fold: :func:`one_run`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from imgcls import rundir, terminal
from imgcls.auto import choose
from imgcls.checkpoint import load_model
from imgcls.config import (
    RunConfig,
    apply_overrides,
    dump_config,
    flat_fields,
    layer_settings,
    read_config_values,
)
from imgcls.data.base import ImageDataset, pool_splits
from imgcls.data.download import data_dir
from imgcls.data.registry import build_dataset
from imgcls.errors import CheckpointError
from imgcls.evaluation import cv as folds_format
from imgcls.inference import resolve_runtime
from imgcls.recipes import PRECISION_CLASSES, get_recipe
from imgcls.rundir import CONFIG, RunFolder
from imgcls.terminal import say
from imgcls.tracking import Group, build_trackers, check_run_folder, tracked
from imgcls.training.launch import note_run
from imgcls.training.strategy import OneProcess


def make_config(config: str | Path | dict | RunConfig | None = None, **overrides) -> RunConfig:
    """A validated RunConfig from a YAML file, dict or RunConfig plus flat overrides (``lr=0.1``).

    With a recipe (``recipe="cifar10-fast"`` here or in the config), values
    come from, in rising priority: the defaults, the recipe, the config, the
    overrides; ``--model auto`` is resolved the same way (see
    :func:`imgcls.config.layer_settings`, which does the layering).
    """
    if isinstance(config, RunConfig):
        values = config.to_dict()
    elif isinstance(config, (str, Path)):
        values = read_config_values(config)  # only what the file sets, so a recipe's settings stay under it
    else:
        values = dict(config or {})
    recipe = overrides.get("recipe") or values.get("recipe")
    option_layers = [dict((values.get("model") or {}).get("options") or {}),  # the config's, then the flags'
                     dict(overrides.get("model_option") or overrides.get("model_options") or {})]
    values = apply_overrides(copy.deepcopy(values), overrides)  # what the user set: the config, then the flags
    settings, why = _base_settings(recipe, values)
    return layer_settings(values, settings, option_layers, why, from_recipe=bool(recipe))


def _flat_value(cfg: RunConfig, key: str):
    """The value of flat option ``key`` (a CLI flag's name) in ``cfg``; a sentinel when there is none."""
    section, f = flat_fields().get(key, (None, None))
    if f is None:
        return object()
    return getattr(cfg if section is None else getattr(cfg, section), f.name)


def _base_settings(recipe: str | None, values: dict) -> tuple[dict, str | None]:
    """(flat settings that lie under the user's, why): a recipe's variant, or what ``--model auto`` chooses.

    A recipe's variant is the one for the precision the run will train in:
    bf16 where the device computes it natively, fp32 elsewhere.
    """
    if recipe:
        train = values.get("train") or {}
        runtime = resolve_runtime(str(train.get("device", "auto")), str(train.get("precision", "auto")))
        precision = runtime.precision
        chosen = get_recipe(recipe)
        return chosen.options(precision), (
            f"{recipe}, its {precision} variant, for {PRECISION_CLASSES[precision]} "
            f"({chosen.variants[precision].summary}): this run trains in {precision} on {runtime.device}")
    model = values.get("model") or {}
    name = model.get("name", "auto")
    if name != "auto" and model.get("pretrained") is not None:
        return {}, None  # a named model with the weights the user chose (or none)
    data, train = values.get("data") or {}, values.get("train") or {}
    return choose(str(data.get("dataset", "digits")), train, follow_links=bool(data.get("follow_links")),
                  model=None if name == "auto" else name, labels=data.get("labels"))


@dataclass
class Finished:
    """What a run leaves: its folder (None in the processes of a job that do not write it), config, history
    and test metrics."""

    path: Path | None
    config: RunConfig
    history: list[dict]
    test_metrics: dict


def train_run(config, overrides: dict, console, *, resume=None, callbacks=(), group: Group | None = None
              ) -> Finished:
    """Train one run from ``config`` and the flat ``overrides`` (or continue ``resume``); see
    :func:`imgcls.api.train`.  ``group``: the tune study or cv folder whose trackers group this run."""
    # start-up time: torch.distributed, and torch's optimisers
    from imgcls.training import distributed
    from imgcls.training.optim import import_dynamo_in_background

    with contextlib.ExitStack() as held:  # the run folder's write lock, until training and the report are done
        distributed.init_distributed()  # one process unless torchrun started this one
        many = distributed.strategy()
        if not many.is_main:
            console = terminal.console(quiet=True)  # the main process speaks for the job
        if resume is not None and not many.is_main:
            cfg = None  # the main process reads the run folder (another node may not see it) and sends its config
        elif resume is not None:
            run, cfg = _resumed(resume, config, overrides, held)
        else:
            cfg = make_config(config, **overrides)  # in every process: a bad option stops them all at once
            for label, line in (("auto", cfg.auto), ("recipe", cfg.recipe_variant)):
                if line:
                    say(console, f"{label}: {line}")
        cfg = many.broadcast(cfg)
        # A tracker's missing package is refused before the data is read; the main process alone tracks.
        trackers = build_trackers(cfg, group) if many.is_main else []
        if cfg.train.optimizer != "muon" and cfg.train.epochs > 0:
            import_dynamo_in_background()  # torch's optimisers need it: overlap it with loading the data (1-1.4 s)
        ds, data_seconds = _load_data(cfg, console, many)
        return one_run(cfg, ds, console, many, resume=run if resume is not None and many.is_main else None,
                       resumed=resume is not None, held=held, trackers=trackers, callbacks=callbacks,
                       data_seconds=data_seconds, shared_images=True)


def _load_data(cfg: RunConfig, console, many: OneProcess) -> tuple[ImageDataset, float]:
    """The run's dataset and the seconds it took; each node's first process decodes and caches it, the others
    map the cache."""
    started = time.perf_counter()
    with many.node_first():
        ds = build_dataset(cfg.data, seed=cfg.train.seed, progress=console.is_terminal and many.is_main)
    data_seconds = time.perf_counter() - started
    for line in ds.summary_lines() + [f"data ready in {data_seconds:.1f}s"]:
        say(console, line)
    return ds, data_seconds


def one_run(cfg: RunConfig, ds: ImageDataset, console, many: OneProcess, *, held: contextlib.ExitStack,
            trackers: list, resume: RunFolder | None = None, resumed: bool = False, callbacks=(),
            data_seconds: float | None = None, shared_images: bool = False, before_fit=None) -> Finished:
    """Everything after the data, for a run and for a fold alike.

    The compatibility check, a new run folder (or ``resume``, the main process's resumed one, when ``resumed``),
    ``before_fit(run)``, training, the report, and the trackers closed with the run's outcome (``held`` keeps the
    run folder's write lock). ``shared_images``: under DDP, let the node's processes map one copy of the split
    images.
    """
    from imgcls.training.trainer import check_compatible, fit  # start-up time


    run = resume
    cfg, notes = check_compatible(cfg, ds, many)
    shared = many.share_images(ds, data_dir() / "shared") if shared_images else None
    for note in [*notes, shared] if shared else notes:
        say(console, f"note: {note}")
    if not resumed and many.is_main:
        run, cfg = RunFolder.create(cfg)
        held.enter_context(run.writing())
    if many.is_main:
        note_run(run.path)  # for imgcls train --nproc's message, should a process fail
        if before_fit is not None:
            before_fit(run)
    else:
        run = None  # the main process alone writes the run folder
    cfg = many.broadcast(cfg)  # the run's name, as the main process chose it
    # The trackers' runs end after the report, or with the error that stopped training.
    with tracked(trackers), many.failures():
        result = fit(cfg, ds, run, console, resume=resumed, data_seconds=data_seconds,
                     callbacks=[*callbacks, *trackers], strategy=many)
        many.finish()  # before the main process's report: no collective is left, and none waits on it
        if not many.is_main:
            return Finished(None, cfg, result.history, {})
        if cfg.report:
            analyse(run.path, console, result.test_logits, result.val_logits)
    return Finished(run.path, cfg, result.history, result.test_metrics)


def _resumed(resume, config, overrides: dict, held: contextlib.ExitStack) -> tuple[RunFolder, RunConfig]:
    """The run folder to resume and its config, checked and locked (``held`` keeps the lock)."""
    run = RunFolder(resume)
    if not (run.path / CONFIG).is_file():
        raise CheckpointError(f"{run.path} is not a run folder (no config.yaml)")
    if not run.checkpoint("last").is_file():
        raise CheckpointError(f"{run.path} has no checkpoints/last.safetensors to resume from")
    cfg = make_config(run.path / CONFIG, epochs=overrides.get("epochs"))
    extra = sorted(k for k, v in overrides.items() if v is not None and k != "epochs"
                   and _flat_value(cfg, k) != v)  # repeating the run's own value (--no-report) is no change
    if extra or config is not None:
        raise CheckpointError(f"a resumed run keeps its own config; only --epochs may change (got "
                              f"{', '.join(extra) or '--config'})")
    held.enter_context(run.writing())  # before anything in it changes: a second resume stops here
    load_model(run.checkpoint("last"))  # damage is refused before config.yaml takes the new epochs
    check_run_folder(cfg, run.path)  # so is a tracker folder that cannot be written
    rundir.read_history(run.path)
    if overrides.get("epochs") is not None:
        run.write_text(CONFIG, dump_config(cfg))
    return run, cfg


def analyse(run_dir: Path, console, test_logits, val_logits=None) -> None:
    """After training: fit temperature scaling on val (when there is one) and write the report.

    ``test_logits``, ``val_logits``: training's own of its final checkpoint, which calibration and the report
    reuse (stage 1 has the val logits from its frozen features; else one val pass serves both steps).
    """
    from imgcls import analysis  # matplotlib: on use

    clf_ds = analysis.load_run(run_dir)
    if clf_ds[0].multilabel:
        say(console, f"calibration: none ({analysis.MULTILABEL_CALIBRATION.split(': ', 1)[1]})")
    elif "val" in clf_ds[1].splits:
        if val_logits is None:
            val_logits = analysis.predict_split(*clf_ds, "val").logits
        cal = analysis.calibrate(run_dir, clf_ds, test_logits, val_logits)
        say(console, f"calibration: temperature {cal['temperature']:.3f}, val ECE {cal['val']['ece_before']:.4f} "
                     f"-> {cal['val']['ece_after']:.4f}")
    page = analysis.report(run_dir, clf_ds, test_logits, val_logits, probes=False)  # imgcls probe runs them
    say(console, f"report: {page}")


def cross_validate(cfg: RunConfig, folds: int, console, out_dir: Path | None = None) -> dict:
    """Train and score one model per fold; write cv.json, cv.csv and folds.npz (:mod:`imgcls.evaluation.cv`).

    Args:
        cfg: the run config every fold trains with (its seed also seeds the folds); its trackers track every
            fold, grouped by the cv folder's name.
        folds: K, from 2 to the image count of the smallest class.
        console: a rich Console for progress and each fold's training log.
        out_dir: the cv folder (default: ``<cfg.out_dir>/<name>-cv<K>``); it must
            not already hold a cross-validation.

    Returns:
        The summary written to cv.json: per_fold figures, their mean and std
        (population, ``np.std``), sizes, and ``path`` of the cv folder.
    """
    seed = cfg.train.seed
    build_trackers(cfg)  # a missing tracker package is refused before the data is read
    ds = build_dataset(cfg.data, seed=seed, progress=console.is_terminal)
    pooled = pool_splits(ds)
    held_outs = folds_format.make_folds(pooled.labels, folds, seed)
    cv_dir = folds_format.new_cv_folder(cfg, folds, out_dir)
    say(console, f"{folds}-fold cross-validation of {cfg.model.name} on {ds.name}: {len(pooled)} train + val "
                 f"images pooled, test split ({len(ds.splits['test'])} images) left untouched; folder {cv_dir}")
    per_fold, indices = [], {}
    for i, held_out in enumerate(held_outs, start=1):
        fold_ds, index = folds_format.fold_dataset(ds, pooled, held_out, i, folds, cfg.data.val_fraction, seed)
        indices.update({f"fold{i}_{name}": idx for name, idx in index.items()})
        # Each fold is an ordinary run folder in the cv folder, with a config of its own, and no report.
        fold_cfg = dataclasses.replace(copy.deepcopy(cfg), out_dir=str(cv_dir), name=folds_format.fold_name(i),
                                       report=False)
        sizes = ", ".join(f"{k} {len(v)}" for k, v in index.items() if k != "test")
        say(console, f"fold {i}/{folds}: {sizes}; its test split is the held-out fold {i} ({len(held_out)} images)")
        started = time.perf_counter()
        with contextlib.ExitStack() as held:
            finished = one_run(fold_cfg, fold_ds, console, OneProcess(), held=held,
                               trackers=build_trackers(fold_cfg, Group("cv", cv_dir.name, i)),
                               before_fit=lambda run, index=index: rundir.write_fold_index(run.path, index))
        per_fold.append(folds_format.fold_record(i, finished.path, finished.test_metrics, len(finished.history),
                                                 index, time.perf_counter() - started))
    summary = {
        "path": str(cv_dir), "dataset": ds.name, "model": cfg.model.name, "folds": folds, "seed": seed,
        "pooled_images": len(pooled), "pooled_from": [s for s in ("train", "val") if s in ds.splits],
        "test_split_images": len(ds.splits["test"]), "val_fraction": cfg.data.val_fraction,
        "metrics": list(folds_format.metric_names({"per_fold": per_fold})), "per_fold": per_fold,
        **folds_format.summarize(per_fold),
        "config": cfg.to_dict(),
    }
    folds_format.write_cv(summary, cv_dir, indices)
    return summary

