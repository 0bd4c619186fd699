"""``--precision bf16`` on CPU: the training passes under bf16 autocast with depthwise
convolutions in fp32; validation and everything after training stay fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.training.loop import TrainConfig, fit

from .test_loop import make_data


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.depthwise(self.pointwise(x))).mean(dim=(2, 3)))


def _train(precision: str, tmp_path=None, resume: bool = False):
    torch.manual_seed(0)
    model = DepthwiseNet()
    seen: dict[str, set] = {"pointwise": set(), "depthwise": set()}
    for name in seen:
        getattr(model, name).register_forward_hook(
            lambda m, args, out, name=name: seen[name].add((m.training, out.dtype)))
    x, y = make_data(24, seed=1)
    xv, yv = make_data(8, seed=2)
    config = TrainConfig(epochs=2, batch_size=8, seed=0, precision=precision, threads=1)
    fit(model, [{"name": "all", "params": model.parameters(), "lr": 1e-3}], x, y, xv, yv,
        config, checkpoint_dir=tmp_path, resume=resume)
    return model, seen


def test_bf16_trains_under_autocast_with_depthwise_convolutions_in_fp32():
    model, seen = _train("bf16")
    assert seen["pointwise"] == {(True, torch.bfloat16), (False, torch.float32)}
    assert seen["depthwise"] == {(True, torch.float32), (False, torch.float32)}
    assert "forward" not in model.depthwise.__dict__  # nothing outlives training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp32_is_the_default_and_stays_fp32():
    assert TrainConfig().precision == "fp32"
    _, seen = _train("fp32")
    assert {d for _, d in seen["pointwise"] | seen["depthwise"]} == {torch.float32}


def test_a_run_is_not_resumed_in_another_precision(tmp_path):
    _train("fp32", tmp_path)
    with pytest.raises(MedtlError, match="precision: 'fp32' -> 'bf16'"):
        _train("bf16", tmp_path, resume=True)
    with pytest.raises(MedtlError, match="--precision"):
        _train("fp16")
