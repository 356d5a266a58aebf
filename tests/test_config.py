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


def _alias_bomb(levels: int = 9) -> str:
    lines = ["train:", '  augment: &a0 ["x","x","x","x","x","x","x","x","x","x"]', "model:", "  options:"]
    for i in range(1, levels + 1):
        lines.append(f"    k{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("content, words", [
    ('train:\n  epochs: "two"\n', "train.epochs must be a whole number, got 'two'"),
    ("data:\n  dataset: 12\n", "data.dataset must be a string, got 12"),
    ('train:\n  seed: "abc"\n', "train.seed must be a whole number, got 'abc'"),
    ('model:\n  options: "not a dict"\n', "model.options must be a mapping"),
    ("train:\n  augment: 5\n", "train.augment must be a list of augmentations"),
    ('data:\n  cache: "no"\n', "data.cache must be true or false, got 'no'"),
    ("train:\n  lr: [1, 2]\n", "train.lr must be a number"),
    ("report: 1\n", "report must be true or false"),
    (_alias_bomb(), "aliases (*a0) are not accepted"),
    (b"\x7fELF\x02\x01\x01\x00\xd0\xff\xfe", "is not text (UTF-8)"),
])
def test_hostile_config_files_get_one_line_naming_the_field(tmp_path, capsys, content, words):
    from imgcls.cli import main

    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "runs"), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err) < 600, err[:2000]
    assert not (tmp_path / "runs").exists()


def test_a_config_yaml_never_holds_aliases_so_it_reads_back(tmp_path):
    cfg = make_config(augment=["hflip"], model_option={"widths": [8, 16, 16]})
    cfg.train.augment = cfg.model.options["w"] = ["same", "list"]  # one object twice: safe_dump would alias it
    text = dump_config(cfg)
    assert "&" not in text and "*" not in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path).train.augment == ["same", "list"]


def test_an_option_of_the_wrong_kind_names_the_model_and_option(capsys):
    from imgcls.cli import main

    assert main(["train", "--model-option", "widths=abc", "--epochs", "1", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "model 'fastnet_small' cannot take the options widths='abc'" in err and "Traceback" not in err


def test_validation_changes_nothing_and_resolving_gives_a_new_config():
    import copy

    from imgcls.config import RunConfig

    cfg = RunConfig()
    cfg.data.image_size, cfg.train.augment, cfg.train.class_weights = "32x48", "hflip,crop", "1,2"
    before = copy.deepcopy(cfg)
    assert cfg.validate() is None and cfg == before
    resolved = cfg.resolved()
    assert resolved is not cfg and cfg == before
    assert resolved.data.image_size == [32, 48] and resolved.train.augment == ["hflip", "crop"]
    assert resolved.train.class_weights == [1.0, 2.0]
    resolved.model.options["dropout"] = 0.5  # the new config shares no mutable part with the old
    assert cfg.model.options == before.model.options


def test_a_setting_that_follows_the_data_comes_back_in_a_new_config():
    import numpy as np

    from imgcls.data.base import ImageDataset, Split
    from imgcls.training.trainer import check_compatible

    cfg = make_config(val_fraction=0.0, model_option={"widths": [8, 8, 8]})
    split = Split(np.zeros((80, 8, 8, 1), np.uint8), np.arange(80) % 2)
    ds = ImageDataset("tiny", ["a", "b"], {"train": split, "test": split})
    resolved, notes = check_compatible(cfg, ds)
    assert cfg.train.monitor == "val_loss" and resolved.train.monitor == "train_loss"
    assert notes == ["no val split: the best checkpoint is chosen by train_loss"]
