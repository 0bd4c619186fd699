"""DICOM pixels against hand-computed values: modality LUT, windows, MONOCHROME1, frames, tags;
and every real sample in ../shared/data/io_samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medtl.data.dicom import WINDOWS, dicom_tags, read_dicom
from medtl.data.volumes import read_volume, volume_slices
from medtl.errors import DataReadError

from ..conftest import write_dicom
from .conftest import shared_data

pydicom = pytest.importorskip("pydicom")

RAMP = np.arange(16, dtype=np.uint16).reshape(4, 4) * 100  # 0 .. 1500


def _minmax(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    return np.rint((v - v.min()) * (255.0 / (v.max() - v.min()))).astype(np.uint8)


def _window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.rint(np.clip((values - (centre - width / 2)) * 255.0 / width, 0, 255)
                   ).astype(np.uint8)


def test_rescale_slope_and_intercept_then_minmax(tmp_path):
    f = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1024,
                    Modality="CT")
    out = read_dicom(f, window="minmax")
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], _minmax(RAMP * 2.0 - 1024))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_named_window_applies_to_hounsfield_units(tmp_path):
    f = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1024,
                    Modality="CT")
    hu = RAMP * 2.0 - 1024  # -1024 .. 1976
    for name in ("lung", "bone", "brain"):
        centre, width = WINDOWS[name]
        assert np.array_equal(read_dicom(f, window=name)[..., 0], _window(hu, centre, width))
    # Brain (40, 80): everything below 0 HU is black, above 80 HU white.
    brain = read_dicom(f, window="brain")[..., 0]
    assert brain[hu <= 0].max() == 0 and brain[hu >= 80].min() == 255


def test_the_files_own_window_is_used_by_auto(tmp_path):
    f = write_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=700, WindowWidth=400)
    out = read_dicom(f)[..., 0]
    # DICOM's linear VOI function (PS3.3 C.11.2.1.2): below c - 0.5 - (w-1)/2 is the minimum,
    # above c - 0.5 + (w-1)/2 the maximum.
    assert out[RAMP <= 500].max() == 0
    assert out[RAMP >= 900].min() == 255
    middle = out[(RAMP > 500) & (RAMP < 900)]
    assert middle.min() > 0 and middle.max() < 255
    assert not np.array_equal(out, read_dicom(f, window="minmax")[..., 0])


def test_monochrome1_is_inverted(tmp_path):
    f2 = write_dicom(tmp_path / "m2.dcm", RAMP)
    f1 = write_dicom(tmp_path / "m1.dcm", RAMP, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(read_dicom(f1), 255 - read_dicom(f2))
    assert read_dicom(f1)[0, 0, 0] == 255  # stored 0 is white in MONOCHROME1


def test_multi_frame_selects_a_frame(tmp_path):
    frames = np.stack([np.full((4, 4), 10 * (k + 1), dtype=np.uint16) for k in range(5)])
    frames[:, 0, 0] = 0  # so min-max has contrast within each frame
    f = write_dicom(tmp_path / "mf.dcm", frames)
    assert dicom_tags(f)["frames"] == 5
    for k in range(5):
        out = read_dicom(f, frame=k, window="minmax")[..., 0]
        assert out[0, 0] == 0 and out[1, 1] == 255
    middle = read_dicom(f)  # default: the middle frame
    assert np.array_equal(middle, read_dicom(f, frame=2))
    with pytest.raises(DataReadError, match="frame 5"):
        read_dicom(f, frame=5)


def test_colour_dicom_is_rgb(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 50
    out = read_dicom(write_dicom(tmp_path / "rgb.dcm", rgb))
    assert np.array_equal(out, rgb)


def test_tags_are_read_without_pixels(tmp_path):
    f = write_dicom(tmp_path / "t.dcm", RAMP, Modality="CT", BodyPartExamined="CHEST",
                    PatientID="12345", PatientName="Doe^John")
    tags = dicom_tags(f)
    assert tags["modality"] == "CT" and tags["body_part"] == "CHEST"
    assert tags["patient_id"] == "12345" and tags["patient_name"] == "Doe^John"
    assert tags["frames"] == 1


def test_no_pixel_data_and_not_dicom_are_read_errors(tmp_path):
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", RAMP))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(DataReadError, match="no pixel data"):
        read_dicom(tmp_path / "nopix.dcm")
    (tmp_path / "text.dcm").write_text("not a dicom file at all")
    with pytest.raises(DataReadError, match="text.dcm"):
        read_dicom(tmp_path / "text.dcm")


def test_compressed_without_a_decoder_names_what_to_install(monkeypatch):
    path = shared_data("io_samples/JPEG2000.dcm")
    try:
        image = read_dicom(path)
    except DataReadError as exc:
        assert "pip install pylibjpeg pylibjpeg-openjpeg" in exc.reason
        assert "JPEG 2000" in exc.reason
    else:  # a decoder is installed here: the image must be real
        assert image.ndim == 3 and image.std() > 0


# ---------------------------------------------------------------------------- real samples
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm"])
def test_real_dicom_samples_match_a_hand_computation(name):
    path = shared_data(f"io_samples/{name}")
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        values = values[len(values) // 2]
    values = values * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    out = read_dicom(path, window="minmax")
    assert out.shape == (*values.shape, 3)
    expected = _minmax(values)
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        expected = 255 - expected
    assert np.array_equal(out[..., 0], expected)
    if name == "CT_small.dcm":
        assert ds.Modality == "CT"
        assert values.min() > -1100 and values.max() < 3100  # plausible Hounsfield units


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_real_nifti_samples_read_as_volumes(name):
    nib = pytest.importorskip("nibabel")
    path = shared_data(f"io_samples/{name}")
    volume = read_volume(path)
    img = nib.as_closest_canonical(nib.load(str(path)))
    shape = img.shape[:3]
    assert volume.shape == (shape[2], shape[0], shape[1]) and volume.dtype == np.float32
    first = np.asarray(img.dataobj)
    if first.ndim == 4:
        first = first[..., 0]
    assert np.allclose(volume[shape[2] // 2], first[:, :, shape[2] // 2])
    images = volume_slices(volume, slices="sample:3", mode="2.5d")
    assert len(images) == 3 and all(i.shape == (shape[0], shape[1], 3) for i in images)


def test_dicom_series_is_sorted_by_position(tmp_path: Path):
    series = tmp_path / "series"
    series.mkdir()
    order = [3, 0, 4, 1, 2]  # written out of order, named so that names mislead too
    for name_index, z in enumerate(order):
        write_dicom(series / f"slice{name_index}.dcm", np.full((4, 4), z * 10, np.uint16),
                    ImagePositionPatient=[0, 0, float(z) * 2.5],
                    ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    volume = read_volume(series)
    assert volume.shape == (5, 4, 4)
    assert [float(v[0, 0]) for v in volume] == [0, 10, 20, 30, 40]


def test_oversized_inputs_are_refused_or_reduced(tmp_path, monkeypatch):
    import nibabel as nib
    from PIL import Image

    import medtl.data.dicom as dicom_module
    import medtl.data.volumes as volumes_module
    from medtl.data.readers import read_image

    monkeypatch.setattr(dicom_module, "MAX_BYTES", 16)
    with pytest.raises(DataReadError, match="too large"):
        read_dicom(write_dicom(tmp_path / "big.dcm", RAMP))
    monkeypatch.setattr(volumes_module, "MAX_BYTES", 16)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v.nii")
    with pytest.raises(DataReadError, match="too large"):
        read_volume(tmp_path / "v.nii")
    # 9,000 px wide: reduced while decoding to at most 8,000 px a side.
    Image.new("L", (9000, 40), 128).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png")
    assert max(image.shape[:2]) <= 8000 and image.shape[2] == 3
