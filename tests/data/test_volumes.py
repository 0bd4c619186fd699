"""Volumes: NIfTI and DICOM series read into one (D, H, W) layout, and the slices, 2.5-D stacks
and MIPs a 2-D backbone is shown, with one intensity mapping per volume."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import medtl.data.dicom as dicom_module
from medtl.data.volumes import (
    VOLUME_EXTENSIONS,
    is_volume_path,
    read_volume,
    slice_indices,
    volume_slices,
)
from medtl.errors import DataReadError, MedtlError

from ..conftest import write_dicom
from .conftest import shared_data

nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

SERIES_UID = "1.2.826.0.1.3680043.8.498.1"


def _ras_volume(shape=(5, 4, 3)) -> np.ndarray:
    """data[x, y, z] = 100 z + 10 y + x: every voxel says where it is."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (100 * z + 10 * y + x).astype(np.float32)


def _save_nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _series(folder: Path, slices: list[np.ndarray], z: list[float], **tags) -> Path:
    """Axial slices written in the given order, each at ImagePositionPatient (0, 0, z)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (pixels, zi) in enumerate(zip(slices, z, strict=True)):
        write_dicom(folder / f"img{i:03d}.dcm", pixels, ImagePositionPatient=[0.0, 0.0, zi],
                    ImageOrientationPatient=[1, 0, 0, 0, 1, 0], SeriesInstanceUID=SERIES_UID,
                    **tags)
    return folder


# ------------------------------------------------------------------------------------ NIfTI
def test_nifti_layout_is_depth_then_anterior_rows_then_right_to_left_columns(tmp_path):
    data = _ras_volume()
    volume = read_volume(_save_nifti(tmp_path / "v.nii", data))
    assert volume.shape == (3, 4, 5) and volume.dtype == np.float32
    # volume[z, row, col] = data[X-1-col, Y-1-row, z]: row 0 is the most anterior (largest y),
    # column 0 the patient's right (largest x), z inferior to superior.
    assert volume[0, 0, 0] == data[4, 3, 0] == 34
    assert volume[2, 3, 4] == data[0, 0, 2] == 200
    assert np.array_equal(volume, np.transpose(data[::-1, ::-1, :], (2, 1, 0)))


def test_nifti_is_reoriented_to_closest_canonical(tmp_path):
    data = _ras_volume()
    ras = read_volume(_save_nifti(tmp_path / "ras.nii", data))
    # The same anatomy stored left-to-right flipped and with axes x, z, y swapped.
    las = np.ascontiguousarray(data[::-1])
    las_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    las_affine[0, 3] = 4.0
    assert np.array_equal(read_volume(_save_nifti(tmp_path / "las.nii.gz", las, las_affine)),
                          ras)
    swapped = np.ascontiguousarray(np.transpose(data, (0, 2, 1)))
    perm = np.eye(4)[[0, 2, 1, 3]]  # voxel (i, j, k) -> (x=i, y=k, z=j)
    assert np.array_equal(read_volume(_save_nifti(tmp_path / "xzy.nii", swapped, perm)), ras)


def test_4d_nifti_gives_its_first_volume(tmp_path):
    data = _ras_volume()
    four = np.stack([data, data + 1000], axis=-1)
    volume = read_volume(_save_nifti(tmp_path / "t.nii.gz", four))
    assert np.array_equal(volume, read_volume(_save_nifti(tmp_path / "d.nii", data)))


def test_nifti_too_large_is_refused_from_the_header(tmp_path, monkeypatch):
    _save_nifti(tmp_path / "v.nii", _ras_volume())
    monkeypatch.setattr(dicom_module, "MAX_BYTES", 16)
    with pytest.raises(DataReadError, match="too large"):
        read_volume(tmp_path / "v.nii")


def test_a_header_claiming_32_gib_is_refused_without_reading_data(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((2048, 2048, 2048))
    header["vox_offset"] = 352
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4)  # no voxel data at all
    with pytest.raises(DataReadError, match="too large"):
        read_volume(path)


def test_bad_nifti_and_missing_files(tmp_path):
    (tmp_path / "bad.nii").write_bytes(b"\0" * 400)
    with pytest.raises(DataReadError, match="bad.nii"):
        read_volume(tmp_path / "bad.nii")
    with pytest.raises(DataReadError, match="not found"):
        read_volume(tmp_path / "missing.nii.gz")
    _save_nifti(tmp_path / "flat.nii", np.zeros((4, 4), np.float32))
    with pytest.raises(DataReadError, match="3-D"):
        read_volume(tmp_path / "flat.nii")
    with pytest.raises(DataReadError, match="unknown window"):
        read_volume(tmp_path / "flat.nii", window="soft")


# ---------------------------------------------------------------------------- DICOM series
def test_dicom_series_is_sorted_by_position_not_by_name(tmp_path):
    order = [3, 0, 4, 1, 2]  # written out of order; file names follow the writing order
    slices = [np.full((4, 4), z * 10, np.uint16) for z in order]
    folder = _series(tmp_path / "s", slices, [z * 2.5 for z in order], RescaleSlope=1,
                     RescaleIntercept=-1024, InstanceNumber=1)
    volume = read_volume(folder)
    assert volume.shape == (5, 4, 4) and volume.dtype == np.float32
    # Sorted by position, and the modality LUT applied (stored - 1024).
    assert [float(v[0, 0]) for v in volume] == [-1024, -1014, -1004, -994, -984]


def test_dicom_series_position_is_projected_on_the_slice_normal(tmp_path):
    # Sagittal slices: rows along y, columns along -z, so the normal is -x and a larger x
    # comes first.
    folder = tmp_path / "sag"
    folder.mkdir()
    for i, x in enumerate([5.0, -5.0, 0.0]):
        write_dicom(folder / f"{i}.dcm", np.full((2, 2), int(x) + 10, np.uint16),
                    ImagePositionPatient=[x, 0.0, 0.0],
                    ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    assert [float(v[0, 0]) for v in read_volume(folder)] == [15, 10, 5]


def test_dicom_series_falls_back_to_instance_number(tmp_path):
    folder = tmp_path / "noipp"
    folder.mkdir()
    for i, n in enumerate([2, 3, 1]):
        write_dicom(folder / f"{i}.dcm", np.full((2, 2), n, np.uint16), InstanceNumber=n)
    assert [float(v[0, 0]) for v in read_volume(folder)] == [1, 2, 3]


def test_nifti_and_dicom_series_of_one_scan_read_the_same(tmp_path):
    rng = np.random.default_rng(0)
    slices = [rng.integers(0, 1000, (4, 6), dtype=np.uint16) for _ in range(3)]
    from_dicom = read_volume(_series(tmp_path / "s", slices, [0.0, 1.0, 2.0]))
    # The NIfTI a converter writes for it: voxel (i, j, k) = slice k at row j, column i;
    # DICOM's LPS axes become RAS by negating x and y.
    data = np.stack([s.T for s in slices], axis=-1).astype(np.float32)
    from_nifti = read_volume(_save_nifti(tmp_path / "s.nii", data, np.diag([-1.0, -1, 1, 1])))
    assert np.array_equal(from_dicom, from_nifti)


def test_dicom_series_errors(tmp_path):
    different = tmp_path / "shapes"
    _series(different, [np.zeros((4, 4), np.uint16), np.zeros((4, 5), np.uint16)], [0, 1])
    with pytest.raises(DataReadError, match="different shapes"):
        read_volume(different)
    two = tmp_path / "two"
    _series(two, [np.zeros((4, 4), np.uint16)], [0])
    write_dicom(two / "other.dcm", np.zeros((4, 4), np.uint16), SeriesInstanceUID="9.9")
    with pytest.raises(DataReadError, match="2 series"):
        read_volume(two)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataReadError, match="no .dcm"):
        read_volume(empty)
    broken = tmp_path / "broken"
    _series(broken, [np.zeros((4, 4), np.uint16)] * 2, [0, 1])
    (broken / "img001.dcm").write_bytes(b"garbage")
    with pytest.raises(DataReadError, match="img001.dcm"):
        read_volume(broken)
    colour = tmp_path / "colour"
    _series(colour, [np.zeros((4, 4, 3), np.uint8)], [0])
    with pytest.raises(DataReadError, match="greyscale"):
        read_volume(colour)


def test_dicom_series_too_large_is_refused_before_decoding(tmp_path, monkeypatch):
    folder = _series(tmp_path / "s", [np.zeros((4, 4), np.uint16)] * 3, [0, 1, 2])

    def decode(*args, **kwargs):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(dicom_module, "MAX_BYTES", 100)  # 3 x 4 x 4 float32 = 192 bytes
    monkeypatch.setattr(dicom_module, "decode_frame", decode)
    with pytest.raises(DataReadError, match="too large"):
        read_volume(folder)


def test_is_volume_path(tmp_path):
    assert VOLUME_EXTENSIONS == (".nii", ".nii.gz")
    nii = _save_nifti(tmp_path / "a.nii", _ras_volume())
    gz = _save_nifti(tmp_path / "B.NII.GZ", _ras_volume())
    assert is_volume_path(nii) and is_volume_path(gz)
    (tmp_path / "x.png").write_bytes(b"")
    assert not is_volume_path(tmp_path / "x.png")
    assert not is_volume_path(tmp_path / "missing.nii")
    series = _series(tmp_path / "s", [np.zeros((2, 2), np.uint16)] * 2, [0, 1])
    (series / ".DS_Store").write_bytes(b"")
    assert is_volume_path(series)
    (series / "notes.txt").write_text("x")
    assert not is_volume_path(series)  # not only DICOM slices
    (series / "notes.txt").unlink()
    write_dicom(series / "z.dcm", np.zeros((2, 2), np.uint16), SeriesInstanceUID="9.9")
    assert not is_volume_path(series)  # two series
    (tmp_path / "empty").mkdir()
    assert not is_volume_path(tmp_path / "empty")


# ---------------------------------------------------------------------------- volume_slices
def _labelled(depth: int = 7) -> np.ndarray:
    """Slice k is uniform at -1350 + 100 k HU, which the lung window maps to exactly 17 k."""
    return np.stack([np.full((3, 4), -1350.0 + 100 * k) for k in range(depth)])


def _which(images: list[np.ndarray]) -> list[int]:
    return [int(img[0, 0, 1]) // 17 for img in images]


@pytest.mark.parametrize(("spec", "depth", "expected"), [
    ("middle", 7, [3]), ("middle", 6, [3]), ("middle", 1, [0]),
    ("all", 7, [0, 1, 2, 3, 4, 5, 6]),
    ("sample:1", 7, [0]), ("sample:3", 7, [0, 3, 6]), ("sample:4", 7, [0, 2, 4, 6]),
    ("sample:10", 7, [0, 1, 2, 3, 4, 5, 6]), ("sample:2", 1, [0]),
])
def test_slice_choices(spec, depth, expected):
    assert slice_indices(depth, spec) == expected
    images = volume_slices(_labelled(depth), slices=spec, window="lung")
    assert _which(images) == expected
    assert all(i.shape == (3, 4, 3) and i.dtype == np.uint8 for i in images)
    for img in images:  # 2d: the slice in all three channels
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0],
                                                                           img[..., 2])


def test_slice_indices_agree_with_the_dataset_loader():
    from medtl.data.sources import slice_indices as loader_indices

    for depth in (1, 2, 5, 16, 33):
        for spec in ("middle", "all", "sample:1", "sample:3", "sample:8", "sample:40"):
            assert slice_indices(depth, spec) == loader_indices(depth, spec)


@pytest.mark.parametrize("bad", ["sample:0", "sample:x", "sample:", "first", "Middle", "2"])
def test_bad_slices_spec_lists_the_choices(bad):
    with pytest.raises(MedtlError, match="middle, all, sample:N"):
        volume_slices(_labelled(), slices=bad)


def test_bad_mode_window_and_shape():
    with pytest.raises(MedtlError, match="2d, 2.5d, mip"):
        volume_slices(_labelled(), mode="3d")
    with pytest.raises(MedtlError, match="auto, minmax, lung"):
        volume_slices(_labelled(), window="soft")
    with pytest.raises(MedtlError, match="3-D"):
        volume_slices(np.zeros((4, 4)))


def test_2_5d_channels_are_the_neighbouring_slices_clamped_at_the_ends():
    images = volume_slices(_labelled(), slices="all", mode="2.5d", window="lung")
    assert len(images) == 7
    channels = [[int(img[0, 0, c]) // 17 for c in range(3)] for img in images]
    assert channels[0] == [0, 0, 1]
    assert channels[3] == [2, 3, 4]
    assert channels[6] == [5, 6, 6]


def test_mip_is_the_maximum_and_always_one_image():
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1350, 150, (6, 5, 4))
    expected = np.rint(np.clip((volume.max(axis=0) + 1350) * 255 / 1500, 0, 255))
    for spec in ("middle", "all", "sample:3"):
        images = volume_slices(volume, slices=spec, mode="mip", window="lung")
        assert len(images) == 1
        assert np.array_equal(images[0][..., 0], expected)
        assert np.array_equal(images[0][..., 0], images[0][..., 2])


def test_one_intensity_mapping_for_the_whole_volume():
    rng = np.random.default_rng(0)
    dark = rng.uniform(0, 10, (8, 8))
    bright = rng.uniform(1000, 1010, (8, 8))
    volume = np.stack([dark, bright, (dark + bright) / 2])
    low, high = np.percentile(volume.astype(np.float32), [0.5, 99.5])
    images = volume_slices(volume, slices="all")
    for img, s in zip(images, volume, strict=True):
        expected = np.rint(np.clip((s - low) * 255 / (high - low), 0, 255))
        assert np.abs(img[..., 0].astype(int) - expected).max() <= 1
    # Per-slice min-max would stretch each slice to 0..255; here the dark slice stays dark.
    assert images[0].max() <= 3 and images[1].min() >= 250
    assert 120 <= images[2].mean() <= 135


def test_robust_range_ignores_outliers_and_non_finite_values():
    volume = np.linspace(0, 100, 1000).reshape(10, 10, 10)
    volume[0, 0, 0] = 1e9  # one hot voxel (metal) must not squash everything else to black
    volume[0, 0, 1] = np.nan
    image = volume_slices(volume, slices="all")[5]
    assert image[..., 0].max() > 100 and image[..., 0].min() < 150
    assert volume_slices(volume, slices="all")[0][0, 0, 0] == 255


def test_named_window_on_another_modality_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="medtl"):
        volume_slices(_labelled(), window="lung", modality="MR")
    assert any("Hounsfield" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medtl"):
        volume_slices(_labelled(), window="lung", modality="CT")
    assert not caplog.records


# ---------------------------------------------------------------------------- real samples
@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_real_nifti_samples(name):
    path = shared_data(f"io_samples/{name}")
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    volume = read_volume(path)
    assert volume.dtype == np.float32
    assert volume.shape == (data.shape[2], data.shape[1], data.shape[0])
    assert np.array_equal(volume, np.transpose(data[::-1, ::-1, :], (2, 1, 0)))
    assert volume.std() > 0
    images = volume_slices(volume, slices="sample:3", mode="2.5d")
    assert len(images) == 3
    assert all(i.shape == (data.shape[1], data.shape[0], 3) and i.dtype == np.uint8
               for i in images)
    assert is_volume_path(path)
