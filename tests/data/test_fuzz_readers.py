"""Hostile input for the readers: random bytes, byte-mutated PNG, JPEG, DICOM and NIfTI files,
DICOM and NIfTI headers with random field values, and oversized images.

The only exception that may escape ``read_image``, ``read_dicom``, ``dicom_tags`` and
``read_volume`` is DataReadError, and a read that succeeds returns the documented dtype and
shape. Examples are derandomized (the same cases every run) and bounded so the file runs in
seconds; ``MEDTL_FUZZ_SCALE=20`` runs 20 times as many fresh random cases.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medtl.data.dicom import WINDOW_CHOICES, dicom_tags, read_dicom
from medtl.data.readers import read_image
from medtl.data.volumes import read_volume
from medtl.errors import DataReadError

from ..conftest import write_dicom

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")


def fuzz(n: int) -> settings:
    """``n`` examples, times MEDTL_FUZZ_SCALE; MEDTL_FUZZ_SCALE also turns derandomization off,
    so a longer local run searches new cases instead of repeating CI's."""
    scale = int(os.environ.get("MEDTL_FUZZ_SCALE", "0") or 0)
    # The work directory is module-scoped, so function_scoped_fixture does not apply.
    return settings(max_examples=n * max(scale, 1), deadline=None, derandomize=scale == 0,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# pydicom and nibabel warn about the malformed values they read; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning",
                                        "ignore::RuntimeWarning",
                                        "ignore::DeprecationWarning")

