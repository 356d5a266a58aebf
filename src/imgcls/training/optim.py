"""Optimisers, learning-rate schedules and early stopping.

Schedules are pure functions of the step (plus, for ``plateau``, a small state
of plain numbers), so a resumed run sets exactly the learning rate that an
uninterrupted one would, and their state fits in a checkpoint's JSON.
"""

from __future__ import annotations

import importlib
import math
import sys
import threading

import torch

from imgcls.config import OPTIMIZERS, SCHEDULES
from imgcls.errors import CheckpointError, ConfigError, unknown_name
from imgcls.models.pretrained import classifier_layer

# Metrics where larger is better; every other monitored metric is minimised.
_MAXIMISED = ("val_accuracy", "train_accuracy", "val_map")


_NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def param_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """The trainable parameters, with normalisation layers' in a group of their own when
    ``cfg.norm_lr_scale`` is not 1.

    Each group carries ``lr_scale`` (read by :meth:`LRSchedule.apply`); the
    normalisation group's weight decay is divided by the scale, so that the
    decay per step (lr x wd) stays that of every other parameter.
    """
    scale = cfg.norm_lr_scale
    norm_ids = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters(recurse=False)
                if scale != 1.0}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = []
    if cfg.optimizer == "muon":  # convolution filters go to Muon, at their own learning rate and momentum
        filters = [p for p in trainable if p.ndim == 4]
        trainable = [p for p in trainable if p.ndim != 4]
        if filters:
            groups.append({"params": filters, "lr_scale": cfg.muon_lr / cfg.lr, "muon": True,
                           "momentum": cfg.muon_momentum, "weight_decay": 0.0})
    backbone_scale = getattr(cfg, "backbone_lr_scale", 1.0)
    if backbone_scale != 1.0:  # a pretrained backbone fine-tuned under its new classifier's learning rate
        classifier = {id(p) for p in classifier_layer(model)[1].parameters()}
        backbone = [p for p in trainable if id(p) not in classifier]
        trainable = [p for p in trainable if id(p) in classifier]
        if backbone:
            groups.append({"params": backbone, "lr_scale": backbone_scale})
    norm = [p for p in trainable if id(p) in norm_ids]
    other = [p for p in trainable if id(p) not in norm_ids]
    if other:
        groups.append({"params": other, "lr_scale": 1.0})
    if norm:
        groups.append({"params": norm, "lr_scale": scale, "weight_decay": cfg.weight_decay / scale})
    return groups


def import_dynamo_in_background() -> None:
    """Start importing ``torch._dynamo`` on a daemon thread, if nothing has yet.

    Every torch optimiser imports it the first time one is built (their methods
    are wrapped in ``torch._disable_dynamo``): about 1.4 s on the 2-core CPU,
    before the first training step.  ``train`` starts this before it loads the
    data when the run uses a torch optimiser (:class:`Muon` needs no dynamo),
    so the import overlaps reading the images; building the optimiser then
    waits, on Python's import lock, for whatever is left of it.  A failed
    import here is dropped: the optimiser imports again and reports the error.
    """
    if "torch._dynamo" not in sys.modules:
        threading.Thread(target=_import_quietly, args=("torch._dynamo",), name="imgcls-import-dynamo",
                         daemon=True).start()


