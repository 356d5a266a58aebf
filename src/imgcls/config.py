"""Run configuration: dataclasses for data, model and training; YAML in, YAML out.

Every field is both a config-file field and a command-line flag: the CLI builds
its flags from the ``flag`` and ``help`` metadata below, so the two can never
drift apart.  ``RunConfig.to_dict()`` is the fully resolved config written to
``config.yaml``; ``load_config`` reads it back (``imgcls train --config``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from imgcls.errors import ConfigError, shown_url, url_secrets

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "muon")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "linear", "plateau")
TTA_MODES = ("none", "flip", "translate", "flip-translate")
TTA_AUTO = "auto"  # the config's tta: chosen by stage 1 on val; a model's meta always holds one of TTA_MODES
MONITORS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy", "val_map")  # val_map: several labels per image
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
SWITCHES = ("auto", "on", "off")
RESIZE_MODES = ("stretch", "crop", "pad")
BAD_IMAGE_POLICIES = ("skip", "error")
TRACKERS = ("tensorboard", "mlflow")


def _opt(default: Any, help: str, flag: str | None = None, choices: tuple | None = None, factory=None):
    """A dataclass field carrying its CLI flag, help text and allowed values."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    dataset: str = _opt("digits", "a built-in dataset (digits, mnist, fashion-mnist, cifar10, cifar100) "
                        "or a folder or .zip of class folders", flag="data")
    image_size: list[int] | None = _opt(None, "resize images to HxW (e.g. 32 or 64x48); default: keep their "
                                        "size when all images share one, else 64x64")
    channels: int | None = _opt(None, "1 (grayscale) or 3 (RGB); default: 1 when every image is grayscale")
    resize: str = _opt("stretch", "how to fit images to --image-size", choices=RESIZE_MODES)
    val_fraction: float = _opt(0.1, "share of the training images held out for validation when the data has no val split")
    test_fraction: float = _opt(0.1, "share of the images held out for testing when the data has no test split")
    on_bad_image: str = _opt("skip", "what to do with an image that cannot be decoded", choices=BAD_IMAGE_POLICIES)
    cache: bool = _opt(True, "cache decoded images as uint8 arrays keyed by the source's content, frozen features "
                       "and the backbone's exported graph")
    follow_links: bool = _opt(False, "read links that lead out of the --data folder (refused by default, so that "
                              "a link cannot pull in files from elsewhere)")
    exclude: str | None = _opt(None, "leave out the images a file lists: the issues.csv of `imgcls inspect` (or any "
                               "CSV with a file column), or one path per line, relative to --data")
    ood: str | None = _opt(None, "a folder or zip of images that are none of the classes: the run measures how well "
                           "it tells them apart (default: images at hand, such as scikit-learn's digits)")
    ood_frr: float = _opt(0.05, "the share of in-class images that the out-of-distribution threshold may answer "
                          "'unknown' for, fitted on val: lower rejects fewer of them and accepts more images that "
                          "are none of the classes")
    labels: str | None = _opt(None, "a CSV of several labels per image: filename,labels (labels separated by spaces, "
                              "; or |) or filename and one 0/1 column per label; a labels.csv beside the images is "
                              "found without it")
    # Folders of photos added to --data by `imgcls train --update` (written by imgcls, not a flag): each is split
    # as --data is (seeded, stratified), its classes join --data's (new ones after them), so the run's own data,
    # and `imgcls train --config` of its config.yaml, is --data and these together.
    added: list[str] = field(default_factory=list)


NO_WEIGHTS = "none"  # --pretrained none: random weights, said explicitly


@dataclass
class ModelConfig:
    name: str = _opt("auto", "registered architecture (see `imgcls models`); auto: chosen from the data and the "
                     "machine (a pretrained EfficientNet-Lite0 for photos, fastnet_small for small images)", flag="model")
    pretrained: str | None = _opt(None, "start from pretrained weights: 'imagenet' (the models that have them are "
                                  "marked in `imgcls models`), or a weights file (.safetensors, or a PyTorch state "
                                  "dict, read with weights_only); 'none': random weights (a model with ImageNet "
                                  "weights named on photos starts from them otherwise)")
    options: dict = _opt(None, "architecture option KEY=VALUE (repeatable), e.g. dropout=0.3",
                         flag="model-option", factory=dict)

    @property
    def weights(self) -> str | None:
        """The weights to start from: ``pretrained``, with ``none`` read as no weights."""
        return None if self.pretrained in (None, NO_WEIGHTS) else self.pretrained


