"""A tiny multi-label run shared by the export, serving and explain tests of issue 21.

Grey noise images of 64 px where a bright disc and a bright bar (tests/conftest.py's
``blob_image``) are each present or not, in every combination; a manifest with one column per
label (``path,disc,bar,split``); a feature-extractor run on random weights, one epoch. 64 px,
not 32: MobileNetV2's last feature map is then 2 x 2, so a Grad-CAM map has a place to point
at (at 32 px it is one cell, and every map is empty).

The run is trained once per test session (:func:`disc_bar_run` keeps it), since the export,
serving and explain tests all read the same one.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import blob_image

SIZE = 64
LABELS = ["disc", "bar"]
SPLITS = {"train": 24, "val": 12, "test": 12}
_RUNS: dict[str, tuple[Path, Path]] = {}


def disc_bar_image(rng: np.random.Generator, disc: bool, bar: bool, size: int = SIZE
                   ) -> np.ndarray:
    """Noise with a disc, a bar, both or neither (each drawn by ``blob_image``)."""
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    for shape, shown in (("disc", disc), ("bar", bar)):
        if shown:
            drawn = blob_image(rng, shape, size)
            img[drawn == 230] = 230
    return img


def write_disc_bar(root: Path, seed: int = 0) -> Path:
    """The images and ``root/manifest.csv``; image i of a split shows a disc when i is odd and a
    bar when i // 2 is odd, so each split has every combination. Returns the manifest."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in SPLITS.items():
        for i in range(n):
            disc, bar = i % 2, (i // 2) % 2
            name = f"{split}_{i:02d}.png"
            Image.fromarray(disc_bar_image(rng, bool(disc), bool(bar))).save(root / name)
            rows.append({"path": name, "disc": disc, "bar": bar, "split": split})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", *LABELS, "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def disc_bar_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run directory) of the session's multi-label run, trained on first use."""
    if "run" not in _RUNS:
        import medtl.workflow

        root = tmp_path_factory.mktemp("multilabel")
        manifest = write_disc_bar(root / "data")
        run = medtl.workflow.train(manifest, strategy="feature-extractor", weights="random",
                                   backbone="mobilenet_v2", image_size=SIZE, epochs=1,
                                   out=root / "run", quiet=True)
        _RUNS["run"] = (root / "data", run.path)
    return _RUNS["run"]


def split_images(data: Path) -> list[Path]:
    """The test split's image files, in manifest order."""
    return [data / f"test_{i:02d}.png" for i in range(SPLITS["test"])]


def with_both(data: Path) -> Path:
    """A test image showing a disc and a bar (i = 3)."""
    return data / "test_03.png"


__all__ = ["LABELS", "disc_bar_image", "disc_bar_run", "split_images", "with_both",
           "write_disc_bar"]
