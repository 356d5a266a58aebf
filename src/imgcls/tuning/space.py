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

Everything is checked before the first trial: an unknown field, a bad range
and a value the field cannot take (each bound and each choice goes through
the config checks, with their messages) are refused.  What only the data can
refuse (a batch larger than the training set) fails that trial alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from imgcls.config import RunConfig, flat_fields, parse_yaml_value, shown
from imgcls.errors import ConfigError

# Fields a study cannot vary, and why.
NOT_SEARCHED = {
    "data": "the data is what a study tunes on; give it with --data",
    "out": "the study folder holds the trials; give it with --out",
    "name": "trials are named trial-<number>; name the study with --study",
    "model_option": "model options cannot be searched yet; fix them with --model-option KEY=VALUE",
}
_SCALARS = (str, int, float, bool, type(None))  # what an Optuna categorical choice may be


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

    def suggest(self, trial):
        """This field's value for an Optuna ``trial``."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list | None:
        """Every value, for the grid sampler; None for a continuous range."""
        if self.kind == "categorical":
            return list(self.choices)
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
        key = str(key).replace("-", "_")
        if key not in table:
            raise ConfigError(f"{where}: unknown config field {key!r}; fields are: {', '.join(sorted(table))}")
        if key in NOT_SEARCHED:
            raise ConfigError(f"{where}: {key} cannot be searched: {NOT_SEARCHED[key]}")
        space[key] = _param(key, spec, where)
    return space


def _field_kind(key: str) -> tuple[str, str]:
    """(the field's kind: "int", "float" or "other"; its dotted name, as config.yaml's messages give it)."""
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
    kind, dotted = _field_kind(key)
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ConfigError(f"{at}: give either choices or a range (low, high), not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at}: choices must be a non-empty list, got {shown(choices)}")
        bad = [c for c in choices if not isinstance(c, _SCALARS)]
        if bad:
            raise ConfigError(f"{at}: a choice must be a single value (text, number, true/false or null), got "
                              f"{shown(bad[0])}; for augment write one comma-separated string, e.g. 'hflip,crop:2'")
        if len(set(map(repr, choices))) != len(choices):
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
    both = sorted(k for k in space if flags.get(k) is not None)
    if both:
        raise ConfigError(f"{both[0]} is both given (--{both[0].replace('_', '-')}) and searched (in the space); "
                          f"drop one of them")
    for key, param in space.items():
        for what, value in param.values_to_check():
            try:
                make({key: value})
            except ConfigError as exc:
                raise ConfigError(f"space: {key}: {what} is refused: {exc}") from None


def suggest(trial, space: Space) -> dict:
    """Flat options of one trial: a value for every field of ``space``."""
    return {name: param.suggest(trial) for name, param in space.items()}


def grid_of(space: Space) -> dict:
    """The grid sampler's search space: every value of every field; ConfigError for a continuous range."""
    grid = {}
    for name, param in space.items():
        values = param.grid()
        if values is None:
            raise ConfigError(f"the grid sampler needs a finite space, but {name} is a continuous range "
                              f"({shown(param.to_dict())}); give it choices (e.g. {name}: [{param.low:g}, "
                              f"{param.high:g}]) or a step, or use --sampler tpe or random")
        grid[name] = values
    return grid


# Augmentation strengths of the default spaces: none, light and strong, in units that do not depend on the image
# size (degrees, fractions).  Photos keep the mirror image in all three; small images (digits) get none by default.
_PHOTO_AUGMENT = ("hflip", "hflip,rotate:10,zoom:0.1", "hflip,rotate:15,zoom:0.2,jitter:0.2")
_SMALL_AUGMENT = ("none", "rotate:10,zoom:0.1", "rotate:15,zoom:0.2")


def _round(x: float) -> float:
    """``x`` to 3 significant digits, as a space file would give it."""
    return float(f"{x:.3g}")


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
    elif cfg.model.pretrained and t.epochs == 0:
        params = [Param("label_smoothing", "float", 0.0, 0.2)]
        why = (f"{cfg.model.name}, stage 1 only (--epochs 0): only label smoothing changes the fitted classifier; "
               f"give --epochs N to tune fine-tuning")
    elif cfg.model.pretrained:
        params = [Param("lr", "float", 1e-5, 3e-3, log=True),
                  Param("weight_decay", "float", 1e-6, 1e-2, log=True),
                  Param("label_smoothing", "float", 0.0, 0.2),
                  Param("backbone_lr_scale", "float", 0.01, 1.0, log=True),
                  Param("batch_size", "categorical", choices=(16, 32, 64)),
                  Param("optimizer", "categorical", choices=("adam", "adamw")),
                  Param("augment", "categorical", choices=_PHOTO_AUGMENT)]
        why = f"fine-tuning {cfg.model.name} from {cfg.model.pretrained} weights"
    else:
        params = [Param("lr", "float", 1e-4, 1e-2, log=True),
                  Param("weight_decay", "float", 1e-6, 1e-2, log=True),
                  Param("label_smoothing", "float", 0.0, 0.2),
                  Param("batch_size", "categorical", choices=(32, 64, 128)),
                  Param("optimizer", "categorical", choices=("adam", "adamw")),
                  Param("augment", "categorical", choices=_SMALL_AUGMENT)]
        why = f"{cfg.model.name} trained from scratch (adam and adamw share a learning-rate scale; add sgd in a space file)"
    space = {p.name: p for p in params if p.name not in fixed}
    if not space:
        raise ConfigError(f"every field of the default space ({', '.join(p.name for p in params)}) is fixed by a "
                          f"flag; give a space of your own with --space FILE")
    return space, why
