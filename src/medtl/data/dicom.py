"""DICOM to pixels as a radiologist would see them, and the few tags medtl needs.

Order of operations (DICOM PS3.3 C.11): stored values -> modality LUT (RescaleSlope/Intercept,
giving Hounsfield units for CT) -> VOI LUT or window (what the acquiring site chose to show,
or a named CT window) -> MONOCHROME1 inversion -> 8 bits. Every failure is a
:class:`~medtl.errors.DataReadError` naming the file, whatever pydicom raised underneath.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data.pixels import to_rgb_uint8
from medtl.errors import DataReadError

log = logging.getLogger("medtl")

# (centre, width) in Hounsfield units: the standard radiology presets as listed by Radiopaedia,
# "Windowing (CT)" (https://radiopaedia.org/articles/windowing-ct).
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}
WINDOW_CHOICES: tuple[str, ...] = ("auto", "minmax", *WINDOWS)

MAX_BYTES = 1 << 30
"""Decoded pixel data larger than this (1 GiB) is refused from the header, before decoding."""
MAX_SIDE = 8000
"""Frames larger than this on a side are block-averaged down to at most this size."""

# Compressed transfer syntaxes pydicom cannot decode without a plugin, and what to install.
_JPEG2000 = "pylibjpeg pylibjpeg-openjpeg"
_JPEG = "pylibjpeg pylibjpeg-libjpeg"
_DECODERS = {
    "1.2.840.10008.1.2.4.50": _JPEG,  # JPEG baseline
    "1.2.840.10008.1.2.4.51": _JPEG,  # JPEG extended
    "1.2.840.10008.1.2.4.57": _JPEG,  # JPEG lossless
    "1.2.840.10008.1.2.4.70": _JPEG,  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": _JPEG,  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": _JPEG,  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": _JPEG2000,  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": _JPEG2000,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _JPEG2000,  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": _JPEG2000,  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": _JPEG2000,  # HTJ2K
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Named windows are in Hounsfield units, which only CT has; warn once per (modality, window)
# rather than once per file, so a folder of 5,000 MR slices gives one line, not 5,000.
_warned: set[tuple[str, str]] = set()


def window_to_uint8(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear window: ``centre - width/2`` maps to 0 and ``centre + width/2`` to 255, clipped.

    NaN maps to 0, so damaged float data cannot turn into undefined integers.
    """
    low = centre - width / 2.0
    scaled = (np.asarray(values, dtype=np.float64) - low) * 255.0 / max(width, 1e-6)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def read_dicom(path: str | os.PathLike[str], *, window: str = "auto",
               frame: int | None = None) -> np.ndarray:
    """Decode one frame of a DICOM file to ``(H, W, 3)`` uint8.

    ``window``:

    - ``auto``: the file's own VOI LUT Sequence, else its (first) WindowCenter/WindowWidth,
      applied with pydicom's ``apply_voi_lut`` and then stretched to 0..255; min-max when the
      file has neither (or when its window is unusable, e.g. a width of 0: logged).
    - ``minmax``: min-max of the modality-LUT values, ignoring the file's windows.
    - a name of :data:`WINDOWS`: that centre/width (Hounsfield units) applied linearly to the
      modality-LUT values and clipped. Allowed on other modalities, with a logged warning.

    MONOCHROME1 is inverted after windowing so that dense is bright, as in MONOCHROME2.
    Colour (SamplesPerPixel 3, including YBR) is returned as RGB, unwindowed. ``frame`` picks
    a frame of a multi-frame file (default: the middle one); only that frame is decoded.
    Frames over :data:`MAX_SIDE` pixels a side are block-averaged; files whose decoded pixels
    would exceed :data:`MAX_BYTES` are refused from the header.

    Raises :class:`DataReadError` (and no other exception type) for anything it cannot read.
    """
    p = Path(path)
    if window not in WINDOW_CHOICES:
        raise DataReadError(str(p), f"unknown window '{window}'; choose one of: "
                                    f"{', '.join(WINDOW_CHOICES)}")
    # PixelData is left on disk (deferred) until the header says it is small enough to decode.
    ds = _dcmread(p, defer_size=1024)
    try:
        frames = _frame_count(ds)
        _check_size(p, ds, frames)
        index = frames // 2 if frame is None else int(frame)
        if not 0 <= index < frames:
            raise DataReadError(str(p), f"frame {index} requested; the file has {frames} "
                                        f"frame{'s' if frames != 1 else ''}")
        pixels = decode_frame(p, ds, index)
        if pixels.ndim == 3:
            # Colour is already RGB; a window is a greyscale notion, so none is applied.
            return to_rgb_uint8(shrink(pixels))
        return _grey(ds, shrink(pixels), window, p)
    except DataReadError:
        raise
    except Exception as exc:  # pydicom's and numpy's error types vary with the damage
        raise DataReadError(str(p), f"cannot decode DICOM ({type(exc).__name__}: {exc})") from exc


