"""Models: a registry of architectures that share one contract.

``create_model(name, in_chans, num_classes, img_size, **options)`` builds any
registered architecture; ``list_models()`` names them; ``summarize`` and
``format_summary`` describe a model layer by layer.
"""

# The families register their models as they are imported: a new family is one module, added here.
from imgcls.models import efficientnet, fast, resnet, resnet_imagenet, seeds  # noqa: F401
from imgcls.models.base import ImageClassifier
from imgcls.models.registry import create_model, list_models
from imgcls.models.summary import format_summary, summarize

__all__ = ["ImageClassifier", "create_model", "list_models", "summarize", "format_summary"]
