"""The model contract, checked over every registered architecture, plus exact seed shapes."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
import torch.nn.functional as F

from imgcls.errors import ConfigError
from imgcls.models import (
    ImageClassifier,
    create_model,
    format_summary,
    list_models,
    summarize,
)
from imgcls.models.fast import whiten_init
from imgcls.models.registry import register_model
from imgcls.models.seeds import Conv2dSame

NUM_CLASSES = 10
SHAPES = [(3, (32, 32)), (1, (28, 28))]
ALL_MODELS = sorted(list_models())

# Parameter counts of the seeds' Keras summaries, for their own input shapes and 10 classes.
SEED_PARAMS = {
    "seed_tf_tutorial": ((3, (32, 32)), 122_570),
    "seed_named_dropout": ((3, (32, 32)), 356_810),
    "seed_cifar_model1": ((3, (32, 32)), 181_162),
    "seed_cifar_model2": ((3, (32, 32)), 1_250_858),
    "seed_cifar_model3": ((3, (32, 32)), 4_210_090),
    "seed_mnist_oneconv": ((1, (28, 28)), 542_230),
}
# CIFAR ResNets with 1x1-conv + BN projection shortcuts, 3x32x32, 10 classes.
RESNET_PARAMS = {
    "resnet8": 78_042,
    "resnet20": 272_474,  # the paper's "0.27M"
    "resnet32": 466_906,
    "resnet56": 855_770,
    "resnet18": 11_173_962,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of two are too small to gain from intra-op threads, and on a busy
    two-core machine the threads' contention makes these tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def _cached(name: str, in_chans: int, img_size: tuple[int, int]):
    torch.manual_seed(0)
    try:
        return create_model(name, in_chans, NUM_CLASSES, img_size)
    except ConfigError as exc:
        return exc


def build(name: str, in_chans: int, img_size: tuple[int, int]) -> ImageClassifier:
    """The model for this shape (built once per session), or skip if it refuses the shape."""
    model = _cached(name, in_chans, img_size)
    if isinstance(model, ConfigError):
        if name in SEED_PARAMS and SEED_PARAMS[name][0] == (in_chans, img_size):
            raise model  # a seed must take its own shape
        pytest.skip(f"{name} refuses {in_chans}x{img_size}: {model}")
    model.zero_grad(set_to_none=True)
    return model


def images(in_chans: int, img_size: tuple[int, int], n: int = 2) -> torch.Tensor:
    return torch.randn(n, in_chans, *img_size, generator=torch.Generator().manual_seed(1))


def outputs_of(model: torch.nn.Module, names, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of the submodules ``names`` during one ``model(x)``."""
    seen: dict[str, list] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen[name].append(o))
        for name in names
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    for name, outs in seen.items():
        assert len(outs) == 1, f"{name} ran {len(outs)} times"
    return {name: outs[0] for name, outs in seen.items()}


model_and_shape = pytest.mark.parametrize(
    "name,in_chans,img_size",
    [(name, c, s) for name in ALL_MODELS for c, s in SHAPES],
    ids=[f"{name}-{c}x{s[0]}x{s[1]}" for name in ALL_MODELS for c, s in SHAPES],
)


# ---------------------------------------------------------------------------
# The contract, for every registered model.


def test_registry_holds_every_family():
    assert set(SEED_PARAMS) | set(RESNET_PARAMS) | {"fastnet", "fastnet_small"} <= set(ALL_MODELS)
    assert all(description for description in list_models().values())


@pytest.mark.parametrize("name", sorted(SEED_PARAMS))
def test_seed_accepts_its_own_shape(name):
    (in_chans, img_size), _ = SEED_PARAMS[name]
    create_model(name, in_chans, NUM_CLASSES, img_size)


@model_and_shape
def test_forward_gives_finite_logits(name, in_chans, img_size):
    model = build(name, in_chans, img_size)
    model.train()
    logits = model(images(in_chans, img_size))
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()


