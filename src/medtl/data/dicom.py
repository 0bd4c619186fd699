"""DICOM to pixels as a radiologist would see them, and the few tags medtl needs.

Order of operations (DICOM PS3.3 C.11): stored values -> modality LUT (RescaleSlope/Intercept,
giving Hounsfield units for CT) -> VOI LUT or window (what the acquiring site chose to show,
or a named CT window) -> MONOCHROME1 inversion -> 8 bits. Every failure is a
:class:`~medtl.errors.DataReadError` naming the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import DataReadError

log = logging.getLogger("medtl")

# (centre, width) in Hounsfield units: the usual radiology presets (e.g. Radiopaedia,
# "Windowing (CT)").
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}
WINDOW_CHOICES: tuple[str, ...] = ("auto", "minmax", *WINDOWS)

MAX_BYTES = 1 << 30
"""Pixel data larger than this (1 GiB) is refused before decoding: memory stays bounded."""
MAX_SIDE = 8000
"""Frames larger than this on a side are block-averaged down to at most this size."""

# Transfer syntaxes pydicom cannot decode alone, and what to install for them.
_DECODERS = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS near-lossless
}


def window_to_uint8(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear window: ``centre - width/2`` maps to 0 and ``centre + width/2`` to 255, clipped."""
    low = centre - width / 2.0
    scaled = (np.asarray(values, dtype=np.float64) - low) * (255.0 / max(width, 1e-6))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def read_dicom(path: str | os.PathLike[str], *, window: str = "auto",
               frame: int | None = None) -> np.ndarray:
    """Decode a DICOM file to ``(H, W, 3)`` uint8.

    ``window``: ``auto`` (the file's VOI LUT or first WindowCenter/Width, else min-max),
    ``minmax``, or a name of :data:`WINDOWS` applied to modality-LUT values. ``frame``: which
    frame of a multi-frame file (default the middle one).
    """
    from medtl.data.readers import to_rgb_uint8

    p = Path(path)
    if window not in WINDOW_CHOICES:
        raise DataReadError(str(p), f"unknown window '{window}' ({', '.join(WINDOW_CHOICES)})")
    ds = _dcmread(p)
    try:
        _check_size(p, ds)
        pixels = _pixels(p, ds)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if frames > 1:
            index = frames // 2 if frame is None else frame
            if not 0 <= index < frames:
                raise DataReadError(str(p), f"frame {index} requested; the file has {frames}")
            pixels = pixels[index]
        elif frame not in (None, 0):
            raise DataReadError(str(p), f"frame {frame} requested; the file has 1")
        pixels = _shrink(pixels)
        if samples != 1:
            # pydicom 3 returns colour as RGB (YBR converted); no windowing for colour.
            return to_rgb_uint8(pixels)
        return _grey(ds, pixels, window, p)
    except DataReadError:
        raise
    except Exception as exc:  # pydicom's error types vary with the damage
        raise DataReadError(str(p), f"cannot decode DICOM ({type(exc).__name__}: {exc})") from exc


def _grey(ds: Any, pixels: np.ndarray, window: str, p: Path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from medtl.data.readers import to_rgb_uint8

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if window in WINDOWS:
        modality = str(ds.get("Modality", "") or "")
        if modality and modality != "CT":
            log.warning("%s: a CT window ('%s') on modality %s", p, window, modality)
        out = window_to_uint8(values, *WINDOWS[window])
    elif window == "auto" and ("VOILUTSequence" in ds or "WindowCenter" in ds):
        out = to_rgb_uint8(apply_voi_lut(values, ds, index=0).astype(np.float64))[..., 0]
    else:
        out = to_rgb_uint8(values)[..., 0]
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        # MONOCHROME1: low values are white. Flip so that dense is bright, as in MONOCHROME2.
        out = 255 - out
    return np.repeat(out[:, :, None], 3, axis=2)


def _dcmread(p: Path, **kwargs: Any) -> Any:
    import pydicom

    if not p.is_file():
        raise DataReadError(str(p), "file not found")
    try:
        return pydicom.dcmread(p, **kwargs)
    except Exception as exc:
        raise DataReadError(str(p), f"not a readable DICOM file ({type(exc).__name__}: {exc})"
                            ) from exc


def _check_size(p: Path, ds: Any) -> None:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    size = rows * cols * frames * samples * max(bits, 8) // 8
    if size > MAX_BYTES:
        raise DataReadError(str(p), f"pixel data too large ({size / 2**30:.1f} GiB > 1 GiB: "
                                    f"{frames} frames of {cols}x{rows})")


def _pixels(p: Path, ds: Any) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DataReadError(str(p), "the DICOM file has no pixel data")
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "unknown"))
        name = getattr(getattr(ds.file_meta, "TransferSyntaxUID", None), "name", syntax)
        package = _DECODERS.get(syntax, "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        raise DataReadError(str(p), f"compressed pixel data ({name}) needs a decoder: "
                                    f"pip install {package} (or python-gdcm)") from exc


def _shrink(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[:2]
    factor = int(np.ceil(max(h, w) / MAX_SIDE))
    if factor <= 1:
        return pixels
    h2, w2 = h // factor * factor, w // factor * factor
    trimmed = pixels[:h2, :w2].astype(np.float32)
    shape = (h2 // factor, factor, w2 // factor, factor, *pixels.shape[2:])
    return trimmed.reshape(shape).mean(axis=(1, 3))


def dicom_tags(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Modality, body part, patient, study/series UIDs, photometric and frames; no pixels.

    These values may identify a patient: use them for grouping, never write them out (see
    medtl.data.privacy).
    """
    p = Path(path)
    ds = _dcmread(p, stop_before_pixels=True)

    def tag(name: str) -> str | None:
        value = ds.get(name)
        text = str(value).strip() if value is not None else ""
        return text or None

    return {"modality": tag("Modality"), "body_part": tag("BodyPartExamined"),
            "patient_id": tag("PatientID"), "patient_name": tag("PatientName"),
            "study_uid": tag("StudyInstanceUID"), "series_uid": tag("SeriesInstanceUID"),
            "photometric": tag("PhotometricInterpretation"),
            "frames": int(ds.get("NumberOfFrames", 1) or 1)}
