"""What a study leaves in its folder, and the lines it prints.

    <out>/<study>/
      study.db            the Optuna storage (SQLite), unless --storage names another
      trial-<n>/          each trial's run folder (a pruned one keeps its folder; a refused one has none)
      study.json          the summary: metric, space, flags, counts by state, the best trial, every trial
      trials.csv          one row per trial: state, metric, seconds, epochs, parameters, run, reason
      best/config.yaml    the best trial's full config: ``imgcls train --config`` repeats it as a new run
      tune.html           optimisation history, parameter importances, parallel coordinates, a slice plot per
                          parameter, the leaderboard and the space (figures: tuning/figures.py)

study.json, trials.csv and best/config.yaml are rewritten after every trial,
so a study stopped at any moment leaves them current; tune.html when a
worker finishes.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna

from imgcls.config import config_from_dict, dump_config
from imgcls.io import write_atomic, write_json
from imgcls.reports.html import Section, render_page, table
from imgcls.tuning import figures
from imgcls.tuning.space import space_to_dict
from imgcls.tuning.study import METRICS

STUDY_JSON = "study.json"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best/config.yaml"
PAGE = "tune.html"
_ORDER = {"complete": 0, "pruned": 1, "failed": 2, "interrupted": 3, "running": 4, "waiting": 5}


@dataclass
class Context:
    """What a study is: its name and folder, where it is stored, and what it searches."""

    name: str
    path: Path
    storage: str  # the URL, password hidden
    metric: str
    space: dict
    flags: dict
    sampler: str
    pruner: str
    trials: int  # the finished trials the study is run to
    out_dir: str  # where best/config.yaml's repeat goes


def state_of(trial) -> str:
    """complete, pruned, failed (by its own settings: it has a reason), interrupted (its worker stopped), running;
    surplus (started when the study had its trials: it ran nothing and is left out of the results)."""
    state = trial.state
    if state == optuna.trial.TrialState.FAIL:
        attrs = trial.user_attrs
        if attrs.get("surplus"):
            return "surplus"
        return "failed" if attrs.get("fail_reason") and not attrs.get("interrupted") else "interrupted"
    return {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned",
            optuna.trial.TrialState.RUNNING: "running"}.get(state, state.name.lower())


def finite(value) -> float | None:
    """``value`` as a float when it is a finite number, else None (JSON has no NaN)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trial_row(trial, space: dict | None = None) -> dict:
    """One trial as study.json and trials.csv hold it; its parameters as ``space`` gives them (a list choice,
    which Optuna stores as text, as the list)."""
    state = state_of(trial)
    steps = trial.intermediate_values
    value = trial.value if state == "complete" else (steps[max(steps)] if state == "pruned" and steps else None)
    seconds = None
    if trial.datetime_start and trial.datetime_complete:
        seconds = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 2)
    reason = trial.user_attrs.get("fail_reason", "")
    if state == "pruned":
        reason = f"pruned after epoch {max(steps)}" if steps else "pruned"
    elif state == "interrupted":
        reason = "interrupted: its worker stopped before the trial finished"
    return {"trial": trial.number, "state": state, "value": finite(value), "seconds": seconds, "epochs": len(steps),
            "params": {k: space[k].decode(v) if k in (space or {}) else v for k, v in trial.params.items()},
            "run": trial.user_attrs.get("run"), "reason": reason}


def _ranked(rows: list[dict], direction: str) -> list[dict]:
    sign = -1.0 if direction == "maximize" else 1.0
    return sorted(rows, key=lambda r: (_ORDER.get(r["state"], 9), math.inf if r["value"] is None else sign * r["value"],
                                       r["trial"]))


