"""Property-based: random bytes and mutated PNG, JPEG, DICOM and NIfTI files fed to the readers.
The only exception that may escape is DataReadError; a read that succeeds returns what is
documented. Example counts are bounded so the file runs in seconds."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medtl.data.readers import read_image
from medtl.data.volumes import read_volume
from medtl.errors import DataReadError

from ..conftest import write_dicom

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
_DIR = Path(tempfile.mkdtemp(prefix="medtl-fuzz-"))
# pydicom and nibabel warn about the malformed values they read; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _valid(kind: str) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    if kind in ("png", "jpg"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG" if kind == "png" else "JPEG")
        return buf.getvalue()
    if kind == "dcm":
        return write_dicom(_DIR / "valid.dcm", pixels.astype(np.uint16) * 10,
                           RescaleSlope=1, RescaleIntercept=-100).read_bytes()
    import nibabel as nib

    path = _DIR / f"valid.{kind}"
    nib.save(nib.Nifti1Image(rng.normal(size=(8, 8, 4)).astype(np.float32), np.eye(4)), path)
    return path.read_bytes()


VALID = {kind: _valid(kind) for kind in ("png", "jpg", "dcm", "nii", "nii.gz")}


def _read(kind: str, data: bytes) -> None:
    path = _DIR / f"case.{kind}"
    path.write_bytes(data)
    try:
        if kind.startswith("nii"):
            out = read_volume(path)
            assert out.dtype == np.float32 and out.ndim == 3
        else:
            out = read_image(path)
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    except DataReadError as exc:
        assert exc.reason and str(path) in str(exc)


@st.composite
def mutated(draw, kind: str) -> bytes:
    data = bytearray(VALID[kind])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos:pos + len(chunk)] = chunk
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_files_read(kind):
    _read(kind, VALID[kind])


@pytest.mark.parametrize("kind", sorted(VALID))
@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_data_read_error(kind, data):
    _read(kind, data)


@pytest.mark.parametrize("kind", sorted(VALID))
@SETTINGS
@given(data=st.data())
def test_mutated_files_raise_only_data_read_error(kind, data):
    _read(kind, data.draw(mutated(kind)))
