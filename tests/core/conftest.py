"""Data for the core wiring tests: tiny synthetic folders, or the embedded demo sample.

Nothing here needs ../shared/data, so a fresh clone runs every test in tests/core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..conftest import blob_image, write_blob_images

# Small images and ImageNet MobileNetV2 (installed offline with medtl): seconds per fit.
FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=32, quiet=True)


@pytest.fixture(scope="package")
def blobs(tmp_path_factory) -> Path:
    """Two visible shapes (classes ``bar`` < ``disc``) in train/val/test folders, 12 each."""
    return write_blob_images(tmp_path_factory.mktemp("core") / "blobs", n_per_class=12,
                             splits=("train", "val", "test"))


@pytest.fixture(scope="package")
def blob_splits(blobs):
    import medtl

    ds = medtl.load_dataset(blobs)
    return ds.split("train"), ds.split("val"), ds.split("test")


def write_noisy_binary(root: Path, counts: dict[str, dict[str, int]], *, flip: int = 3,
                       size: int = 48, seed: int = 0) -> Path:
    """Bars and discs with ``flip`` images per class and split drawn as the other shape.

    The mislabelled images make every figure imperfect (sensitivity != specificity, thresholds
    that differ between val and test), so a metric computed for the wrong class or on the wrong
    split cannot pass by coincidence.
    """
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = cls if i >= flip else ("bar" if cls == "disc" else "disc")
                Image.fromarray(blob_image(rng, shape, size)).save(
                    d / f"{split}_{cls}_{i:03d}.png")
    return root
