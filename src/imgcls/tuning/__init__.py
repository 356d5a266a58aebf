"""Hyperparameter search on Optuna: ``imgcls tune``.

    space.py     search spaces: the default one for a config, a YAML file of one, checked before any trial
    study.py     the Optuna storage and study (SQLite in the study folder by default), checked before any trial
    search.py    the objective (each trial an ordinary run folder) and the loop over trials
    results.py   study.json, trials.csv, best/config.yaml, tune.html and the leaderboard

The package sits below ``api``: the functions that make a config and train a
run come in as arguments (``api.tune`` passes its own), so a trial is exactly
what ``imgcls train`` with the trial's flags would run.
"""