@dataclass
class TrainConfig:
    optimizer: str = _opt("adam", "optimiser", choices=OPTIMIZERS)
    lr: float = _opt(1e-3, "peak learning rate")
    momentum: float = _opt(0.9, "momentum (sgd, rmsprop, and muon's SGD part)")
    nesterov: bool = _opt(False, "Nesterov momentum (sgd, muon)")
    muon_lr: float = _opt(0.24, "muon: learning rate of the convolution filters, which Muon updates (the rest "
                          "takes --lr with SGD)")
    muon_momentum: float = _opt(0.6, "muon: momentum of the convolution filters' updates")
    weight_decay: float = _opt(0.0, "weight decay (L2 for sgd/adam/rmsprop, decoupled for adamw)")
    label_smoothing: float = _opt(0.0, "label smoothing in [0, 1)")
    grad_clip: float | None = _opt(None, "clip the gradient's global L2 norm to this value")
    norm_lr_scale: float = _opt(1.0, "multiply the learning rate of normalisation layers' parameters by this; "
                                "their weight decay is divided by it, so the decay per step is unchanged")
    lookahead: bool = _opt(False, "every 5 steps, pull the weights back to a moving average of themselves whose "
                           "weight grows over the run (as hlb-CIFAR10 and airbench); training ends on the average")
    schedule: str = _opt("constant", "learning-rate schedule", choices=SCHEDULES)
    warmup_epochs: float = _opt(0.0, "linear warmup to --lr over this many epochs")
    warmup_start: float | None = _opt(None, "warmup starts at this fraction of --lr (default: 1/25 for "
                                      "onecycle, else 0)")
    step_size: int = _opt(10, "step schedule: epochs between decays")
    gamma: float = _opt(0.1, "step schedule: decay factor")
    min_lr: float = _opt(0.0, "cosine/onecycle/linear: final learning rate; plateau: lower bound")
    plateau_patience: int = _opt(2, "plateau schedule: epochs without improvement before decaying")
    plateau_factor: float = _opt(0.1, "plateau schedule: decay factor")
    epochs: int = _opt(10, "maximum number of epochs (of fine-tuning after --head-first; 0 there: the classifier only)")
    head_first: bool = _opt(False, "transfer learning, stage 1: fit the classifier on the frozen pretrained backbone's "
                            "features (computed once and cached) before any epoch; the flip view is added when "
                            "--augment has hflip")
    fast: bool = _opt(False, "with --model auto on photos: the quickest good run, stage 1 only on EfficientNet-Lite0 "
                      "(no fine-tuning, whatever the machine or budget)")
    backbone_lr_scale: float = _opt(1.0, "multiply the learning rate of every parameter but the classifier's by this "
                                    "(fine-tuning a pretrained backbone: 0.1)")
    time_budget: str | None = _opt(None, "stop training before this much time has passed since the data was ready "
                                   "(e.g. 90s, 5m, 1h); at least the first stage always runs")
    low_res_scale: float = _opt(1.0, "progressive resizing: train the first --low-res-epochs on images scaled by "
                                "this factor (0.75: 32x32 trains at 24x24, for about 0.56 of the compute); the "
                                "rest, and every evaluation, at full size; 1 = off")
    low_res_epochs: float = _opt(0.0, "progressive resizing: how many epochs (fractions allowed) train at "
                                 "--low-res-scale")
    batch_size: int = _opt(64, "training batch size (the global batch when several processes train: each takes "
                           "a slice)")
    sync_bn: bool = _opt(False, "several processes: BatchNorm statistics over the global batch instead of each "
                         "process's slice (slower: every BatchNorm layer waits for the others)")
    eval_batch_size: int = _opt(512, "batch size for evaluation and prediction")
    early_stopping: bool = _opt(False, "stop when the monitored metric stops improving")
    monitor: str = _opt("val_loss", "metric for early stopping, plateau and the best checkpoint", choices=MONITORS)
    patience: int = _opt(3, "early stopping: epochs without improvement before stopping")
    min_delta: float = _opt(0.0, "early stopping: smallest change that counts as an improvement")
    restore_best: bool = _opt(True, "early stopping: end with the best epoch's weights")
    class_weights: Any = _opt(None, "'balanced', or one weight per class as a comma-separated list")
    augment: list[str] = _opt(None, "augmentations, comma-separated: hflip, rotate:DEG, zoom:F, "
                              "translate:PX, crop:PX, jitter:F, cutout:PX", factory=list)
    device: str = _opt("auto", "training device", choices=DEVICES)
    precision: str = _opt("auto", "bf16 autocast (auto: on where the device runs bf16 fast)", choices=PRECISIONS)
    channels_last: str = _opt("auto", "channels_last memory format (auto: on on CPU, and on CUDA with bf16)", choices=SWITCHES)
    seed: int = _opt(0, "random seed: a run repeats exactly on the same machine")
    top_k: int = _opt(5, "k of the top-k accuracy reported by evaluation")
    tta: str = _opt("none", "test-time augmentation, kept with the model and used wherever it predicts: "
                    "average the logits over mirrored and/or 1-pixel-shifted copies; auto: flip when stage 1's "
                    "val loss says it helps (--head-first), else none", choices=TTA_MODES + (TTA_AUTO,))


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = _opt("runs", "folder that holds run folders", flag="out")
    name: str | None = _opt(None, "run name (default: <dataset>-<model>-<time>)")
    report: bool = _opt(True, "calibrate on the val split and write report.html when training ends")
    recipe: str | None = _opt(None, "a named set of settings tuned for a kind of data (see `imgcls recipes`); "
                              "flags given beside it override its values")
    track: list[str] = _opt(  # noqa: RUF009 (a list, as augment: _opt gives it a default_factory)
        None, "experiment trackers, comma-separated or repeated: tensorboard (event files in <run>/tensorboard), "
        "mlflow (see --mlflow-uri); needs pip install 'imgcls[track]'", factory=list)
    mlflow_uri: str | None = _opt(None, "MLflow tracking URI for --track mlflow, e.g. http://127.0.0.1:5000 "
                                  "(default: sqlite:///<out>/mlflow.db, artefacts in <out>/mlartifacts)")
    auto: str | None = None  # what `--model auto` chose and why (written by imgcls, not a flag)
    recipe_variant: str | None = None  # which of the recipe's variants was taken and why (written by imgcls)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every value that can be checked without data; raise ConfigError.  Changes nothing."""
        for where, obj in (("", self), ("data.", self.data), ("model.", self.model), ("train.", self.train)):
            _check_types(obj, where)
        for section in (self.data, self.train):
            for f in fields(section):
                choices = f.metadata.get("choices")
                value = getattr(section, f.name)
                if choices and value not in choices:
                    raise ConfigError(f"{f.name} {shown(value)} is not accepted; choose one of: {', '.join(choices)}")
        d, t = self.data, self.train
        if self.name is not None:
            check_run_name(self.name)
        _check_track(self.track, self.mlflow_uri)
        # The epochs first: the ranges of warmup_epochs and low_res_epochs depend on them.
        _check_int("epochs", t.epochs, 0 if t.head_first else 1, 1_000_000)
        _check_int("seed", t.seed, 0, 2**32 - 1)
        _check_range("val_fraction", d.val_fraction, 0.0, 0.9)
        _check_range("test_fraction", d.test_fraction, 0.0, 0.9)
        _check_range("ood_frr", d.ood_frr, 0.0, 0.5, low_open=True)
        if d.val_fraction + d.test_fraction >= 1.0:
            raise ConfigError("val_fraction + test_fraction must be below 1 so that images remain for training")
        if not isinstance(d.added, list) or not all(isinstance(a, str) and a.strip() for a in d.added):
            raise ConfigError(f"data.added must be a list of folders (written by imgcls train --update), got "
                              f"{shown(d.added)}")
        if d.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {d.channels!r}")
        if d.image_size is not None:
            parse_image_size(d.image_size)
        _check_range("lr", t.lr, 0.0, 100.0, low_open=True)
        _check_range("label_smoothing", t.label_smoothing, 0.0, 0.999)
        _check_range("momentum", t.momentum, 0.0, 0.9999)
        _check_range("weight_decay", t.weight_decay, 0.0, 1.0)
        _check_range("gamma", t.gamma, 0.0, 1.0, low_open=True)
        _check_range("plateau_factor", t.plateau_factor, 0.0, 1.0, low_open=True)
        _check_range("min_lr", t.min_lr, 0.0, t.lr)
        _check_range("warmup_epochs", t.warmup_epochs, 0.0, float(t.epochs))
        _check_range("low_res_scale", t.low_res_scale, 0.0, 1.0, low_open=True)
        _check_range("low_res_epochs", t.low_res_epochs, 0.0, float(t.epochs))
        if t.warmup_start is not None:
            _check_range("warmup_start", t.warmup_start, 0.0, 1.0)
        _check_range("norm_lr_scale", t.norm_lr_scale, 0.0, 10_000.0, low_open=True)
        for name in ("batch_size", "eval_batch_size", "step_size", "top_k"):
            _check_int(name, getattr(t, name), 1, 1_000_000)
        _check_range("backbone_lr_scale", t.backbone_lr_scale, 0.0, 1.0)
        if t.time_budget is not None:
            parse_duration(t.time_budget)
        if t.head_first and not self.model.weights:
            raise ConfigError("head_first fits the classifier on a pretrained backbone's features; give --pretrained "
                              "imagenet (or a weights file) with it")
        for name in ("patience", "plateau_patience"):
            _check_int(name, getattr(t, name), 0, 1_000_000)
        if t.grad_clip is not None:
            _check_range("grad_clip", t.grad_clip, 0.0, math.inf, low_open=True)
        parse_class_weights(t.class_weights)
        if t.nesterov and t.optimizer not in ("sgd", "muon"):
            raise ConfigError(f"nesterov applies to the sgd and muon optimizers only, not {t.optimizer!r}")
        _check_range("muon_lr", t.muon_lr, 0.0, 100.0, low_open=True)
        _check_range("muon_momentum", t.muon_momentum, 0.0, 0.9999)
        if t.nesterov and t.momentum <= 0:
            raise ConfigError("nesterov needs momentum > 0")

    def resolved(self) -> RunConfig:
        """A new, checked RunConfig with its values in their canonical form.

        ``image_size`` becomes ``[height, width]``, ``class_weights`` a list or
        ``"balanced"``, ``augment`` a list; this config is left as it was.
        """
        self.validate()
        d, t = self.data, self.train
        data = replace(d, image_size=None if d.image_size is None else parse_image_size(d.image_size),
                       added=list(d.added))
        augment = list(t.augment) if isinstance(t.augment, list) else split_list(t.augment)
        train = replace(t, class_weights=parse_class_weights(t.class_weights), augment=augment)
        return replace(self, data=data, model=replace(self.model, options=dict(self.model.options)), train=train,
                       track=list(dict.fromkeys(split_list(self.track))))


