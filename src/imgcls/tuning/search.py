"""The search: every trial an ordinary run folder, reported to Optuna after every epoch.

    tune(make, train, flags, ...)
      -> the space (a file's, or the default for the config) checked with make()   before anything is written
      -> the storage and study opened and checked                                 (study.py)
      -> study.optimize(objective):
           objective(trial):  suggest params -> train(params, <study folder>, trial-<number>, on_epoch_end)
           on_epoch_end:      trial.report(metric, epoch); TrialPruned when the pruner says so
      -> after every trial: its line, study.json, trials.csv, best/config.yaml        (results.py)
      -> the leaderboard and tune.html

``make(params)`` and ``train(params, out_dir, name, on_epoch_end)`` come from
``api.tune``: a trial is what ``imgcls train`` with the study's flags and the
trial's values runs.  ``--trials N`` counts the study's finished trials
(complete, pruned, or failed by their settings), so running the same command
again, on this machine or another sharing the storage, tops the study up to N.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path

import numpy as np
import optuna

from imgcls.config import parse_duration, shown
from imgcls.errors import ConfigError, ImgclsError, TrainingError
from imgcls.evaluation.metrics import confusion_matrix, per_class_scores
from imgcls.inference import predict_proba
from imgcls.rundir import CONFIG, RUN, read_doc
from imgcls.terminal import say
from imgcls.tuning import results
from imgcls.tuning.space import (
    as_options,
    check_space,
    default_space,
    given_names,
    grid_of,
    parse_space,
    read_space,
    space_to_dict,
    space_yaml,
    suggest,
)
from imgcls.tuning.study import (
    AUTO_METRIC,
    METRICS,
    PRUNERS,
    SAMPLERS,
    default_storage,
    fail_dead_workers_trials,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    sampler_seed,
    shown_url,
    worker_id,
)

# Flags that do not change what a trial trains, left out of the study's record of its flags.
_NOT_COMPARED = ("out", "report", "track", "mlflow_uri")


class StudyError(ImgclsError):
    """The study cannot go on (not one trial's settings): it stops with this message."""


class Surplus(Exception):
    """A trial started after the study had its number of trials (by other workers): it runs nothing."""


def _surplus(trial, limit: int) -> bool:
    """Whether ``limit`` trials numbered before ``trial`` are finished or running (numbers are given out in order by
    the storage, so every worker agrees which trials are surplus)."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number
               and results.state_of(t) in ("complete", "pruned", "failed", "running")]
    return len(earlier) >= limit


def resolve_space(make, flags: dict, space=None) -> tuple[dict, str]:
    """(the space, a line saying what it is): ``space`` (a file path or a dict) checked, or the default one.

    Args:
        make: ``make(params) -> RunConfig`` (``api.make_config`` with the study's flags and ``params``).
        flags: the flat options given (unset ones None).
        space: a YAML file, a dict in its form, or None for the default space.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    base = make({})
    if space is None:
        found, why = default_space(base, fixed=given_names(given))
        title = f"default search space: {why}"
    elif isinstance(space, dict):
        found, title = parse_space(space), "search space given in Python"
    else:
        found, title = read_space(space), f"search space of {space}"
    check_space(found, make, given)
    return found, title


def tune(*, make, train, flags: dict, trials: int, timeout=None, space=None, metric: str = AUTO_METRIC,
         study: str | None = None, storage: str | None = None, sampler="tpe", pruner="median", console) -> dict:
    """Run (or continue) a study; returns its summary (:func:`imgcls.tuning.results.summarize`).

    ``sampler`` and ``pruner`` are names, or Optuna objects (Python callers).
    Everything that can be refused is refused before the study folder is made.
    """
    _check_arguments(trials, metric, sampler, pruner, flags)
    seconds = _timeout(timeout)
    base = make({})
    multilabel = _multilabel(base)
    if metric == AUTO_METRIC:
        metric = "val_map" if multilabel else "val_accuracy"
    _check_base(base, metric, multilabel)
    name = default_study_name(base.data.dataset) if study is None else study  # "" is refused, not the default
    _check_study_name(name)
    found, title = resolve_space(make, flags, space)
    grid = grid_of(found) if sampler == "grid" else None
    study_dir = Path(base.out_dir) / name
    storage = storage or os.environ.get("IMGCLS_STORAGE") or None  # a URL with a password stays off the command line
    url = storage or default_storage(study_dir)
    store = open_storage(url) if storage is not None else None  # refused before the study folder is made
    study_dir.mkdir(parents=True, exist_ok=True)
    store = store or open_storage(url)
    attrs = {"space": space_to_dict(found), "metric": metric, "flags": _recorded_flags(flags)}
    seed = base.train.seed
    with _optuna_quiet():
        seen = {}  # the study's trial count when this worker opened it

        def sampler_for(existing: int):
            seen["existing"] = existing
            return _sampler(sampler, sampler_seed(seed, existing), grid)

        opened = open_study(name, store, sampler_for, _pruner(pruner, base.train.epochs), attrs)
    context = results.Context(name=name, path=study_dir, storage=shown_url(url), metric=metric, space=found,
                              flags=attrs["flags"], sampler=_described(sampler), pruner=_described(pruner),
                              trials=trials, out_dir=base.out_dir)
    say(console, f"study {name}: {trials} trials, {metric} ({METRICS[metric]}), sampler {context.sampler}, "
                  f"pruner {context.pruner}; {title}")
    say(console, f"study folder {study_dir}; storage {context.storage}")
    say(console, f"searching: {', '.join(f'{k} {_range(p)}' for k, p in found.items())}")
    objective = make_objective(found, train, study_dir, metric, trials, flags,
                               fresh_seed=isinstance(sampler, str) and seen.get("existing") == 0)
    _run(opened, store, context, objective, seconds, console)
    if grid is not None and seconds is None and counted(opened) < trials:
        points = math.prod(len(v) for v in grid.values())
        say(console, f"note: the grid has {points} combinations and every one was tried: the study stops at "
                      f"{counted(opened)} of the {trials} trials asked")
    summary = results.write_all(opened, context, html=True)
    say(console, results.format_leaderboard(summary))
    say(console, results.closing_line(summary))
    return summary


def _check_arguments(trials, metric: str, sampler, pruner, flags: dict) -> None:
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"--trials must be a whole number of at least 1, got {shown(trials)}")
    if metric not in METRICS and metric != AUTO_METRIC:
        raise ConfigError(f"--metric {shown(metric)} is not accepted; choose one of: {AUTO_METRIC}, {', '.join(METRICS)}")
    if isinstance(sampler, str) and sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {shown(sampler)} is not accepted; choose one of: {', '.join(SAMPLERS)}")
    if isinstance(pruner, str) and pruner not in PRUNERS:
        raise ConfigError(f"--pruner {shown(pruner)} is not accepted; choose one of: {', '.join(PRUNERS)}")
    if flags.get("name") is not None:
        raise ConfigError("--name is not taken by tune: trials are named trial-<number>; name the study with --study")


def _multilabel(base) -> bool:
    """Whether the study's data gives several labels per image (a CSV of labels), from a look at its listing."""
    from imgcls.auto import probe_data  # start-up time: only tune needs it

    probe = probe_data(base.data.dataset, base.data.follow_links, base.data.labels)
    return probe is not None and probe.multilabel


def _check_base(base, metric: str, multilabel: bool = False) -> None:
    """Refuse a config no trial could be ranked by ``metric`` with."""
    if multilabel and metric == "val_macro_f1":
        raise ConfigError("val_macro_f1 ranks one class per image, and this data has several labels per image; use "
                          "--metric val_map (the default for it), val_accuracy (exact sets) or val_loss")
    if not multilabel and metric == "val_map":
        raise ConfigError("val_map ranks data with several labels per image (a CSV of labels), and this data has one "
                          "class per image; use --metric val_accuracy, val_macro_f1 or val_loss")
    if metric == "val_macro_f1" and base.train.epochs == 0:
        raise ConfigError("val_macro_f1 is measured after every epoch and --epochs 0 trains none; use --metric "
                          "val_accuracy or val_loss, or give --epochs N")
    if base.data.val_fraction == 0 and not Path(base.data.dataset).expanduser().exists():
        # A built-in dataset has no val split of its own (a folder or zip may have one: checked at its first epoch).
        whose = " (the recipe's)" if base.recipe else ""
        raise ConfigError(f"tuning ranks trials by {metric} on a validation split, and {base.data.dataset} with "
                          f"val_fraction 0{whose} has none; give --val-fraction 0.1")
    out = Path(base.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; give the folder the study goes in")


def _run(study, store, context, objective, seconds: float | None, console) -> None:
    """Run trials until the study has ``context.trials`` finished ones (or ``seconds`` have passed)."""
    gone = fail_dead_workers_trials(study, store)
    if gone:
        say(console, f"trials {', '.join(map(str, gone))} were running when their worker on this machine stopped: "
                      f"marked interrupted (their folders stay); they do not count towards --trials")
    done = counted(study)
    if done >= context.trials:
        say(console, f"the study has {done} finished trials already (--trials {context.trials}); raise --trials to "
                      f"run more")
        return
    if done:
        say(console, f"continuing: {done} of {context.trials} trials finished before")
    try:
        _optimize(study, context, objective, context.trials - done, seconds, console)
    except KeyboardInterrupt:
        results.write_all(study, context, html=False)  # the interrupted trial shows as such; run again to go on
        raise


def show_space(make, flags: dict, space=None) -> str:
    """The space a study with these flags would search, as the YAML that ``--space`` reads."""
    found, title = resolve_space(make, flags, space)
    return space_yaml(found, f"{title}\nevery key is a config field (model_option.KEY: a model option); save this, "
                             f"edit it, and give it to --space")


def _optimize(study, context, objective, n_trials: int, timeout: float | None, console) -> None:
    def after_trial(study, trial) -> None:
        if results.state_of(trial) != "surplus":
            say(console, results.trial_line(results.trial_row(trial, context.space), context))
            results.write_all(study, context, html=False)
        if counted(study) >= context.trials:
            study.stop()  # other workers may have finished trials meanwhile

    with _optuna_quiet():
        study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(ConfigError, TrainingError, Surplus),
                       callbacks=[after_trial], gc_after_trial=False)


def counted(study) -> int:
    """Finished trials: complete, pruned, and failed by their own settings (not interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if results.state_of(t) in ("complete", "pruned", "failed"))


def make_objective(space: dict, train, study_dir: Path, metric: str, limit: int, flags: dict,
                   fresh_seed: bool = False):
    """The Optuna objective: one trial trains one run folder, ``<study_dir>/trial-<number>``, with ``flags``
    (the options given: ``--model-option`` values are merged with searched ones) and the trial's values.

    A trial numbered after ``limit`` trials that are finished or running (other workers') runs nothing: it is
    marked surplus and left out of every result, so that workers sharing a study finish exactly ``limit``.

    ``fresh_seed``: the sampler was seeded with the config's seed because the study was empty when this worker
    opened it.  If another worker took trial 0 in the meantime (two workers started together), this worker's
    first trial is not 0, and its sampler is reseeded, so that the two do not draw the same values.
    """
    first = {"pending": fresh_seed}

    def objective(trial) -> float:
        if first["pending"]:
            first["pending"] = False
            if trial.number > 0:
                trial.study.sampler.reseed_rng()
        if _surplus(trial, limit):
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise Surplus(f"the study has {limit} trials before trial {trial.number}")
        params = suggest(trial, space)
        run_name = f"trial-{trial.number}"
        trial.set_user_attr("run", run_name)
        trial.set_user_attr("worker", worker_id())
        values: dict[int, float] = {}

        def on_epoch_end(state, record: dict) -> None:
            if record.get("stage") == "head":
                return  # stage 1 of a head-first run: its figure is not a training epoch's
            value = _metric(metric, state, record)
            values[record["epoch"]] = value
            trial.report(value, record["epoch"])
            if record["epoch"] < state.cfg.train.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4f} after epoch {record['epoch']}")

        try:
            run = train(as_options(params, flags), study_dir, run_name, on_epoch_end)
        except (ConfigError, TrainingError) as exc:
            trial.set_user_attr("fail_reason", " ".join(str(exc).split())[:500])
            if not (study_dir / run_name / CONFIG).is_file():
                trial.set_user_attr("run", None)  # refused before its run folder was made
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        trial.set_user_attr("config", run.config.to_dict())
        trial.set_user_attr("run", run.path.name)
        return _final_value(metric, run, values)

    return objective


def _metric(metric: str, state, record: dict) -> float:
    """The epoch's value of ``metric``: from its record, or (macro F1) computed on the val split."""
    if metric in record:
        return float(record[metric])
    ds = state.dataset
    if "val" not in ds.splits:
        raise StudyError(f"tuning picks trials by {metric} on a validation split, and the data gave none "
                         f"(val_fraction {state.cfg.data.val_fraction:g}); give --val-fraction 0.1 or a val folder")
    if metric != "val_macro_f1":
        raise StudyError(f"the epoch's record has no {metric}")
    val = ds.splits["val"]
    proba = predict_proba(state.model, val.images, state.meta["normalize"], state.runtime,
                          state.cfg.train.eval_batch_size, tta=state.meta["tta"])
    _, _, f1, _ = per_class_scores(confusion_matrix(val.labels, proba.argmax(1), ds.num_classes))
    return float(np.mean(f1))


def _final_value(metric: str, run, values: dict[int, float]) -> float:
    """The metric of the weights the run ended with: the best checkpoint's epoch (``restore_best``), else the last."""
    summary = read_doc(run.path / RUN, "the trial's training wrote it a moment ago: check the disk, then tune again")
    epoch = summary.get("best_epoch") if summary.get("final_checkpoint") == "best" else summary.get("epochs_run")
    if epoch in values:
        return values[epoch]
    record = next((r for r in run.history if r.get("epoch") == epoch), run.history[-1] if run.history else {})
    if metric not in record:
        raise StudyError(f"tuning picks trials by {metric} on a validation split, and the run {run.path} has none; "
                         f"give --val-fraction 0.1 or a val folder")
    return float(record[metric])


def _timeout(value) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ConfigError:
        raise ConfigError(f"--timeout must be a duration such as 90s, 30m or 2h, got {shown(value)}") from None


def default_study_name(dataset: str) -> str:
    """``<data>-tune``: the same command names the same study, so running it again continues it."""
    stem = Path(str(dataset)).stem if str(dataset) not in ("", ".") else "data"
    return (re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "data") + "-tune"


def _check_study_name(name) -> None:
    """A study name is a plain folder name: letters, digits, '_', '-' and '.', not first.  Anything else
    ('%2e%2e%2f', '?mode=ro', a space) could mean something else to a path or a database URL."""
    if (not isinstance(name, str) or re.fullmatch(r"\w[\w.\-]*", name) is None
            or len(name.encode("utf-8", "surrogateescape")) > 200):
        raise ConfigError(f"--study {shown(name)} is not accepted: a study name is one plain folder name inside "
                          f"--out (letters, digits, '-', '_' and '.', not first; 200 bytes at most), such as "
                          f"'digits-lr'")


def _recorded_flags(flags: dict) -> dict:
    out = {}
    for key, value in flags.items():
        if value is None or key in _NOT_COMPARED:
            continue
        out[key] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return out


def _sampler(sampler, seed: int, grid):
    return make_sampler(sampler, seed, grid) if isinstance(sampler, str) else sampler


def _pruner(pruner, epochs: int):
    return make_pruner(pruner, epochs) if isinstance(pruner, str) else pruner


def _described(obj) -> str:
    return obj if isinstance(obj, str) else type(obj).__name__


def _range(p) -> str:
    if p.kind == "categorical":
        return "{" + ", ".join(map(str, p.choices)) + "}"
    return f"[{p.low:g}, {p.high:g}]" + (" log" if p.log else "") + (f" step {p.step:g}" if p.step else "")


@contextlib.contextmanager
def _optuna_quiet():
    """Optuna's own log lines off for the study (imgcls prints one line per trial), then as they were."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)

