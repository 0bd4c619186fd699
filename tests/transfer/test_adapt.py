"""AdaBN (medtl.transfer.adapt): only BatchNorm running statistics change, to the target's."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medtl.models import create_backbone
from medtl.training.loop import seeded
from medtl.transfer.adapt import adapt_batchnorm


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def test_adabn_changes_only_batchnorm_running_statistics():
    with seeded(0):
        net = create_backbone("mobilenet_v2", weights="random")
    net.reset_classifier(2)
    before = _state(net)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 32, 32, generator=g) * 2 + 1 for _ in range(3)]
    assert adapt_batchnorm(net, batches) == 24
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(BN_STATS) for k in changed)
    # every running mean and variance was re-estimated, and nothing else moved
    assert {k for k in after if k.endswith(("running_mean", "running_var"))} <= changed
    assert not net.training and all(m.momentum == 0.1 for m in net.modules()
                                    if isinstance(m, nn.BatchNorm2d))


def test_adabn_statistics_are_the_targets():
    bn = nn.BatchNorm2d(3)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(5, 3, 4, 4, generator=g) * 3 + 7 for _ in range(4)]
    adapt_batchnorm(nn.Sequential(bn), batches)
    x = torch.cat(batches).transpose(0, 1).reshape(3, -1)
    # a cumulative average over equal batches: the mean of the batch means and of the batch
    # (unbiased) variances
    means = torch.stack([b.transpose(0, 1).reshape(3, -1).mean(1) for b in batches])
    vars_ = torch.stack([b.transpose(0, 1).reshape(3, -1).var(1) for b in batches])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, vars_.mean(0), atol=1e-4)
    assert np.allclose(bn.running_mean.numpy(), x.mean(1).numpy(), atol=1e-4)
