from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.data.readers import probe_image, read_image, to_rgb_uint8
from medtl.errors import DataReadError


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = noise((6, 9))
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgb_is_kept(tmp_path: Path) -> None:
    rgb = noise((5, 7, 3))
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "c.bmp"), rgb)


def test_rgba_is_composited_onto_black(tmp_path: Path) -> None:
    rgba = np.full((4, 4, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # fully transparent pixel with a bright colour underneath
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[1, 1].tolist() == [200, 200, 200]


def test_gray_with_alpha(tmp_path: Path) -> None:
    Image.new("LA", (3, 2), (90, 255)).save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out.shape == (2, 3, 3) and (out == 90).all()


def test_palette_image_gives_palette_colours(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    img.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (4, 4, 3)
    assert out[2, 2].tolist() == [10, 20, 30]


def test_sixteen_bit_grayscale_is_min_max_scaled(tmp_path: Path) -> None:
    deep = np.array([[1000, 2000], [3000, 4095]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255
    assert 0 < out[0, 1, 0] < out[1, 0, 0] < 255  # order kept, not clipped to white


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(noise((10, 20, 3))).save(tmp_path / "o.jpg", exif=exif)
    assert read_image(tmp_path / "o.jpg").shape == (20, 10, 3)


def test_case_insensitive_extension_and_tiff(tmp_path: Path) -> None:
    Image.fromarray(noise((3, 3))).save(tmp_path / "x.TIF", format="TIFF")
    assert read_image(tmp_path / "x.TIF").shape == (3, 3, 3)


def test_corrupt_bytes_raise_data_read_error(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(DataReadError, match="cannot identify image file") as info:
        read_image(bad)
    assert info.value.path == str(bad) and "corrupt.png" in str(info.value)
    assert probe_image(bad) is not None


def jpeg_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise((size, size, 3))).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_truncated_jpeg_raises_data_read_error_naming_the_file(tmp_path: Path) -> None:
    data = jpeg_bytes()
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(data[: len(data) * 6 // 10])
    assert probe_image(cut) is None  # the header is intact: only a full decode can tell
    with pytest.raises(DataReadError, match="truncated") as info:
        read_image(cut)
    assert "cut.jpeg" in str(info.value) and "\n" not in str(info.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataReadError, match="empty"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(DataReadError, match="not found"):
        read_image(tmp_path / "missing.png")
    assert probe_image(tmp_path / "empty.png") == "file is empty"
    assert probe_image(tmp_path / "missing.png") == "file not found"


def test_to_rgb_uint8_shapes() -> None:
    assert to_rgb_uint8(noise((4, 5, 1))).shape == (4, 5, 3)
    assert to_rgb_uint8(noise((4, 5, 4))).shape == (4, 5, 3)
    flat = to_rgb_uint8(np.full((2, 2), 7.5))
    assert flat.dtype == np.uint8 and (flat == 0).all()
    with pytest.raises(ValueError):
        to_rgb_uint8(np.zeros((2, 2, 2)))


@pytest.mark.parametrize(
    ("name", "shape"), [("CT_small.dcm", (128, 128, 3)), ("MR_small.dcm", (64, 64, 3))]
)
def test_dicom_is_read_and_scaled(name: str, shape: tuple[int, int, int], shared) -> None:
    out = read_image(shared(f"io_samples/{name}"))
    assert out.shape == shape and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_dicom_monochrome1_is_inverted(tmp_path: Path, shared) -> None:
    pydicom = pytest.importorskip("pydicom")
    source = shared("io_samples/CT_small.dcm")
    normal = read_image(source)
    ds = pydicom.dcmread(source)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    inverted = read_image(tmp_path / "inverted.dcm")
    assert np.abs(inverted.astype(int) + normal.astype(int) - 255).max() <= 1


def test_non_dicom_bytes_in_dcm_file(tmp_path: Path) -> None:
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"\x00" * 64)
    assert probe_image(bad) is None  # load time only checks existence and size for DICOM
    with pytest.raises(DataReadError, match="DICOM") as info:
        read_image(bad)
    assert "scan.dcm" in str(info.value)