# Fields whose own parser takes more than their annotation says (a "32x32" size, a "90s" budget, "a,b" lists).
_OWN_PARSER = {"image_size", "time_budget", "class_weights", "augment", "track", "added"}
_KINDS = {str: "a string", bool: "true or false", int: "a whole number", float: "a number", dict: "a mapping"}


def _check_types(obj, where: str) -> None:
    """ConfigError naming the field when a value is not of its field's type (a config file can hold anything)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        if name in _OWN_PARSER or dataclasses.is_dataclass(hint):
            continue
        value = getattr(obj, name)
        allowed = tuple(t for t in typing.get_args(hint) if t is not type(None)) or (hint,)
        optional = type(None) in typing.get_args(hint)
        if value is None and optional:
            continue
        if not all(t in _KINDS for t in allowed):
            continue  # nothing simple to check
        fits = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in allowed)
        fits = fits or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            kinds = " or ".join(_KINDS[t] for t in allowed) + (" (or left out)" if optional else "")
            raise ConfigError(f"{where}{name} must be {kinds}, got {shown(value)}")
    if where == "train." and not isinstance(obj.augment, (str, list)) or (
            where == "train." and isinstance(obj.augment, list) and not all(isinstance(a, str) for a in obj.augment)):
        raise ConfigError(f"train.augment must be a list of augmentations or a comma-separated string "
                          f"(e.g. hflip,crop:4), got {shown(obj.augment)}")


_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def shown(value) -> str:
    """A short repr of ``value``: an error message never echoes (or builds) a huge value."""
    return _SHORT.repr(value)


MAX_RUN_NAME_BYTES = 200  # a run name is a folder name: file systems allow 255 bytes, and --out may add "-2"


def check_run_name(name) -> None:
    """A run name is one folder name inside --out: no path separators, not '.' or '..', not hidden, not long."""
    if isinstance(name, str) and len(name.encode("utf-8", "surrogateescape")) > MAX_RUN_NAME_BYTES:
        raise ConfigError(f"name {shown(name)} is too long: {len(name):,} characters, where a run name (a folder "
                          f"name) may have {MAX_RUN_NAME_BYTES} bytes at most")
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or name.startswith(".")
            or any(ch in name for ch in ("/", "\\", "\0"))):
        raise ConfigError(f"name {shown(name)} is not accepted: a run name is one folder name inside --out "
                          f"(letters, digits, '-', '_', ...; no '/', '\\' or leading '.'), such as 'flowers-1'")


def _check_track(track, mlflow_uri) -> None:
    """``track``: a list of tracker names or a comma-separated string of them; ``mlflow_uri`` only beside mlflow."""
    if not (isinstance(track, str) or isinstance(track, list) and all(isinstance(n, str) for n in track)):
        raise ConfigError(f"track must be a list of trackers or a comma-separated string (e.g. tensorboard,mlflow), "
                          f"got {shown(track)}")
    names = split_list(track)
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"track {shown(name)} is not accepted; choose one or more of: {', '.join(TRACKERS)}")
    if mlflow_uri is not None and url_secrets(str(mlflow_uri)):
        raise ConfigError(f"mlflow_uri {shown(shown_url(str(mlflow_uri)))} holds a password or token, which would "
                          f"be printed and stored in config.yaml; give the URI without it, and the credentials in "
                          f"MLflow's own environment variables MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                          f"(or MLFLOW_TRACKING_TOKEN)")
    if mlflow_uri is not None and "mlflow" not in names:
        raise ConfigError(f"mlflow_uri {shown(mlflow_uri)} is given but track does not name mlflow; add --track mlflow")


def _check_range(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not is_number or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")


def _check_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


def parse_duration(value) -> float:
    """'90s', '5m', '1.5h', '300' (seconds) or a number -> seconds; refuses anything else."""
    units = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(value).lower())
            if match is None:
                raise ValueError
            seconds = float(match.group(1)) * units[match.group(2)]
        if not 0 < seconds < 1e7 or math.isnan(seconds):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"time_budget must be a duration such as 90s, 5m or 1h, got {value!r}") from None
    return seconds


def split_list(value) -> list[str]:
    """'a,b' or ['a', 'b'] or None -> ['a', 'b']."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def parse_image_size(value) -> list[int]:
    """32, '32', '64x48', [64, 48] -> [H, W]; refuses anything else."""
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.lower().split("x")]
        elif isinstance(value, int):
            parts = [value]
        else:
            parts = [int(p) for p in value]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(4 <= p <= 4096 for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"image_size must be N or HxW with sides from 4 to 4096 pixels, got {value!r}") from None
    return parts


