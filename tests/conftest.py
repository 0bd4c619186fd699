"""Shared fixtures. Every test runs offline and with a private feature cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KERMANY = SHARED_DATA / "chest_xray_kermany_224"


@pytest.fixture(autouse=True, scope="session")
def _offline_and_private_cache(tmp_path_factory):
    os.environ["MEDTL_OFFLINE"] = "1"
    os.environ["MEDTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("medtl-cache"))
    yield


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """A cache directory of this test's own, for tests that count cache hits."""
    d = tmp_path / "cache"
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(d))
    return d


def kermany_or_skip() -> Path:
    if not KERMANY.is_dir():
        pytest.skip(f"real data not found at {KERMANY} (../shared/data is absent in a fresh "
                    "clone; these tests run where it exists)")
    return KERMANY


def write_blob_images(root: Path, n_per_class: int = 12, size: int = 48, seed: int = 0,
                      splits: tuple[str, ...] = ("train", "test")) -> Path:
    """A two-class folder dataset whose class is visible: a bright disc vs a bright bar."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in ("disc", "bar"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = rng.integers(0, 60, (size, size), dtype=np.uint8)
                cy, cx = rng.integers(12, size - 12, 2)
                yy, xx = np.mgrid[:size, :size]
                if cls == "disc":
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 230
                else:
                    img[cy - 2:cy + 2, 4:size - 4] = 230
                Image.fromarray(img).save(d / f"p{i:03d}_{split}_{cls}.png")
    return root


@pytest.fixture
def blob_data(tmp_path) -> Path:
    return write_blob_images(tmp_path / "blobs")
