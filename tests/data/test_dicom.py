"""DICOM pixels against hand-computed values (modality LUT, VOI LUT and windows, named CT windows,
MONOCHROME1, frames, colour and YCbCr, compressed syntaxes, size limits), the tags, and every
real DICOM sample in ../shared/data/io_samples."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest

import medtl.data.dicom as dicom_module
from medtl.data.dicom import WINDOW_CHOICES, WINDOWS, dicom_tags, read_dicom
from medtl.data.readers import read_dicom as readers_read_dicom
from medtl.data.readers import read_image
from medtl.errors import DataReadError

from ..conftest import write_dicom
from .conftest import shared_data

pydicom = pytest.importorskip("pydicom")

RAMP = np.arange(16, dtype=np.uint16).reshape(4, 4) * 100  # 0 .. 1500


def _minmax(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.rint((v - v.min()) * (255.0 / (v.max() - v.min()))).astype(np.uint8)


def _window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.rint(np.clip((values - (centre - width / 2)) * 255.0 / width, 0, 255)
                   ).astype(np.uint8)


def _dicom_linear(x: np.ndarray, centre: float, width: float, y_min: float, y_max: float
                  ) -> np.ndarray:
    """DICOM's LINEAR VOI function, PS3.3 C.11.2.1.2.1, written out from the standard."""
    x = np.asarray(x, dtype=np.float64)
    c, w = centre - 0.5, width - 1.0
    y = ((x - c) / w + 0.5) * (y_max - y_min) + y_min
    return np.where(x <= c - w / 2, y_min, np.where(x > c + w / 2, y_max, y))


def test_window_choices_and_standard_presets():
    assert WINDOW_CHOICES == ("auto", "minmax", "lung", "mediastinum", "abdomen", "brain", "bone")
    assert WINDOWS["lung"] == (-600, 1500) and WINDOWS["mediastinum"] == (50, 350)
    assert WINDOWS["abdomen"] == (40, 400) and WINDOWS["brain"] == (40, 80)
    assert WINDOWS["bone"] == (400, 1800)


# ------------------------------------------------------------------ modality LUT and windows
def test_rescale_slope_and_intercept_then_minmax(tmp_path):
    f = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1024,
                    Modality="CT", WindowCenter=40, WindowWidth=80)
    out = read_dicom(f, window="minmax")  # ignores the file's window
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], _minmax(RAMP * 2.0 - 1024))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_named_lung_window_on_known_hounsfield_units(tmp_path):
    hu = np.array([[-2000, -1350, -1024, -710], [40, 150, 500, 3000]])
    f = write_dicom(tmp_path / "ct.dcm", hu + 1024, RescaleSlope=1, RescaleIntercept=-1024,
                    Modality="CT")
    # Lung (-600, 1500): -1350 HU -> 0, 150 HU -> 255; (hu + 1350) * 255 / 1500 in between.
    expected = [[0, 0, 55, 109], [236, 255, 255, 255]]
    assert read_dicom(f, window="lung")[..., 0].tolist() == expected


def test_named_windows_apply_to_modality_lut_values(tmp_path):
    f = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1024,
                    Modality="CT")
    hu = RAMP * 2.0 - 1024  # -1024 .. 1976
    for name, (centre, width) in WINDOWS.items():
        assert np.array_equal(read_dicom(f, window=name)[..., 0], _window(hu, centre, width))
    brain = read_dicom(f, window="brain")[..., 0]  # (40, 80): 0 HU black, 80 HU white
    assert brain[hu <= 0].max() == 0 and brain[hu >= 80].min() == 255


def test_named_window_on_mr_is_allowed_and_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(dicom_module, "_warned", set())
    f = write_dicom(tmp_path / "mr.dcm", RAMP, Modality="MR")
    with caplog.at_level(logging.WARNING, logger="medtl"):
        out = read_dicom(f, window="bone")
        read_dicom(f, window="bone")  # once per (modality, window), not once per file
    assert np.array_equal(out[..., 0], _window(RAMP.astype(float), *WINDOWS["bone"]))
    warnings = [r for r in caplog.records if "Hounsfield" in r.getMessage()]
    assert len(warnings) == 1 and "MR" in warnings[0].getMessage()


