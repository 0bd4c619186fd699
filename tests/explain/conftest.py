"""A dataset where the evidence has a known place: a bright patch decides the class."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

PATCH_SIZE = 128
PATCH_SIDE = 40


def write_patch_images(root: Path, n_per_class: dict[str, int], size: int = PATCH_SIZE,
                       side: int = PATCH_SIDE, margin: int = 0, noise: float = 25,
                       seed: int = 0) -> Path:
    """Grey noise; images of class ``patch`` also hold one bright square at a random position at
    least ``margin`` pixels from the border, those of class ``none`` do not. Writes
    ``root/<split>/<class>/*.png`` and ``root/patches.csv`` with each patch's box (y0, x0, side),
    so a map can be scored on where it points."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in n_per_class.items():
        for cls in ("none", "patch"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.normal(110, noise, (size, size))
                path = d / f"{split}_{cls}_{i:03d}.png"
                if cls == "patch":
                    y0, x0 = rng.integers(margin, size - side - margin + 1, 2)
                    # Brighter, with the background's texture: a flat square would only show
                    # its edges to the network, and maps peak on its border.
                    img[y0:y0 + side, x0:x0 + side] += 90
                    rows.append({"path": str(path.resolve()), "y0": int(y0), "x0": int(x0),
                                 "side": side})
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    with open(root / "patches.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "y0", "x0", "side"])
        w.writeheader()
        w.writerows(rows)
    return root


def patch_boxes(root: Path) -> dict[str, tuple[int, int, int]]:
    with open(root / "patches.csv", newline="") as f:
        return {r["path"]: (int(r["y0"]), int(r["x0"]), int(r["side"]))
                for r in csv.DictReader(f)}
