"""Mixup and CutMix (``--mix none|mixup|cutmix|both``) of a training batch, and their loss.

Mixup (Zhang et al. 2018) blends two images and their targets with a weight lambda drawn
from Beta(alpha, alpha); CutMix (Yun et al. 2019) pastes a box of one image into another and
weights the targets by the areas. Each batch is mixed with itself in reverse order (timm's
"batch" mode: the epoch's order is already random, so reversing pairs random images and costs
no draw), one lambda per batch. ``both`` picks one of the two per batch with p = 0.5, as timm's
``switch_prob``.

The loss of a mixed batch is ``lam * loss(y) + (1 - lam) * loss(y_reversed)`` with the loop's
own criterion, so class weights and label smoothing apply to both targets as they do unmixed.

Only the training step calls this: validation, test, prediction and frozen features never see
a mixed image. The draws come from a numpy generator derived from (seed, epoch) only, as the
loop's other generators are, so a resumed run replays each epoch's mixing exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MIX_CHOICES = ("none", "mixup", "cutmix", "both")
# Zhang et al. found alpha 0.1-0.4 best on ImageNet and larger values underfit; a small medical
# set has less to spare, so the low end's 0.2 keeps most mixed images close to one original.
MIXUP_ALPHA = 0.2
# Yun et al.'s value (and timm's default): lambda uniform on [0, 1], any box size equally likely.
CUTMIX_ALPHA = 1.0
# ``both``: the chance that a batch is CutMix rather than mixup (timm's switch_prob default).
CUTMIX_PROB = 0.5
# The loop's generator streams per (seed, epoch): 0 shuffling, 1 augmentation, 2 mixing.
MIX_STREAM = 2


def mix_generator(seed: int, epoch: int) -> np.random.Generator:
    """The mixing draws of one epoch: they depend on (seed, epoch) only, never on what ran
    before, so an epoch resumed from a checkpoint mixes as it did uninterrupted."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, MIX_STREAM]))


@dataclass
class MixedBatch:
    """A mixed batch: images ``x`` whose targets are ``y_a`` (weight ``lam``) and ``y_b``."""

    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float
    kind: str  # "mixup" | "cutmix"
    box: tuple[int, int, int, int] | None = None  # CutMix: (top, bottom, left, right)

    def loss(self, criterion: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """The lambda-weighted loss of the two targets, each through the loop's criterion."""
        return self.lam * criterion(logits, self.y_a) + (1.0 - self.lam) * criterion(
            logits, self.y_b)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mix: str,
              rng: np.random.Generator) -> MixedBatch:
    """Mix (N, C, H, W) ``x`` (any scaling: the mix is convex, so it commutes with the
    per-channel normalisation) and labels ``y`` as ``mix`` says; ``mix`` is not "none"."""
    kind = mix
    if mix == "both":
        kind = "cutmix" if rng.random() < CUTMIX_PROB else "mixup"
    y_b = y.flip(0)
    if kind == "mixup":
        lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
        return MixedBatch(lam * x + (1.0 - lam) * x.flip(0), y, y_b, lam, kind)
    if kind != "cutmix":
        raise ValueError(f"mix {mix!r}: not one of {MIX_CHOICES[1:]}")
    lam = float(rng.beta(CUTMIX_ALPHA, CUTMIX_ALPHA))
    top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
    # The box is clipped at the borders: the targets' weights are the areas actually pasted
    # (timm's correct_lam), not the lambda drawn.
    area = (bottom - top) * (right - left)
    return MixedBatch(mixed, y, y_b, 1.0 - area / (x.shape[-2] * x.shape[-1]), kind,
                      (top, bottom, left, right))


def cutmix_box(height: int, width: int, lam: float,
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Yun et al.'s box: sides sqrt(1 - lam) of the image's, centred uniformly, clipped to the
    image; (top, bottom, left, right), bottom and right exclusive."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right