@model_and_shape
def test_backward_reaches_every_parameter(name, in_chans, img_size):
    model = build(name, in_chans, img_size)
    model.train()
    loss = F.cross_entropy(model(images(in_chans, img_size)), torch.tensor([0, 1]))
    loss.backward()
    for pname, param in model.named_parameters():
        if not param.requires_grad:  # fastnet's BatchNorm scales are fixed at 1 by design
            assert name == "fastnet" and pname.endswith(("bn1.weight", "bn2.weight")), pname
            continue
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"
    model.zero_grad(set_to_none=True)


@model_and_shape
def test_head_of_features_equals_forward(name, in_chans, img_size):
    model = build(name, in_chans, img_size).eval()
    x = images(in_chans, img_size)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.ndim == 4
        torch.testing.assert_close(model.forward_head(features), model(x))


@model_and_shape
def test_gradcam_layer_gives_a_map_with_gradients(name, in_chans, img_size):
    model = build(name, in_chans, img_size).eval()
    fmap = outputs_of(model, [model.gradcam_layer], images(in_chans, img_size))[model.gradcam_layer]
    assert fmap.ndim == 4 and fmap.shape[0] == 2
    assert fmap.requires_grad
    assert model.gradcam_layer in model.stages


@model_and_shape
def test_stages_resolve_to_feature_maps_in_order(name, in_chans, img_size):
    model = build(name, in_chans, img_size).eval()
    assert model.stages, "a model needs at least one stage"
    names = [n for n, _ in model.named_modules()]
    positions = [names.index(stage) for stage in model.stages]
    assert positions == sorted(positions)
    x = images(in_chans, img_size)
    with torch.no_grad():
        outputs = outputs_of(model, model.stages, x)
        for stage in model.stages:
            assert outputs[stage].ndim == 4 and outputs[stage].shape[0] == 2, stage
        assert outputs[model.stages[-1]].shape[1] == model.forward_features(x).shape[1]


@model_and_shape
def test_rebuilds_from_arch_and_kwargs(name, in_chans, img_size):
    model = build(name, in_chans, img_size)
    assert model.arch == name
    json.dumps(model.arch_kwargs)  # stored in checkpoint metadata
    rebuilt = create_model(model.arch, in_chans, NUM_CLASSES, img_size, **model.arch_kwargs)
    assert count_params(rebuilt) == count_params(model)
    rebuilt.load_state_dict(model.state_dict())


# ---------------------------------------------------------------------------
# Exact architectures.


@pytest.mark.parametrize("name", sorted(SEED_PARAMS))
def test_seed_parameter_counts_match_keras(name):
    (in_chans, img_size), expected = SEED_PARAMS[name]
    assert count_params(create_model(name, in_chans, NUM_CLASSES, img_size)) == expected


@pytest.mark.parametrize("name", sorted(RESNET_PARAMS))
def test_resnet_parameter_counts(name):
    assert count_params(create_model(name, 3, NUM_CLASSES, (32, 32))) == RESNET_PARAMS[name]


def test_seed_named_dropout_keeps_keras_layer_names():
    model = create_model("seed_named_dropout", 3, NUM_CLASSES, (32, 32))
    for name in ("features.conv1", "features.conv2", "features.conv3", "head.dense1", "head.output"):
        model.get_submodule(name)
    assert model.stages == ("features.conv1_relu", "features.conv2_relu", "features.conv3_relu")
    assert model.head.dense1_drop.p == 0.5


def test_seed_cifar_model1_output_shapes_match_keras():
    summary = summarize(create_model("seed_cifar_model1", 3, NUM_CLASSES, (32, 32)), (3, 32, 32))
    shapes = {layer.name: layer.output_shape for layer in summary.layers}
    assert shapes["features.conv1"] == (None, 32, 16, 16)  # 5x5 stride 2 'same'
    assert shapes["features.conv2"] == (None, 32, 6, 6)  # 5x5 stride 2 'valid'
    assert shapes["features.pool1"] == (None, 32, 3, 3)
    assert shapes["head.flatten"] == (None, 288)


