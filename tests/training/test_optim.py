"""Schedules, early stopping and class weights: the numbers the trainer relies on."""

import math
import subprocess
import sys

import pytest
import torch

from imgcls.config import TrainConfig
from imgcls.errors import CheckpointError, ConfigError
from imgcls.training.optim import (
    EarlyStopping,
    Lookahead,
    LRSchedule,
    build_optimizer,
    class_weight_tensor,
    orthogonalize,
    param_groups,
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


def test_linear_schedule_warms_from_a_fraction_then_decays_to_min_lr():
    s = schedule(schedule="linear", warmup_epochs=2, warmup_start=0.2, min_lr=0.007)
    assert s.lr_at(0) == pytest.approx(0.1 * (0.2 + 0.8 / 20))
    assert s.lr_at(19) == pytest.approx(0.1)
    assert s.lr_at(20) == pytest.approx(0.1)
    assert s.lr_at(60) == pytest.approx(0.1 + (0.007 - 0.1) * 0.5)
    assert s.lr_at(100) == pytest.approx(0.007)


def _bn_net():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    net(torch.zeros(2, 1, 5, 5))
    return net


def test_norm_lr_scale_puts_norm_parameters_in_a_faster_group_with_the_same_decay_per_step():
    net = _bn_net()
    net[1].weight.requires_grad_(False)  # frozen parameters take no part
    cfg = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=1e-3, norm_lr_scale=64.0, epochs=1)
    opt = build_optimizer(param_groups(net, cfg), cfg)
    LRSchedule(cfg, steps_per_epoch=1).apply(opt, 0)
    other, norm = opt.param_groups
    assert [p is net[1].bias for p in norm["params"]] == [True]
    assert not any(p is net[1].weight for g in opt.param_groups for p in g["params"])
    assert norm["lr"] == pytest.approx(6.4) and other["lr"] == pytest.approx(0.1)
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(other["lr"] * other["weight_decay"])
    one = build_optimizer(param_groups(net, TrainConfig(norm_lr_scale=1.0)), TrainConfig())
    assert len(one.param_groups) == 1


def test_lookahead_pulls_weights_to_the_average_and_ends_on_it():
    net = _bn_net()
    look = Lookahead(net, total_steps=10)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    look.after_step(net, 4)  # not a multiple of 5: nothing happens
    assert torch.equal(net[0].weight, start["0.weight"] + 1)
    look.after_step(net, 5)  # decay 0.95**5 * 0.5**3: the weights move most of the way to themselves
    d = 0.95**5 * 0.5**3
    torch.testing.assert_close(net[0].weight, start["0.weight"] + (1 - d))
    torch.testing.assert_close(look.average["0.weight"], net[0].weight)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    look.after_step(net, 10)  # the last step: one more pull (decay 0.95**5), then the weights become the average
    assert torch.equal(net[0].weight, look.average["0.weight"])
    assert not torch.equal(net[0].weight, start["0.weight"] + (1 - d) + 1)


def test_orthogonalize_brings_every_singular_value_near_one():
    g = torch.randn(64, 200, generator=torch.Generator().manual_seed(0)) * torch.logspace(-0.5, 0.5, 200)
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.min() > 0.3 and s.max() < 1.6  # Newton-Schulz in bf16, 3 steps: roughly U V^T
    tall = torch.linalg.svdvals(orthogonalize(g.T).float())
    torch.testing.assert_close(tall, s, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("bf16", [False, True])
def test_muon_steps_filters_by_an_orthogonalised_update_and_the_rest_as_sgd(bf16):
    torch.manual_seed(0)
    conv, head = torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.Linear(8, 2)
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)
    twin = torch.nn.Linear(8, 2)
    twin.load_state_dict(head.state_dict())
    cfg = TrainConfig(optimizer="muon", lr=0.1, muon_lr=0.2, muon_momentum=0.6, momentum=0.9, nesterov=True,
                      weight_decay=0.01)
    opt = build_optimizer(param_groups(model, cfg), cfg, bf16=bf16)
    assert [g["muon"] for g in opt.param_groups] == [True, False]
    dtype = torch.bfloat16 if bf16 else torch.float32
    reference = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    buf = None
    for step in range(3):
        x = torch.randn(32, 3, 6, 6)
        opt.zero_grad()
        model(x).square().sum().backward()
        reference.zero_grad()
        twin(model[2](model[1](conv(x))).detach()).square().sum().backward()
        LRSchedule(cfg, 1).apply(opt, 0)
        before, grad = conv.weight.detach().clone(), conv.weight.grad.clone()
        opt.step()
        reference.step()
        torch.testing.assert_close(head.weight, twin.weight)
        # Muon: scale the filter to norm sqrt(8), then step by 0.2 x orthogonalise(Nesterov momentum).
        buf = grad if buf is None else 0.6 * buf + grad
        expected = before * (8 ** 0.5 / before.norm()) - 0.2 * orthogonalize((grad + 0.6 * buf).reshape(8, -1), dtype=dtype).view(8, 3, 3, 3)
        torch.testing.assert_close(conv.weight, expected)


_DYNAMO_CHILD = """
import sys, threading
import imgcls
started = []
real_start = threading.Thread.start
threading.Thread.start = lambda self: (started.append(self.name), real_start(self))[1]
opts = dict(out=sys.argv[1], quiet=True, report=False, epochs=1, model_option={"widths": [8, 16, 16]})
imgcls.train(name="muon", optimizer="muon", muon_lr=0.24, muon_momentum=0.6, lr=0.2, momentum=0.85, **opts)
print("torch._dynamo" in sys.modules, "imgcls-import-dynamo" in started)
imgcls.train(name="sgd", optimizer="sgd", lr=0.05, **opts)
print("torch._dynamo" in sys.modules, "imgcls-import-dynamo" in started)
"""


def test_only_runs_with_a_torch_optimiser_import_torch_dynamo_and_on_a_thread_of_their_own(tmp_path):
    # Every torch optimiser imports torch._dynamo when it is built (1-1.4 s on the 2-core CPU): `train`
    # starts it on a thread before loading the data, so it overlaps decoding the images. Muon, imgcls's own
    # optimiser, does without it, so a Muon run (the fast recipes) never pays for it: train, checkpoint, test.
    out = subprocess.run([sys.executable, "-c", _DYNAMO_CHILD, str(tmp_path)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False", "True", "True"]


def test_muon_state_dict_has_torch_layout_and_refuses_other_parameter_groups():
    conv, head = torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.Linear(8, 2)
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)
    cfg = TrainConfig(optimizer="muon", lr=0.1, muon_lr=0.2, muon_momentum=0.6, momentum=0.9)
    opt = build_optimizer(param_groups(model, cfg), cfg)
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    # As torch.optim.Optimizer: parameters numbered in group order, state keyed by those numbers.
    assert [g["params"] for g in saved["param_groups"]] == [[0], [1, 2]]
    assert sorted(saved["state"]) == [0, 1, 2]
    twin = build_optimizer(param_groups(model, cfg), cfg)
    twin.load_state_dict(saved)
    assert torch.equal(twin.state[head.bias]["momentum_buffer"], opt.state[head.bias]["momentum_buffer"])
    other = build_optimizer(param_groups(torch.nn.Sequential(head), cfg), cfg)
    with pytest.raises(CheckpointError, match=r"parameter groups of sizes \[1, 2\]; this model's are \[2\]"):
        other.load_state_dict(saved)
