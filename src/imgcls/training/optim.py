"""Optimisers, learning-rate schedules and early stopping.

Schedules are pure functions of the step (plus, for ``plateau``, a small state
of plain numbers), so a resumed run sets exactly the learning rate that an
uninterrupted one would, and their state fits in a checkpoint's JSON.
"""

from __future__ import annotations

import math

import torch

from imgcls.errors import ConfigError, unknown_name

# Metrics where larger is better; every other monitored metric is minimised.
_MAXIMISED = ("val_accuracy", "train_accuracy")


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """Build the optimiser named by ``cfg.optimizer`` (a TrainConfig)."""
    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "rmsprop":
        # Keras' RMSprop defaults: rho 0.9, eps 1e-7; momentum only when asked for.
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, eps=1e-7, momentum=cfg.momentum if cfg.momentum else 0.0,
                                   weight_decay=cfg.weight_decay)
    raise unknown_name("optimizer", name, ("sgd", "adam", "adamw", "rmsprop"))


class LRSchedule:
    """Learning rate per optimiser step: warmup, then the named schedule.

    Args:
        cfg: TrainConfig (lr, schedule, warmup_epochs, step_size, gamma, min_lr,
            plateau_patience, plateau_factor, epochs).
        steps_per_epoch: optimiser steps in one epoch.
    """

    def __init__(self, cfg, steps_per_epoch: int):
        if cfg.schedule not in ("constant", "step", "cosine", "onecycle", "plateau"):
            raise unknown_name("schedule", cfg.schedule, ("constant", "step", "cosine", "onecycle", "plateau"))
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total = max(1, cfg.epochs * steps_per_epoch)
        warm = cfg.warmup_epochs
        if cfg.schedule == "onecycle" and warm == 0:
            warm = 0.3 * cfg.epochs  # PyTorch's OneCycleLR default pct_start
        self.warmup = int(round(warm * steps_per_epoch))
        self.plateau_scale = 1.0  # multiplied by plateau_factor on each plateau
        self.plateau_best: float | None = None
        self.plateau_bad = 0

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based)."""
        cfg = self.cfg
        if self.warmup and step < self.warmup:
            start = cfg.lr / 25.0 if cfg.schedule == "onecycle" else 0.0
            return start + (cfg.lr - start) * (step + 1) / self.warmup
        if cfg.schedule == "constant":
            return cfg.lr
        if cfg.schedule == "step":
            return cfg.lr * cfg.gamma ** (step // self.steps_per_epoch // cfg.step_size)
        if cfg.schedule == "plateau":
            return max(cfg.lr * self.plateau_scale, cfg.min_lr)
        # cosine and onecycle anneal from lr to min_lr over the steps after warmup.
        floor = cfg.min_lr if cfg.min_lr > 0 or cfg.schedule == "cosine" else cfg.lr / 1e4
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_epoch(self, metrics: dict) -> None:
        """Plateau bookkeeping: decay when the monitored metric stalls."""
        if self.cfg.schedule != "plateau":
            return
        value = metrics[self.cfg.monitor]
        if self.plateau_best is None or is_improvement(self.cfg.monitor, value, self.plateau_best, 0.0):
            self.plateau_best, self.plateau_bad = value, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad >= self.cfg.plateau_patience:  # Keras' ReduceLROnPlateau counts this way
            self.plateau_scale *= self.cfg.plateau_factor
            self.plateau_bad = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale = state["plateau_scale"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]


def is_improvement(monitor: str, value: float, best: float | None, min_delta: float) -> bool:
    if best is None:
        return True
    if monitor in _MAXIMISED:
        return value > best + min_delta
    return value < best - min_delta


class EarlyStopping:
    """Keras-style early stopping on one monitored metric."""

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best: float | None = None
        self.best_epoch = -1
        self.wait = 0

    def update(self, epoch: int, metrics: dict) -> bool:
        """Record an epoch; return True when this epoch is the best so far."""
        value = metrics[self.monitor]
        if is_improvement(self.monitor, value, self.best, self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True
        self.wait += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.wait >= self.patience  # as Keras: patience epochs without improvement

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]


def class_weight_tensor(spec, labels, num_classes: int) -> torch.Tensor | None:
    """Loss weights per class: None, 'balanced' (n / (k * count)) or an explicit list."""
    if spec is None:
        return None
    if spec == "balanced":
        counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
        weights = len(labels) / (num_classes * counts.clamp_min(1))
        return weights.float()
    if len(spec) != num_classes:
        raise ConfigError(f"class_weights has {len(spec)} values but the dataset has {num_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)
