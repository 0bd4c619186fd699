"""Training-time augmentation presets (``--augment none|basic|strong``) for batched tensors.

torchvision's v2 transform classes draw one set of parameters per call, so applying them to an
(N, C, H, W) batch would rotate, flip and deform every image identically. Here the parameters
are drawn per sample from a caller-owned ``torch.Generator`` and applied with the v2 functional
API, so each image gets its own augmentation while an epoch stays reproducible and resumable
from the generator's seed and state.

Ranges are deliberately mild: medical findings are small and their appearance is the signal,
so anything that could erase a lesion (crops, strong colour jitter) is left out. The
``strong`` preset adds an elastic deformation (Gu 2023's "deformable" class), which mimics
tissue and patient-positioning variability. See docs/augmentation.md for per-modality flips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from medtl.errors import check_choice

AUGMENT_PRESETS = ("none", "basic", "strong")

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of one preset; symmetric ranges are given by their half-width."""

    degrees: float          # rotation in [-degrees, degrees]
    scale: tuple[float, float]
    translate: float        # fraction of width/height, in [-translate, translate]
    brightness: float       # factor in [1 - b, 1 + b]
    contrast: float         # factor in [1 - c, 1 + c]
    hflip: bool
    elastic_alpha: float = 0.0  # 0 disables the elastic step
    elastic_sigma: float = 5.0


_PRESETS: dict[str, dict] = {
    "basic": dict(degrees=10.0, scale=(0.9, 1.1), translate=0.05, brightness=0.1, contrast=0.1),
    # alpha/sigma are torchvision's ElasticTransform defaults: at sigma 5 the smoothed field moves
    # pixels by about one pixel (std) with local warps, enough to vary shapes without tearing.
    "strong": dict(degrees=15.0, scale=(0.85, 1.15), translate=0.08, brightness=0.2,
                   contrast=0.2, elastic_alpha=50.0, elastic_sigma=5.0),
}


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the generator's device so a CPU generator works whatever device holds the images.
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return (low + (high - low) * u).cpu()


def _separable_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """The same Gaussian blur as F.gaussian_blur (reflect padding, normalised kernel).

    F.gaussian_blur convolves with the full k x k kernel; two 1-D passes give the same result
    several times faster at k = 41 (the full kernel took 0.7 s of "strong"'s 1 s per batch).
    """
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    c = x.shape[1]
    pad = kernel // 2
    x = nnf.pad(x, [pad, pad, pad, pad], mode="reflect")
    x = nnf.conv2d(x, k1.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return nnf.conv2d(x, k1.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


def _displacements(n: int, height: int, width: int, alpha: float, sigma: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Per-sample smoothed random fields (N, H, W, 2), as ElasticTransform.make_params builds one.

    Re-implemented rather than called because make_params draws from the global RNG, which would
    break per-epoch determinism.
    """
    noise = torch.rand(n, 2, height, width, generator=generator, device=generator.device)
    noise = noise.cpu() * 2 - 1
    # Reflect padding needs pad < size, so small images get a smaller (still odd) kernel.
    kernel = min(int(8 * sigma + 1) | 1, 2 * min(height, width) - 1)
    field = _separable_blur(noise, kernel, sigma) if kernel > 1 else noise
    field[:, 0] *= alpha / width
    field[:, 1] *= alpha / height
    return field.permute(0, 2, 3, 1).contiguous()


class BatchAugment:
    """Augments a float (N, C, H, W) batch in [0, 1] with per-sample random parameters."""

    def __init__(self, params: AugmentParams) -> None:
        self.params = params

    def __repr__(self) -> str:
        return f"BatchAugment({self.params})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"expected a float (N, C, H, W) batch, got {images.dtype} "
                             f"of shape {tuple(images.shape)}")
        p = self.params
        n, _, height, width = images.shape
        # All parameters are drawn up front in a fixed order, so the generator's consumption
        # does not depend on the data and a resumed epoch replays exactly.
        angles = _uniform(n, -p.degrees, p.degrees, generator)
        scales = _uniform(n, p.scale[0], p.scale[1], generator)
        tx = _uniform(n, -p.translate, p.translate, generator) * width
        ty = _uniform(n, -p.translate, p.translate, generator) * height
        brightness = _uniform(n, 1 - p.brightness, 1 + p.brightness, generator)
        contrast = _uniform(n, 1 - p.contrast, 1 + p.contrast, generator)
        flips = _uniform(n, 0.0, 1.0, generator) < 0.5
        fields = (_displacements(n, height, width, p.elastic_alpha, p.elastic_sigma, generator)
                  if p.elastic_alpha > 0 else None)

        out = []
        for i in range(n):
            img = images[i]
            if p.hflip and bool(flips[i]):
                img = F.horizontal_flip(img)
            # fill=0: medical images have dark borders, so black corners look like the real thing.
            img = F.affine(img, angle=float(angles[i]), translate=[float(tx[i]), float(ty[i])],
                           scale=float(scales[i]), shear=[0.0, 0.0],
                           interpolation=InterpolationMode.BILINEAR, fill=0.0)
            if fields is not None:
                img = F.elastic(img, fields[i : i + 1].to(img.device),
                                interpolation=InterpolationMode.BILINEAR, fill=0.0)
            img = F.adjust_brightness(img, float(brightness[i]))
            img = F.adjust_contrast(img, float(contrast[i]))
            out.append(img)
        return torch.stack(out).clamp_(0.0, 1.0).to(images.dtype)


def make_augment(preset: str, *, hflip: bool = True) -> Augment | None:
    """The augmentation of a preset, or None for "none".

    ``hflip=False`` for images whose laterality matters (chest X-rays: the heart is on the left).
    The returned callable takes a float32 (N, C, H, W) batch in [0, 1] and a torch.Generator and
    returns a batch of the same shape and dtype, clamped to [0, 1].
    """
    check_choice("augment", preset, AUGMENT_PRESETS)
    if preset == "none":
        return None
    return BatchAugment(AugmentParams(hflip=hflip, **_PRESETS[preset]))
