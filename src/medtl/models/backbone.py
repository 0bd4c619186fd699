"""One backbone contract over torchvision and timm models: ``Backbone`` (built with weights by
``create_backbone`` in factory.py) and the key layout that maps it to its builder model.

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

import functools
import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from medtl.errors import MedtlError
from medtl.models._build import build_model, split_model
from medtl.models.registry import BackboneSpec, get_spec

WeightsKind = Literal["imagenet", "random", "file", "run"]


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's starting weights came from: what a run records (config.json).

    Kind ``run`` (multi-stage transfer, ``--weights RUN_DIR``): ``sha256`` is that of the run's
    weight file that was loaded, ``data_fingerprint`` the data the run was trained on, and
    ``chain`` the earlier stages, oldest first (ImageNet, then each run before this one).

    A ``file`` written by ``medtl pretrain`` (self-supervised pretraining) sets ``method``
    (simclr, byol, dino); ``data_fingerprint`` is then that of the images it pretrained on and
    ``chain`` the weights it started from (ImageNet or random).
    """

    kind: WeightsKind
    source: str
    path: Path | None
    sha256: str | None
    data_fingerprint: str | None = None
    chain: tuple[WeightsInfo, ...] = ()
    method: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "source": self.source,
            "path": str(self.path) if self.path is not None else None,
            "sha256": self.sha256,
        }
        if self.method is not None:
            out["method"] = self.method
        # Other kinds, and files that medtl did not pretrain, keep the record they always had.
        if self.kind == "run" or self.method is not None:
            out["data_fingerprint"] = self.data_fingerprint
            out["chain"] = [stage.to_dict() for stage in self.chain]
        return out

    def stages(self) -> tuple[WeightsInfo, ...]:
        """The whole chain, oldest first, ending with these weights (each without its chain)."""
        return (*self.chain, replace(self, chain=()))


RANDOM = WeightsInfo("random", "random", None, None)


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


@dataclass(frozen=True)
class Layout:
    """Key names and shapes of a spec's builder model and of its medtl wrapper."""

    builder_shapes: dict[str, tuple[int, ...]]
    backbone_to_builder: dict[str, str]
    head_keys: frozenset[str]
    first_conv_key: str


@functools.cache
def layout(name: str) -> Layout:
    """Computed once per backbone on the meta device: no memory, no initialisation cost.

    It lives next to ``Backbone`` because the wrapper's key names are what it maps; the weights
    resolver (weights.py) renames checkpoints with it, and ``create_backbone`` (factory.py)
    builds on both.
    """
    spec = get_spec(name)
    model = build_model(spec, device="meta")
    builder_sd = model.state_dict(keep_vars=True)
    by_id = {id(t): k for k, t in builder_sd.items()}
    wrapper = Backbone(spec, model)
    # Same tensor objects under both names: identity gives the renaming exactly.
    backbone_to_builder = {
        k: by_id[id(t)] for k, t in wrapper.state_dict(keep_vars=True).items() if id(t) in by_id
    }
    head_ids = {id(t) for t in wrapper.classifier.state_dict(keep_vars=True).values()}
    if wrapper.imagenet_pool is not None:
        head_ids |= {id(t) for t in wrapper.imagenet_pool.state_dict(keep_vars=True).values()}
    return Layout(
        builder_shapes={k: tuple(t.shape) for k, t in builder_sd.items()},
        backbone_to_builder=backbone_to_builder,
        head_keys=frozenset(k for k, t in builder_sd.items() if id(t) in head_ids),
        first_conv_key=spec.first_conv + ".weight",
    )