def parse_class_weights(value):
    """None, 'balanced', '1,2,3' or [1, 2, 3] -> None, 'balanced' or list[float]."""
    if value is None or value == "balanced":
        return value
    try:
        weights = [float(v) for v in split_list(value)] if isinstance(value, str) else [float(v) for v in value]
    except (TypeError, ValueError):
        weights = []
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ConfigError(f"class_weights must be 'balanced' or non-negative numbers, one per class; got {value!r}")
    return weights


def _section_from_dict(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config field {where}.{unknown[0]}; fields of {where!r} are: {', '.join(sorted(known))}")
    return cls(**values)


def config_from_dict(values: dict) -> RunConfig:
    """Build a validated RunConfig from a (possibly partial) nested dict."""
    values = dict(values or {})
    sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
    top = tuple(f.name for f in fields(RunConfig) if f.name not in sections)
    known = set(sections) | set(top)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config field {unknown[0]!r}; top-level fields are: {', '.join(sorted(known))}")
    kwargs = {k: _section_from_dict(cls, values.get(k) or {}, k) for k, cls in sections.items()}
    kwargs.update({k: values[k] for k in top if k in values})
    return RunConfig(**kwargs).resolved()


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML config file (a full config.yaml or any subset of it)."""
    return config_from_dict(_read_yaml(path))


def read_config_values(path: str | Path) -> dict:
    """The values a YAML config file sets (only those), checked as :func:`load_config` checks them."""
    values = _read_yaml(path)
    config_from_dict(copy.deepcopy(values))
    return values


class _ConfigLoader(yaml.SafeLoader):
    """YAML without aliases (a config never needs them, and nested ones expand to billions of values) and
    without a key given twice in one mapping (YAML keeps the last silently: the first would be lost)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: aliases (*{event.anchor}) are not accepted in "
                                 f"a config file; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if duplicate:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: the key {shown(key)} is given twice in "
                                     f"one mapping; keep one")
        return super().construct_mapping(node, deep)