def test_the_files_own_window_is_used_by_auto(tmp_path):
    # Two windows: the first is used. Unsigned 16-bit, so pydicom's output range is 0..65535.
    f = write_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=[700, 100], WindowWidth=[400, 50])
    expected = _minmax(_dicom_linear(RAMP, 700, 400, 0, 65535))
    out = read_dicom(f)
    assert np.array_equal(out[..., 0], expected)
    assert out[..., 0][RAMP <= 500].max() == 0 and out[..., 0][RAMP >= 900].min() == 255
    assert not np.array_equal(out, read_dicom(f, window="minmax"))


def test_window_is_applied_after_the_modality_lut(tmp_path):
    # Centre/width are in rescaled units: 40 / 80 HU on stored values offset by 1024.
    f = write_dicom(tmp_path / "ct.dcm", RAMP // 10 + 980, RescaleSlope=1,
                    RescaleIntercept=-1024, WindowCenter=40, WindowWidth=80)
    hu = (RAMP // 10 + 980).astype(float) - 1024  # -44 .. 106
    y_min, y_max = -1024, 65535 - 1024
    expected = _minmax(_dicom_linear(hu, 40, 80, y_min, y_max))
    assert np.array_equal(read_dicom(f)[..., 0], expected)


def test_voi_lut_sequence_is_preferred_to_the_window(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    pixels = np.arange(16, dtype=np.uint16).reshape(4, 4)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [16, 0, 8])
    item.add_new("LUTData", "US", [v * v for v in range(16)])  # non-linear: 0, 1, 4, ..., 225
    f = write_dicom(tmp_path / "lut.dcm", pixels, VOILUTSequence=Sequence([item]),
                    WindowCenter=8, WindowWidth=4)
    assert np.array_equal(read_dicom(f)[..., 0], _minmax(pixels.astype(float) ** 2))


def test_an_unusable_window_falls_back_to_minmax(tmp_path, caplog):
    f = write_dicom(tmp_path / "bad.dcm", RAMP, WindowCenter=700, WindowWidth=0)
    with caplog.at_level(logging.WARNING, logger="medtl"):
        out = read_dicom(f)
    assert np.array_equal(out[..., 0], _minmax(RAMP))
    assert any("ignoring the file's window" in r.getMessage() for r in caplog.records)


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    f2 = write_dicom(tmp_path / "m2.dcm", RAMP)
    f1 = write_dicom(tmp_path / "m1.dcm", RAMP, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(read_dicom(f1)[..., 0], 255 - _minmax(RAMP))
    assert np.array_equal(read_dicom(f1), 255 - read_dicom(f2))
    assert read_dicom(f1)[0, 0, 0] == 255  # stored 0 is white in MONOCHROME1
    lung = read_dicom(f1, window="lung")[..., 0]
    assert np.array_equal(lung, 255 - _window(RAMP.astype(float), *WINDOWS["lung"]))


# ------------------------------------------------------------------------- frames, colour
def test_multi_frame_selects_one_frame(tmp_path):
    # Frame k is uniform at -1350 + 300 k HU: the lung window gives 51 k.
    frames = np.stack([np.full((4, 4), 300 * k - 1350 + 1024, np.int16) for k in range(5)])
    f = write_dicom(tmp_path / "mf.dcm", frames, RescaleSlope=1, RescaleIntercept=-1024,
                    Modality="CT")
    assert dicom_tags(f)["frames"] == 5
    for k in range(5):
        out = read_dicom(f, frame=k, window="lung")
        assert out.shape == (4, 4, 3) and (out == 51 * k).all()
    assert (read_dicom(f, window="lung") == 102).all()  # default: the middle frame (2)
    for bad in (5, -1):
        with pytest.raises(DataReadError, match="5 frames"):
            read_dicom(f, frame=bad)


def test_frame_of_a_single_frame_file(tmp_path):
    f = write_dicom(tmp_path / "one.dcm", RAMP)
    assert np.array_equal(read_dicom(f, frame=0), read_dicom(f))
    with pytest.raises(DataReadError, match="1 frame"):
        read_dicom(f, frame=1)


def _rgb() -> np.ndarray:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    rgb[1] = [[255, 255, 255], [128, 128, 128], [200, 100, 50]]
    return rgb


def test_colour_dicom_is_rgb_and_never_windowed(tmp_path):
    rgb = _rgb()
    f = write_dicom(tmp_path / "rgb.dcm", rgb)
    assert np.array_equal(read_dicom(f), rgb)
    assert np.array_equal(read_dicom(f, window="lung"), rgb)


def test_colour_planar_configuration_1(tmp_path):
    rgb = _rgb()
    ds = pydicom.dcmread(write_dicom(tmp_path / "rgb.dcm", rgb))
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()  # RRR..GGG..BBB..
    ds.save_as(tmp_path / "planar.dcm")
    assert np.array_equal(read_dicom(tmp_path / "planar.dcm"), rgb)


def test_ybr_full_is_converted_to_rgb(tmp_path):
    rgb = _rgb().astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # YCbCr as stored in DICOM YBR_FULL (PS3.3 C.7.6.3.1.2, the JFIF equations).
    ybr = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                    128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                    128 + 0.5 * r - 0.418688 * g - 0.081312 * b], axis=-1)
    stored = np.clip(np.rint(ybr), 0, 255).astype(np.uint8)
    f = write_dicom(tmp_path / "ybr.dcm", stored, PhotometricInterpretation="YBR_FULL")
    out = read_dicom(f)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).max() <= 2  # rounding in the stored YCbCr only


