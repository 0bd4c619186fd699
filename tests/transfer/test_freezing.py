"""Issue 3, acceptance 1: for every registered backbone, fine-tune --unfreeze K trains exactly the
top K blocks plus the head, and truncated --keep K drops the blocks above K and still predicts."""

from __future__ import annotations

import pytest
import torch

from medtl.errors import MedtlError
from medtl.models import backbone_names, create_backbone
from medtl.transfer.freezing import (
    TruncatedBackbone,
    frozen_blocks,
    param_groups,
    set_trainable,
    train_mode_hook,
)


def _input(bb, n=2):
    # Smallest input each architecture accepts quickly: ViT needs its 224 grid, Inception 75+.
    size = 224 if bb.spec.family == "vit" else max(75, min(bb.spec.input_size, 96))
    return torch.randn(n, 3, size, size)


def _ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("name", backbone_names())
def test_fine_tune_trains_exactly_the_top_k_blocks_and_the_head(name):
    torch.manual_seed(0)
    bb = create_backbone(name, weights="random")
    bb.reset_classifier(2)
    blocks = list(bb.blocks.items())
    for k in (0, 1, 2, len(blocks)):
        set_trainable(bb, unfreeze=k)
        trainable = _ids(p for p in bb.parameters() if p.requires_grad)
        expected = _ids(bb.classifier.parameters())
        for _, block in blocks[len(blocks) - k:]:
            expected |= _ids(block.parameters())
        if k and bb.spec.family == "vit":
            expected |= _ids(bb.pool.parameters())  # its final norm goes with the top block
        assert trainable == expected, (name, k)
        assert frozen_blocks(bb) == [n for n, _ in blocks[:len(blocks) - k]]
    with pytest.raises(MedtlError, match="--unfreeze"):
        set_trainable(bb, unfreeze=len(blocks) + 1)


@pytest.mark.parametrize("name", backbone_names())
def test_truncated_keeps_the_lower_k_blocks_and_produces_logits(name):
    torch.manual_seed(0)
    bb = create_backbone(name, weights="random").eval()
    n = len(bb.blocks)
    keep = max(1, n // 2)
    model = TruncatedBackbone(bb, keep, num_classes=3).eval()
    assert list(model.blocks) == list(bb.blocks)[:keep]
    dropped = _ids(p for _, b in list(bb.blocks.items())[keep:] for p in b.parameters())
    assert not dropped & _ids(model.parameters())
    with torch.no_grad():
        logits = model(_input(bb))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    set_trainable(model)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(MedtlError, match="--keep"):
        TruncatedBackbone(bb, n + 1, num_classes=3)


def test_frozen_blocks_stay_in_eval_mode_and_learning_rates_decay_downwards():
    bb = create_backbone("resnet18", weights="random")
    bb.reset_classifier(2)
    set_trainable(bb, unfreeze=2)
    train_mode_hook(bb)(bb)
    assert bb.classifier.training and bb.blocks["layer4"].training
    assert bb.blocks["layer3"].training
    assert not bb.blocks["layer2"].training and not bb.blocks["stem"].training
    groups = param_groups(bb, lr=1e-3, decay=0.5)
    assert [g["name"] for g in groups] == ["classifier", "layer4", "layer3"]
    assert [g["lr"] for g in groups] == [1e-3, 5e-4, 2.5e-4]
