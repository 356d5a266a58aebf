"""The Optuna storage and study: opened, and checked, before any trial.

By default a study lives in ``<study folder>/study.db`` (SQLite): running the
same ``imgcls tune`` command again continues it.  ``--storage URL`` takes any
SQLAlchemy URL Optuna accepts (``postgresql://user:pass@host/db``), so workers
on several machines can join one study by running the same command.

A study remembers what it searches (user attributes): the space, the metric
and the training flags.  Joining it with another space, metric or flags is
refused, since its trials would not be comparable.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

import optuna

from imgcls.config import shown
from imgcls.errors import ConfigError, hide_secrets
from imgcls.errors import shown_url as errors_shown_url

DB = "study.db"
METRICS = {"val_accuracy": "maximize", "val_loss": "minimize", "val_macro_f1": "maximize", "val_map": "maximize"}
AUTO_METRIC = "auto"  # val_map for data with several labels per image, else val_accuracy
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
# A worker writes a heartbeat every HEARTBEAT s while a trial runs; a trial whose heartbeat is older than GRACE s
# (its worker was killed) is marked failed by the next worker that starts a trial.
HEARTBEAT, GRACE = 30, 120


def default_storage(study_dir: Path) -> str:
    """The SQLite URL of ``study_dir``'s study.db, built from the path (a '?', '%' or '#' in a folder name
    stays part of the path, not a URL's query or escape)."""
    from sqlalchemy.engine import URL  # optuna's own dependency

    return URL.create("sqlite", database=str(Path(study_dir).resolve() / DB)).render_as_string(hide_password=False)


def shown_url(url: str) -> str:
    """``url`` with its credentials hidden (a password after ``user:`` and in the query), for messages and
    study.json; cut short when it is long."""
    text = errors_shown_url(url)
    return text if len(text) <= 300 else shown(text)


def open_storage(url: str):
    """An Optuna RDBStorage for ``url``; ConfigError in one line when the URL or the database cannot be used."""
    from sqlalchemy.engine import make_url  # optuna's own dependency
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    hint = "give sqlite:///FILE, postgresql://USER:PASSWORD@HOST/DATABASE or another SQLAlchemy URL"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as exc:  # ValueError: a port that is not a number
        port = " (its port is not a number)" if isinstance(exc, ValueError) and "int()" in str(exc) else ""
        raise ConfigError(f"--storage {shown_url(url)} is not a database URL{port}; {hint}") from None
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"--storage {shown_url(url)}: unknown database kind {parsed.drivername!r}; {hint}") from None
    kind = parsed.get_backend_name()
    if kind == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"--storage {shown_url(url)} is a database in memory, which keeps nothing and no other "
                          f"worker can join; give sqlite:///FILE (or leave --storage out for the study folder's)")
    connect = {"sqlite": {"timeout": 60}, "postgresql": {"connect_timeout": 10},
               "mysql": {"connect_timeout": 10}}.get(kind, {})
    try:
        return _rdb_storage(url, connect)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--storage {shown_url(url)}: its database driver {exc.name!r} is not installed; for "
                          f"PostgreSQL pip install 'psycopg[binary]' and write postgresql+psycopg://...") from None
    except Exception as exc:  # noqa: BLE001 (any driver's error: reported in one line)
        said = hide_secrets(" ".join(str(exc).split()), url)
        if parsed.password:
            said = said.replace(str(parsed.password), "***")
        said = said[:300] or type(exc).__name__
        raise ConfigError(f"--storage {shown_url(url)}: the database cannot be opened ({said})") from None


def sampler_seed(seed: int, trials: int) -> int:
    """The sampler's seed: ``seed`` for a new study; for one that has trials, another stream for this worker, so that
    a continued study does not draw its first values again."""
    if trials == 0:
        return seed
    return (seed * 1_000_003 + trials * 7_919 + os.getpid()) % 2**32


