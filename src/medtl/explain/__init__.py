"""Where a model looks: attribution maps, overlays and their sanity checks."""

from medtl.explain.cam import METHODS, Explainer
from medtl.explain.runs import explain_images, gallery, randomisation_check

__all__ = ["METHODS", "Explainer", "explain_images", "gallery", "randomisation_check"]
