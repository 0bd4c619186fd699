"""Augmentation presets: shape/range contract, determinism, per-sample draws and the flip switch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from medtl.data.augment import AUGMENT_PRESETS, BatchAugment, _separable_blur, make_augment
from medtl.errors import MedtlError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 4, c: int = 1, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


def _left_bright(n: int, c: int = 1, h: int = 32, w: int = 32) -> torch.Tensor:
    # A broad bright band away from the border, so that no rotation/translation within the
    # presets' ranges can move it across the midline; only a flip can.
    x = torch.full((n, c, h, w), 0.1)
    x[..., h // 8 : h - h // 8, w // 8 : w // 2 - w // 8] = 0.9
    return x


@pytest.mark.parametrize("preset", ["basic", "strong"])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("hw", [(32, 32), (64, 48)])
def test_shape_dtype_range_preserved(preset: str, c: int, hw: tuple[int, int]) -> None:
    x = _batch(4, c, *hw)
    y = make_augment(preset)(x, _gen(1))
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(y, x)


def test_input_is_not_modified() -> None:
    x = _batch()
    before = x.clone()
    make_augment("strong")(x, _gen(0))
    assert torch.equal(x, before)


@pytest.mark.parametrize("preset", ["basic", "strong"])
def test_same_seed_same_output_different_seed_different_output(preset: str) -> None:
    aug = make_augment(preset)
    x = _batch(c=3)
    a = aug(x, _gen(7))
    assert torch.equal(a, aug(x, _gen(7)))
    assert not torch.allclose(a, aug(x, _gen(8)))


def test_generator_state_advances_so_consecutive_batches_differ() -> None:
    aug = make_augment("basic")
    x = _batch()
    g = _gen(3)
    assert not torch.allclose(aug(x, g), aug(x, g))


@pytest.mark.parametrize("preset", ["basic", "strong"])
def test_parameters_are_drawn_per_sample(preset: str) -> None:
    one = _batch(1, 3)
    y = make_augment(preset)(one.repeat(2, 1, 1, 1), _gen(0))
    assert not torch.allclose(y[0], y[1])


def _left_minus_right(y: torch.Tensor) -> torch.Tensor:
    w = y.shape[-1]
    return y[..., : w // 2].mean(dim=(1, 2, 3)) - y[..., w // 2 :].mean(dim=(1, 2, 3))


@pytest.mark.parametrize("preset", ["basic", "strong"])
def test_no_hflip_never_flips(preset: str) -> None:
    aug = make_augment(preset, hflip=False)
    x = _left_bright(16)
    for seed in range(10):
        assert bool((_left_minus_right(aug(x, _gen(seed))) > 0).all())


def test_hflip_flips_some_samples() -> None:
    aug = make_augment("basic", hflip=True)
    diffs = torch.cat([_left_minus_right(aug(_left_bright(16), _gen(s))) for s in range(4)])
    flipped = int((diffs < 0).sum())
    # p = 0.5 per sample over 64 draws: both outcomes must occur, roughly half each.
    assert 16 < flipped < 48


def test_strong_differs_from_basic_by_elastic_step() -> None:
    x = _batch(c=3)
    basic, strong = make_augment("basic"), make_augment("strong")
    assert strong.params.elastic_alpha > 0 and basic.params.elastic_alpha == 0
    assert not torch.allclose(basic(x, _gen(0)), strong(x, _gen(0)))
    # Same ranges and seed with the elastic step switched off: the step itself changes the output.
    rigid = BatchAugment(replace(strong.params, elastic_alpha=0.0))
    assert not torch.allclose(rigid(x, _gen(0)), strong(x, _gen(0)))


def test_none_returns_none() -> None:
    assert make_augment("none") is None
    assert make_augment("none", hflip=False) is None


def test_unknown_preset_raises_medtl_error() -> None:
    with pytest.raises(MedtlError, match="augment"):
        make_augment("heavy")


def test_presets_listed() -> None:
    assert AUGMENT_PRESETS == ("none", "basic", "strong")


def test_rejects_non_batch_input() -> None:
    with pytest.raises(ValueError):
        make_augment("basic")(torch.rand(1, 32, 32), _gen(0))


def test_separable_blur_matches_torchvision() -> None:
    x = torch.rand(2, 2, 32, 48, generator=_gen(0)) * 2 - 1
    expected = F.gaussian_blur(x, [41, 41], [5.0, 5.0])
    assert torch.allclose(_separable_blur(x, 41, 5.0), expected, atol=1e-5)