# ---------------------------------------------------------------------------------- tags
def test_tags_are_read_without_pixels(tmp_path):
    f = write_dicom(tmp_path / "t.dcm", RAMP, Modality="CT", BodyPartExamined="CHEST",
                    PatientID="12345", PatientName="Doe^John", StudyInstanceUID="1.2.3",
                    SeriesInstanceUID="1.2.3.4")
    assert dicom_tags(f) == {"modality": "CT", "body_part": "CHEST", "patient_id": "12345",
                             "patient_name": "Doe^John", "study_uid": "1.2.3",
                             "series_uid": "1.2.3.4", "photometric": "MONOCHROME2",
                             "frames": 1, "burned_in": False}


def test_missing_tags_are_none(tmp_path):
    tags = dicom_tags(write_dicom(tmp_path / "bare.dcm", RAMP, PatientID=""))
    assert tags["modality"] is None and tags["body_part"] is None
    assert tags["patient_id"] is None and tags["patient_name"] is None
    assert tags["series_uid"] is None and tags["frames"] == 1
    with pytest.raises(DataReadError, match="not a readable DICOM"):
        (tmp_path / "x.dcm").write_bytes(b"nope")
        dicom_tags(tmp_path / "x.dcm")


# ------------------------------------------------------------------------ bad files, limits
def test_no_pixel_data_not_dicom_truncated_and_missing(tmp_path):
    f = write_dicom(tmp_path / "a.dcm", RAMP)
    ds = pydicom.dcmread(f)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(DataReadError, match="no pixel data"):
        read_dicom(tmp_path / "nopix.dcm")
    (tmp_path / "text.dcm").write_text("not a dicom file at all")
    with pytest.raises(DataReadError, match="not a readable DICOM") as info:
        read_dicom(tmp_path / "text.dcm")
    assert info.value.path == str(tmp_path / "text.dcm")
    data = f.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-10])  # pixel data cut short
    with pytest.raises(DataReadError, match="cut.dcm"):
        read_dicom(tmp_path / "cut.dcm")
    with pytest.raises(DataReadError, match="not found"):
        read_dicom(tmp_path / "missing.dcm")
    with pytest.raises(DataReadError, match="unknown window 'soft'"):
        read_dicom(f, window="soft")


def test_too_large_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    f = write_dicom(tmp_path / "big.dcm", RAMP)

    def decode(*args, **kwargs):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(dicom_module, "MAX_BYTES", 16)
    monkeypatch.setattr(dicom_module, "decode_frame", decode)
    with pytest.raises(DataReadError, match="too large"):
        read_dicom(f)


def test_frames_over_max_side_are_block_averaged(tmp_path, monkeypatch):
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    f = write_dicom(tmp_path / "s.dcm", pixels)
    monkeypatch.setattr(dicom_module, "MAX_SIDE", 4)
    out = read_dicom(f, window="minmax")
    means = pixels.reshape(4, 2, 4, 2).mean(axis=(1, 3))  # 4.5, 6.5, ... 58.5
    assert out.shape == (4, 4, 3)
    assert np.array_equal(out[..., 0], _minmax(np.rint(means)))


def test_a_real_8001_pixel_wide_frame_is_halved(tmp_path):
    pixels = np.zeros((2, 8001), dtype=np.uint16)
    pixels[:, 1:3000:2] = 1000  # alternating columns: their 2x2 blocks average to 500
    pixels[:, 6000:] = 1000
    out = read_dicom(write_dicom(tmp_path / "wide.dcm", pixels), window="minmax")[0, :, 0]
    assert out.shape == (4000,)  # factor 2; the odd last column is dropped
    # A block mean (not a stride, which would keep only the zeros) gives 500 -> 128.
    assert (out[:1500] == 128).all() and (out[1500:3000] == 0).all() and (out[3000:] == 255).all()


