"""Any image array to ``(H, W, 3)`` uint8 RGB, shared by the image readers and DICOM.

A module of its own, below ``readers.py`` and ``dicom.py``, so that dicom.py does not import
readers.py (which dispatches ``.dcm`` files to it).
"""

from __future__ import annotations

import numpy as np


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Turn a 2-D grayscale or ``(H, W, C)`` array into a new ``(H, W, 3)`` uint8 array.

    Grayscale is replicated to three channels (what ImageNet backbones expect); a fourth (alpha)
    channel is dropped; anything that is not already uint8 is min-max scaled to 0..255, because
    medical intensities (CT Hounsfield units, 12-bit X-ray) have no fixed 8-bit mapping.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(
            f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got {a.shape}"
        )
    if a.dtype != np.uint8:
        a = _minmax_uint8(a)
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    return np.array(a, dtype=np.uint8, copy=True)


def _minmax_uint8(a: np.ndarray) -> np.ndarray:
    f = a.astype(np.float64)
    finite = np.isfinite(f)
    if not finite.all():
        # NaN/inf in float images (damaged or masked data) would make the whole image NaN:
        # scale by the finite values, NaN to black, +-inf to the ends.
        if not finite.any():
            return np.zeros(a.shape, dtype=np.uint8)
        lo, hi = float(f[finite].min()), float(f[finite].max())
        f = np.nan_to_num(f, nan=lo, posinf=hi, neginf=lo)
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        # A constant image carries no contrast; black is as good as any value and avoids 0/0.
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)
