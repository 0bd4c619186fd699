"""Test-time augmentation (``--tta none|flip|standard``): a fixed set of views of each image,
whose probabilities are averaged.

The views are built by one torch module, :class:`TTAViews`, on the model's normalised input
(N, C, S, S), and the same module is what ``medtl export`` traces into the ONNX graph (and the
TorchScript bundle), so ``predict``, ``evaluate``, ``export`` and ``serve`` average exactly the
same views:

- ``flip``: the image and its horizontal flip (2 views).
- ``standard``: the image; its horizontal flip where flips are allowed; a zoom in (the centre
  ``round(S / 1.1)`` pixels resized to S); a zoom out (the image resized to ``round(0.9 S)``
  and centred on black); shifts by ``d = max(1, round(0.03 S))`` pixels down-right and
  up-left, the uncovered border black (5 or 6 views). Resizes are bilinear, half-pixel
  centres, no antialiasing (ONNX ``Resize`` computes the same). "Black" is pixel value 0, i.e.
  ``-mean / std`` after normalisation, like the training augmentation's fill.

What is averaged: each view's softmax probabilities, before calibration; the temperature
(fitted on validation's averaged probabilities when the run was trained with TTA) is applied to
the mean. The out-of-distribution score is the unaugmented view's (the first view).

Flips: a flip is allowed only when the run's own training augmentation flipped images
(``--augment basic|strong`` without ``--no-hflip``): a run trained with ``--no-hflip`` said its
images' left and right matter (a chest X-ray's heart side), and a run trained without any
augmentation never saw a flipped image. ``flip`` is then refused, and ``standard`` leaves the
flip out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn

from medtl.errors import MedtlError, check_choice

TTA_CHOICES = ("none", "flip", "standard")
ZOOM_IN = 1.1
ZOOM_OUT = 0.9
SHIFT = 0.03  # of the side, at least one pixel


def flips_allowed(augment: str, hflip: bool) -> bool:
    """Whether the run's training augmentation flipped images horizontally."""
    return bool(hflip) and augment != "none"


def check_tta(tta: str, *, augment: str, hflip: bool) -> None:
    """Refuse a TTA the run's augmentation policy forbids (a MedtlError saying why)."""
    if not isinstance(tta, str) or tta not in TTA_CHOICES:
        # Bounded: the value may come from a crafted model.json
        raise MedtlError(f"unknown tta {repr(tta)[:40]}; choose one of: "
                         f"{', '.join(TTA_CHOICES)}")
    if tta == "flip" and not flips_allowed(augment, hflip):
        why = ("was trained with --no-hflip: left and right matter for its images (a chest "
               "X-ray's heart side)" if not hflip else
               "was trained with --augment none, so it never saw a flipped image")
        raise MedtlError(f"--tta flip: the run {why}; use --tta standard (scales and shifts, "
                         "no flip) or --tta none")


def view_names(tta: str, *, flip: bool) -> list[str]:
    """The views of ``tta`` in the order :class:`TTAViews` stacks them."""
    check_choice("tta", tta, TTA_CHOICES)
    if tta == "none":
        return ["identity"]
    if tta == "flip":
        return ["identity", "hflip"]
    return ["identity", *(["hflip"] if flip else []), f"zoom{ZOOM_IN}", f"zoom{ZOOM_OUT}",
            "shift+", "shift-"]


def shift_pixels(size: int) -> int:
    return max(1, round(SHIFT * size))


class TTAViews(nn.Module):
    """Normalised images (N, C, S, S) to their views stacked view-major: (V * N, C, S, S),
    rows ``v * N + i`` the view ``v`` of image ``i``; view 0 is the image itself."""

    def __init__(self, tta: str, size: int, fill: tuple[float, ...], *, flip: bool) -> None:
        super().__init__()
        self.names = view_names(tta, flip=flip)
        self.size = int(size)
        # The normalised value of a black pixel, per channel: what uncovered borders get.
        self.register_buffer("fill", torch.tensor(fill, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def n_views(self) -> int:
        return len(self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._view(x, name) for name in self.names], dim=0)

    def _view(self, x: torch.Tensor, name: str) -> torch.Tensor:
        s = self.size
        if name == "identity":
            return x
        if name == "hflip":
            return torch.flip(x, dims=[3])
        if name == f"zoom{ZOOM_IN}":
            c = round(s / ZOOM_IN)
            lo = (s - c) // 2
            return _resize(x[:, :, lo:lo + c, lo:lo + c], s)
        if name == f"zoom{ZOOM_OUT}":
            c = round(s * ZOOM_OUT)
            lo = (s - c) // 2
            return self._pad(_resize(x, c), lo, s - c - lo, lo, s - c - lo)
        d = shift_pixels(s)
        if name == "shift+":  # content moves d pixels right and down
            return self._pad(x[:, :, :s - d, :s - d], d, 0, d, 0)
        return self._pad(x[:, :, d:, d:], 0, d, 0, d)  # "shift-": left and up

    def _pad(self, x: torch.Tensor, left: int, right: int, top: int, bottom: int
             ) -> torch.Tensor:
        # Pad with 0 around x - fill, then add fill back: the border is black, not the mean.
        return nnf.pad(x - self.fill, [left, right, top, bottom]) + self.fill


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return nnf.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                           antialias=False)


class TTAModel(nn.Module):
    """Views, then ``features`` and ``head`` on all of them at once: the mean over views of the
    softmax probabilities (N, K), uncalibrated, and the unaugmented view's features (N, D)."""

    def __init__(self, views: TTAViews, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.views = views
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.views.n_views
        f = self.features(self.views(x))
        p = torch.softmax(self.head(f).float(), dim=1)
        p = p.reshape(v, -1, p.shape[1]).mean(dim=0)
        return p, f.reshape(v, -1, f.shape[1])[0]


def make_views(tta: str, preprocessing, *, augment: str, hflip: bool) -> TTAViews:
    """The views of ``tta`` for a model of this preprocessing and augmentation policy."""
    check_tta(tta, augment=augment, hflip=hflip)
    fill = tuple(-m / s for m, s in zip(preprocessing.model_mean, preprocessing.model_std,
                                        strict=True))
    return TTAViews(tta, preprocessing.size, fill, flip=flips_allowed(augment, hflip))


__all__ = ["TTA_CHOICES", "TTAModel", "TTAViews", "check_tta", "flips_allowed", "make_views",
           "view_names"]
