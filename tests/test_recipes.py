"""Named recipes: their settings reach the config, flags override them, and unsuitable data is refused."""

import numpy as np
import pytest

from imgcls.api import make_config
from imgcls.cli import main
from imgcls.config import dump_config
from imgcls.data.base import ImageDataset, Split
from imgcls.errors import ConfigError
from imgcls.recipes import RECIPES, get_recipe


def dataset(n: int, h: int, w: int, c: int, name: str = "data/x") -> ImageDataset:
    images = np.zeros((n, h, w, c), dtype=np.uint8)
    return ImageDataset(name, ["a", "b"], {"train": Split(images, np.arange(n) % 2)})


def test_recipe_settings_reach_the_config_and_flags_override_them():
    cfg = make_config(recipe="cifar10-fast", precision="bf16")
    assert cfg.recipe == "cifar10-fast"
    assert (cfg.model.name, cfg.train.optimizer, cfg.train.muon_lr, cfg.train.tta, cfg.train.epochs) == (
        "fastnet", "muon", 0.24, "flip-translate", 13)
    assert (cfg.train.low_res_scale, cfg.train.low_res_epochs) == (0.75, 7)
    assert not cfg.train.lookahead
    assert cfg.train.augment == ["altflip", "crop:2"] and cfg.train.nesterov and cfg.data.val_fraction == 0.0
    mine = make_config(recipe="cifar10-fast", precision="bf16", lr=0.5, epochs=4)
    assert mine.train.lr == 0.5 and mine.train.epochs == 4 and mine.train.muon_lr == 0.24


def test_model_options_merge_key_by_key_over_the_recipes(tmp_path):
    # mnist-fast's fastnet has no whitening stem; asking for other widths must not bring the stem back.
    cfg = make_config(recipe="mnist-fast", model_option={"widths": [16, 32, 64]})
    assert cfg.model.options == {"widths": [16, 32, 64], "whiten": False}  # either variant
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  options:\n    pool: ceil\n")
    cfg = make_config(path, recipe="mnist-fast", precision="bf16", model_option={"widths": [8, 8, 8]})
    assert cfg.model.options == {"widths": [8, 8, 8], "whiten": False, "pool": "ceil"}
    # A config file that sets a few values keeps the recipe's others.
    assert (cfg.model.name, cfg.train.optimizer, cfg.train.epochs) == ("fastnet", "muon", 2)
    # Another model does not take the recipe's model options.
    assert make_config(recipe="mnist-fast", model="fastnet_small").model.options == {}


def test_a_recipe_runs_config_yaml_gives_back_the_same_config(tmp_path):
    cfg = make_config(recipe="mnist-fast", lr=0.3, data="mnist")
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert make_config(path).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_has_both_variants_and_each_builds_a_valid_config(name, precision):
    cfg = make_config(recipe=name, precision=precision)
    assert cfg.recipe == name and cfg.train.epochs >= 1
    assert cfg.recipe_variant.startswith(f"{name}, its {precision} variant")
    assert get_recipe(name).variants[precision].measured  # every variant says what it was measured to do


def test_a_cpu_without_native_bf16_takes_the_fp32_variant_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # as on an AVX2-only CPU, whatever this one has
    fp32 = make_config(recipe="mnist-fast", device="cpu")
    assert fp32.train.precision == "auto" and "fp32 variant" in fp32.recipe_variant
    assert (fp32.model.options["widths"], fp32.train.batch_size, fp32.train.low_res_epochs) == ([24, 48, 96], 512, 1.5)
    bf16 = make_config(recipe="mnist-fast", device="cpu", precision="bf16")
    assert (bf16.model.options["widths"], bf16.train.batch_size) == ([32, 64, 128], 1024)
    # Flags still override the variant's values.
    assert make_config(recipe="mnist-fast", device="cpu", batch_size=256).train.batch_size == 256
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "variant fp32" in out and "variant bf16" in out and "this machine (cpu, fp32)" in out
    assert out.count("<- this machine") == len(RECIPES)


def test_a_run_moved_to_a_cpu_without_bf16_keeps_the_variant_its_config_recorded(tmp_path, monkeypatch):
    import imgcls.inference

    monkeypatch.setattr(imgcls.inference, "cpu_has_fast_bf16", lambda: True)
    cfg = make_config(recipe="mnist-fast", device="cpu", data="mnist")
    assert "bf16 variant" in cfg.recipe_variant
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    monkeypatch.setattr(imgcls.inference, "cpu_has_fast_bf16", lambda: False)
    again = make_config(path)
    assert again.recipe_variant == cfg.recipe_variant
    assert (again.model.options["widths"], again.train.batch_size) == ([32, 64, 128], 1024)


def test_cifar10_fast_accepts_small_colour_images_and_refuses_the_rest():
    recipe = get_recipe("cifar10-fast")
    recipe.check(dataset(6000, 32, 32, 3))
    recipe.check(dataset(6000, 40, 28, 3))
    with pytest.raises(ConfigError) as err:
        recipe.check(dataset(300, 8, 8, 1, name="digits"))
    message = str(err.value)
    for part in ("'cifar10-fast'", "digits", "1 channel", "8x8", "300 training images", "--image-size 32"):
        assert part in message
    with pytest.raises(ConfigError, match="its images are 224x224"):
        recipe.check(dataset(6000, 224, 224, 3))


def test_mnist_fast_refuses_colour_images():
    recipe = get_recipe("mnist-fast")
    recipe.check(dataset(6000, 28, 28, 1))
    with pytest.raises(ConfigError, match="3 channels"):
        recipe.check(dataset(6000, 28, 28, 3))


def test_training_with_an_unsuitable_recipe_stops_before_a_run_folder_exists(tmp_path, capsys):
    assert main(["train", "--recipe", "cifar10-fast", "--out", str(tmp_path), "--quiet"]) == 2
    assert "recipe 'cifar10-fast' suits colour" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cifar10-fast.*mnist-fast"):
        make_config(recipe="imagenet-fast")


def test_recipes_command_lists_each_recipe_and_what_it_suits(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        assert name in out
    assert "suits: colour (3-channel) images" in out and "--optimizer muon" in out


def test_changing_a_recipes_epochs_keeps_its_share_of_low_resolution_training(tmp_path):
    # cifar10-fast trains its first 7 of 13 epochs at 24x24; --epochs 26 makes that the first 14, --epochs 3
    # the first 21/13 (7 of 3 epochs would be refused as more than the run).
    assert make_config(recipe="cifar10-fast", precision="bf16").train.low_res_epochs == 7
    assert make_config(recipe="cifar10-fast", precision="bf16", epochs=26).train.low_res_epochs == 14
    assert make_config(recipe="cifar10-fast", precision="bf16", epochs=3).train.low_res_epochs == pytest.approx(21 / 13)
    assert make_config(recipe="cifar10-fast", precision="bf16", epochs=3, low_res_epochs=1).train.low_res_epochs == 1
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 26\n")
    assert make_config(config, recipe="cifar10-fast", precision="bf16").train.low_res_epochs == 14
    config.write_text("train:\n  epochs: 22\n  low_res_epochs: 2\n")
    assert make_config(config, recipe="cifar10-fast", precision="bf16").train.low_res_epochs == 2
