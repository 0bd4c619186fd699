"""One backbone contract over torchvision and timm models: ``create_backbone`` and ``Backbone``.

Logits path: ``forward(x) = forward_head(forward_blocks(x))``, where ``forward_head`` pools the
last feature map and applies ``classifier``. Feature path: ``forward_features(x) =
pool(forward_blocks(x))``, an (N, num_features) vector.

The two paths share ``pool`` except for AlexNet/VGG with their original ImageNet classifier: their
FC stack needs torchvision's fixed-size pooling (6x6 / 7x7, flattened), kept as ``imagenet_pool``
so ImageNet logits are exact, while their features are the globally pooled conv5 maps (256-d /
512-d, no FC layers). ``reset_classifier(n)`` drops ``imagenet_pool`` and the FC stack and puts
``nn.Linear(num_features, n)`` on the features, as for every other backbone.
"""

from __future__ import annotations

import itertools
import os

import torch
from torch import Tensor, nn

from medtl.errors import MedtlError, WeightsError
from medtl.models._build import (
    build_model,
    layout,
    set_input_channels,
    set_input_channels_unadapted,
    split_model,
)
from medtl.models.registry import BackboneSpec, get_spec
from medtl.models.weights import RANDOM, ResolvedWeights, WeightsInfo, resolve_weights


class Backbone(nn.Module):
    """A builder model rearranged into ``blocks`` -> ``pool`` -> ``classifier``.

    The modules are the builder model's own (no copies). ``blocks`` is ordered bottom to top
    with the names of ``spec.blocks``; partial fine-tuning unfreezes them from the top and
    truncation keeps them from the bottom. Like torchvision and timm models, a new Backbone is
    in training mode: call ``eval()`` before extracting features.
    """

    def __init__(
        self, spec: BackboneSpec, model: nn.Module, weights_info: WeightsInfo | None = None
    ) -> None:
        super().__init__()
        parts = split_model(spec, model)
        self.spec = spec
        self.weights_info = weights_info if weights_info is not None else RANDOM
        self.num_features = spec.feature_dim
        self.num_classes = parts.num_classes
        self.blocks = nn.ModuleDict(parts.blocks)
        self.pool = parts.pool
        self.add_module("imagenet_pool", parts.imagenet_pool)
        self.classifier = parts.classifier

    @property
    def in_chans(self) -> int:
        first = next(m for m in self.blocks.modules() if isinstance(m, nn.Conv2d))
        return first.in_channels

    def block_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each block, bottom to top."""
        return list(self.blocks.items())

    def forward_blocks(self, x: Tensor, upto: int | None = None) -> Tensor:
        """The output of the lowest ``upto`` blocks (all when None): a feature map, or tokens
        (N, 1 + patches, D) for ViT."""
        n = len(self.blocks)
        if upto is None:
            upto = n
        if not 1 <= upto <= n:
            raise MedtlError(
                f"{self.spec.name} has {n} blocks ({', '.join(self.blocks)}); "
                f"cannot keep {upto}: choose 1 to {n}"
            )
        for block in itertools.islice(self.blocks.values(), upto):
            x = block(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features, (N, num_features)."""
        return self.pool(self.forward_blocks(x))

    def forward_head(self, feature_map: Tensor) -> Tensor:
        """Logits from the last block's output."""
        pool = self.imagenet_pool if self.imagenet_pool is not None else self.pool
        return self.classifier(pool(feature_map))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_blocks(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by ``nn.Linear(num_features, num_classes)`` on the pooled
        features (``nn.Identity`` for 0: ``forward`` then returns the features)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = next(self.blocks.parameters())
        self.imagenet_pool = None
        self.classifier = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.num_classes = num_classes

    def feature_extractor(self) -> nn.Module:
        """A module whose ``forward`` is ``forward_features`` (for ONNX/TorchScript export)."""
        return FeatureExtractor(self)

    def extra_repr(self) -> str:
        return f"name={self.spec.name}, weights={self.weights_info.source}"


class FeatureExtractor(nn.Module):
    """``Backbone.forward_features`` as a module's ``forward``; shares the backbone's weights."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


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
    """Build backbone ``name`` with ``weights`` ("imagenet", "random" or a state_dict file).

    ``in_chans=1`` sums the first convolution's RGB filters, so a grey image gives exactly the
    features of that image replicated to three channels. Raises MedtlError for an unknown
    name and WeightsError when weights cannot be found or loaded.
    """
    spec = get_spec(name)
    if in_chans < 1:
        raise MedtlError(f"in_chans must be at least 1, got {in_chans}")
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
