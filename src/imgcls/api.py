"""The Python API: what the CLI calls, usable from a notebook.

    run = imgcls.train(data="photos.zip", model="resnet20", epochs=20)
    clf = imgcls.load(run.path)            # or imgcls.load("runs/photos-resnet20-...")
    clf.predict(["cat.jpg", pil_image, array])
    clf.evaluate()                         # the run's own test split
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgcls import driver, predictor, rundir
from imgcls import update as updating
from imgcls.config import RunConfig
from imgcls.driver import make_config  # re-exported: the face of the package
from imgcls.errors import ConfigError, DataError
from imgcls.evaluation.evaluate import evaluate_model
from imgcls.evaluation.metrics import save_metrics
from imgcls.inference import normalization_tensors, to_input
from imgcls.predictor import Predictor  # noqa: F401 (re-exported: the face of the package)
from imgcls.startup import keep_freed_memory  # also the opt-in of library users
from imgcls.terminal import say
from imgcls.tracking import Group
from imgcls.training.callbacks import EpochEnd

INSPECT_MIN_SIDE = 64  # px: small images (digits, CIFAR) are inspected at least this large


class Run(driver.Finished):
    """A finished (or interrupted) training run: ``path``, ``config``, ``history``, ``test_metrics``."""

    def load(self, which: str | None = None, device: str = "auto") -> Classifier:
        return load(self.path, which=which, device=device)

    def __repr__(self) -> str:
        acc = self.test_metrics.get("accuracy")
        return f"Run({str(self.path)!r}, epochs={len(self.history)}, test_accuracy={acc})"


def _console(quiet: bool):
    from imgcls.terminal import console  # rich: on use

    return console(quiet)


def train(config=None, *, resume: str | Path | None = None, quiet: bool = False, update: str | Path | None = None,
          console=None, on_epoch_end=None, callbacks=(), trial: tuple[str, int] | None = None, **overrides) -> Run:
    """Train a model and return its :class:`Run`.

    Args:
        config: a YAML path, dict or RunConfig (default: the built-in digits).
        resume: a run folder to continue from its last checkpoint; only
            ``epochs`` may be raised when resuming.
        update: a run folder trained head-first (stage 1 only) to update with the photos in ``data`` (one
            folder per class: new classes, more photos of its own, or both): a new run, its classifier refitted
            in seconds on the frozen features of the old and new images (see :mod:`imgcls.update`); ``out``,
            ``name`` and ``report`` may be given beside it, every other setting is the run's.
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
    if update is not None:
        if config is not None or resume is not None:
            raise ConfigError(f"an update keeps the settings of the run it updates ({update}); give it without "
                              f"{'a config' if config is not None else 'resume'}")
        finished = updating.update_run(update, overrides, console)
        return Run(finished.path, finished.config, finished.history, finished.test_metrics)
    finished = driver.train_run(config, overrides, console, resume=resume,
                                callbacks=[*callbacks, EpochEnd(on_epoch_end) if on_epoch_end else None],
                                group=None if trial is None else Group("study", *trial))
    return Run(finished.path, finished.config, finished.history, finished.test_metrics)


def cross_validate(config=None, folds: int = 5, *, out_dir: str | Path | None = None, quiet: bool = False,
                   console=None, **overrides) -> dict:
    """Stratified k-fold cross-validation of ``config`` (as :func:`train` takes it) with ``folds`` folds.

    Each fold is an ordinary run folder inside the cv folder (default
    ``<out>/<name>-cv<K>``), beside cv.json, cv.csv, folds.npz and report.html.

    Returns:
        cv.json's content: per_fold figures, their mean and std, sizes, and ``path``.
    """
    from imgcls.reports.cv import write_cv_page  # matplotlib: on use

    keep_freed_memory()  # an entry point: see imgcls.startup
    console = console or _console(quiet)
    out_dir = None if out_dir is None else Path(out_dir)
    cfg = make_config(config, **overrides)
    result = driver.cross_validate(cfg, folds, console, out_dir=out_dir)
    write_cv_page(result, Path(result["path"]))
    say(console, f"cross-validation folder: {result['path']}")
    return result


