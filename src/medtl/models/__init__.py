"""Backbones: the registry, weight resolution and the uniform ``Backbone`` wrapper."""

from medtl.models.backbone import Backbone, count_parameters
from medtl.models.factory import create_backbone
from medtl.models.registry import (
    BackboneSpec,
    WeightSource,
    backbone_names,
    get_spec,
    list_specs,
)
from medtl.models.weights import (
    ResolvedWeights,
    WeightsInfo,
    imagenet_available,
    resolve_weights,
)

__all__ = [
    "Backbone",
    "BackboneSpec",
    "ResolvedWeights",
    "WeightSource",
    "WeightsInfo",
    "backbone_names",
    "count_parameters",
    "create_backbone",
    "get_spec",
    "imagenet_available",
    "list_specs",
    "resolve_weights",
]
