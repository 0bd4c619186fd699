"""Volumes (NIfTI files, DICOM series folders) and the 2-D images a 2-D backbone is shown.

A 2-D ImageNet backbone sees a volume as slices: one slice in three channels (``2d``), three
neighbouring slices as the three channels (``2.5d``, the usual way to give 2-D weights some
depth), or the maximum intensity projection (``mip``). One intensity mapping per volume, so a
slice's brightness still means the same as its neighbours'.

Both sources give the same layout, so a scan reads the same whichever way it was exported:
``(D, H, W)`` with D running inferior to superior (for axial data), rows anterior to posterior
and columns from the patient's right to left (the radiological view of DICOM axial images).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data import dicom
from medtl.data.dicom import WINDOW_CHOICES, WINDOWS, window_to_uint8
from medtl.errors import DataReadError, MedtlError, check_choice

log = logging.getLogger("medtl")

VOLUME_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz")
"""File name endings (case-insensitive) read as volumes by :func:`read_volume`."""
VOLUME_MODES: tuple[str, ...] = ("2d", "2.5d", "mip")
SLICE_CHOICES: tuple[str, ...] = ("middle", "all", "sample:N")

# Robust per-volume intensity range: the 0.5th and 99.5th percentiles ignore the few extreme
# voxels (metal, air outside the field of view) that would squash min-max contrast.
_PERCENTILES = (0.5, 99.5)
# Percentiles from at most this many voxels (evenly strided): the estimate is as good and a
# 1 GiB volume is not copied and partitioned to get it.
_PERCENTILE_SAMPLE = 1 << 24


def is_volume_path(path: str | os.PathLike[str]) -> bool:
    """True for a ``.nii``/``.nii.gz`` file, or a folder holding only ``.dcm`` slices of one
    series (hidden files such as ``.DS_Store`` aside). Reads DICOM headers only, never raises:
    a slice whose header cannot be read does not disqualify the folder (reading it will say
    what is wrong with it)."""
    p = Path(path)
    if p.is_file():
        return p.name.lower().endswith(VOLUME_EXTENSIONS)
    if not p.is_dir():
        return False
    try:
        entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    except OSError:
        return False
    if not entries or any(not e.is_file() or e.suffix.lower() != ".dcm" for e in entries):
        return False
    import pydicom

    series = set()
    for e in entries:
        try:
            ds = pydicom.dcmread(e, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            series.add(str(ds.get("SeriesInstanceUID", "") or ""))
        except Exception:  # a predicate: an unreadable header is reported by read_volume
            continue
    series.discard("")
    return len(series) <= 1


def read_volume(path: str | os.PathLike[str], *, window: str = "auto") -> np.ndarray:
    """A ``(D, H, W)`` float32 volume in modality units (HU for CT), layout as in the module
    docstring.

    - NIfTI (nibabel): reoriented to the closest canonical (RAS) axes, so slices are along the
      third axis (axial for an axial acquisition). A 4-D (or higher) file gives its first
      volume only (the first time point of an fMRI or perfusion series); only that volume is
      read from disk.
    - A folder of DICOM slices (one series): sorted by ImagePositionPatient projected on the
      slice normal (cross product of ImageOrientationPatient), or by InstanceNumber when any
      slice lacks position/orientation; modality LUT applied. Slices of different shapes,
      several series, multi-frame or colour slices are refused.

    ``window`` is validated but not applied: the values stay in modality units so that
    :func:`volume_slices` can map the whole volume at once. Volumes over 1 GiB as float32 are
    refused from the headers, before any pixel is read. Raises :class:`DataReadError` (and no
    other exception type) for anything it cannot read.
    """
    p = Path(path)
    if window not in WINDOW_CHOICES:
        raise DataReadError(str(p), f"unknown window '{window}'; choose one of: "
                                    f"{', '.join(WINDOW_CHOICES)}")
    if p.is_dir():
        return _read_series(p)
    if not p.is_file():
        raise DataReadError(str(p), "file not found")
    return _read_nifti(p)


def _read_nifti(p: Path) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(str(p))
        shape = tuple(int(n) for n in img.shape)
        if len(shape) < 3 or min(shape) < 1:
            raise DataReadError(str(p), f"expected a 3-D (or 4-D) volume, got shape {shape}")
        # The output is float32, so that (not the on-disk dtype) is what must fit in memory.
        n_bytes = int(np.prod(shape[:3], dtype=np.int64)) * 4
        if n_bytes > dicom.MAX_BYTES:
            raise DataReadError(str(p), f"volume too large ({n_bytes / 2**30:.1f} GiB as "
                                        f"float32 > {dicom.MAX_BYTES / 2**30:g} GiB)")
        while len(img.shape) > 3:
            img = img.slicer[..., 0]  # the first volume; the slicer reads only it
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except DataReadError:
        raise
    except Exception as exc:  # nibabel and numpy raise many types on damaged files
        raise DataReadError(str(p), f"cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim != 3 or min(data.shape) < 1:
        raise DataReadError(str(p), f"expected a 3-D volume, got shape {data.shape}")
    # RAS (x: to the right, y: anterior, z: superior) -> (z, rows: anterior first, columns:
    # patient's right first), the layout of an axial DICOM series.
    return np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))


def _read_series(folder: Path) -> np.ndarray:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() == ".dcm")
    if not files:
        raise DataReadError(str(folder), "no .dcm slices in this folder")
    # Headers first (pixel data deferred), so size and shape are checked before decoding.
    headers = [(f, dicom._dcmread(f, defer_size=1024)) for f in files]
    shapes: dict[tuple[int, int], str] = {}
    series: set[str] = set()
    for f, ds in headers:
        try:
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = dicom._frame_count(ds)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            series.add(str(ds.get("SeriesInstanceUID", "") or ""))
        except Exception as exc:
            raise DataReadError(str(f), f"cannot read DICOM header ({type(exc).__name__}: "
                                        f"{exc})") from exc
        if frames != 1 or samples != 1:
            raise DataReadError(str(f), f"a series slice must be one greyscale frame "
                                        f"({frames} frames, {samples} samples per pixel)")
        shapes.setdefault((rows, cols), f.name)
    if len(shapes) > 1:
        found = ", ".join(f"{c}x{r} ({name})" for (r, c), name in sorted(shapes.items()))
        raise DataReadError(str(folder), f"slices of different shapes: {found}")
    series.discard("")
    if len(series) > 1:
        raise DataReadError(str(folder), f"the folder holds {len(series)} series; a volume "
                                         "folder must hold one")
    rows, cols = next(iter(shapes))
    n_bytes = len(files) * rows * cols * 4
    if n_bytes > dicom.MAX_BYTES:
        raise DataReadError(str(folder), f"volume too large ({n_bytes / 2**30:.1f} GiB as "
                                         f"float32 > {dicom.MAX_BYTES / 2**30:g} GiB)")
    keys = _sort_keys([ds for _, ds in headers])
    order = sorted(range(len(files)), key=lambda i: (keys[i], files[i].name))
    volume = np.empty((len(files), rows, cols), dtype=np.float32)
    for out_index, i in enumerate(order):
        volume[out_index] = _slice_values(*headers[i], (rows, cols))
    return volume


def _slice_values(f: Path, ds: Any, shape: tuple[int, int]) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        dicom._check_size(f, ds, 1)
        pixels = dicom.decode_frame(f, ds, 0)
        if pixels.shape != shape:
            raise DataReadError(str(f), f"decoded slice is {pixels.shape}, expected {shape}")
        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    except DataReadError:
        raise
    except Exception as exc:
        raise DataReadError(str(f), f"cannot read DICOM slice ({type(exc).__name__}: {exc})"
                            ) from exc


def _sort_keys(datasets: list[Any]) -> list[float]:
    """Position along the slice normal (ImagePositionPatient . normal) for every slice, else
    InstanceNumber for every slice, else 0 (file-name order). One rule for the whole series:
    mixing positions and instance numbers would interleave the two scales."""
    positions = []
    for ds in datasets:
        try:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            iop = [float(v) for v in ds.ImageOrientationPatient]
        except Exception:  # missing or malformed: fall back below
            break
        if len(ipp) != 3 or len(iop) != 6 or not np.all(np.isfinite([*ipp, *iop])):
            break
        normal = np.cross(iop[:3], iop[3:])
        positions.append(float(np.dot(normal, ipp)))
    else:
        return positions
    try:
        return [float(ds.InstanceNumber) for ds in datasets]
    except Exception:
        log.warning("DICOM series without positions or instance numbers: slices in file-name "
                    "order")
        return [0.0] * len(datasets)


def slice_indices(depth: int, spec: str) -> list[int]:
    """Which of ``depth`` slices ``spec`` chooses: ``middle`` (``depth // 2``), ``all``, or
    ``sample:N``: N evenly spaced, the first and last slice included (all of them when
    N >= depth). A bad spec is a :class:`MedtlError` listing the allowed spellings."""
    if spec == "middle":
        return [depth // 2]
    if spec == "all":
        return list(range(depth))
    m = re.fullmatch(r"sample:(\d+)", spec)
    if m is None or int(m.group(1)) < 1:
        raise MedtlError(f"unknown slices '{spec}'; choose one of: "
                         f"{', '.join(SLICE_CHOICES)} (N >= 1)")
    n = min(int(m.group(1)), depth)
    return sorted({int(round(x)) for x in np.linspace(0, depth - 1, n)})


def volume_slices(volume: np.ndarray, *, slices: str = "middle", mode: str = "2d",
                  window: str = "auto", modality: str | None = None) -> list[np.ndarray]:
    """``(H, W, 3)`` uint8 images of a ``(D, H, W)`` volume, one per chosen slice.

    ``slices``: see :func:`slice_indices`. ``mode``: ``2d`` (the slice in three channels),
    ``2.5d`` (channels = slices k-1, k, k+1, clamped at the ends) or ``mip`` (the maximum
    intensity projection over all slices: always a single image, whatever ``slices`` says).
    ``window``: a name of :data:`~medtl.data.dicom.WINDOWS` (Hounsfield units, applied
    linearly; a warning is logged when ``modality`` is given and is not CT), else (``auto``,
    ``minmax``) the volume's 0.5th to 99.5th percentiles. Either way one mapping serves the
    whole volume: per-slice scaling would erase the contrast between slices.
    """
    slice_indices(1, slices)  # validate the spelling even for mip
    check_choice("mode", mode, VOLUME_MODES)
    check_choice("window", window, WINDOW_CHOICES)
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3 or min(v.shape) < 1:
        raise MedtlError(f"a volume must be 3-D (D, H, W) and non-empty, got shape {v.shape}")
    if window in WINDOWS:
        if modality and modality.upper() != "CT":
            log.warning("the '%s' window is in Hounsfield units (CT) but the modality is %s",
                        window, modality)
        centre, width = WINDOWS[window]
    else:
        low, high = _robust_range(v)
        centre, width = (low + high) / 2.0, high - low

    def grey(a: np.ndarray) -> np.ndarray:
        return window_to_uint8(a, centre, width)

    if mode == "mip":
        # The window is monotonic, so mapping the maximum equals the maximum of the mapping.
        return [_three(grey(np.nanmax(v, axis=0) if np.isnan(v).any() else v.max(axis=0)))]
    depth = v.shape[0]
    out = []
    for k in slice_indices(depth, slices):
        if mode == "2d":
            out.append(_three(grey(v[k])))
        else:
            around = [min(max(k + d, 0), depth - 1) for d in (-1, 0, 1)]
            out.append(np.ascontiguousarray(np.stack([grey(v[i]) for i in around], axis=2)))
    return out


def _three(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _robust_range(v: np.ndarray) -> tuple[float, float]:
    flat = v.reshape(-1)
    if flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: -(-flat.size // _PERCENTILE_SAMPLE)]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(flat, _PERCENTILES)
    return float(low), float(high)