def inspect(data: str | Path, *, name: str | None = None, folds: int = 5, quiet: bool = False, console=None,
            **overrides) -> dict:
    """The problems of the images in ``data`` (a folder or zip, in any layout ``train(data=...)`` takes), before
    anyone trains on it: exact and near duplicates, copies across splits (leakage) and across classes, likely
    label errors, outliers, dark, bright, flat, blurry and grey images, and the balance of the classes.

    Writes ``<out>/<name>`` (default ``runs/<data>-inspect``): inspect.json, issues.csv (for ``train(exclude=)``),
    inspect.html and oof.npz (the out-of-fold probabilities of the label check).

    Args:
        name: the inspection's folder (default ``<data>-inspect``, ``-2``, ... when taken).
        folds: folds of the label check (k-fold probabilities of a linear classifier on frozen features).
        **overrides: flat options as :func:`train` takes them that decide how the images are read and seen:
            ``model``, ``image_size``, ``out``, ``cache``, ``val_fraction``, ``seed``, ...

    Returns:
        inspect.json's content: ``findings`` (records with ``problem``, ``file``, ``split``, ``label``, ``score``,
        ``suggested_label``, ``paired_file``, ``detail``), ``summary``, ``counts``, ``skipped``, ``path``.
    """
    from imgcls import inspection  # start-up time: the features and the page

    keep_freed_memory()  # an entry point: see imgcls.startup
    console = console or _console(quiet)
    cfg = make_config(data=str(data), **overrides)
    if not cfg.model.weights:  # small images train from scratch; they are inspected on ImageNet features
        size = overrides.get("image_size") or [max(INSPECT_MIN_SIDE, cfg.data.image_size[0] if cfg.data.image_size
                                                   else 0)] * 2
        cfg = make_config(data=str(data), **{**overrides, "model": "efficientnet_lite0", "pretrained": "imagenet",
                                             "image_size": size})
    return inspection.inspect(cfg, console, Path(cfg.out_dir), name, folds)


def tune(config=None, *, trials: int = 20, timeout: str | float | None = None, space=None,
         metric: str = "auto", study: str | None = None, storage: str | None = None, sampler="tpe",
         pruner="median", quiet: bool = False, console=None, **overrides) -> dict:
    """Search hyperparameters with Optuna: ``trials`` runs of ``config`` (as :func:`train` takes it), each with
    values drawn from ``space``, in the study folder ``<out>/<study>``.

    Args:
        trials: the study's finished trials to reach (complete, pruned, or failed by their settings); running
            the same call again continues the study up to that number.
        timeout: stop starting trials after this long (``"30m"``, seconds).
        space: a YAML file or a dict mapping config fields to ranges or choices (see
            :mod:`imgcls.tuning.space`); default: the default space for the config.
        metric: ``val_accuracy`` (maximised), ``val_loss`` (minimised), ``val_macro_f1`` (maximised) or
            ``val_map`` (maximised; several labels per image), reported after every epoch for the pruner;
            ``auto``: ``val_map`` for data with a CSV of labels, else ``val_accuracy``.
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
    info = rundir.read_doc(best_run / rundir.RUN, f"tune again, or retrain {best_run} by hand")
    best = make_config(summary["best_config"])
    epochs = best.train.epochs if info.get("best_epoch") is None else int(info["best_epoch"])
    epochs = epochs if best.train.head_first else max(epochs, 1)  # a head-first run may train its head alone
    cfg = make_config(best, val_fraction=0.0, early_stopping=False, epochs=epochs,
                      out=str(Path(summary["path"])), name="best-retrained")
    say(console, f"retraining the best trial ({best_run.name}) on train + val for {cfg.train.epochs} epochs, then "
                 f"the test split once")
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


class Classifier(predictor.TorchPredictor):
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
        if target == "true" and self.multilabel:
            raise ConfigError("target 'true' reads each image's class from its folder, and a multi-label model's "
                              "images carry their labels in a CSV; name the labels to explain instead "
                              f"(for example --target {','.join(self.classes[:2])}: one map per label)")
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
