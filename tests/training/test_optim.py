"""Schedules, early stopping and class weights: the numbers the trainer relies on."""

import math

import pytest
import torch

from imgcls.config import TrainConfig
from imgcls.errors import ConfigError
from imgcls.training.optim import (
    EarlyStopping,
    LRSchedule,
    build_optimizer,
    class_weight_tensor,
)


def schedule(**kw):
    cfg = TrainConfig(**{"epochs": 10, "lr": 0.1, **kw})
    return LRSchedule(cfg, steps_per_epoch=10)


def test_constant_with_linear_warmup():
    s = schedule(warmup_epochs=1)
    assert s.lr_at(0) == pytest.approx(0.01)
    assert s.lr_at(4) == pytest.approx(0.05)
    assert s.lr_at(9) == pytest.approx(0.1)
    assert s.lr_at(99) == pytest.approx(0.1)


def test_step_decays_every_step_size_epochs():
    s = schedule(schedule="step", step_size=3, gamma=0.5)
    assert s.lr_at(29) == pytest.approx(0.1)
    assert s.lr_at(30) == pytest.approx(0.05)
    assert s.lr_at(60) == pytest.approx(0.025)


def test_cosine_goes_from_lr_to_min_lr():
    s = schedule(schedule="cosine", min_lr=0.001)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(50) == pytest.approx(0.001 + 0.099 * 0.5, rel=1e-3)
    assert s.lr_at(100) == pytest.approx(0.001)
    lrs = [s.lr_at(i) for i in range(100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_onecycle_warms_from_lr_over_25_then_anneals():
    s = schedule(schedule="onecycle")
    assert s.warmup == 30
    assert s.lr_at(0) == pytest.approx(0.004 + (0.1 - 0.004) / 30)
    assert s.lr_at(29) == pytest.approx(0.1)
    assert s.lr_at(100) == pytest.approx(0.1 / 1e4)


def test_plateau_decays_after_patience_epochs_without_improvement():
    s = schedule(schedule="plateau", plateau_patience=2, plateau_factor=0.5, monitor="val_loss")
    for loss in (1.0, 0.9, 0.95):
        s.end_epoch({"val_loss": loss})
    assert s.lr_at(0) == pytest.approx(0.1)
    s.end_epoch({"val_loss": 0.91})
    assert s.lr_at(0) == pytest.approx(0.05)
    restored = schedule(schedule="plateau", plateau_patience=2, plateau_factor=0.5)
    restored.load_state_dict(s.state_dict())
    assert restored.lr_at(0) == pytest.approx(0.05)


def test_early_stopping_counts_like_keras():
    es = EarlyStopping("val_accuracy", patience=2)
    assert es.update(1, {"val_accuracy": 0.5})
    assert not es.update(2, {"val_accuracy": 0.5})
    assert not es.should_stop
    assert not es.update(3, {"val_accuracy": 0.4})
    assert es.should_stop and es.best_epoch == 1


def test_min_delta_ignores_small_improvements():
    es = EarlyStopping("val_loss", patience=5, min_delta=0.1)
    es.update(1, {"val_loss": 1.0})
    assert not es.update(2, {"val_loss": 0.95})
    assert es.update(3, {"val_loss": 0.85})


def test_balanced_class_weights():
    w = class_weight_tensor("balanced", [0, 0, 0, 1], 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    assert class_weight_tensor(None, [0, 1], 2) is None
    with pytest.raises(ConfigError, match="3 values but the dataset has 2"):
        class_weight_tensor([1.0, 2.0, 3.0], [0, 1], 2)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_build_optimizer(name, cls):
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer=name, lr=0.01))
    assert isinstance(opt, cls) and math.isclose(opt.param_groups[0]["lr"], 0.01)