def _import_quietly(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - the main thread's own import reports it
        pass


def build_optimizer(params, cfg, bf16: bool = False) -> torch.optim.Optimizer | Muon:
    """Build the optimiser named by ``cfg.optimizer`` (a TrainConfig) over ``params``
    (parameters or :func:`param_groups`).

    ``bf16``: whether the device computes bf16 natively (``Runtime.bf16``); Muon
    then orthogonalises in bf16, and in fp32 otherwise.
    """
    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "muon":
        return Muon(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                    dtype=torch.bfloat16 if bf16 else torch.float32)
    if name == "rmsprop":
        # Keras' RMSprop defaults: rho 0.9, eps 1e-7; momentum only when asked for.
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, eps=1e-7, momentum=cfg.momentum if cfg.momentum else 0.0,
                                   weight_decay=cfg.weight_decay)
    raise unknown_name("optimizer", name, OPTIMIZERS)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix to ``g`` (2-D): U V^T of its SVD.

    The quintic Newton-Schulz iteration of Keller Jordan's Muon, computed in
    ``dtype``: bf16 where the device multiplies bf16 natively (a CUDA GPU, a
    CPU with AVX512-BF16 or AMX), fp32 elsewhere, where a bf16 matrix product
    falls to a slow reference kernel (the optimiser chooses; see
    :func:`build_optimizer`).  Its coefficients push small singular values up
    fast, so after 3 steps they lie roughly in [0.5, 1.5] rather than at
    exactly 1, which trains as well.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    x = x / (x.norm() + eps)  # every singular value <= 1
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon:
    """Muon for the groups marked ``muon``, SGD for the rest, in one optimiser.

    Muon (Keller Jordan, 2024; as in airbench94_muon): the (Nesterov) momentum
    of a filter's gradient, reshaped to out_channels x rest, is orthogonalised
    (:func:`orthogonalize`) and taken as the step, after the filter is scaled
    to norm sqrt(out_channels); the scale of the loss does not matter to it.
    The other groups take plain SGD steps (momentum, Nesterov and weight decay
    as ``torch.optim.SGD``).  One optimiser keeps one state dict, so a resumed
    run restores both.

    It has the parts of the ``torch.optim.Optimizer`` interface that training
    uses (``param_groups``, ``state``, ``step``, ``zero_grad``, ``state_dict``
    and ``load_state_dict``, in torch's state-dict layout) but does not derive
    from it: every torch optimiser imports ``torch._dynamo`` when it is built
    (1.0-1.4 s on the 2-core CPU), and a Muon run needs none of it.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        self.dtype = dtype  # of the Newton-Schulz iteration
        self.defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                         "muon": False}
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict] = []
        seen: set[int] = set()
        for group in groups:
            group = {**self.defaults, **group, "params": list(group["params"])}
            for p in group["params"]:
                if not isinstance(p, torch.Tensor) or not p.is_leaf:
                    raise ConfigError(f"Muon optimises leaf tensors, got {type(p).__name__}")
                if id(p) in seen:
                    raise ConfigError("a parameter appears in more than one Muon parameter group")
                seen.add(id(p))
            self.param_groups.append(group)
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd and not group["muon"]:
                    g = g.add(p, alpha=wd)
                state = self.state.setdefault(p, {})
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.detach().clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(g)
                buf = state["momentum_buffer"]
                g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    g = orthogonalize(g.reshape(len(g), -1), dtype=self.dtype).view_as(p)
                p.add_(g, alpha=-lr)
        return loss

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``: parameters numbered in group order."""
        index = {}
        groups = []
        for group in self.param_groups:
            numbers = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": numbers})
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` of an optimiser over the same parameter groups."""
        saved = state_dict["param_groups"]
        sizes, mine = [len(g["params"]) for g in saved], [len(g["params"]) for g in self.param_groups]
        if sizes != mine:
            raise CheckpointError(f"the saved Muon state has parameter groups of sizes {sizes}; "
                                  f"this model's are {mine}")
        params = {n: p for g_saved, group in zip(saved, self.param_groups)
                  for n, p in zip(g_saved["params"], group["params"])}
        self.state = {}
        for n, s in state_dict["state"].items():
            p = params[int(n)]
            self.state[p] = {k: v.to(device=p.device, dtype=p.dtype) if isinstance(v, torch.Tensor) else v
                             for k, v in s.items()}
        for g_saved, group in zip(saved, self.param_groups):
            group.update({k: v for k, v in g_saved.items() if k != "params"})


class LRSchedule:
    """Learning rate per optimiser step: warmup, then the named schedule.

    Args:
        cfg: TrainConfig (lr, schedule, warmup_epochs, step_size, gamma, min_lr,
            plateau_patience, plateau_factor, epochs).
        steps_per_epoch: optimiser steps in one epoch.
    """

    def __init__(self, cfg, steps_per_epoch: int):
        if cfg.schedule not in SCHEDULES:
            raise unknown_name("schedule", cfg.schedule, SCHEDULES)
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
            start = cfg.warmup_start if cfg.warmup_start is not None else (0.04 if cfg.schedule == "onecycle" else 0.0)
            return cfg.lr * (start + (1.0 - start) * (step + 1) / self.warmup)
        if cfg.schedule == "constant":
            return cfg.lr
        if cfg.schedule == "step":
            return cfg.lr * cfg.gamma ** (step // self.steps_per_epoch // cfg.step_size)
        if cfg.schedule == "plateau":
            return max(cfg.lr * self.plateau_scale, cfg.min_lr)
        # cosine, onecycle and linear anneal from lr to min_lr over the steps after warmup.
        floor = cfg.min_lr if cfg.min_lr > 0 or cfg.schedule != "onecycle" else cfg.lr / 1e4
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if cfg.schedule == "linear":
            return cfg.lr + (floor - cfg.lr) * progress
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer | Muon, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
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


class Lookahead:
    """Lookahead towards a moving average of the weights, as in hlb-CIFAR10 and airbench.

    Every ``EVERY`` optimiser steps the average moves towards the weights,
    ``avg = d * avg + (1 - d) * w``, and the weights are set to the average.
    ``d`` grows with progress, ``d = 0.95**5 * (step / total)**3``: near 0 at
    first (the average just follows), about 0.77 at the end, which damps the
    noise of the last, low-learning-rate steps.  After the last step the
    weights become the average.  Every floating-point entry of the state dict
    takes part, BatchNorm statistics included.

    Args:
        model: the model being trained.
        total_steps: optimiser steps in the whole run.
    """

    EVERY = 5
    PEAK = 0.95**5

    def __init__(self, model: torch.nn.Module, total_steps: int):
        self.total = max(1, total_steps)
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def _pull(self, model: torch.nn.Module, decay: float) -> None:
        state = model.state_dict()
        for name, avg in self.average.items():
            avg.lerp_(state[name], 1.0 - decay)
            state[name].copy_(avg)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """Call after optimiser step number ``step`` (counting from 1)."""
        if step % self.EVERY == 0:
            self._pull(model, self.PEAK * min(1.0, step / self.total) ** 3)
        if step == self.total:
            self._pull(model, 1.0)

    def state_dict(self) -> dict:
        return {"average": dict(self.average)}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["average"].items():
            self.average[name].copy_(value)


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
    """Loss weights per class: None, 'balanced' (n / (k * count)) or an explicit list.

    Multi-label (``labels`` a 0/1 (N, K) matrix): weights of each label's positives (BCE's ``pos_weight``);
    'balanced' gives each label negatives / positives, capped at 100, so that its positives weigh as much as
    its negatives.
    """
    if spec is None:
        return None
    labels = torch.as_tensor(labels)
    if spec == "balanced" and labels.ndim == 2:
        positives = labels.double().sum(0)
        return ((len(labels) - positives) / positives.clamp_min(1)).clamp(1e-3, 100.0).float()
    if spec == "balanced":
        counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
        weights = len(labels) / (num_classes * counts.clamp_min(1))
        return weights.float()
    if len(spec) != num_classes:
        raise ConfigError(f"class_weights has {len(spec)} values but the dataset has {num_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)
