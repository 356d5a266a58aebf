"""The Python API: what the CLI calls, usable from a notebook.

    run = imgcls.train(data="photos.zip", model="resnet20", epochs=20)
    clf = imgcls.load(run.path)            # or imgcls.load("runs/photos-resnet20-...")
    clf.predict(["cat.jpg", pil_image, array])
    clf.evaluate()                         # the run's own test split
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls import predictor, rundir
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
from imgcls.data.download import data_dir
from imgcls.data.registry import build_dataset
from imgcls.errors import CheckpointError, ConfigError, DataError
from imgcls.evaluation.evaluate import evaluate_model
from imgcls.evaluation.metrics import save_metrics
from imgcls.inference import normalization_tensors, resolve_runtime, to_input
from imgcls.io import read_json
from imgcls.predictor import Predictor  # noqa: F401 (re-exported: the face of the package)
from imgcls.recipes import PRECISION_CLASSES, get_recipe
from imgcls.rundir import CONFIG, RunFolder
from imgcls.startup import keep_freed_memory  # also the opt-in of library users
from imgcls.tracking import build_trackers, check_run_folder, tracked
from imgcls.training.callbacks import EpochEnd


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
                  model=None if name == "auto" else name)


@dataclass
class Run:
    """A finished (or interrupted) training run."""

    path: Path
    config: RunConfig
    history: list[dict]
    test_metrics: dict

    def load(self, which: str | None = None, device: str = "auto") -> "Classifier":
        return load(self.path, which=which, device=device)

    def __repr__(self) -> str:
        acc = self.test_metrics.get("accuracy")
        return f"Run({str(self.path)!r}, epochs={len(self.history)}, test_accuracy={acc})"


def _console(quiet: bool):
    from imgcls.terminal import console  # rich: on use

    return console(quiet)


def train(config=None, *, resume: str | Path | None = None, quiet: bool = False, console=None,
          on_epoch_end=None, callbacks=(), trial: tuple[str, int] | None = None, **overrides) -> Run:
    """Train a model and return its :class:`Run`.

    Args:
        config: a YAML path, dict or RunConfig (default: the built-in digits).
        resume: a run folder to continue from its last checkpoint; only
            ``epochs`` may be raised when resuming.
        quiet: print nothing.
        on_epoch_end: called as ``on_epoch_end(state, record)`` after each
            epoch (see :func:`imgcls.training.trainer.fit`).
        callbacks: objects with any of the hooks of :mod:`imgcls.training.callbacks`
            (``on_train_start``, ``on_step``, ``on_epoch_end``, ``on_train_end``).
        trial: (study name, trial number) when the run is a trial of :func:`tune`: the trackers of
            ``track`` group it with the study's other trials (see :mod:`imgcls.tracking`).
        **overrides: flat options, named as the CLI flags: ``data``, ``model``,
            ``epochs``, ``lr``, ``optimizer``, ``augment``, ...
    """
    keep_freed_memory()  # an entry point: see imgcls.startup
    console = console or _console(quiet)
    with contextlib.ExitStack() as held:
        return _train(config, resume, console, [*callbacks, EpochEnd(on_epoch_end) if on_epoch_end else None],
                      overrides, held, trial)


def _train(config, resume, console, callbacks: list, overrides: dict, held: contextlib.ExitStack,
           trial: tuple[str, int] | None = None) -> Run:
    """:func:`train`'s body; ``held`` keeps the run folder's write lock until training and the report are done."""
    # on use: load() needs no trainer
    from imgcls.training import distributed  # start-up time: torch.distributed
    from imgcls.training.launch import note_run  # start-up time
    from imgcls.training.optim import import_dynamo_in_background
    from imgcls.training.trainer import check_compatible, fit

    d = distributed.init_distributed()  # rank 0 of 1 unless torchrun started this process
    if not d.is_main:
        console = _console(True)  # rank 0 speaks for the job
    if resume is not None and not d.is_main:
        cfg = None  # rank 0 reads the run folder (another node may not see it) and sends its config
    elif resume is not None:
        run, cfg = _resumed(resume, config, overrides, held)
    else:
        cfg = make_config(config, **overrides)  # on every rank: a bad option stops them all at once
        for label, line in (("auto", cfg.auto), ("recipe", cfg.recipe_variant)):
            if line:
                console.print(f"{label}: {line}", highlight=False, markup=False, soft_wrap=True)
    cfg = distributed.broadcast(cfg)
    # A tracker's missing package is refused before the data is read; rank 0 alone tracks.
    trackers = build_trackers(cfg, trial) if d.is_main else []
    if cfg.train.optimizer != "muon" and cfg.train.epochs > 0:
        import_dynamo_in_background()  # torch's optimisers need it: overlap it with loading the data (1-1.4 s)
    started = time.perf_counter()
    if d.local_rank != 0:
        distributed.barrier()  # the node's first process decodes and caches the data; the others map the cache
    ds = build_dataset(cfg.data, seed=cfg.train.seed, progress=console.is_terminal and d.is_main)
    if d.local_rank == 0:
        distributed.barrier()
    data_seconds = time.perf_counter() - started
    for line in ds.summary_lines() + [f"data ready in {data_seconds:.1f}s"]:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    cfg, notes = check_compatible(cfg, ds)
    shared = distributed.share_splits(ds, data_dir() / "shared")  # DDP: the node's processes map one copy
    notes = [*notes, shared] if shared else notes
    for note in notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    if resume is None and d.is_main:
        run, cfg = RunFolder.create(cfg)
        held.enter_context(run.writing())
    if d.is_main:
        note_run(run.path)  # for imgcls train --nproc's message, should a process fail
    else:
        run = None  # rank 0 alone writes the run folder
    cfg = distributed.broadcast(cfg)  # the run's name, as rank 0 chose it
    # The trackers' runs end after the report, or with the error that stopped training.
    with tracked(trackers), distributed.peer_failures():
        result = fit(cfg, ds, run, console, resume=resume is not None, data_seconds=data_seconds,
                     callbacks=[*callbacks, *trackers])
        if d.enabled:
            distributed.finish()  # before rank 0's report: no collective is left, and none waits on it
        if not d.is_main:
            return Run(None, cfg, result.history, {})
        if cfg.report:
            _analyse(run.path, console, result.test_logits, result.val_logits)
    return Run(run.path, cfg, result.history, result.test_metrics)


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


def _analyse(run_dir: Path, console, test_logits, val_logits=None) -> None:
    """After training: fit temperature scaling on val (when there is one) and write the report.

    ``test_logits``, ``val_logits``: training's own of its final checkpoint, which calibration and the report
    reuse (stage 1 has the val logits from its frozen features; else one val pass serves both steps).
    """
    from imgcls import analysis  # matplotlib: on use

    clf_ds = analysis.load_run(run_dir)
    if "val" in clf_ds[1].splits:
        if val_logits is None:
            val_logits = analysis.predict_split(*clf_ds, "val").logits
        cal = analysis.calibrate(run_dir, clf_ds, test_logits, val_logits)
        console.print(f"calibration: temperature {cal['temperature']:.3f}, val ECE {cal['val']['ece_before']:.4f} "
                      f"-> {cal['val']['ece_after']:.4f}", highlight=False, markup=False, soft_wrap=True)
    page = analysis.report(run_dir, clf_ds, test_logits, val_logits, probes=False)  # imgcls probe runs them
    console.print(f"report: {page}", highlight=False, markup=False, soft_wrap=True)


def cross_validate(config=None, folds: int = 5, *, out_dir: str | Path | None = None, quiet: bool = False,
                   console=None, **overrides) -> dict:
    """Stratified k-fold cross-validation of ``config`` (as :func:`train` takes it) with ``folds`` folds.

    Each fold is an ordinary run folder inside the cv folder (default
    ``<out>/<name>-cv<K>``), beside cv.json, cv.csv, folds.npz and report.html.

    Returns:
        cv.json's content: per_fold figures, their mean and std, sizes, and ``path``.
    """
    from imgcls.reports.cv import write_cv_page  # on use
    from imgcls.training.cv import cross_validate as run_folds  # on use

    keep_freed_memory()  # an entry point: see imgcls.startup
    console = console or _console(quiet)
    out_dir = None if out_dir is None else Path(out_dir)
    cfg = make_config(config, **overrides)
    if cfg.track:  # the folds train through training.cv, which takes no trackers yet: refused, not ignored
        raise ConfigError(f"cross-validation does not track experiments yet; leave out --track "
                          f"{','.join(cfg.track)} (train or tune a run with it)")
    result = run_folds(cfg, folds, console, out_dir=out_dir)
    write_cv_page(result, Path(result["path"]))
    console.print(f"cross-validation folder: {result['path']}", highlight=False, markup=False, soft_wrap=True)
    return result


def tune(config=None, *, trials: int = 20, timeout: str | float | None = None, space=None,
         metric: str = "val_accuracy", study: str | None = None, storage: str | None = None, sampler="tpe",
         pruner="median", quiet: bool = False, console=None, **overrides) -> dict:
    """Search hyperparameters with Optuna: ``trials`` runs of ``config`` (as :func:`train` takes it), each with
    values drawn from ``space``, in the study folder ``<out>/<study>``.

    Args:
        trials: the study's finished trials to reach (complete, pruned, or failed by their settings); running
            the same call again continues the study up to that number.
        timeout: stop starting trials after this long (``"30m"``, seconds).
        space: a YAML file or a dict mapping config fields to ranges or choices (see
            :mod:`imgcls.tuning.space`); default: the default space for the config.
        metric: ``val_accuracy`` (maximised), ``val_loss`` (minimised) or ``val_macro_f1`` (maximised),
            reported after every epoch for the pruner.
        study: the study's name (default ``<data>-tune``).
        storage: a SQLAlchemy URL (default: ``sqlite:///<study folder>/study.db``).
        sampler: ``tpe`` (seeded by the config's seed), ``random``, ``grid``, or an Optuna sampler.
        pruner: ``median``, ``hyperband``, ``none``, or an Optuna pruner.
        **overrides: flat training options, as for :func:`train`; ``out`` is where the study folder goes.

    Returns:
        The study's summary (study.json): ``best_value``, ``best_params``, ``best_run``, ``best_config``,
        ``counts`` by state, and every trial.
    """
    search = _tuning()
    keep_freed_memory()  # an entry point: see imgcls.startup
    console = console or _console(quiet)
    trial_flags = {"report": False, **{k: v for k, v in overrides.items() if v is not None}}

    def make(params: dict) -> RunConfig:
        return make_config(config, **{**trial_flags, **params})

    def run_trial(params: dict, out_dir: Path, name: str, on_epoch_end) -> Run:
        trial = (out_dir.name, int(name.removeprefix("trial-")))  # the study's folder; search names runs trial-<n>
        return train(config, quiet=True, on_epoch_end=on_epoch_end, trial=trial,
                     **{**trial_flags, **params, "out": str(out_dir), "name": name})

    return search.tune(make=make, train=run_trial, flags=overrides, trials=trials, timeout=timeout, space=space,
                       metric=metric, study=study, storage=storage, sampler=sampler, pruner=pruner, console=console)


def retrain_best(summary: dict, *, quiet: bool = False, console=None) -> Run:
    """Train the best trial's configuration on its training and validation images together, and evaluate it
    on the test split once: the run ``<study folder>/best-retrained``.

    It trains for the epochs that gave the best trial its value (its best epoch, with early stopping off: no
    validation images are left to stop on).  Validation images carved out of the training data join the
    training set; a val/ folder of the data's own stays a validation split.

    Args:
        summary: what :func:`tune` returned (study.json's content).
    """
    if not summary.get("best_config") or not summary.get("best_run"):
        raise ConfigError(f"study {summary.get('study', '')!r} has no complete trial yet: nothing to retrain")
    console = console or _console(quiet)
    best_run = Path(summary["best_run"])
    info = read_json(best_run / rundir.RUN, default={}) or {}
    best = make_config(summary["best_config"])
    epochs = best.train.epochs if info.get("best_epoch") is None else int(info["best_epoch"])
    epochs = epochs if best.train.head_first else max(epochs, 1)  # a head-first run may train its head alone
    cfg = make_config(best, val_fraction=0.0, early_stopping=False, epochs=epochs,
                      out=str(Path(summary["path"])), name="best-retrained")
    console.print(f"retraining the best trial ({best_run.name}) on train + val for {cfg.train.epochs} epochs, then "
                  f"the test split once", highlight=False, markup=False, soft_wrap=True)
    return train(cfg, console=console)


def _tuning():
    """imgcls.tuning.search; a ConfigError saying what to install when Optuna is not there."""
    try:
        from imgcls.tuning import search  # optuna: on use
    except ModuleNotFoundError as exc:
        if exc.name not in ("optuna", "sqlalchemy"):
            raise
        raise ConfigError(f"imgcls tune runs on Optuna, which is not installed ({exc.name} is missing); "
                          f"pip install 'imgcls[tune]' (or 'optuna>=4,<6')") from None
    return search


def search_space(config=None, *, space=None, **overrides) -> str:
    """The space :func:`tune` with these arguments would search, as the YAML that ``space=`` (``--space``) reads."""
    search = _tuning()
    trial_flags = {"report": False, **{k: v for k, v in overrides.items() if v is not None}}
    return search.show_space(lambda params: make_config(config, **{**trial_flags, **params}), overrides, space)


class Classifier(predictor.Classifier):
    """A trained model, rebuilt from its checkpoint alone, that also evaluates and explains.

    Inputs to ``predict``/``predict_proba``/``explain`` may be file paths
    (images, folders, zips), PIL images, or uint8 arrays (H, W), (H, W, C)
    or (N, H, W, C); a single input or a list of them.  Images are converted
    and resized as the model's training data was.
    """

    def evaluate(self, data: str | Path | None = None, split: str = "test", top_k: int = 5, save: bool = False) -> dict:
        """Metrics on ``split`` of the run's own data, or of another dataset with the same classes.

        With ``save=True`` (and a run folder) writes ``eval_<split>.json`` and ``.csv`` into it.
        """
        ds = self.dataset(data)
        if split not in ds.splits:
            raise DataError(f"split {split!r} does not exist; the data has: {', '.join(ds.splits)}")
        metrics, _ = evaluate_model(self.model, self.meta, ds.splits[split], ds.classes, self.runtime,
                                    self.batch_size, top_k)
        if save and self.run_dir is not None:
            save_metrics(metrics, self.run_dir, rundir.eval_stem(split, data))
        return metrics

    def explain(self, inputs, method: str = "gradcam", target: str | int = "predicted", layer: str | None = None):
        """Attribution maps for ``inputs``: an :class:`imgcls.explain.Explanation` (``.maps``, ``.plot()``).

        ``target`` is ``predicted``, ``true`` (the class folder each image is in) or a class name.
        """
        from imgcls.explain.explain import explain_arrays  # Captum: on use

        names, images, bad = self.load_inputs(inputs)
        if not len(images):
            raise DataError("no image could be read: " + "; ".join(f"{b.path}: {b.reason}" for b in bad))
        labels = self._folder_labels(names) if target == "true" else None
        exp = explain_arrays(self.model, self.meta, images, method=method, target=target,
                             layer=None if layer in (None, "auto") else layer, device=None, labels=labels, names=names)
        exp.bad = bad
        return exp

    def _folder_labels(self, names: list[str]) -> np.ndarray:
        """True classes of images read from class folders (the parent folder's name)."""
        labels = []
        for name in names:
            parent = Path(name).parent.name
            if parent not in self.classes:
                raise DataError(f"--target true needs images inside class folders; the folder of {name} "
                                f"({parent!r}) is not a class: {', '.join(self.classes)}")
            labels.append(self.classes.index(parent))
        return np.array(labels, dtype=np.int64)

    def _explained_batch(self, exp):
        import torch


        mean, std = normalization_tensors(self.meta["normalize"], self.runtime.device)
        x = to_input(torch.from_numpy(exp.images).to(self.runtime.device), mean, std, channels_last=False)
        return x, torch.from_numpy(exp.targets).to(self.runtime.device)

    def sanity_check(self, exp) -> dict:
        """Model-randomisation check (Adebayo et al. 2018) of ``exp``'s method on its images."""
        from imgcls.explain.sanity import randomisation_check  # Captum: on use

        x, target = self._explained_batch(exp)
        result = randomisation_check(self.model, x, target, exp.method, exp.layer)
        return {"mean_correlation": result["mean"], "passed": result["passed"], "threshold": result["threshold"]}

    def score_explanations(self, exp) -> list[dict]:
        """Deletion AUC and randomisation check of every method on ``exp``'s images."""
        from imgcls.explain.sanity import score_methods  # Captum: on use

        x, target = self._explained_batch(exp)
        return score_methods(self.model, x, target, layer=exp.layer)


def load(path: str | Path, which: str | None = None, device: str = "auto") -> Classifier:
    """Load a run folder (its final checkpoint) or a checkpoint file as a :class:`Classifier`."""
    core = predictor.load(path, which, device)
    return Classifier(core.model, core.meta, core.runtime, core.run_dir)
