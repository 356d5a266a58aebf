"""Config validation: bad values are refused with messages naming them and what is accepted."""

import re

import pytest

from imgcls.api import make_config
from imgcls.config import config_from_dict, dump_config, load_config, parse_image_size
from imgcls.errors import ConfigError


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer": "adagrad"}, "optimizer 'adagrad' is not accepted; choose one of: sgd, adam, adamw, rmsprop"),
    ({"schedule": "triangle"}, "choose one of: constant, step, cosine, onecycle, linear, plateau"),
    ({"batch_size": 0}, "batch_size must be a whole number from 1"),
    ({"epochs": 2.5}, "epochs must be a whole number"),
    ({"lr": -1.0}, "lr must be a number in (0"),
    ({"lr": float("nan")}, "lr must be a number"),
    ({"label_smoothing": 1.0}, "label_smoothing must be a number in [0"),
    ({"image_size": "0x32"}, "image_size must be N or HxW"),
    ({"image_size": "big"}, "image_size must be N or HxW"),
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"class_weights": "heavy"}, "class_weights must be 'balanced' or non-negative numbers"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction + test_fraction must be below 1"),
    ({"nesterov": True, "optimizer": "adam"}, "nesterov applies to the sgd and muon optimizers only"),
    ({"monitor": "accuracy"}, "choose one of: val_loss, val_accuracy, train_loss, train_accuracy"),
    ({"low_res_scale": 0.0}, "low_res_scale must be a number in (0, 1]"),
    ({"low_res_scale": 1.5}, "low_res_scale must be a number in (0, 1]"),
    ({"low_res_epochs": 3.0, "epochs": 2}, "low_res_epochs must be a number in [0, 2]"),
])
def test_bad_values_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        make_config(**overrides)
    assert message in str(err.value)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'; options are: .*lr"):
        make_config(learning_rate=0.1)


def test_unknown_config_file_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config field train.epoch; fields of 'train' are: .*epochs"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = make_config(data="cifar10", lr=0.05, augment="hflip,crop:4", image_size="40x32", class_weights="1,2")
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert again.data.image_size == [40, 32] and again.train.augment == ["hflip", "crop:4"]
    assert again.train.class_weights == [1.0, 2.0]


def test_image_size_forms():
    assert parse_image_size(32) == [32, 32]
    assert parse_image_size("64x48") == [64, 48]
    assert parse_image_size([10, 12]) == [10, 12]


def test_empty_dict_is_the_default_config():
    cfg = config_from_dict({})
    assert cfg.data.dataset == "digits" and cfg.train.epochs == 10


def test_paths_are_accepted_and_stored_as_text(tmp_path):
    cfg = make_config(data=tmp_path / "photos.zip", out=tmp_path / "runs")
    assert cfg.data.dataset == str(tmp_path / "photos.zip") and cfg.out_dir == str(tmp_path / "runs")
    assert "photos.zip" in dump_config(cfg)


@pytest.mark.parametrize("overrides, words", [
    ({"name": "../../x"}, "name '../../x' is not accepted"),
    ({"name": "a/b"}, "name 'a/b' is not accepted"),
    ({"name": ".."}, "name '..' is not accepted"),
    ({"epochs": -3}, "epochs must be a whole number from 1"),
    ({"seed": -1}, "seed must be a whole number from 0"),
])
def test_hostile_names_epochs_and_seeds_get_the_message_that_names_them(overrides, words):
    from imgcls.api import make_config

    with pytest.raises(ConfigError, match=re.escape(words)):
        make_config(**overrides)


def test_a_run_name_with_a_path_never_leaves_out(tmp_path, capsys):
    from imgcls.cli import main

    out = tmp_path / "runs"
    assert main(["train", "--out", str(out), "--name", "../../escaped", "--epochs", "1", "--no-report"]) == 2
    assert "name '../../escaped' is not accepted" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escaped"))
