"""What each strategy does to the pretrained backbone, checked tensor by tensor after a fit
through the public API (issue 14, step 0).

- fine-tune: frozen blocks keep every parameter AND every BatchNorm buffer bitwise equal to
  the ImageNet ones (frozen blocks stay in eval mode while the rest trains); the top block moves.
- feature-extractor / hybrid: the whole backbone stays bitwise ImageNet.
- scratch starts from random weights, full from ImageNet ones.
"""

from __future__ import annotations

import pytest
import torch

import medtl

from .conftest import FAST


# ACCESSOR: adapt when the core is restructured
def network(clf: medtl.TransferClassifier) -> torch.nn.Module:
    """The fitted classifier's backbone (the whole trained network for trainable strategies,
    the frozen feature extractor for frozen ones), a module with the Backbone contract."""
    return clf.model_.backbone


def _imagenet_state() -> dict[str, torch.Tensor]:
    return medtl.create_backbone("mobilenet_v2", weights="imagenet").state_dict()


def _block_prefixes(net: torch.nn.Module, names) -> tuple[str, ...]:
    prefix = {n: p for p, m in net.named_modules() for n, b in net.blocks.items() if m is b}
    return tuple(prefix[n] + "." for n in names)


def _differing(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
               prefixes: tuple[str, ...]) -> list[str]:
    keys = [k for k in state if k.startswith(prefixes)]
    assert keys, f"no tensor under {prefixes}"
    return [k for k in keys if not torch.equal(state[k].cpu(), ref[k])]


def test_fine_tune_keeps_frozen_blocks_and_their_batchnorm_buffers_bitwise(blob_splits):
    train, val, _ = blob_splits
    clf = medtl.TransferClassifier(strategy="fine-tune", unfreeze=1, epochs=2,
                                   **FAST).fit(train, val)
    net = network(clf)
    blocks = list(net.blocks)
    frozen, top = blocks[:-1], blocks[-1:]
    state, ref = net.state_dict(), _imagenet_state()
    # Buffers too: BatchNorm running_mean/var and num_batches_tracked of a frozen block move as
    # soon as the block runs in train mode, though no gradient reaches its parameters.
    frozen_prefixes = _block_prefixes(net, frozen)
    buffers = [k for k, _ in net.named_buffers() if k.startswith(frozen_prefixes)]
    assert any(k.endswith("running_mean") for k in buffers)
    assert _differing(state, ref, frozen_prefixes) == []
    moved = _differing(dict(net.named_parameters()), ref, _block_prefixes(net, top))
    top_params = [k for k, _ in net.named_parameters() if k.startswith(_block_prefixes(net, top))]
    assert moved == top_params, "every parameter of the unfrozen top block should have trained"


@pytest.mark.parametrize("strategy, engine", [("feature-extractor", "torch"),
                                              ("hybrid", "auto")])
def test_frozen_strategies_leave_the_backbone_bitwise_imagenet(blob_splits, strategy, engine):
    train, val, test = blob_splits
    clf = medtl.TransferClassifier(strategy=strategy, engine=engine, cache=False,
                                   **FAST).fit(train, val)
    clf.predict_proba(test)
    state, ref = network(clf).state_dict(), _imagenet_state()
    assert _differing(state, ref, ("blocks.",)) == []
    assert {k for k in state if k.startswith("blocks.")} == {k for k in ref
                                                             if k.startswith("blocks.")}


def _max_change_from_imagenet(clf) -> dict[str, float]:
    ref = _imagenet_state()
    return {k: float((p.detach().cpu() - ref[k]).abs().max())
            for k, p in network(clf).named_parameters() if k.startswith("blocks.")}


def test_scratch_starts_from_random_weights_and_full_from_imagenet(blob_splits):
    train, val, _ = blob_splits
    # A learning rate so small that one epoch cannot move a weight by 1e-4: what is left is
    # where training started.
    opts = dict(epochs=1, lr=1e-8, **FAST)
    full = medtl.TransferClassifier(strategy="full", **opts).fit(train, val)
    scratch = medtl.TransferClassifier(strategy="scratch", **opts).fit(train, val)
    assert max(_max_change_from_imagenet(full).values()) < 1e-4
    far = _max_change_from_imagenet(scratch)
    first_conv = next(k for k in far if k.endswith("weight"))
    assert far[first_conv] > 0.05, f"{first_conv} of scratch is ImageNet's"
    assert sum(v > 1e-3 for v in far.values()) > 0.5 * len(far)
    assert network(scratch).weights_info.kind == "random"
    assert network(full).weights_info.kind == "imagenet"
