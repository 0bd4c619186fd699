"""``create_backbone``: a registry spec, built and loaded with resolved weights.

It sits above both ``backbone.py`` (the wrapper and its key layout) and ``weights.py`` (which
renames checkpoints with that layout), which keeps the three free of import cycles.
"""

from __future__ import annotations

import itertools
import os

import torch
from torch import nn

from medtl.errors import MedtlError, WeightsError
from medtl.models._build import build_model, set_input_channels, set_input_channels_unadapted
from medtl.models.backbone import Backbone, layout
from medtl.models.registry import BackboneSpec, get_spec
from medtl.models.run_weights import is_run_dir, resolve_run_weights
from medtl.models.weights import ResolvedWeights, resolve_weights


def _has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _build_loaded(spec: BackboneSpec, resolved: ResolvedWeights) -> tuple[nn.Module, int]:
    """The builder model with ``resolved`` loaded; returns it and its input channel count."""
    sd = resolved.state_dict
    if sd is None:
        return build_model(spec), 3
    lay = layout(spec.name)
    chans = int(sd[lay.first_conv_key].shape[1])
    complete = sd.keys() == lay.builder_shapes.keys()
    if complete:
        # Build without allocating or initialising (VGG's random init alone costs seconds),
        # then adopt the checkpoint's tensors.
        model = build_model(spec, device="meta")
        set_input_channels_unadapted(model, spec.first_conv, chans)
        model.load_state_dict(sd, strict=True, assign=True)
        if not _has_meta(model):
            return model, chans
    model = build_model(spec)
    set_input_channels_unadapted(model, spec.first_conv, chans)
    result = model.load_state_dict(sd, strict=False)
    # conform_state_dict guarantees every feature tensor; only the classifier may be absent.
    unexpected_missing = set(result.missing_keys) - lay.head_keys
    if result.unexpected_keys or unexpected_missing:
        raise WeightsError(
            f"{resolved.source}: failed to load into {spec.name}: missing "
            f"{sorted(unexpected_missing)[:4]}, unexpected {result.unexpected_keys[:4]}"
        )
    return model, chans


def create_backbone(
    name: str, weights: str | os.PathLike[str] = "imagenet", in_chans: int = 3
) -> Backbone:
    """Build backbone ``name`` with ``weights`` ("imagenet", "random", a state_dict file, or
    the directory of a finished medtl run of the same backbone, whose classifier is dropped).

    ``in_chans=1`` sums the first convolution's RGB filters, so a grey image gives exactly the
    features of that image replicated to three channels. Raises MedtlError for an unknown
    name and WeightsError when weights cannot be found or loaded.
    """
    spec = get_spec(name)
    if in_chans < 1:
        raise MedtlError(f"in_chans must be at least 1, got {in_chans}")
    if is_run_dir(weights):  # multi-stage transfer: a finished run's backbone
        resolved = resolve_run_weights(spec, weights)
    else:
        resolved = resolve_weights(spec, weights)
    model, chans = _build_loaded(spec, resolved)
    if in_chans != chans:
        if chans != 3:
            raise WeightsError(
                f"{resolved.source}: the weights take {chans}-channel input; "
                f"create the backbone with in_chans={chans}"
            )
        set_input_channels(model, spec.first_conv, in_chans)
    backbone = Backbone(spec, model, resolved.info)
    if resolved.head is not None:
        backbone.reset_classifier(int(resolved.head["weight"].shape[0]))
        with torch.no_grad():
            backbone.classifier.load_state_dict(resolved.head)
    return backbone
