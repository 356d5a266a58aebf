"""The model registry: one decorated builder per architecture.

Every builder takes ``in_chans``, ``num_classes`` and ``img_size`` (H, W) plus
its own keyword options, and returns an :class:`imgcls.models.base.ImageClassifier`.

A leaf: the family modules import :func:`register_model` from here, and the
package (``imgcls/models/__init__.py``) imports the families, so every model
is registered once ``imgcls.models`` (or any module in it) is imported.  A new
family is one module, named in that ``__init__``.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

from imgcls.errors import ConfigError, unknown_name

_REGISTRY: dict[str, Callable] = {}
_DESCRIPTIONS: dict[str, str] = {}
_SHAPE = ("in_chans", "num_classes", "img_size")  # what every builder takes; the rest are its options


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` under its own name; a duplicate name is an error."""
    name = fn.__name__
    if name in _REGISTRY:
        raise RuntimeError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    doc = (fn.__doc__ or "").strip().splitlines()
    _DESCRIPTIONS[name] = doc[0] if doc else ""
    return fn


def list_models() -> dict[str, str]:
    """Registered model names mapped to a one-line description."""
    return dict(sorted(_DESCRIPTIONS.items()))


def model_options(name: str) -> dict | None:
    """The options model ``name`` takes, with their defaults (its builder's keyword arguments beyond the shape);
    None when the builder takes any keyword."""
    if name not in _REGISTRY:
        raise unknown_name("model", name, _REGISTRY)
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default for p in params if p.name not in _SHAPE}


def check_options(name: str, options: dict) -> None:
    """Refuse option names that model ``name`` does not take, without building it (no data shape needed)."""
    takes = model_options(name)
    unknown = [] if takes is None else sorted(k for k in options if k not in takes)
    if unknown:
        raise ConfigError(f"model {name!r} does not accept these options {unknown}; it takes: "
                          f"{', '.join(takes) or 'no options'}")


TRAINING_BYTES_PER_PARAM = 16  # fp32 weights, their gradients and Adam's two moments


def _refuse_too_large(name: str, options: dict, build, in_chans: int, num_classes: int, img_size) -> None:
    """ConfigError when the model these options describe could not even hold its training state in this machine's
    memory (``widths=[100000, ...]`` asked for 360 GB); nothing is allocated to find out."""
    import torch

    try:
        with torch.device("meta"):
            probe = build(in_chans=in_chans, num_classes=num_classes, img_size=img_size, **options)
        params = sum(p.numel() for p in probe.parameters())
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is built as before
        return
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = params * TRAINING_BYTES_PER_PARAM
    if need > memory:
        shown = ", ".join(f"{k}={str(v)[:40]}" for k, v in options.items())
        raise ConfigError(f"model {name!r} with {shown} has {params:,} parameters: training it needs about "
                          f"{need / 2**30:,.0f} GiB for the weights, their gradients and Adam's state alone, more "
                          f"than this machine's {memory / 2**30:,.0f} GiB; give smaller options")


def create_model(name: str, in_chans: int, num_classes: int, img_size: tuple[int, int], **kwargs):
    """Build a registered model.

    Args:
        name: registry name (see :func:`list_models`).
        in_chans: input channels (1 for grayscale, 3 for colour).
        num_classes: number of output logits.
        img_size: (H, W) of the input images.
        **kwargs: the architecture's own options (for example ``dropout``).

    Raises:
        ConfigError: unknown name, or a shape or option the model cannot take.
    """
    if name not in _REGISTRY:
        raise unknown_name("model", name, _REGISTRY)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    check_options(name, kwargs)
    try:
        if kwargs:  # options may ask for any size: counted on the meta device (no memory) before it is built
            _refuse_too_large(name, kwargs, _REGISTRY[name], in_chans, num_classes, tuple(img_size))
        return _REGISTRY[name](in_chans=in_chans, num_classes=num_classes, img_size=tuple(img_size), **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r} does not accept these options {sorted(kwargs)}: {exc}") from exc
    except ConfigError:
        raise  # already says what is wrong (a ConfigError is a ValueError too)
    except (ValueError, OverflowError) as exc:  # an option of the right name and the wrong kind: widths=abc
        shown = ", ".join(f"{k}={str(v)[:40]!r}" for k, v in kwargs.items())
        raise ConfigError(f"model {name!r} cannot take the options {shown} ({exc}); see `imgcls models` for "
                          f"each model's options") from exc