def _rdb_storage(url: str, connect: dict):
    """RDBStorage(url); when two workers create the tables of a new database at once, the second tries again."""
    from sqlalchemy.exc import DatabaseError, IntegrityError  # optuna's own dependency

    for wait in (1.0, 2.0, 4.0, None):  # seconds: the other worker's tables are there by then
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 4 and 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect},
                                                  heartbeat_interval=HEARTBEAT, grace_period=GRACE)
        except DatabaseError as exc:
            # Both workers saw no tables and one made them first: "already exists", a duplicate key (the version
            # row, PostgreSQL's type of a table), or SQLite's lock while it did.
            racing = isinstance(exc, IntegrityError) or any(
                words in str(exc) for words in ("already exists", "duplicate key", "database is locked"))
            if wait is None or not racing:
                raise
            time.sleep(wait)


def make_sampler(name: str, seed: int, grid: dict | None = None):
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ConfigError(f"--sampler {shown(name)} is not accepted; choose one of: {', '.join(SAMPLERS)}")


def make_pruner(name: str, epochs: int):
    """The pruner ``name``; it sees the metric after every epoch (steps 1 to ``epochs``)."""
    if name == "median":
        # Five trials run to the end before any is pruned; a trial is stopped when its metric after an epoch is
        # worse than the median of the finished trials' after the same epoch.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {shown(name)} is not accepted; choose one of: {', '.join(PRUNERS)}")


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


ATTR = "imgcls"  # the study's user attribute holding what it searches, set in one write


def open_study(name: str, storage, sampler_for, pruner, attrs: dict):
    """Create study ``name`` in ``storage``, or load it when it exists and ``attrs`` match what it was made with.

    Args:
        sampler_for: ``sampler_for(trials)`` -> the sampler, given the number of trials the study has already.
        attrs: what the study searches (``space``, ``metric``, ``flags``), kept as one user attribute.
    """
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        study_id = None
    if study_id is None:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler_for(0), pruner=pruner,
                                    direction=METRICS[attrs["metric"]], load_if_exists=True)  # another may be first
        study_id = storage.get_study_id_from_name(name)
    else:
        sampler = sampler_for(len(storage.get_all_trials(study_id, deepcopy=False)))
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    have = storage.get_study_user_attrs(study_id).get(ATTR)
    if have is None:
        # A new study, or one whose maker has not written its attribute yet (it does before its first trial).
        if storage.get_all_trials(study_id, deepcopy=False):
            raise ConfigError(f"study {name!r} in this storage was not made by imgcls tune; give another --study name")
        study.set_user_attr(ATTR, attrs)
    else:
        _check_attrs(name, have, attrs)
    return study


def _check_attrs(name: str, have: dict, want: dict) -> None:
    for key, what in (("space", "search space"), ("metric", "metric"), ("flags", "training flags")):
        if not _same(have.get(key), want[key]):
            theirs, ours = have.get(key), want[key]
            if isinstance(theirs, dict) and isinstance(ours, dict):
                differ = sorted(k for k in set(theirs) | set(ours) if not _same(theirs.get(k), ours.get(k)))
                detail = f"they differ in {', '.join(differ)}"
            else:
                detail = f"it has {shown(theirs)}, this command {shown(ours)}"
            raise ConfigError(f"study {name!r} was made with another {what} ({detail}); run it with the same one "
                              f"to continue it, or give another --study name")


def worker_id() -> list:
    """[host, PID] of this process, kept with each trial it runs."""
    return [socket.gethostname(), os.getpid()]


def fail_dead_workers_trials(study, storage) -> list[int]:
    """Mark failed the running trials of workers on this machine that are gone (killed); their numbers.

    Trials of other machines are left to the heartbeat (GRACE seconds after their last beat).
    """
    host, numbers = socket.gethostname(), []
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if not (isinstance(worker, list) and len(worker) == 2 and worker[0] == host) or _alive(worker[1]):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
            numbers.append(t.number)
    return numbers


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # another user's process, or not a PID: leave it to the heartbeat
    return True
