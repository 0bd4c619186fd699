"""Which parameters a strategy trains, and at which learning rate.

Frozen means frozen (design.md): a frozen block's parameters get no gradient and its modules stay
in eval mode while the rest trains, so BatchNorm running statistics are not updated either.
Learning rates are discriminative, as the reviews advise for fine-tuning: the new head at the
base rate, each block below it at ``decay`` times the rate of the block above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.models.backbone import Backbone


def frozen_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks none of whose parameters train."""
    return [name for name, block in _blocks(model)
            if not any(p.requires_grad for p in block.parameters())]


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.blocks.items())


def set_trainable(model: nn.Module, unfreeze: int | None = None) -> None:
    """Train the top ``unfreeze`` blocks (0 = the head alone: the frozen feature extractor;
    ``None`` = every block the model has); the head (``classifier``) always trains."""
    n = len(model.blocks)
    unfreeze = n if unfreeze is None else unfreeze
    if not 0 <= unfreeze <= n:
        raise MedtlError(f"--unfreeze {unfreeze}: {model.spec.name} has {n} blocks "
                         f"({', '.join(model.blocks)}); choose 0 to {n}")
    top = {name for name, _ in _blocks(model)[n - unfreeze:]} if unfreeze else set()
    for name, block in _blocks(model):
        block.requires_grad_(name in top)
    # A ViT's final norm sits in its pool: it trains whenever the last block does.
    model.pool.requires_grad_(list(model.blocks)[-1] in top)
    model.classifier.requires_grad_(True)


def train_mode_hook(model: nn.Module) -> Callable[[nn.Module], None]:
    """What the training loop calls instead of ``model.train()``: frozen blocks stay in eval."""
    def train_mode(m: nn.Module) -> None:
        m.train()
        frozen = set(frozen_blocks(m))
        for name, block in _blocks(m):
            if name in frozen:
                block.eval()
        if not any(p.requires_grad for p in m.pool.parameters()):
            m.pool.eval()
    return train_mode


def param_groups(model: nn.Module, lr: float, decay: float = 0.5) -> list[dict]:
    """Head at ``lr``; trainable blocks from the top down at lr*decay, lr*decay^2, ...

    Parameters of ``pool`` (a ViT's final norm) go with the top block.
    """
    groups = [{"name": "classifier", "params": [p for p in model.classifier.parameters()
                                          if p.requires_grad], "lr": lr}]
    pool_params = [p for p in model.pool.parameters() if p.requires_grad]
    rate = lr
    for i, (name, block) in enumerate(reversed(_blocks(model))):
        params = [p for p in block.parameters() if p.requires_grad]
        if i == 0:
            params += pool_params
        if not params:
            continue
        rate *= decay
        groups.append({"name": name, "params": params, "lr": rate})
    return [g for g in groups if g["params"]]


class TruncatedBackbone(nn.Module):
    """TruncatedTL (Peng et al. 2022): the lowest ``keep`` blocks, pooled, and a new head.

    Shares ``spec`` and the block/pool/classifier contract of Backbone, so freezing, learning
    rates and Grad-CAM treat it the same way.
    """

    def __init__(self, backbone: Backbone, keep: int, num_classes: int) -> None:
        super().__init__()
        n = len(backbone.blocks)
        if not 1 <= keep <= n:
            raise MedtlError(f"--keep {keep}: {backbone.spec.name} has {n} blocks "
                             f"({', '.join(backbone.blocks)}); choose 1 to {n}")
        self.spec = backbone.spec
        self.weights_info = backbone.weights_info
        self.keep = keep
        self.blocks = nn.ModuleDict(list(backbone.blocks.items())[:keep])
        # A ViT keeps its token pooling (final norm + class token); a CNN's truncated feature
        # map has its own channel count, so it gets a plain global average pool.
        self.pool = backbone.pool if self.spec.family == "vit" else _GlobalAvgPool()
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            size = min(backbone.spec.input_size, 224)
            dummy = torch.zeros(1, backbone.in_chans, size, size,
                                device=next(backbone.parameters()).device)
            self.num_features = int(self.pool(self.forward_blocks(dummy)).shape[1])
        backbone.train(was_training)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.num_classes = num_classes

    @property
    def in_chans(self) -> int:
        first = next(m for m in self.blocks.modules() if isinstance(m, nn.Conv2d))
        return first.in_channels

    def forward_blocks(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        for block in list(self.blocks.values())[:upto]:
            x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


class _GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
