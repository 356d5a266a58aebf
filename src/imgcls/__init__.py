"""imgcls: train, evaluate, explain and serve convolutional image classifiers.

The data flow reads as one line::

    dataset -> batches -> model -> trainer -> checkpoint -> evaluation / predict

The verbs of the package are those of :mod:`imgcls.api`: ``imgcls.train``,
``imgcls.load``, ``imgcls.tune``, ``imgcls.cross_validate``, ``imgcls.inspect``
and ``imgcls.make_config`` are those very functions, with their signatures and
docstrings (``help(imgcls.train)``).  ``import imgcls`` itself stays cheap:
:mod:`imgcls.api` (and torch) is imported the first time one of them is
looked up.
"""

__version__ = "0.1.0"

# The names imgcls.api lends the package (PEP 562: looked up on first use).
_VERBS = ("train", "load", "tune", "cross_validate", "inspect", "make_config")

__all__ = ["__version__", "cross_validate", "inspect", "load", "make_config", "train", "tune"]  # _VERBS


def __getattr__(name: str):
    if name not in _VERBS:
        raise AttributeError(f"module 'imgcls' has no attribute {name!r}")
    from imgcls.startup import import_paused  # on use: importing imgcls is free

    value = getattr(import_paused("imgcls.api"), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_VERBS})