@pytest.mark.parametrize("size", [7, 16, 31, 32, 33])
@pytest.mark.parametrize("kernel,stride", [(5, 2), (3, 1), (3, 2), (2, 1), (4, 3)])
def test_conv2d_same_pads_like_tensorflow(size, kernel, stride):
    conv = Conv2dSame(2, 3, kernel, stride=stride)
    x = torch.randn(1, 2, size, size)
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    before, after = total // 2, total - total // 2  # TensorFlow puts the odd pixel after
    expected = F.conv2d(F.pad(x, [before, after, before, after]), conv.weight, conv.bias, stride=stride)
    out = conv(x)
    assert out.shape[-2:] == (-(-size // stride),) * 2
    torch.testing.assert_close(out, expected)


def test_max_norm_constraint_caps_incoming_weight_norms():
    model = create_model("seed_cifar_model3", 3, NUM_CLASSES, (32, 32))
    assert model.max_norm == 3.0
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(50.0)
    model.apply_constraints()
    for layer in (model.features.conv1, model.features.conv2, model.head.dense1):
        norms = layer.weight.flatten(1).norm(dim=1)
        assert norms.max() <= 3.0 + 1e-4
    assert model.head.output.weight.flatten(1).norm(dim=1).max() > 3.0  # the output layer is free


def test_max_norm_can_be_switched_off():
    model = create_model("seed_cifar_model3", 3, NUM_CLASSES, (32, 32), max_norm=None)
    with torch.no_grad():
        model.features.conv1.weight.mul_(100.0)
    before = model.features.conv1.weight.clone()
    model.apply_constraints()
    torch.testing.assert_close(model.features.conv1.weight, before)


def test_dropout_options_reach_the_layers():
    model = create_model("seed_cifar_model2", 3, NUM_CLASSES, (32, 32), dropout_conv=0.1, dropout=0.3)
    assert model.features.drop1.p == model.features.drop2.p == 0.1
    assert model.head.dense1_drop.p == 0.3
    assert model.arch_kwargs == {"dropout_conv": 0.1, "dropout": 0.3}


def test_resnet_width_multiplier():
    wide = create_model("resnet20", 3, NUM_CLASSES, (32, 32), width=2)
    assert wide.features.stem.conv.out_channels == 32
    assert count_params(wide) > 3 * RESNET_PARAMS["resnet20"]


@pytest.mark.parametrize("name,in_chans,side", [("fastnet_small", 1, 8), ("fastnet_small", 3, 8), ("fastnet", 1, 9),
                                                ("fastnet", 1, 28), ("fastnet", 3, 32), ("fastnet_small", 3, 32)])
def test_fastnet_takes_small_inputs(name, in_chans, side):
    model = create_model(name, in_chans, NUM_CLASSES, (side, side)).train()
    logits = model(torch.randn(4, in_chans, side, side))
    assert logits.shape == (4, NUM_CLASSES) and torch.isfinite(logits).all()


def test_fastnet_with_floor_pooling_refuses_inputs_below_9_pixels():
    with pytest.raises(ConfigError, match="at least 9x9"):
        create_model("fastnet", 3, NUM_CLASSES, (8, 8))


@pytest.mark.parametrize("value", [-1, "3", True])
def test_fastnet_refuses_a_bad_whiten_bias_epochs(value):
    with pytest.raises(ConfigError, match="whiten_bias_epochs must be a number of epochs >= 0"):
        create_model("fastnet", 3, NUM_CLASSES, (32, 32), whiten_bias_epochs=value)


def test_fastnet_is_airbench94s_network():
    model = create_model("fastnet", 3, NUM_CLASSES, (32, 32))
    assert count_params(model) == 1_972_792  # as airbench94's (its BatchNorm scales included, though fixed)
    # Floor pooling: 31 -> 15 -> 7 -> 3, as airbench94 (ceil would give 16, 8, 4).
    shapes = []
    x = torch.randn(2, 3, 32, 32)
    for name in model.stages:
        x = model.get_submodule(name)(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(24, 31, 31), (64, 15, 15), (256, 7, 7), (256, 3, 3)]
    # Dirac init: the first in_channels filters of each 3x3 conv pass their input channel through.
    conv = model.features.block2.conv1.weight  # (256, 64, 3, 3)
    torch.testing.assert_close(conv[:64, :, 1, 1], torch.eye(64))
    assert conv[:64].abs().sum() == 64
    assert not model.features.block1.bn1.weight.requires_grad and model.features.block1.bn1.bias.requires_grad
    # The whitening stem is set from data and frozen; the small variant leaves its stem alone.
    images = torch.randn(200, 3, 32, 32)
    before = model.features.stem.conv.weight.clone()
    model.init_from_data(images)
    assert not torch.equal(before, model.features.stem.conv.weight)
    assert not model.features.stem.conv.weight.requires_grad and model.features.stem.conv.bias.requires_grad
    # The stem's bias trains for whiten_bias_epochs (3 by default) epochs, then is frozen.
    model.start_epoch(2)
    assert model.features.stem.conv.bias.requires_grad
    model.start_epoch(3)
    assert not model.features.stem.conv.bias.requires_grad
    small = create_model("fastnet_small", 3, NUM_CLASSES, (32, 32))
    kept = small.features.stem.conv.weight.clone()
    small.init_from_data(images)
    assert torch.equal(kept, small.features.stem.conv.weight) and small.features.stem.conv.weight.requires_grad


def test_whiten_init_whitens_the_stem():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 1, 16, 16, generator=gen)
    x = torch.cat([base, 0.5 * base + 0.5 * torch.randn(64, 2, 16, 16, generator=gen)], dim=1)
    model = whiten_init(create_model("fastnet_small", 3, NUM_CLASSES, (16, 16)), x)
    weight = model.features.stem.conv.weight  # (24, 3, 2, 2): 12 whitening filters and their negatives
    torch.testing.assert_close(weight[12:], -weight[:12])
    out = F.conv2d(x, weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    moment = out.T @ out / len(out)
    torch.testing.assert_close(moment, torch.eye(12), atol=0.05, rtol=0)


def test_whiten_init_in_chunks_gives_the_same_filters_and_refuses_no_images(monkeypatch):
    import imgcls.models.fast as fast

    x = torch.randn(250, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    whole = whiten_init(create_model("fastnet_small", 3, NUM_CLASSES, (12, 12)), x).features.stem.conv.weight
    monkeypatch.setattr(fast, "_WHITEN_CHUNK", 64)  # 4 chunks, the last one short
    chunked = whiten_init(create_model("fastnet_small", 3, NUM_CLASSES, (12, 12)), x).features.stem.conv.weight
    assert torch.equal(whole, chunked)
    with pytest.raises(ConfigError, match=r"with N >= 1, got \(0, 3, 12, 12\)"):
        whiten_init(create_model("fastnet_small", 3, NUM_CLASSES, (12, 12)), x[:0])


# ---------------------------------------------------------------------------
# Summary, errors, registry.


def test_summary_of_seed_tf_tutorial_matches_keras():
    model = create_model("seed_tf_tutorial", 3, NUM_CLASSES, (32, 32)).train()
    summary = summarize(model, (3, 32, 32))
    assert model.training, "summarize must leave the mode as it was"
    # The Keras summary of seed 000, channels first; ReLU rows are Keras' fused activations.
    keras = [
        ("Conv2d", (None, 32, 30, 30), 896),
        ("MaxPool2d", (None, 32, 15, 15), 0),
        ("Conv2d", (None, 64, 13, 13), 18_496),
        ("MaxPool2d", (None, 64, 6, 6), 0),
        ("Conv2d", (None, 64, 4, 4), 36_928),
        ("Flatten", (None, 1024), 0),
        ("Linear", (None, 64), 65_600),
        ("Linear", (None, 10), 650),
    ]
    rows = [(layer.type, layer.output_shape, layer.params)
            for layer in summary.layers if layer.type != "ReLU"]
    assert rows == keras
    totals = (summary.total_params, summary.trainable_params, summary.non_trainable_params)
    assert totals == (122_570, 122_570, 0)

    text = format_summary(summary)
    assert "(None, 32, 30, 30)" in text and "(None, 10)" in text
    assert "features.conv1 (Conv2d)" in text
    assert "Total params: 122,570" in text and "Non-trainable params: 0" in text
    assert "\x1b" not in text  # plain text, no terminal colour codes


def test_summary_counts_frozen_parameters_as_non_trainable():
    model = create_model("resnet8", 3, NUM_CLASSES, (32, 32))
    model.head.fc.requires_grad_(False)
    summary = summarize(model, (3, 32, 32))
    assert summary.non_trainable_params == 64 * NUM_CLASSES + NUM_CLASSES
    assert summary.total_params == RESNET_PARAMS["resnet8"]
    assert sum(layer.params for layer in summary.layers) == summary.total_params


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'resnet1000'") as info:
        create_model("resnet1000", 3, NUM_CLASSES, (32, 32))
    for name in ALL_MODELS:
        assert name in str(info.value)


def test_too_small_input_names_the_minimum():
    with pytest.raises(ConfigError, match=re.escape("at least 18x18")):
        create_model("seed_tf_tutorial", 3, NUM_CLASSES, (8, 8))
    create_model("seed_tf_tutorial", 3, NUM_CLASSES, (18, 18))(torch.zeros(1, 3, 18, 18))


@pytest.mark.parametrize("name", sorted(SEED_PARAMS))
def test_seed_minimum_size_is_exact(name):
    """The refused size is one below a size that really runs."""
    try:
        create_model(name, 3, NUM_CLASSES, (2, 2))
        minimum = 2
    except ConfigError as exc:
        minimum = int(re.search(r"at least (\d+)x", str(exc)).group(1))
    model = create_model(name, 3, NUM_CLASSES, (minimum, minimum)).eval()
    assert model(torch.zeros(1, 3, minimum, minimum)).shape == (1, NUM_CLASSES)
    if minimum > 2:
        with pytest.raises(ConfigError):
            create_model(name, 3, NUM_CLASSES, (minimum - 1, minimum - 1))


@pytest.mark.parametrize("options", [{"dropout": 1.5}, {"no_such_option": 1}])
def test_bad_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        create_model("seed_named_dropout", 3, NUM_CLASSES, (32, 32), **options)


def test_duplicate_registration_raises():
    def seed_tf_tutorial(**kwargs):  # same name as a registered builder
        raise AssertionError("never called")

    with pytest.raises(RuntimeError, match="registered twice"):
        register_model(seed_tf_tutorial)


# ---------------------------------------------------------------------------
# EfficientNet-Lite's classifier over several stages (head_stages).


def test_lite0_head_stages_parameter_counts():
    # 1,280 pooled features (the original), then stage 2 to the head convolution: 24+40+80+112+192+320+1280.
    assert count_params(create_model("efficientnet_lite0", 3, NUM_CLASSES, (64, 64))) == 3_383_818
    multi = create_model("efficientnet_lite0", 3, NUM_CLASSES, (64, 64), head_stages=7)
    assert multi.num_features == 2_048 and count_params(multi) == 3_383_818 + 768 * NUM_CLASSES
    assert create_model("efficientnet_lite2", 3, NUM_CLASSES, (64, 64), head_stages=8).stage_widths == \
        (16, 24, 48, 88, 120, 208, 352, 1280)


@pytest.mark.parametrize("k", [2, 7, 8])
def test_head_stages_reads_the_pooled_outputs_of_the_last_stages(k):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, NUM_CLASSES, (64, 48), head_stages=k).eval()
    x = images(3, (64, 48))
    with torch.no_grad():
        features = model.forward_features(x)
        taps = model.stages[-k:]
        outputs = outputs_of(model, taps, x)
    assert features.shape == (2, model.num_features, 1, 1) == (2, sum(model.stage_widths[-k:]), 1, 1)
    torch.testing.assert_close(features.flatten(1), torch.cat([outputs[t].mean((2, 3)) for t in taps], 1))
    # The same weights read the last stage alone with head_stages 1: its pooled map is the last 1,280 features.
    single = create_model("efficientnet_lite0", 3, NUM_CLASSES, (64, 48)).eval()
    single.load_state_dict({n: v for n, v in model.state_dict().items() if not n.startswith("head.")}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(single.forward_features(x).mean((2, 3)), features.flatten(1)[:, -1280:])
    assert model.arch_kwargs["head_stages"] == k and "head_stages" not in single.arch_kwargs


@pytest.mark.parametrize("value", [0, 9, True, 2.5, "7"])
def test_head_stages_outside_1_to_8_is_refused_with_the_range(value):
    with pytest.raises(ConfigError, match=r"head_stages must be a whole number from 1 .* to 8 .*got"):
        create_model("efficientnet_lite0", 3, NUM_CLASSES, (64, 64), head_stages=value)
