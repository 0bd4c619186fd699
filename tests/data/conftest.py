"""Fixtures for the data tests: tiny image trees written with PIL into tmp_path."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# /work/main/tests/data/conftest.py -> /work/shared/data (absent in a user's fresh clone).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not found: the shared test data lives outside the repository")
    return path


def write_image(path: Path, *, mode: str = "L", size: tuple[int, int] = (8, 8)) -> Path:
    """Write a small noise image whose content depends on the file name (so keys differ)."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def make_tree(root: Path, layout: dict[str, Iterable[str]]) -> Path:
    """``{"train/NORMAL": ["a.png", ...], ...}`` -> image files under ``root``."""
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_image(root / folder / name)
    return root


def kermany_names(cls: str, n_patients: int, per_patient: int, start: int = 1) -> list[str]:
    """Kermany-style file names: several images for each patient."""
    names = []
    for p in range(start, start + n_patients):
        for j in range(per_patient):
            if cls == "NORMAL":
                prefix = "NORMAL2-" if p % 2 else ""
                names.append(f"{prefix}IM-{p:04d}-{j + 1:04d}.png")
            else:
                names.append(f"person{p}_bacteria_{100 * p + j}.png")
    return names


@pytest.fixture
def tree(tmp_path: Path) -> Callable[[dict[str, Iterable[str]]], Path]:
    def build(layout: dict[str, Iterable[str]], name: str = "data") -> Path:
        return make_tree(tmp_path / name, layout)

    return build


@pytest.fixture
def kermany_like(tmp_path: Path) -> Path:
    """train/{NORMAL,PNEUMONIA} with 15 patients x 3 images each, and a small test/ folder."""
    return make_tree(
        tmp_path / "kermany_like",
        {
            "train/NORMAL": kermany_names("NORMAL", 15, 3),
            "train/PNEUMONIA": kermany_names("PNEUMONIA", 15, 3),
            "test/NORMAL": kermany_names("NORMAL", 3, 1, start=500),
            "test/PNEUMONIA": kermany_names("PNEUMONIA", 3, 1, start=500),
        },
    )


# Helpers are handed out as fixtures rather than imported (``from conftest import ...``) so the
# tests keep working whatever pytest import mode or other conftest.py files the project uses.
@pytest.fixture
def shared() -> Callable[[str], Path]:
    return shared_data


@pytest.fixture
def names() -> Callable[..., list[str]]:
    return kermany_names


@pytest.fixture
def image() -> Callable[..., Path]:
    return write_image