def _grey(ds: Any, pixels: np.ndarray, window: str, p: Path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(pixels, ds)
    if window in WINDOWS:
        _warn_if_not_ct(str(ds.get("Modality", "") or ""), window, p)
        out = window_to_uint8(values, *WINDOWS[window])
    elif window == "auto" and _has_voi(ds):
        out = to_rgb_uint8(_apply_voi(ds, values, p))[..., 0]
    else:
        out = to_rgb_uint8(np.asarray(values, dtype=np.float64))[..., 0]
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        # MONOCHROME1: low values are white. Flip so that dense is bright, as in MONOCHROME2.
        out = 255 - out
    return np.repeat(out[:, :, None], 3, axis=2)


def _has_voi(ds: Any) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def _apply_voi(ds: Any, values: np.ndarray, p: Path) -> np.ndarray:
    """The file's VOI LUT or first window as float64; min-max input when it is unusable."""
    from pydicom.pixels import apply_voi_lut

    try:
        if ds.get("VOILUTSequence"):
            # A VOI LUT is indexed by integer values; pydicom warns on (and truncates) floats.
            values = np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64)
        out = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        if out.shape == values.shape:
            return out
        reason = f"a VOI output of shape {out.shape}"
    except Exception as exc:  # a bad window (width 0, unknown function) should not lose the image
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("%s: ignoring the file's window (%s); using min-max", p, reason)
    return np.asarray(values, dtype=np.float64)


def _warn_if_not_ct(modality: str, window: str, p: Path) -> None:
    if modality and modality != "CT" and (modality, window) not in _warned:
        _warned.add((modality, window))
        log.warning("%s: the '%s' window is in Hounsfield units (CT) but the modality is %s",
                    p, window, modality)


def _dcmread(p: Path, **kwargs: Any) -> Any:
    import pydicom

    if not p.is_file():
        raise DataReadError(str(p), "file not found")
    try:
        return pydicom.dcmread(p, **kwargs)
    except Exception as exc:
        raise DataReadError(str(p), f"not a readable DICOM file ({type(exc).__name__}: {exc})"
                            ) from exc


def _frame_count(ds: Any) -> int:
    return max(int(ds.get("NumberOfFrames", 1) or 1), 1)


