"""Preprocessing: decoded uint8 images to the normalised tensors a backbone's weights expect.

The whole image is resized to a square (no centre crop): a crop can cut away the finding, and
medical images are usually framed on purpose. Mean and std come from the weights' config, as
timm derives them, so ImageNet and EfficientNet-Lite (mean = std = 0.5) weights both get theirs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from medtl.errors import MedtlError

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "nearest": Image.NEAREST}
# Input sides a backbone can be given: below 8 px nothing survives the first strides; above
# 4096 px one image of three float32 channels is 200 MB.
MIN_SIZE, MAX_SIZE = 8, 4096


@dataclass(frozen=True)
class Preprocessing:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"          # whole image to size x size, aspect ratio not kept
    interpolation: str = "bilinear"
    # 1: the model's first convolution takes one grey channel (``--in-chans 1``).
    channels: int = 3

    @classmethod
    def for_spec(cls, spec, size: int | None = None, channels: int = 3) -> Preprocessing:
        """The preprocessing of a registry entry's weights, optionally at another input size."""
        return cls(size=int(size or spec.input_size), mean=tuple(spec.mean), std=tuple(spec.std),
                   channels=channels)

    @property
    def model_mean(self) -> tuple[float, ...]:
        """Per-channel mean of the model's input: one averaged value for a grey model."""
        return (sum(self.mean) / 3,) if self.channels == 1 else tuple(self.mean)

    @property
    def model_std(self) -> tuple[float, ...]:
        return (sum(self.std) / 3,) if self.channels == 1 else tuple(self.std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From a run's model.json: untrusted input, so every value is checked (a size of
        100000 would exhaust memory at the first image)."""
        try:
            pre = cls(size=int(d["size"]), mean=tuple(float(v) for v in d["mean"]),
                      std=tuple(float(v) for v in d["std"]), resize=d.get("resize", "squash"),
                      interpolation=d.get("interpolation", "bilinear"),
                      channels=int(d.get("channels", 3)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MedtlError(f"preprocessing {d!r}: not a medtl preprocessing ({exc})") from exc
        problems = []
        if not MIN_SIZE <= pre.size <= MAX_SIZE:
            problems.append(f"size {pre.size} outside {MIN_SIZE}..{MAX_SIZE}")
        # Pixels are scaled to [0, 1]: a mean or std far outside it (or not finite) is no
        # normalisation medtl wrote, and NaN or inf would turn every prediction into NaN.
        if len(pre.mean) != 3 or len(pre.std) != 3 \
                or not all(math.isfinite(m) and -10 <= m <= 10 for m in pre.mean) \
                or not all(math.isfinite(s) and 1e-6 <= s <= 10 for s in pre.std):
            problems.append("mean and std need three finite values each (|mean| <= 10, "
                            "std in [1e-6, 10])")
        if pre.resize != "squash" or pre.interpolation not in INTERPOLATIONS:
            problems.append(f"resize {pre.resize!r} / interpolation {pre.interpolation!r} unknown")
        if pre.channels not in (1, 3):
            problems.append(f"channels {pre.channels} is not 1 or 3")
        if problems:
            raise MedtlError(f"preprocessing: {'; '.join(problems)}")
        return pre

    def key(self) -> str:
        """Stable short hash, part of the feature-cache key."""
        d = self.to_dict()
        if d["channels"] == 3:  # keys of caches written before grey models existed stay valid
            del d["channels"]
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def resize_uint8(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 to (size, size, 3) uint8, antialiased."""
        if image.shape[0] == self.size and image.shape[1] == self.size:
            return image
        resample = INTERPOLATIONS[self.interpolation]
        return np.asarray(Image.fromarray(image).resize((self.size, self.size), resample))

    def normalise(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 to (N, C, S, S) float32, normalised; C is ``channels``."""
        x = batch_uint8.astype(np.float32) * np.float32(1 / 255)
        if self.channels == 1:
            x = x.mean(axis=-1, keepdims=True)
        x -= np.asarray(self.model_mean, dtype=np.float32)
        x /= np.asarray(self.model_std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        return self.normalise(np.stack([self.resize_uint8(im) for im in images]))