def _jpeg_dicom(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=100)
    f = write_dicom(path, pixels.astype(np.uint16))
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def _no_plugins(monkeypatch, uid: str) -> None:
    """Make pydicom's decoder for ``uid`` look as it does with no plugin installed."""
    from pydicom.pixels import get_decoder

    monkeypatch.setattr(get_decoder(uid), "_available", {})


def test_jpeg_baseline_decodes_or_names_what_to_install(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit

    pixels = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # a smooth ramp
    f = _jpeg_dicom(tmp_path / "jpeg.dcm", pixels)
    if get_decoder(JPEGBaseline8Bit).is_available:  # Pillow is a plugin for JPEG baseline
        out = read_dicom(f, window="minmax")
        assert out.shape == (16, 16, 3)
        assert np.abs(out[..., 0].astype(int) - _minmax(pixels).astype(int)).max() <= 8
    _no_plugins(monkeypatch, JPEGBaseline8Bit)
    with pytest.raises(DataReadError) as info:
        read_dicom(f)
    assert "JPEG Baseline" in info.value.reason
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in info.value.reason
    assert "python-gdcm" in info.value.reason


def test_compressed_jpeg2000_sample_decodes_or_names_what_to_install(monkeypatch):
    from pydicom.pixels import get_decoder

    path = shared_data("io_samples/JPEG2000.dcm")
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    if get_decoder(syntax).is_available:  # Pillow (with OpenJPEG) or pylibjpeg is installed
        expected = _minmax(ds.pixel_array.astype(float))
        out = read_dicom(path)
        assert out.shape == (1024, 256, 3) and out.std() > 0
        assert np.array_equal(out[..., 0], expected)
    _no_plugins(monkeypatch, syntax)
    with pytest.raises(DataReadError) as info:
        read_dicom(path)
    assert "JPEG 2000" in info.value.reason
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in info.value.reason
    with pytest.raises(DataReadError, match="JPEG2000.dcm"):
        read_image(path)


def test_readers_read_dicom_delegates(tmp_path):
    f = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleIntercept=-1024, RescaleSlope=1)
    assert np.array_equal(readers_read_dicom(f, window="lung"), read_dicom(f, window="lung"))
    assert np.array_equal(read_image(f), read_dicom(f))


# ----------------------------------------------------------------------------- real samples
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm",
                                  "JPEG2000.dcm"])
def test_real_dicom_samples_match_a_hand_computation(name, monkeypatch):
    path = shared_data(f"io_samples/{name}")
    ds = pydicom.dcmread(path)
    try:
        stored = ds.pixel_array
    except (RuntimeError, NotImplementedError):
        pytest.skip(f"no decoder for {ds.file_meta.TransferSyntaxUID.name} installed here")
    values = stored.astype(np.float64)
    values = values * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    out = read_dicom(path, window="minmax")
    assert out.shape == (*values.shape, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], _minmax(values))
    tags = dicom_tags(path)
    assert tags["modality"] == ds.Modality and tags["frames"] == 1
    assert tags["photometric"] == "MONOCHROME2"
    if name == "CT_small.dcm":
        assert ds.Modality == "CT"
        assert -1100 < values.min() < 0 < values.max() < 3100  # plausible Hounsfield units
        lung = read_dicom(path, window="lung")[..., 0]
        assert np.array_equal(lung, _window(values, *WINDOWS["lung"]))


def test_real_mr_sample_uses_its_own_window():
    path = shared_data("io_samples/MR_small.dcm")
    ds = pydicom.dcmread(path)
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)  # 600, 1600
    signed = 2 ** (ds.BitsStored - 1)
    expected = _minmax(_dicom_linear(ds.pixel_array, centre, width, -signed, signed - 1))
    assert np.array_equal(read_dicom(path)[..., 0], expected)


def test_real_overlay_sample_uses_the_first_of_two_windows():
    path = shared_data("io_samples/examples_overlay.dcm")
    ds = pydicom.dcmread(path)
    assert len(ds.WindowCenter) == 2
    centre, width = float(ds.WindowCenter[0]), float(ds.WindowWidth[0])
    expected = _minmax(_dicom_linear(ds.pixel_array, centre, width, 0, 2**ds.BitsStored - 1))
    out = read_dicom(path)
    assert out.shape == (300, 484, 3)
    assert np.array_equal(out[..., 0], expected)