def _check_size(p: Path, ds: Any, frames: int) -> None:
    """Refuse, from the header alone, pixel data that would decode to more than MAX_BYTES."""
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DataReadError(str(p), "the DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        raise DataReadError(str(p), f"the DICOM header gives an empty image ({cols}x{rows})")
    samples = max(int(ds.get("SamplesPerPixel", 1) or 1), 1)
    bits = max(int(ds.get("BitsAllocated", 16) or 16), 8)
    size = rows * cols * frames * samples * bits // 8
    if size > MAX_BYTES:
        raise DataReadError(str(p), f"pixel data too large ({size / 2**30:.1f} GiB > "
                                    f"{MAX_BYTES / 2**30:g} GiB: {frames} frames of {cols}x{rows})")


def decode_frame(p: Path, ds: Any, index: int) -> np.ndarray:
    """Decode frame ``index`` of ``ds`` to ``(H, W)`` stored values or ``(H, W, 3)`` RGB.

    Only that frame is decoded. YCbCr (YBR_FULL, YBR_FULL_422) is converted with pydicom's
    ``convert_color_space``; PALETTE COLOR is expanded with ``apply_color_lut``. A compressed
    transfer syntax with no decoder installed gives a DataReadError saying what to install.
    """
    from pydicom.pixels import apply_color_lut, as_pixel_options, convert_color_space, get_decoder

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        raise DataReadError(str(p), "the file meta has no TransferSyntaxUID")
    name = getattr(syntax, "name", str(syntax))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DataReadError(str(p), f"unsupported transfer syntax {name} ({syntax})") from exc
    if not decoder.is_available:
        package = _DECODERS.get(str(syntax), f"{_JPEG} pylibjpeg-openjpeg")
        raise DataReadError(str(p), f"compressed pixel data ({name}) needs a decoder that is "
                                    f"not installed: pip install {package} (or python-gdcm)")
    # raw=True: colour conversion is done below from what the decoder reports it returned, so
    # decoders that already output RGB are not converted twice.
    arr, props = decoder.as_array(ds, index=index, raw=True, **as_pixel_options(ds))
    photometric = str(props.get("photometric_interpretation", "")).strip().upper()
    if arr.ndim == 3 and arr.shape[-1] == 3 and photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
    elif arr.ndim == 2 and photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
        raise DataReadError(str(p), f"decoded pixel data has an unexpected shape {arr.shape}")
    return arr


def shrink(pixels: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """Block-mean ``pixels`` (``(H, W)`` or ``(H, W, C)``) to at most ``max_side`` a side.

    The factor is the smallest integer that fits; up to factor-1 edge rows/columns are dropped
    so blocks are whole. Integer input stays integer (rounded), so VOI LUT indices and RGB
    values keep their meaning.
    """
    limit = MAX_SIDE if max_side is None else max_side
    h, w = pixels.shape[:2]
    factor = -(-max(h, w) // limit)
    if factor <= 1:
        return pixels
    h2, w2 = h // factor * factor, w // factor * factor
    blocks = pixels[:h2, :w2].reshape(h2 // factor, factor, w2 // factor, factor,
                                      *pixels.shape[2:])
    # dtype=float64 accumulates block by block (buffered), without a float copy of the frame.
    mean = blocks.mean(axis=(1, 3), dtype=np.float64)
    if np.issubdtype(pixels.dtype, np.integer):
        return np.rint(mean).astype(pixels.dtype)
    return mean.astype(pixels.dtype)


def dicom_tags(path: str | os.PathLike[str]) -> dict[str, str | int | bool | None]:
    """Modality, body part, patient, study/series UIDs, photometric, frames and whether text is
    burned into the pixels; no pixels read.

    Keys: ``modality``, ``body_part``, ``patient_id``, ``patient_name``, ``study_uid``,
    ``series_uid``, ``photometric`` (str or None when missing/empty), ``frames`` (int) and
    ``burned_in`` (bool: BurnedInAnnotation (0028,0301) is YES, see :func:`burned_in`).
    These values may identify a patient: use them for grouping, never write them out (see
    medtl.data.privacy). Raises :class:`DataReadError` for a file pydicom cannot parse.
    """
    p = Path(path)
    ds = _dcmread(p, stop_before_pixels=True)

    def tag(name: str) -> str | None:
        value = ds.get(name)
        text = str(value).strip() if value is not None else ""
        return text or None

    try:
        return {"modality": tag("Modality"), "body_part": tag("BodyPartExamined"),
                "patient_id": tag("PatientID"), "patient_name": tag("PatientName"),
                "study_uid": tag("StudyInstanceUID"), "series_uid": tag("SeriesInstanceUID"),
                "photometric": tag("PhotometricInterpretation"), "frames": _frame_count(ds),
                "burned_in": _says_burned_in(ds)}
    except Exception as exc:  # values are parsed lazily: a damaged one fails here
        raise DataReadError(str(p), f"cannot read DICOM tags ({type(exc).__name__}: {exc})"
                            ) from exc


def _says_burned_in(ds: Any) -> bool:
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def burned_in(path: str | os.PathLike[str]) -> bool:
    """Whether the file's BurnedInAnnotation (0028,0301) is YES: its pixels carry text
    (names, dates, record numbers) that no tag pseudonym removes, so medtl shows none of its
    pixels in a report. Only that tag is read; an unreadable file is False (the pixel read
    reports it)."""
    import pydicom

    try:
        ds = pydicom.dcmread(Path(path), stop_before_pixels=True,
                             specific_tags=["BurnedInAnnotation"])
        return _says_burned_in(ds)
    except Exception:  # noqa: BLE001 - damaged files are reported when their pixels are read
        return False