def summarize(study, context: Context) -> dict:
    """The summary of ``study`` (study.json's content): counts by state, the best trial, every trial."""
    direction = METRICS[context.metric]
    rows = [trial_row(t, context.space) for t in study.get_trials(deepcopy=False) if state_of(t) != "surplus"]
    counts = Counter(r["state"] for r in rows)
    complete = [r for r in _ranked(rows, direction) if r["state"] == "complete" and r["value"] is not None]
    best = complete[0] if complete else None
    return {
        "study": context.name, "path": str(context.path), "storage": context.storage, "metric": context.metric,
        "direction": direction, "sampler": context.sampler, "pruner": context.pruner,
        "trials_target": context.trials, "finished": sum(counts[s] for s in ("complete", "pruned", "failed")),
        "counts": {s: counts.get(s, 0) for s in ("complete", "pruned", "failed", "interrupted", "running")},
        "best_trial": None if best is None else best["trial"],
        "best_value": None if best is None else best["value"],
        "best_params": None if best is None else best["params"],
        "best_run": None if best is None or not best["run"] else str(context.path / best["run"]),
        "best_config": None if best is None else str(context.path / BEST_CONFIG),
        "space": space_to_dict(context.space), "flags": context.flags, "trials": rows,
    }


def write_all(study, context: Context, html: bool) -> dict:
    """Write study.json, trials.csv, best/config.yaml (and tune.html when ``html``); returns the summary."""
    summary = summarize(study, context)
    if summary["best_trial"] is not None:
        config = _config_of(study, summary["best_trial"])
        if config is None:
            summary["best_config"] = None
        else:
            write_atomic(context.path / BEST_CONFIG, best_config_text(config, context.out_dir))
    write_json(context.path / STUDY_JSON, summary)
    write_atomic(context.path / TRIALS_CSV, trials_csv(summary, context))
    if html:
        write_page(summary, context, study)
    return summary


def _config_of(study, number: int) -> dict | None:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t.user_attrs.get("config")
    return None


def best_config_text(config: dict, out_dir: str) -> str:
    """The best trial's config as an ordinary run's: no name (a new one is made), the runs go to ``out_dir``,
    with its report."""
    cfg = config_from_dict({k: v for k, v in config.items() if k not in ("name",)})
    cfg = dataclasses.replace(cfg, name=None, out_dir=str(out_dir), report=True)
    return ("# the best trial's config: `imgcls train --config <this file>` trains it again as a new run\n"
            + dump_config(cfg))


def trials_csv(summary: dict, context: Context) -> str:
    names = list(context.space)
    for r in summary["trials"]:
        names += [k for k in r["params"] if k not in names]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", "state", summary["metric"], "seconds", "epochs", *names, "run", "reason"])
    for r in sorted(summary["trials"], key=lambda r: r["trial"]):
        writer.writerow([r["trial"], r["state"], "" if r["value"] is None else r["value"],
                         "" if r["seconds"] is None else r["seconds"], r["epochs"],
                         *(r["params"].get(k, "") for k in names), r["run"] or "", r["reason"]])
    return buf.getvalue()


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_line(row: dict, context: Context) -> str:
    """The live line of a finished trial: number, state, metric, parameters, seconds, and why it stopped."""
    value = "-" if row["value"] is None else f"{row['value']:.4f}"
    params = " ".join(f"{k}={_value_text(v)}" for k, v in row["params"].items())
    seconds = "" if row["seconds"] is None else f"  {row['seconds']:.1f}s"
    reason = f"  ({row['reason']})" if row["reason"] and row["state"] != "complete" else ""
    return f"trial {row['trial']:>3}  {row['state']:<9} {context.metric} {value}  {params}{seconds}{reason}"


def format_leaderboard(summary: dict) -> str:
    """The trials best first (then pruned, failed, interrupted) as a text table."""
    rows = _ranked(summary["trials"], summary["direction"])
    names = list(summary["space"])
    for r in rows:
        names += [k for k in r["params"] if k not in names]
    header = ["trial", "state", summary["metric"], "seconds", *names]
    body = [[str(r["trial"]), r["state"], "-" if r["value"] is None else f"{r['value']:.4f}",
             "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
             *(_value_text(r["params"][k]) if k in r["params"] else "" for k in names)] for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) if i < 4 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in [header, *body]]
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n)
    return "\n".join([f"leaderboard of study {summary['study']} ({counts or 'no trials'}):", *lines])


