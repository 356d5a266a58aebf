"""Attribution maps and the explain entry point: shapes, batching, errors, files, and maps that
land where the evidence is."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from imgcls.errors import ConfigError
from imgcls.explain import (
    METHODS,
    Explanation,
    attribute,
    explain_arrays,
    overlay,
    plot_explanations,
    write_explanations,
)
from imgcls.explain.explain import _select, file_stems
from imgcls.inference import predict_proba, resolve_runtime
from imgcls.models import ImageClassifier, create_model, list_models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["cat", "dog", "a$b"]


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(arch: str = "resnet8", in_chans: int = 3, size=(16, 16), num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(arch, in_chans, num_classes, size).eval()


def meta_for(in_chans: int, size, temperature: float = 1.0) -> dict:
    return {"classes": list(CLASSES), "normalize": {"mean": [0.5] * in_chans, "std": [0.25] * in_chans},
            "input_shape": [in_chans, *size], "temperature": temperature}


def random_images(n: int, in_chans: int, size, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, in_chans), dtype=np.uint8)


# ---------------------------------------------------------------------------
# attribute()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch,in_chans,size", [
    ("resnet8", 3, (16, 16)),
    ("fastnet_small", 1, (16, 16)),
    ("resnet8", 1, (16, 24)),
    ("fastnet_small", 3, (20, 12)),
])
def test_every_method_gives_finite_maps_at_input_size(method, arch, in_chans, size):
    model = small_model(arch, in_chans, size)
    x = torch.randn(3, in_chans, *size)
    maps = attribute(model, x, torch.tensor([0, 1, 2]), method)
    assert maps.shape == (3, *size)
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    if method != "occlusion":  # occlusion may be negative (covering a region can raise the logit)
        assert (maps >= 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_batch_gives_the_same_map_as_single_images(method):
    model = small_model("resnet8", 3, (16, 16))
    x = torch.randn(4, 3, 16, 16)
    target = torch.tensor([2, 0, 1, 2])
    batch = attribute(model, x, target, method)
    single = torch.cat([attribute(model, x[i:i + 1], target[i:i + 1], method) for i in range(4)])
    scale = batch.abs().max()
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.parametrize("arch", sorted(list_models()))
def test_gradcam_runs_on_every_model_with_its_default_layer(arch):
    try:
        model = small_model(arch, 3, (32, 32), num_classes=4)
    except ConfigError as exc:  # a size this model refuses
        pytest.skip(str(exc))
    maps = attribute(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 3]), "gradcam")
    assert maps.shape == (2, 32, 32)
    assert torch.isfinite(maps).all() and (maps >= 0).all()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_unknown_layer_lists_the_valid_layers(method):
    model = small_model()
    with pytest.raises(ConfigError, match="valid layers: .*features.layer3"):
        attribute(model, torch.randn(1, 3, 16, 16), torch.tensor([0]), method, layer="features.nope")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_a_named_layer_is_used_and_a_non_feature_map_layer_refused(method):
    model = small_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    default = attribute(model, x, t, method)
    earlier = attribute(model, x, t, method, layer="features.layer1")
    assert earlier.shape == default.shape and not torch.allclose(earlier, default)
    with pytest.raises(ConfigError, match="feature map"):
        attribute(model, x, t, method, layer="head.fc")


@pytest.mark.parametrize("method", ["integrated-gradients", "occlusion", "saliency"])
def test_pixel_methods_ignore_a_layer_but_explain_arrays_refuses_it(method):
    model = small_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    torch.testing.assert_close(attribute(model, x, t, method, layer="features.layer1"), attribute(model, x, t, method))
    images = random_images(1, 3, (16, 16))
    with pytest.raises(ConfigError, match="takes no layer.*gradcam"):
        explain_arrays(model, meta_for(3, (16, 16)), images, method, layer="features.layer1")
    assert explain_arrays(model, meta_for(3, (16, 16)), images, method, layer="auto").layer is None


def test_unknown_method_lists_the_methods():
    with pytest.raises(ConfigError, match="unknown method 'lime'.*gradcam\\+\\+.*integrated-gradients"):
        attribute(small_model(), torch.randn(1, 3, 16, 16), torch.tensor([0]), "lime")


@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_as_it_was(method):
    model = small_model()
    model.train()
    frozen = model.features.stem.conv.weight
    frozen.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats included
    attribute(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), method)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not getattr(module, "_backward_pre_hooks", {})
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_no_captum_gradient_warning(recwarn):
    model = small_model()
    for method in METHODS:
        attribute(model, torch.randn(1, 3, 16, 16), torch.tensor([0]), method)
    assert not [w for w in recwarn if "require" in str(w.message)]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "saliency"])
def test_attributions_are_fp32_under_bf16_autocast(method):
    model = small_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    plain = attribute(model, x, t, method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = attribute(model, x, t, method)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain)


class TwoColours(ImageClassifier):
    """Class 0 = "how much red", class 1 = "how much green": 1x1 conv picking R and G, ReLU, mean-pool."""

    def __init__(self):
        super().__init__(3, 2, (16, 16))
        conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 1.0
            conv.weight[1, 1] = 1.0
        self.features = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU()))
        self.head = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                                              fc=nn.Linear(2, 2, bias=False)))
        with torch.no_grad():
            self.head.fc.weight.copy_(torch.eye(2))
        self.gradcam_layer = "features.relu"


@pytest.mark.parametrize("method", METHODS)
def test_maps_land_where_the_evidence_is(method):
    # A red square top-left and a green square bottom-right on a background at the mean (0).
    x = torch.zeros(2, 3, 16, 16)
    x[:, 0, 2:6, 2:6] = 2.0
    x[:, 1, 10:14, 10:14] = 2.0
    maps = attribute(TwoColours().eval(), x, torch.tensor([0, 1]), method)
    red, green = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    red[2:6, 2:6], green[10:14, 10:14] = True, True
    for m, inside, outside in ((maps[0].numpy(), red, green), (maps[1].numpy(), green, red)):
        assert inside.ravel()[m.argmax()]
        assert m[inside].mean() > 5 * max(m[outside].mean(), 1e-12)


# ---------------------------------------------------------------------------
# explain_arrays() and its outputs


def test_explain_arrays_predicted_target_and_temperature():
    model, meta = small_model(), meta_for(3, (16, 16), temperature=2.0)
    images = random_images(5, 3, (16, 16))
    exp = explain_arrays(model, meta, images, "gradcam", names=[f"img{i}.png" for i in range(5)])
    assert isinstance(exp, Explanation)
    assert exp.maps.shape == exp.raw_maps.shape == (5, 16, 16)
    assert exp.maps.dtype == np.float32 and exp.maps.min() >= 0 and exp.maps.max() <= 1
    assert np.allclose(exp.maps.reshape(5, -1).max(1), 1.0) or not exp.raw_maps.any()
    runtime = resolve_runtime("cpu", "fp32", "off")
    expected = predict_proba(model, images, meta["normalize"], runtime, temperature=2.0)
    np.testing.assert_allclose(exp.proba, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(exp.predicted, expected.argmax(1))
    np.testing.assert_array_equal(exp.targets, exp.predicted)
    assert exp.target_names == [CLASSES[t] for t in exp.predicted]
    assert exp.layer == model.gradcam_layer and exp.images is images


@pytest.mark.parametrize("method", METHODS)
def test_explain_arrays_does_not_depend_on_batch_size(method):
    model, meta = small_model("fastnet_small", 1, (16, 16)), meta_for(1, (16, 16))
    images = random_images(5, 1, (16, 16))
    one = explain_arrays(model, meta, images, method, target="dog", batch_size=1)
    many = explain_arrays(model, meta, images, method, target="dog", batch_size=4)
    np.testing.assert_allclose(one.raw_maps, many.raw_maps, rtol=1e-4, atol=1e-5 * np.abs(many.raw_maps).max())
    assert one.layer == (model.gradcam_layer if method.startswith("gradcam") else None)


def test_targets_by_name_index_and_labels():
    model, meta = small_model(), meta_for(3, (16, 16))
    images = random_images(3, 3, (16, 16))
    by_name = explain_arrays(model, meta, images, "saliency", target="a$b")
    assert by_name.targets.tolist() == [2, 2, 2] and by_name.target_names == ["a$b"] * 3
    by_index = explain_arrays(model, meta, images, "saliency", target=2)
    np.testing.assert_array_equal(by_index.raw_maps, by_name.raw_maps)
    assert explain_arrays(model, meta, images, "saliency", target="1").targets.tolist() == [1, 1, 1]
    labels = np.array([1, 0, 2])
    true = explain_arrays(model, meta, images, "saliency", target="true", labels=labels)
    assert true.targets.tolist() == [1, 0, 2] and true.target_names == ["dog", "cat", "a$b"]


def test_bad_targets_and_inputs_are_refused():
    model, meta = small_model(), meta_for(3, (16, 16))
    images = random_images(2, 3, (16, 16))
    with pytest.raises(ConfigError, match="'horse'.*classes: cat, dog, a\\$b"):
        explain_arrays(model, meta, images, target="horse")
    with pytest.raises(ConfigError, match="class index 0..2"):
        explain_arrays(model, meta, images, target=3)
    with pytest.raises(ConfigError, match="needs the images' labels"):
        explain_arrays(model, meta, images, target="true")
    with pytest.raises(ConfigError, match="unknown method 'cam'.*occlusion"):
        explain_arrays(model, meta, images, method="cam")
    with pytest.raises(ConfigError, match="valid layers"):
        explain_arrays(model, meta, images, layer="features.layer9")
    with pytest.raises(ConfigError, match="16x16 with 3 channel"):
        explain_arrays(model, meta, random_images(2, 3, (16, 20)))
    with pytest.raises(ConfigError, match="uint8"):
        explain_arrays(model, meta, images.astype(np.float32))


@pytest.mark.parametrize("channels", [1, 3])
def test_overlay_is_rgb_uint8(channels):
    image = random_images(1, channels, (8, 12))[0]
    heat = np.linspace(0, 1, 96, dtype=np.float32).reshape(8, 12)
    out = overlay(image, heat)
    assert out.shape == (8, 12, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), np.repeat(image, 3 // channels, axis=-1))
    assert not np.array_equal(out, overlay(image, heat[::-1]))
    with pytest.raises(ConfigError, match="does not match"):
        overlay(image, heat.T)


def test_plot_and_write_explanations(tmp_path):
    model, meta = small_model(), meta_for(3, (16, 16))
    names = ["dir/cat 1.png", "cat 1.jpg", "grid.png", None]
    exp = explain_arrays(model, meta, random_images(4, 3, (16, 16)), "gradcam++", target="cat",
                         names=[n or "" for n in names])
    fig = plot_explanations(exp, ncols=3)
    assert len(fig.axes) == 2  # the panels as one picture, and the shared colour bar
    assert fig.axes[-1].get_ylabel() == "attribution (normalised)"
    titles = [t.get_text() for t in fig.texts if t.get_text() != f"{exp.method} at {exp.layer}"]  # not the heading
    assert titles == [exp.title(i).replace("$", r"\$") for i in range(4)]  # a '$' is shown, not read as mathtext
    (canvas,) = [im.get_array() for im in fig.axes[0].images]
    first = overlay(exp.images[0], exp.maps[0])  # 16 px: enlarged by whole repetitions, sharp
    factor = (canvas.shape[1] // 3 - 8) // 16
    tile = first.repeat(factor, 0).repeat(factor, 1)
    hits = [(y, x) for y in range(canvas.shape[0] - len(tile)) for x in range(canvas.shape[1] // 3 - len(tile))
            if (canvas[y, x] == tile[0, 0]).all() and np.array_equal(canvas[y:y + len(tile), x:x + len(tile)], tile)]
    assert hits  # the first panel is the overlay of the first image and its map
    written = write_explanations(exp, tmp_path / "out", save_maps=True)
    stems = ["cat_1", "cat_1_2", "grid_2", "image_003"]
    expected = [tmp_path / "out" / f"{s}_gradcam++.{ext}" for s in stems for ext in ("png", "npy")]
    assert written == expected + [tmp_path / "out" / "grid_gradcam++.png"]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    np.testing.assert_array_equal(np.load(expected[1]), exp.raw_maps[0])
    single = write_explanations(_select(exp, 0), tmp_path / "one")  # one image: no grid
    assert [p.name for p in single] == ["cat_1_gradcam++.png"]


def test_file_stems_are_safe_and_unique():
    assert file_stems(["a/b/Photo.JPG", "photo.png", "../..", "é x"], 4) == ["Photo", "photo_2", "image_002", "x"]
    assert file_stems(None, 2) == ["image_000", "image_001"]
