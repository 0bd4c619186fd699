"""Volumes (NIfTI files, DICOM series folders) and the 2-D images a 2-D backbone is shown.

A 2-D ImageNet backbone sees a volume as slices: one slice in three channels (``2d``), three
neighbouring slices as the three channels (``2.5d``, the usual way to give 2-D weights some
depth), or the maximum intensity projection (``mip``). One intensity mapping per volume, so a
slice's brightness still means the same as its neighbours'.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medtl.data.dicom import MAX_BYTES, WINDOWS, window_to_uint8
from medtl.errors import DataReadError, MedtlError, check_choice

VOLUME_MODES = ("2d", "2.5d", "mip")


def read_volume(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``(D, H, W)`` float32 volume in modality units (HU for CT) from a NIfTI file (first
    volume of a 4-D file; reoriented to the closest canonical axes, slices along the third) or
    a folder of DICOM slices (sorted by position along the slice normal)."""
    p = Path(path)
    if p.is_dir():
        return _read_series(p)
    import nibabel as nib

    try:
        img = nib.load(str(p))
        shape = img.shape
        itemsize = np.dtype(img.get_data_dtype()).itemsize
        n_bytes = int(np.prod(shape[:3])) * max(itemsize, 4)
        if n_bytes > MAX_BYTES:
            raise DataReadError(str(p), f"volume too large ({n_bytes / 2**30:.1f} GiB > 1 GiB)")
        if len(shape) > 3:
            img = img.slicer[..., 0]  # a 4-D series: its first volume
            while len(img.shape) > 3:
                img = img.slicer[..., 0]
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except DataReadError:
        raise
    except Exception as exc:  # nibabel and numpy raise many types on damaged files
        raise DataReadError(str(p), f"cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim != 3 or min(data.shape) < 1:
        raise DataReadError(str(p), f"expected a 3-D volume, got shape {data.shape}")
    return np.ascontiguousarray(np.moveaxis(data, 2, 0))


def _read_series(folder: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() == ".dcm")
    if not files:
        raise DataReadError(str(folder), "no .dcm slices in this folder")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        except Exception as exc:
            raise DataReadError(str(f), f"cannot read DICOM slice ({type(exc).__name__}: {exc})"
                                ) from exc
        slices.append((_position(ds), f.name, pixels))
    shapes = {s[2].shape for s in slices}
    if len(shapes) > 1:
        raise DataReadError(str(folder), f"slices of different shapes {sorted(shapes)}")
    if len(slices) * slices[0][2].nbytes > MAX_BYTES:
        raise DataReadError(str(folder), "volume too large (> 1 GiB)")
    slices.sort(key=lambda s: (s[0], s[1]))
    return np.stack([s[2] for s in slices])


def _position(ds) -> float:
    """Position along the slice normal (ImagePositionPatient . normal), else InstanceNumber."""
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(iop) == 6:
        normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
        return float(np.dot(normal, np.array(ipp, float)))
    return float(ds.get("InstanceNumber", 0) or 0)


def volume_slices(volume: np.ndarray, *, slices: str = "middle", mode: str = "2d",
                  window: str = "auto") -> list[np.ndarray]:
    """``(H, W, 3)`` uint8 images of a ``(D, H, W)`` volume.

    ``slices``: ``middle``, ``all`` or ``sample:N`` (N evenly spaced); ``mode``: ``2d`` (the
    slice in three channels), ``2.5d`` (slices k-1, k, k+1, clamped at the ends) or ``mip``
    (one image, the maximum over all slices, whatever ``slices`` says). ``window``: a named CT
    window, else (``auto``, ``minmax``) the volume's 0.5th–99.5th percentiles.
    """
    from medtl.data.sources import slice_indices

    check_choice("mode", mode, VOLUME_MODES)
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3:
        raise MedtlError(f"a volume must be 3-D (D, H, W), got shape {v.shape}")
    if window in WINDOWS:
        centre, width = WINDOWS[window]
    else:
        low, high = np.percentile(v, [0.5, 99.5])
        centre, width = (low + high) / 2.0, max(high - low, 1e-6)
    grey = window_to_uint8(v, centre, width)
    if mode == "mip":
        return [np.repeat(grey.max(axis=0)[:, :, None], 3, axis=2)]
    depth = len(grey)
    out = []
    for k in slice_indices(depth, slices):
        if mode == "2d":
            out.append(np.repeat(grey[k][:, :, None], 3, axis=2))
        else:
            around = [min(max(k + d, 0), depth - 1) for d in (-1, 0, 1)]
            out.append(np.ascontiguousarray(np.stack([grey[i] for i in around], axis=2)))
    return out