def closing_line(summary: dict) -> str:
    if summary["best_trial"] is None:
        return f"no trial completed; study folder {summary['path']}"
    params = " ".join(f"{k}={_value_text(v)}" for k, v in summary["best_params"].items())
    repeat = (f"; repeat it with `imgcls train --config {summary['best_config']}`" if summary["best_config"] else "")
    return (f"best: trial {summary['best_trial']}, {summary['metric']} {summary['best_value']:.4f} ({params}), "
            f"run folder {summary['best_run']}{repeat}")


def write_page(summary: dict, context: Context, study) -> Path:
    """tune.html: the study in numbers, its optimisation history, parameter importances, parallel coordinates and
    slice plots, leaderboard and space."""
    shown = [("tune_history", figures.history_figure(summary))]
    importances = _importances(study)
    if importances:
        shown.append(("tune_importance", figures.importance_figure(importances)))
    best = "no trial completed" if summary["best_trial"] is None else (
        f"best: trial {summary['best_trial']}, {summary['metric']} {summary['best_value']:.4f}")
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n) or "no trials"
    rows = _ranked(summary["trials"], summary["direction"])
    names = list(summary["space"])
    board = table(["trial", "state", summary["metric"], "seconds", "epochs", *names, "run", "reason"],
                  [[r["trial"], r["state"], "-" if r["value"] is None else r["value"],
                    "-" if r["seconds"] is None else r["seconds"], r["epochs"],
                    *(_value_text(r["params"][k]) if k in r["params"] else "" for k in names), r["run"] or "",
                    r["reason"]] for r in rows])
    space = table(["field", "search"], [[k, str(v)] for k, v in summary["space"].items()])
    sections = [
        Section("Study", paragraphs=[
            html.escape(f"{summary['metric']} ({summary['direction']}), sampler {summary['sampler']}, pruner "
                        f"{summary['pruner']}; {counts}; {best}."),
            html.escape(f"storage: {summary['storage']}")], figures=shown),
        parameters_section(summary, context.space),
        Section("Leaderboard", tables=[board]),
        Section("Search space", tables=[space]),
    ]
    return render_page(f"imgcls tune: {summary['study']}", sections, context.path, page_name=PAGE)


def _importances(study) -> dict:
    """Optuna's parameter importances, or {} when there are too few complete trials (or it cannot compute them)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3 or not any(len(t.params) for t in complete):
        return {}
    try:
        with warnings.catch_warnings():  # too few trials to tell the parameters apart: equal importances, said once
            warnings.simplefilter("ignore", UserWarning)
            return dict(optuna.importance.get_param_importances(study))
    except Exception:  # noqa: BLE001 (a figure of the page: the study's results stand without it)
        return {}


def figure_stem(name: str) -> str:
    """The file stem of parameter ``name``'s slice plot (also its image's alt text in tune.html)."""
    return "tune_slice_" + re.sub(r"[^A-Za-z0-9_]+", "_", name)


def parameters_section(summary: dict, space: dict) -> Section:
    """The parallel-coordinates plot and one slice plot per parameter, or a line saying why there are none."""
    rows = summary["trials"]
    complete, pruned = (len(figures.valued(rows, (s,))) for s in ("complete", "pruned"))
    left_out = sum(1 for r in rows if r["state"] in ("failed", "interrupted", "running"))
    if not complete + pruned:
        return Section("Parameters", paragraphs=[html.escape(
            f"no trial has a {summary['metric']} yet ({left_out} failed, interrupted or running): no parallel "
            f"coordinates or slice plots")])
    said = (f"Parallel coordinates: the {complete} complete trials, one line each, coloured by {summary['metric']}. "
            f"Slice plots: {summary['metric']} against each parameter, complete trials as dots, {pruned} pruned as "
            f"grey crosses at their value when stopped (an earlier epoch's); log-scaled ranges on a log axis, "
            f"choices as categories. Failed, interrupted and running trials have no value and are left out "
            f"({left_out}).")
    shown = [("tune_parallel", figures.parallel_figure(summary, space))] if complete else []
    shown += [(figure_stem(name), figures.slice_figure(summary, name, param)) for name, param in space.items()]
    return Section("Parameters", paragraphs=[html.escape(said)], figures=shown)
