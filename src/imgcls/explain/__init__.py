"""Explanations: attribution maps (Grad-CAM and others), overlays, figures and files."""

from imgcls.explain.attribution import METHODS, attribute
from imgcls.explain.explain import (
           Explanation,
           explain_arrays,
           overlay,
           plot_explanations,
           write_explanations,
)

__all__ = [
           "METHODS",
           "Explanation",
           "attribute",
           "explain_arrays",
           "overlay",
           "plot_explanations",
           "write_explanations",
]
