"""Search spaces: which config fields a study varies, and over what.

A space maps flat config field names (as ``imgcls train --help`` names the
flags, with ``_``: ``lr``, ``weight_decay``, ``batch_size``) to a range or a
list of choices.  In YAML (``imgcls tune --space space.yaml``; ``--show-space``
prints the default one in this form)::

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}    # log-uniform
    label_smoothing: {low: 0.0, high: 0.2}        # uniform
    epochs: {low: 2, high: 6, step: 2}            # a whole-number field gives whole numbers
    batch_size: [32, 64, 128]                     # choices (or {choices: [...]})
    optimizer: [adam, adamw, sgd]
    model_option.widths: [[16, 32, 64], [32, 64, 128]]   # a model option (--model-option widths=...)

A field lists at most 1,000 choices, and the grid sampler takes at most
100,000 combinations; larger ones are refused before anything is checked or
built.

A model option is named ``model_option.KEY`` (or ``model.options.KEY``, as
config.yaml nests it); it is merged into the ``--model-option`` values given.
A choice may be a list (Optuna stores it as its YAML text, ``"[16, 32, 64]"``,
and each trial gets the list back).

Everything is checked before the first trial: an unknown field, a bad range
and a value the field cannot take (each bound and each choice goes through
the config checks, with their messages) are refused; a model option the model
does not take is refused with the message training would give, and each of
its values builds the model once (at the config's image size, else 64x64).  What only the data can
refuse (a batch larger than the training set) fails that trial alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from imgcls.config import (
    RunConfig,
    flat_fields,
    parse_image_size,
    parse_yaml_value,
    shown,
)
from imgcls.errors import ConfigError
from imgcls.models.pretrained import models_with_weights
from imgcls.models.registry import check_options, create_model, model_options

MAX_CHOICES = 1_000  # values one field may list
MAX_GRID_POINTS = 100_000  # combinations the grid sampler may hold (each a trial; Optuna keeps the grid in memory)


# Fields a study cannot vary, and why.
NOT_SEARCHED = {
    "data": "the data is what a study tunes on; give it with --data",
    "out": "the study folder holds the trials; give it with --out",
    "name": "trials are named trial-<number>; name the study with --study",
    "model_option": "name one model option at a time, as model_option.KEY (e.g. model_option.widths: "
                    "[[16, 32, 64], [32, 64, 128]])",
}
_SCALARS = (str, int, float, bool, type(None))  # what an Optuna categorical choice may be
MODEL_OPTION = "model_option."  # a space's key for one model option: model_option.KEY
_MODEL_OPTION_ALIASES = ("model.options.", "model_options.")  # config.yaml's nesting, the Python keyword's
_CHECK_SIZE = (64, 64)  # (H, W) a model option's values are built at when the config gives no --image-size


def _encoded(choice):
    """``choice`` as an Optuna categorical choice: itself when a single value, else its YAML text."""
    if isinstance(choice, _SCALARS):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True, width=10_000).strip()


def _plain(value):
    """``value`` with tuples as lists, as YAML gives them."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Param:
    """One searched field: a range (``kind`` "float" or "int") or a list of ``choices`` ("categorical")."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def to_dict(self) -> dict:
        """The YAML form (what a space file holds for this field)."""
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def values_to_check(self) -> list[tuple[str, object]]:
        """(what, value) pairs that the config checks see before any trial: each bound or each choice."""
        if self.kind == "categorical":
            return [(f"choice {shown(c)}", c) for c in self.choices]
        return [("low", self.low), ("high", self.high)]

    def stored(self) -> list:
        """The choices as Optuna stores them (a list as its YAML text)."""
        return [_encoded(c) for c in self.choices]

    def index(self, value) -> int | None:
        """The position of ``value`` (as a trial has it, or as Optuna stored it) among the choices; None if absent."""
        keys = [repr(c) for c in self.stored()]
        for key in (repr(_encoded(_plain(value))), repr(value)):
            if key in keys:
                return keys.index(key)
        return None

    def decode(self, value):
        """A value as Optuna stored it, back as this field's (a list choice's text as the list)."""
        if self.kind == "categorical":
            return dict(zip(map(repr, self.stored()), self.choices)).get(repr(value), value)
        return value

    def suggest(self, trial):
        """This field's value for an Optuna ``trial``."""
        if self.kind == "categorical":
            return self.decode(trial.suggest_categorical(self.name, self.stored()))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid_size(self) -> int | None:
        """How many values :meth:`grid` gives, counted without building them; None for a continuous range."""
        if self.kind == "categorical":
            return len(self.stored())
        if self.kind == "int" and not self.log:
            return max(0, (int(self.high) - int(self.low)) // int(self.step or 1) + 1)
        if self.kind == "float" and self.step is not None:
            return max(0, math.floor((self.high - self.low) / self.step + 1e-9) + 1)
        return None

    def grid(self) -> list | None:
        """Every value, for the grid sampler; None for a continuous range."""
        if self.kind == "categorical":
            return self.stored()
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "float" and self.step is not None:
            count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        return None


Space = dict  # field name -> Param, in the order the trials suggest them


def space_to_dict(space: Space) -> dict:
    return {name: p.to_dict() for name, p in space.items()}


def space_yaml(space: Space, title: str = "") -> str:
    """The space as a file that ``--space`` reads back, one field a line, ``title`` as comment lines."""
    lines = [f"# {line}" for line in title.splitlines()]
    for name, p in space.items():
        text = yaml.safe_dump(p.to_dict(), default_flow_style=True, width=10_000, sort_keys=False)
        lines.append(f"{name}: {text.strip()}")
    return "\n".join(lines) + "\n"


def read_space(path: str | Path) -> Space:
    """The space in a YAML file, its form checked (the values are checked by :func:`check_space`)."""
    path = Path(path)
    where = f"space file {path}"
    if not path.is_file():
        raise ConfigError(f"{where} {'is not a file' if path.exists() else 'does not exist'}; give a YAML file as "
                          f"--show-space prints it")
    try:
        values = parse_yaml_value(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not text (UTF-8); give a YAML file as --show-space prints it") from None
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc}") from None
    return parse_space(values, where)


def parse_space(values, where: str = "space") -> Space:
    """A space from its dict form (a space file's content, or ``api.tune(space={...})``)."""
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{where} must map config fields to ranges or choices (e.g. lr: {{low: 1.0e-4, high: "
                          f"1.0e-2, log: true}}), got {shown(values)}")
    table = flat_fields()
    space = {}
    for key, spec in values.items():
        key = _key(str(key), where)
        if key.startswith(MODEL_OPTION):
            space[key] = _param(key, spec, where)
            continue
        if key not in table:
            raise ConfigError(f"{where}: unknown config field {key!r}; fields are: {', '.join(sorted(table))}")
        if key in NOT_SEARCHED:
            raise ConfigError(f"{where}: {key} cannot be searched: {NOT_SEARCHED[key]}")
        space[key] = _param(key, spec, where)
    return space


def _key(key: str, where: str) -> str:
    """A space's key in its canonical form: a flat field (``_`` for ``-``), or ``model_option.KEY``."""
    for alias in _MODEL_OPTION_ALIASES:
        if key.startswith(alias):
            key = MODEL_OPTION + key[len(alias):]
    if key.startswith(MODEL_OPTION):
        if not key[len(MODEL_OPTION):].isidentifier():
            raise ConfigError(f"{where}: {key!r} does not name a model option; write model_option.KEY, e.g. "
                              f"model_option.widths")
        return key
    return key.replace("-", "_")


def _field_kind(key: str, spec: dict) -> tuple[str, str]:
    """(the field's kind: "int", "float" or "other"; its dotted name, as config.yaml's messages give it).

    A model option has no declared type: a range of whole numbers is "int", any other range "float".
    """
    if key.startswith(MODEL_OPTION):
        bounds = [spec.get(b) for b in ("low", "high", "step") if spec.get(b) is not None]
        whole = bounds and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        return ("int" if whole else "float"), f"model.options.{key[len(MODEL_OPTION):]}"
    section, f = flat_fields()[key]
    kind = str(f.type)
    dotted = f"{section}.{f.name}" if section else f.name
    if kind.startswith("int"):
        return "int", dotted
    if kind.startswith("float"):
        return "float", dotted
    return "other", dotted


def _param(key: str, spec, where: str) -> Param:
    at = f"{where}: {key}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{at} must be a range ({{low: L, high: H}}, optionally log: true or step: S) or a list "
                          f"of choices, got {shown(spec)}")
    unknown = sorted(set(map(str, spec)) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise ConfigError(f"{at}: unknown key {unknown[0]!r}; a range has low, high and optionally log or step, "
                          f"a list of values has choices")
    kind, dotted = _field_kind(key, spec)
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ConfigError(f"{at}: give either choices or a range (low, high), not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at}: choices must be a non-empty list, got {shown(choices)}")
        if len(choices) > MAX_CHOICES:  # each is checked as a config (about 2 ms): 200,000 took minutes
            raise ConfigError(f"{at}: {len(choices):,} choices, more than the {MAX_CHOICES:,} a field may list; "
                              f"give a range (low, high, and a step for evenly spaced values)")
        choices = _plain(choices)
        bad = [c for c in choices if not isinstance(c, (*_SCALARS, list, dict))]
        if bad:
            raise ConfigError(f"{at}: a choice must be a value (text, number, true/false, null) or a list of "
                              f"them, got {shown(bad[0])}")
        if len({repr(_encoded(c)) for c in choices}) != len(choices):
            raise ConfigError(f"{at}: choices {shown(choices)} name a value twice")
        return Param(key, "categorical", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{at}: a range needs both low and high, got {shown(spec)}")
    if kind == "other":
        raise ConfigError(f"{at}: {dotted} is not a number, so it takes a list of choices, not a range "
                          f"(e.g. {key}: [a, b])")
    low, high = (_number(spec[b], b, at, dotted, kind) for b in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: log must be true or false, got {shown(log)}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, "step", at, dotted, kind)
        if step <= 0:
            raise ConfigError(f"{at}: step must be above 0, got {step!r}")
        if log:
            raise ConfigError(f"{at}: give log or step, not both (a log range has no even step)")
    if not low < high:
        raise ConfigError(f"{at}: bad range: low {low!r} must be below high {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{at}: bad range: a log range needs low above 0, got {low!r}")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _number(value, what: str, at: str, dotted: str, kind: str):
    """A bound as a number of the field's kind; numeric text is read (YAML reads ``1e-4`` as text)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{at}: {what}: {dotted} must be a number, got {shown(value)}")
    if kind == "int":
        if float(value) != int(value):
            raise ConfigError(f"{at}: {what}: {dotted} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def check_space(space: Space, make, flags: dict) -> None:
    """Refuse, before any trial, a space that no trial could run.

    Args:
        space: the space.
        make: ``make(params) -> RunConfig``, the config a trial with these
            flat values would train (raises ConfigError as config.yaml would).
        flags: the flat options given beside the space (command-line flags):
            a field both given and searched is refused.
    """
    both = sorted(k for k in space if k in given_names(flags))
    if both:
        flag = (f"--model-option {both[0][len(MODEL_OPTION):]}=..." if both[0].startswith(MODEL_OPTION)
                else f"--{both[0].replace('_', '-')}")
        raise ConfigError(f"{both[0]} is both given ({flag}) and searched (in the space); drop one of them")
    check_model(make(as_options({}, flags)))  # the options given beside the space (--model-option)
    for key, param in space.items():
        for what, value in param.values_to_check():
            try:
                cfg = make(as_options({key: value}, flags))
                if key.startswith(MODEL_OPTION):
                    check_model(cfg, key[len(MODEL_OPTION):])
            except ConfigError as exc:
                raise ConfigError(f"space: {key}: {what} is refused: {exc}") from None


def given_names(flags: dict) -> set[str]:
    """The space keys that the flags fix: flat fields given, and ``model_option.KEY`` for each model option given."""
    names = {k for k, v in flags.items() if v is not None}
    return names | {MODEL_OPTION + k for k in _given_options(flags)}


def _given_options(flags: dict) -> dict:
    return dict(flags.get("model_option") or flags.get("model_options") or {})


def as_options(values: dict, flags: dict) -> dict:
    """A trial's flat options (what ``imgcls train`` takes) from its values: ``model_option.KEY`` values join
    the model options given with the flags (``--model-option``), the rest stay as they are."""
    out, options = {}, {}
    for key, value in values.items():
        if key.startswith(MODEL_OPTION):
            options[key[len(MODEL_OPTION):]] = value
        else:
            out[key] = value
    if options:
        out["model_option"] = {**_given_options(flags), **options}
    return out


def check_model(cfg: RunConfig, searched: str | None = None) -> None:
    """Refuse, before any trial, model options that training would refuse.

    Option names by the builder's signature (the message training gives); with ``searched``, the model is also
    built once with these options at the config's image size (64x64 when it has none): a value the model
    refuses there, while it takes its other options at that size, is refused.
    """
    check_options(cfg.model.name, cfg.model.options)
    if searched is None:
        return
    size = tuple(parse_image_size(cfg.data.image_size) if cfg.data.image_size else _CHECK_SIZE)
    channels = cfg.data.channels or 3
    others = {k: v for k, v in cfg.model.options.items() if k != searched}
    try:
        create_model(cfg.model.name, channels, 10, size, **others)
    except ConfigError:
        return  # the size (not the option) is refused: the data's own size decides, at each trial
    create_model(cfg.model.name, channels, 10, size, **cfg.model.options)


def suggest(trial, space: Space) -> dict:
    """Flat options of one trial: a value for every field of ``space``."""
    return {name: param.suggest(trial) for name, param in space.items()}


def grid_of(space: Space) -> dict:
    """The grid sampler's search space: every value of every field; ConfigError for a continuous range, or for a
    grid of more than MAX_GRID_POINTS combinations (counted before a value is built)."""
    sizes = {}
    for name, param in space.items():
        size = param.grid_size()
        if size is None:
            raise ConfigError(f"the grid sampler needs a finite space, but {name} is a continuous range "
                              f"({shown(param.to_dict())}); give it choices (e.g. {name}: [{param.low:g}, "
                              f"{param.high:g}]) or a step, or use --sampler tpe or random")
        sizes[name] = size
    total = math.prod(sizes.values())
    if total > MAX_GRID_POINTS:
        largest = max(sizes, key=sizes.get)
        counts = ", ".join(f"{n}: {k:,}" for n, k in list(sizes.items())[:6]) + (", ..." if len(sizes) > 6 else "")
        raise ConfigError(f"the grid has {total:,} combinations ({counts}), "
                          f"more than the {MAX_GRID_POINTS:,} the grid sampler takes; give {largest} a larger step or "
                          f"fewer choices, or use --sampler tpe or random")
    return {name: param.grid() for name, param in space.items()}


# Augmentation strengths of the default spaces: none, light and strong, in units that do not depend on the image
# size (degrees, fractions).  Photos keep the mirror image in all three; small images (digits) get none by default.
_PHOTO_AUGMENT = ("hflip", "hflip,rotate:10,zoom:0.1", "hflip,rotate:15,zoom:0.2,jitter:0.2")
_SMALL_AUGMENT = ("none", "rotate:10,zoom:0.1", "rotate:15,zoom:0.2")


def _round(x: float) -> float:
    """``x`` to 3 significant digits, as a space file would give it."""
    return float(f"{x:.3g}")


def _width_param(cfg: RunConfig) -> tuple[Param | None, str]:
    """The width of a from-scratch model whose builder takes one, searched at its own and at half (about a quarter
    of the compute, so a trial costs no more than the default): (the param, a clause saying so) or (None, "")."""
    takes = model_options(cfg.model.name) or {}
    if "widths" in takes:  # channels per block (fastnet)
        own = [int(w) for w in cfg.model.options.get("widths", takes["widths"])]
        half = [max(1, w // 2) for w in own]
        return (Param(MODEL_OPTION + "widths", "categorical", choices=(half, own)),
                f"; widths {own} and half of them")
    if "width" in takes:  # a multiplier of every stage's channels (the CIFAR ResNets)
        own = float(cfg.model.options.get("width", takes["width"]))
        return Param(MODEL_OPTION + "width", "categorical", choices=(own / 2, own)), f"; width x{own:g} and half"
    return None, ""


def _transfer_params(cfg: RunConfig) -> tuple[list[Param], str]:
    """What changes the classifier of a stage-1 run on a pretrained backbone: the backbone (among those of its
    family with ImageNet weights), the image size (its own, 1.25x and 1.5x), how many stages the classifier
    reads (a model option), and label smoothing; (the params, a clause saying so)."""
    params = [Param("label_smoothing", "float", 0.0, 0.2)]
    said = ["label smoothing"]
    family = cfg.model.name.rstrip("0123456789")
    backbones = [m for m in models_with_weights() if m.rstrip("0123456789") == family]
    if cfg.model.pretrained == "imagenet" and len(backbones) > 1:
        params.append(Param("model", "categorical", choices=tuple(backbones)))
        said.append(f"the backbone ({', '.join(backbones)})")
    side = parse_image_size(cfg.data.image_size)[0] if cfg.data.image_size else None
    if side:
        sides = (side, 8 * round(side * 1.25 / 8), 8 * round(side * 1.5 / 8))
        params.append(Param("image_size", "categorical", choices=sides))
        said.append(f"the image size ({', '.join(map(str, sides))} px)")
    if "head_stages" in (model_options(cfg.model.name) or {}):
        params.append(Param(MODEL_OPTION + "head_stages", "categorical", choices=(1, 4, 7)))
        said.append("the stages the classifier reads (1, 4 or 7)")
    return params, ", ".join(said)


def default_space(cfg: RunConfig, fixed=frozenset()) -> tuple[Space, str]:
    """The default space for ``cfg`` (a resolved config) and a line saying which it is.

    Fields in ``fixed`` (the flags the user gave) stay as given and are left out.
    """
    t = cfg.train
    if t.optimizer == "muon":
        # A recipe's settings are tuned already: search a factor of 3 either side of them.
        wd = max(t.weight_decay, 1e-5)
        params = [Param("lr", "float", _round(t.lr / 3), _round(t.lr * 3), log=True),
                  Param("muon_lr", "float", _round(t.muon_lr / 3), min(_round(t.muon_lr * 3), 100.0), log=True),
                  Param("weight_decay", "float", _round(wd / 10), min(_round(wd * 10), 1.0), log=True),
                  Param("label_smoothing", "float", 0.0, 0.3),
                  Param("batch_size", "categorical", choices=(max(t.batch_size // 2, 1), t.batch_size))]
        why = f"around the muon settings of {cfg.recipe or 'this config'} ({cfg.model.name})"
    elif cfg.model.weights and t.epochs == 0:
        params, said = _transfer_params(cfg)
        why = (f"{cfg.model.name}, stage 1 only (--epochs 0): {said}; the frozen features of a size and backbone "
               f"are computed once and cached for the trials that share them; give --epochs N to tune "
               f"fine-tuning")
    elif cfg.model.weights:
        params = [Param("lr", "float", 1e-5, 3e-3, log=True),
                  Param("weight_decay", "float", 1e-6, 1e-2, log=True),
                  Param("label_smoothing", "float", 0.0, 0.2),
                  Param("backbone_lr_scale", "float", 0.01, 1.0, log=True),
                  Param("batch_size", "categorical", choices=(16, 32, 64)),
                  Param("optimizer", "categorical", choices=("adam", "adamw")),
                  Param("augment", "categorical", choices=_PHOTO_AUGMENT)]
        why = f"fine-tuning {cfg.model.name} from {cfg.model.weights} weights"
    else:
        params = [Param("lr", "float", 1e-4, 1e-2, log=True),
                  Param("weight_decay", "float", 1e-6, 1e-2, log=True),
                  Param("label_smoothing", "float", 0.0, 0.2),
                  Param("batch_size", "categorical", choices=(32, 64, 128)),
                  Param("optimizer", "categorical", choices=("adam", "adamw")),
                  Param("augment", "categorical", choices=_SMALL_AUGMENT)]
        width, said = _width_param(cfg)
        params += [width] if width else []
        why = (f"{cfg.model.name} trained from scratch (adam and adamw share a learning-rate scale; add sgd in a "
               f"space file){said}")
    space = {p.name: p for p in params if p.name not in fixed}
    if not space:
        raise ConfigError(f"every field of the default space ({', '.join(p.name for p in params)}) is fixed by a "
                          f"flag; give a space of your own with --space FILE")
    return space, why