KINDS = ("png", "jpg", "dcm", "nii", "nii.gz")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid(work: Path) -> dict[str, bytes]:
    """One small valid file of each kind, as bytes."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    out = {}
    for kind in ("png", "jpg"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG" if kind == "png" else "JPEG")
        out[kind] = buf.getvalue()
    out["dcm"] = write_dicom(work / "valid.dcm", pixels.astype(np.int16) * 10 - 500,
                             RescaleSlope=1, RescaleIntercept=-100, WindowCenter=0,
                             WindowWidth=400, Modality="CT").read_bytes()
    for kind in ("nii", "nii.gz"):
        path = work / f"valid.{kind}"
        data = rng.normal(size=(8, 6, 4)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
        out[kind] = path.read_bytes()
    return out


def check_read(path: Path, kind: str, window: str = "auto", frame: int | None = None) -> None:
    """Read ``path``; succeed with the documented output or fail with a DataReadError only."""
    try:
        if kind.startswith("nii") or path.is_dir():
            out = read_volume(path)
            assert out.dtype == np.float32 and out.ndim == 3 and min(out.shape) >= 1
            return
        if kind == "dcm":
            out = read_dicom(path, window=window, frame=frame)
            tags = dicom_tags(path)
            assert isinstance(tags["frames"], int)
        else:
            out = read_image(path)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        assert min(out.shape[:2]) >= 1
    except DataReadError as exc:
        assert exc.reason and str(path) in str(exc)


def _write(work: Path, kind: str, data: bytes) -> Path:
    path = work / f"case.{kind}"
    path.write_bytes(data)
    return path


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with 1-8 bit flips, overwrites, truncations or insertions; half of the
    positions fall in the first 512 bytes, where the headers are."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert"]))
        end = max(len(out) - 1, 0)
        pos = draw(st.one_of(st.integers(0, min(end, 512)), st.integers(0, end)))
        if op == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[pos:pos + len(chunk)] = chunk
        elif op == "truncate":
            del out[pos:]
        else:
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


@pytest.mark.parametrize("kind", KINDS)
def test_valid_files_read(kind, valid, work):
    path = _write(work, kind, valid[kind])
    if kind.startswith("nii"):
        assert read_volume(path).shape == (4, 6, 8)
    elif kind == "dcm":
        assert read_dicom(path).shape == (16, 16, 3)
    else:
        assert read_image(path).shape == (16, 16, 3)


@pytest.mark.parametrize("kind", KINDS)
@fuzz(40)
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_data_read_error(kind, data, work):
    check_read(_write(work, kind, data), kind)


@pytest.mark.parametrize("kind", KINDS)
@fuzz(100)
@given(data=st.data())
def test_mutated_files_raise_only_data_read_error(kind, data, valid, work):
    window = data.draw(st.sampled_from(WINDOW_CHOICES))
    frame = data.draw(st.one_of(st.none(), st.integers(-2, 3)))
    check_read(_write(work, kind, data.draw(mutated(valid[kind]))), kind, window, frame)


# ------------------------------------------------------------------ DICOM header values
def _us(values: list[int]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(values), st.integers(0, 65535)).map(
        lambda v: struct.pack("<H", v))


def _text(values: list[str]) -> st.SearchStrategy[bytes]:
    def pad(s: str) -> bytes:
        b = s.encode("ascii", "replace")
        return b + b" " * (len(b) % 2)

    return st.one_of(st.sampled_from(values),
                     st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
                     ).map(pad)


_NUMBERS = ["0", "1", "-1", "2", "0.5", "-1024", "1e308", "-1e308", "nan", "inf", "abc", "",
            "1\\2", "40\\400\\9", "3.5e-320"]
DICOM_FIELDS: dict[int, tuple[str, st.SearchStrategy[bytes]]] = {
    0x00280002: ("US", _us([0, 1, 2, 3, 4])),  # SamplesPerPixel
    0x00280004: ("CS", _text(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL",
                              "YBR_FULL_422", "PALETTE COLOR", "YBR_ICT", "HSV"])),
    0x00280006: ("US", _us([0, 1, 2])),  # PlanarConfiguration
    0x00280008: ("IS", _text(["0", "1", "2", "3", "-1", "100000", "abc", "1.5"])),
    0x00280010: ("US", _us([0, 1, 4, 8, 16, 9000, 65535])),  # Rows
    0x00280011: ("US", _us([0, 1, 4, 8, 16, 9000, 65535])),  # Columns
    0x00280100: ("US", _us([0, 1, 7, 8, 12, 16, 32, 64])),  # BitsAllocated
    0x00280101: ("US", _us([0, 1, 8, 12, 15, 16, 17, 32])),  # BitsStored
    0x00280102: ("US", _us([0, 7, 11, 15, 31, 40])),  # HighBit
    0x00280103: ("US", _us([0, 1, 2])),  # PixelRepresentation
    0x00281050: ("DS", _text(_NUMBERS)),  # WindowCenter
    0x00281051: ("DS", _text(_NUMBERS)),  # WindowWidth
    0x00281052: ("DS", _text(_NUMBERS)),  # RescaleIntercept
    0x00281053: ("DS", _text(_NUMBERS)),  # RescaleSlope
    0x00281056: ("CS", _text(["LINEAR", "LINEAR_EXACT", "SIGMOID", "CUBIC"])),
    0x00080060: ("CS", _text(["CT", "MR", "CR", ""])),  # Modality
}
SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.57", "1.2.3.4"]


@fuzz(500)
@given(data=st.data())
def test_dicom_header_values_raise_only_data_read_error(data, work):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(write_dicom(work / "base.dcm",
                                     np.arange(64, dtype=np.uint16).reshape(8, 8) * 40,
                                     Modality="CT", RescaleSlope=1, RescaleIntercept=-1024))
    tags = data.draw(st.lists(st.sampled_from(sorted(DICOM_FIELDS)), min_size=1, max_size=6,
                              unique=True))
    for tag in tags:
        vr, values = DICOM_FIELDS[tag]
        value = data.draw(values)
        # Raw elements are written byte for byte: pydicom would refuse most of these values.
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    pixels = bytes(ds.PixelData)
    size = data.draw(st.sampled_from([len(pixels), 0, 1, 63, 127, 129, 256, 4096]))
    ds.PixelData = (pixels * (size // max(len(pixels), 1) + 1))[:size] or b"\0\0"
    ds.file_meta.TransferSyntaxUID = data.draw(st.sampled_from(SYNTAXES))
    path = work / "header.dcm"
    try:
        ds.save_as(path, enforce_file_format=False)
    except Exception:  # pydicom cannot even write this combination: nothing to read
        return
    check_read(path, "dcm", data.draw(st.sampled_from(WINDOW_CHOICES)),
               data.draw(st.one_of(st.none(), st.integers(0, 2))))


@fuzz(40)
@given(data=st.data())
def test_dicom_series_folders_raise_only_data_read_error(data, work):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    folder = work / "series"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    positions = _text(["0\\0\\0", "0\\0\\1", "nan\\0\\1", "1\\2", "inf\\inf\\inf", "a\\b\\c"])
    orientations = _text(["1\\0\\0\\0\\1\\0", "0\\0\\0\\0\\0\\0", "1\\0\\0", "nan\\0\\0\\0\\1\\0"])
    for i in range(data.draw(st.integers(1, 3))):
        side = data.draw(st.sampled_from([4, 4, 4, 5]))
        path = write_dicom(folder / f"{i}.dcm", np.full((side, side), i, np.uint16),
                           InstanceNumber=i, SeriesInstanceUID="1.2.3")
        ds = pydicom.dcmread(path)
        # Fixed UIDs: random ones vary in length, and so would the mutations drawn below.
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.{i}"
        for tag, values in ((0x00200032, positions), (0x00200037, orientations)):
            if data.draw(st.booleans()):
                value = data.draw(values)
                ds[tag] = RawDataElement(Tag(tag), "DS", len(value), value, 0, False, True)
        ds.save_as(path, enforce_file_format=False)
        if data.draw(st.integers(0, 4)) == 0:
            path.write_bytes(data.draw(mutated(path.read_bytes())))
    check_read(folder, "series")


# ------------------------------------------------------------------ NIfTI header values
_FLOATS = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e-30, 1e30, float("nan"), float("inf")]),
                    st.floats(-1e6, 1e6, width=32))
NIFTI_FIELDS = {
    "dim": st.lists(st.one_of(st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 2048, 32767]),
                              st.integers(-5, 40)), min_size=8, max_size=8),
    "datatype": st.sampled_from([0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1536,
                                 2304, 7, 99]),
    "bitpix": st.sampled_from([0, 8, 16, 32, 64, 7]),
    "vox_offset": st.sampled_from([0.0, 348.0, 352.0, 353.0, 1e9, -4.0, float("nan")]),
    "scl_slope": _FLOATS,
    "scl_inter": _FLOATS,
    "pixdim": st.lists(_FLOATS, min_size=8, max_size=8),
    "qform_code": st.integers(-1, 5),
    "sform_code": st.integers(-1, 5),
    "quatern_b": _FLOATS,
    "srow_x": st.lists(_FLOATS, min_size=4, max_size=4),
    "srow_z": st.lists(_FLOATS, min_size=4, max_size=4),
}


@pytest.mark.parametrize("kind", ["nii", "nii.gz"])
@fuzz(120)
@given(data=st.data())
def test_nifti_header_values_raise_only_data_read_error(kind, data, work):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((4, 3, 2))
    header["vox_offset"] = 352
    header.set_sform(np.eye(4), code=1)
    for name in data.draw(st.lists(st.sampled_from(sorted(NIFTI_FIELDS)), min_size=1,
                                   max_size=5, unique=True)):
        header[name] = data.draw(NIFTI_FIELDS[name])
    body = np.arange(24, dtype=np.float32).tobytes()
    body = body[:data.draw(st.sampled_from([len(body), 0, 10, 95, 200]))]
    raw = header.binaryblock + b"\0" * 4 + body
    check_read(_write(work, kind, gzip.compress(raw) if kind == "nii.gz" else raw), kind)


# ---------------------------------------------------------------------- oversized images
def test_images_over_8000_pixels_are_reduced_while_reading(tmp_path):
    wide = np.zeros((20, 9000), dtype=np.uint8)
    wide[:, 4500:] = 200
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = read_image(tmp_path / "wide.png")
    assert out.shape == (18, 8000, 3)  # aspect kept: 20 * 8000 / 9000 rounds to 18
    assert (out[:, :3990] == 0).all() and (out[:, 4010:] == 200).all()
    tall = Image.new("I;16", (30, 8100), 5000)  # 16-bit, min-max scaled after reduction
    tall.save(tmp_path / "tall.tif")
    assert read_image(tmp_path / "tall.tif").shape == (8000, 30, 3)  # 29.6 rounds to 30


def test_a_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    rgb = np.zeros((32, 16400, 3), dtype=np.uint8)
    rgb[:, :8200] = (200, 40, 40)
    rgb[:, 8200:] = (40, 40, 200)
    Image.fromarray(rgb).save(tmp_path / "huge.jpg", quality=95)
    out = read_image(tmp_path / "huge.jpg")
    assert max(out.shape[:2]) == 8000 and out.shape[2] == 3
    assert np.abs(out[:, 100].astype(int) - (200, 40, 40)).max() <= 8
    assert np.abs(out[:, -100].astype(int) - (40, 40, 200)).max() <= 8


def test_decompression_bomb_is_a_data_read_error(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px > 2 x 1,000: refused
    with pytest.raises(DataReadError, match="too large") as info:
        read_image(tmp_path / "bomb.png")
    assert "bomb.png" in str(info.value)