class _ConfigDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # config.yaml is read back by _ConfigLoader
        return True


def parse_yaml_value(text: str):
    """The YAML document ``text`` (safe types, no aliases); ConfigError in one line of at most 300 characters."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        said = " ".join(re.sub(r'\s*in "<unicode string>"', "", str(exc)).split())
        raise ConfigError(f"is not valid YAML: {said[:300]}") from None
    except RecursionError:
        raise ConfigError("is not valid YAML here: it nests too deeply") from None


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = parse_yaml_value(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (UTF-8); give a YAML file such as a run's "
                          f"config.yaml") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {path} {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, train), "
                          f"got {type(values).__name__}")
    return values


def dump_config(cfg: RunConfig) -> str:
    return yaml.dump(cfg.to_dict(), Dumper=_ConfigDumper, sort_keys=False)


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Flat option names (CLI flags with ``_``, Python keywords) -> (section, field)."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for section, cls in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
        for f in fields(cls):
            if f.metadata:  # a field without help (data.added) is written by imgcls, not given as a flag
                out[(f.metadata.get("flag") or f.name).replace("-", "_")] = (section, f)
    for f in fields(RunConfig):
        if f.metadata:
            out[(f.metadata.get("flag") or f.name).replace("-", "_")] = (None, f)
    return out


def apply_overrides(values: dict, overrides: dict) -> dict:
    """Set flat options (``lr=0.1``, ``data="x.zip"``) into a nested config dict.

    ``None`` values are ignored, so unset CLI flags leave the config as it was.
    """
    table = flat_fields()
    for key, value in overrides.items():
        if value is None:
            continue
        key = {"model_options": "model_option"}.get(key, key)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)  # config.yaml holds plain strings
        if key not in table:
            raise ConfigError(f"unknown option {key!r}; options are: {', '.join(sorted(table))}")
        section, f = table[key]
        if section is None:
            values[f.name] = value
        else:
            values.setdefault(section, {})[f.name] = value
    return values


def layer_settings(values: dict, settings: dict, option_layers: list[dict], why: str | None,
                   from_recipe: bool) -> RunConfig:
    """The RunConfig of the user's ``values`` laid over ``settings`` (a recipe's, or what ``--model auto`` chose).

    Args:
        values: nested config values the user set (config file, then flags).
        settings: flat settings that lie under them (``{}`` for none).
        option_layers: the model options the user gave, the config file's
            then the flags'; model options merge key by key (the settings',
            then these), except that the settings' are dropped when the model
            is not theirs.
        why: the line saying what the settings are, kept in ``recipe_variant``
            (a recipe) or ``auto`` (the auto choice).
        from_recipe: whether ``settings`` are a recipe's.
    """
    layers = list(option_layers)
    if settings and (values.get("model") or {}).get("name") == "auto":
        values = copy.deepcopy(values)
        del values["model"]["name"]  # an explicit --model auto asks for what the auto layer chose
    base_model = settings.get("model") if settings else None
    if settings:
        layers.insert(0, dict(settings.get("model_option") or {}))
        base = apply_overrides({}, settings)
        _keep_low_res_share(base, values, settings)
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key].update(value)
            else:
                base[key] = value
        values = base
    cfg = config_from_dict(values)
    if settings and cfg.model.name != base_model:
        layers = layers[1:]
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    cfg.model.options = merged
    if why and from_recipe:
        cfg.recipe_variant = cfg.recipe_variant or why  # a resumed run's config.yaml keeps the variant it took
    elif why:
        cfg.auto = why
    return cfg


def _keep_low_res_share(base: dict, user: dict, settings: dict) -> None:
    """When only the epochs of a recipe with progressive resizing change, keep its share of the run.

    ``--recipe cifar10-fast --epochs 26`` trains the first 14 epochs at low
    resolution (the recipe's 7 of 13), not 7; a ``low_res_epochs`` the user
    sets is kept as it is.
    """
    given = user.get("train") or {}
    epochs = given.get("epochs")
    if (not settings.get("low_res_epochs") or "low_res_epochs" in given or isinstance(epochs, bool)
            or not isinstance(epochs, int) or epochs < 1):
        return
    base.setdefault("train", {})["low_res_epochs"] = settings["low_res_epochs"] * epochs / settings["epochs"]
