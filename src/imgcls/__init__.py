"""imgcls: train, evaluate, explain and serve convolutional image classifiers.

The data flow reads as one line::

    dataset -> batches -> model -> trainer -> checkpoint -> evaluation / predict

Heavy modules are imported lazily so that ``import imgcls`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["train", "load", "tune", "__version__"]


def train(*args, **kwargs):
    """Train a model; see :func:`imgcls.api.train`."""
    from imgcls.startup import import_paused  # on use: importing imgcls is free

    return import_paused("imgcls.api").train(*args, **kwargs)


def load(*args, **kwargs):
    """Load a trained classifier; see :func:`imgcls.api.load`."""
    from imgcls.startup import import_paused  # on use: importing imgcls is free

    return import_paused("imgcls.api").load(*args, **kwargs)


def tune(*args, **kwargs):
    """Search hyperparameters with Optuna (``pip install imgcls[tune]``); see :func:`imgcls.api.tune`."""
    from imgcls.startup import import_paused  # on use: importing imgcls is free

    return import_paused("imgcls.api").tune(*args, **kwargs)
