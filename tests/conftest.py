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
                Image.fromarray(blob_image(rng, cls, size)).save(
                    d / f"p{i:03d}_{split}_{cls}.png")
    return root


def blob_image(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """One grey image: noise with a bright disc (``shape="disc"``) or bar at a random place."""
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    cy, cx = rng.integers(12, size - 12, 2)
    yy, xx = np.mgrid[:size, :size]
    if shape == "disc":
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 230
    else:
        img[cy - 2:cy + 2, 4:size - 4] = 230
    return img


@pytest.fixture
def blob_data(tmp_path) -> Path:
    return write_blob_images(tmp_path / "blobs")


def write_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    """A minimal uncompressed DICOM file (Explicit VR Little Endian) holding ``pixels``.

    ``pixels``: (H, W) or (frames, H, W) unsigned/signed integers, or (H, W, 3) uint8 RGB.
    ``tags`` are set on the dataset as given (PatientID=..., RescaleSlope=..., ...).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    pixels = np.asarray(pixels)
    rgb = pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8
    if pixels.ndim == 3 and not rgb:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = (pixels.shape[:2] if rgb else pixels.shape[-2:])
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        data = pixels.astype(np.uint8)
    else:
        signed = pixels.min() < 0
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = int(signed)
        data = pixels.astype(np.int16 if signed else np.uint16)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = data.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
