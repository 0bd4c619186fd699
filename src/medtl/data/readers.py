"""Decode image files to ``(H, W, 3)`` uint8 RGB arrays, the one format the rest of medtl sees.

Every failure on a bad file is a :class:`~medtl.errors.DataReadError` naming the file, so a
corrupt image in a folder of thousands is reported as one line instead of a Pillow traceback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medtl.data.dicom import read_dicom
from medtl.data.pixels import to_rgb_uint8
from medtl.errors import DataReadError

# read_dicom and to_rgb_uint8 stay importable from here (existing callers); they live in
# dicom.py and pixels.py so that dicom.py needs nothing from this module (no import cycle).

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
"""File extensions (compared case-insensitively) that folder sources treat as images."""

DICOM_EXTENSIONS: tuple[str, ...] = (".dcm",)

# Version of the pixel pipeline: file to uint8 RGB (this module, dicom.py, pixels.py, the volume
# slicing of volumes.py) and uint8 to the model's square (transforms.Preprocessing.resize_uint8).
# It is part of every feature-cache key, so bump it whenever decoding or resizing changes output
# pixels: features cached by the old code are then computed again instead of served stale.
PIXEL_PIPELINE_VERSION = 1

# Pillow modes that hold more than 8 bits per sample; converting them with Image.convert("L")
# clips instead of rescaling, which turns a 12-bit X-ray into a white square.
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def probe_image(path: str | os.PathLike[str]) -> str | None:
    """Cheap load-time check: ``None`` when the file looks readable, else the reason it is not.

    Only the header is parsed (``Image.open`` is lazy), so probing thousands of files is fast;
    damage further into the file surfaces later in :func:`read_image`. DICOM files only need to
    exist and be non-empty here.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot access file ({exc.strerror or exc})"
    if size == 0:
        return "file is empty"
    if p.suffix.lower() in DICOM_EXTENSIONS:
        return None
    try:
        with Image.open(p):
            pass
    except UnidentifiedImageError:
        return "cannot identify image file (not an image, or a format Pillow cannot read)"
    except Image.DecompressionBombError as exc:
        return f"image too large ({exc})"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"cannot open image ({exc})"
    return None


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one image file to a ``(H, W, 3)`` uint8 RGB array.

    - EXIF orientation is applied (phone photos of films are often stored rotated).
    - 16-bit and float grayscale are min-max scaled to 8 bits.
    - Transparency (RGBA, LA, palette with a transparent colour) is composited onto black, the
      background of radiographs and scans, rather than exposing whatever colour hides under it.
    - Images over :data:`MAX_SIDE` pixels on a side are reduced while decoding (aspect kept),
      so memory stays bounded; one that Pillow refuses as a decompression bomb is a
      :class:`DataReadError` saying it is too large.
    - ``.dcm`` files are read with pydicom (medtl.data.dicom): modality LUT, the file's own
      window when it has one (else min-max), MONOCHROME1 inverted; the middle frame of a
      multi-frame file.

    Raises :class:`DataReadError` (and no other exception type) for a missing, empty, corrupt,
    truncated or unsupported file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataReadError(str(p), "file not found")
    if p.stat().st_size == 0:
        raise DataReadError(str(p), "file is empty")
    if p.suffix.lower() in DICOM_EXTENSIONS:
        return read_dicom(p)
    try:
        with Image.open(p) as img:
            return _pil_to_rgb(img)
    except UnidentifiedImageError as exc:
        raise DataReadError(
            str(p), "cannot identify image file (not an image, or a format Pillow cannot read)"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise DataReadError(str(p), f"image too large to decode safely ({exc})") from exc
    except OSError as exc:
        # Pillow reports a cut-off file as OSError("image file is truncated ...").
        msg = str(exc)
        reason = msg if "truncated" in msg else f"cannot decode image ({msg})"
        raise DataReadError(str(p), reason) from exc
    except Exception as exc:
        # Pillow's decoders raise a grab-bag of types on malformed data (ValueError, SyntaxError,
        # struct.error, IndexError, EOFError, ...); callers must only ever see DataReadError.
        raise DataReadError(str(p), f"cannot decode image ({type(exc).__name__}: {exc})") from exc


MAX_SIDE = 8000
"""Images larger than this on a side are reduced while decoding, so memory stays bounded."""


def _reduce(img: Image.Image) -> Image.Image:
    """``img`` reduced (aspect kept) to at most :data:`MAX_SIDE` a side, else unchanged."""
    w, h = img.size
    if max(w, h) <= MAX_SIDE:
        return img
    ratio = MAX_SIDE / max(w, h)
    target = (max(1, int(w * ratio)), max(1, int(h * ratio)))
    # JPEG decodes at 1/2, 1/4 or 1/8 scale directly (draft never goes below the target), so a
    # huge JPEG is never held at full size; other formats ignore draft and are box-averaged.
    img.draft(img.mode, target)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    return img


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(_reduce(img))
    if img.mode in _HIGH_DEPTH_MODES:
        return to_rgb_uint8(np.asarray(img))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)


# ---- .npz archives (MedMNIST) ----------------------------------------------------------------
NPZ_MAX_GB_ENV = "MEDTL_MAX_NPZ_GB"
_NPZ_DEFAULT_MAX = 8 << 30  # 8 GiB: MedMNIST's largest (224 px, ~100k images) is under 5


def npz_budget() -> int:
    """Bytes the arrays of one .npz may take once decompressed: ``MEDTL_MAX_NPZ_GB`` when set,
    else 8 GiB or half the machine's memory, whichever is less."""
    env = os.environ.get(NPZ_MAX_GB_ENV)
    if env:
        try:
            return int(float(env) * (1 << 30))
        except ValueError:
            raise DataReadError(NPZ_MAX_GB_ENV, f"not a number of GB: {env!r}") from None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the fixed cap alone
        return _NPZ_DEFAULT_MAX
    return min(_NPZ_DEFAULT_MAX, ram // 2)


def read_npz(path: str | os.PathLike[str], wanted: Iterable[str], *,
             max_bytes: int | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays named in ``wanted`` that the .npz ``path`` holds, and the names of all its
    arrays.

    An .npz is a zip: a few MB can declare tens of GB (a compression bomb). So every wanted
    member's .npy header (its shape and dtype: what it will take, whatever the zip's own size
    fields claim) is read first, and nothing is decompressed when together they would take
    more than ``max_bytes`` (default :func:`npz_budget`). numpy then reads exactly the declared
    bytes of each. Arrays of Python objects (pickles, which can run code) are refused.
    Every failure is a :class:`DataReadError` naming the file.
    """
    import zipfile

    limit = npz_budget() if max_bytes is None else max_bytes
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n.removesuffix(".npy"): n for n in zf.namelist()}
            names = [k for k in wanted if k in members]
            sizes = {k: _npy_nbytes(path, k, zf, members[k]) for k in names}
            if sum(sizes.values()) > limit:
                biggest = max(sizes, key=sizes.__getitem__)
                raise DataReadError(str(path), (
                    f"its arrays would take {sum(sizes.values()) / (1 << 30):.1f} GB once "
                    f"decompressed ('{biggest}' alone {sizes[biggest] / (1 << 30):.1f} GB), more "
                    f"than the {limit / (1 << 30):.1f} GB medtl reads from an .npz "
                    f"({NPZ_MAX_GB_ENV} sets another limit); nothing was decompressed"))
            arrays = {}
            for k in names:
                with zf.open(members[k]) as f:
                    arrays[k] = np.lib.format.read_array(f, allow_pickle=False)
    except DataReadError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise DataReadError(str(path), f"cannot read .npz ({exc})") from exc
    return arrays, sorted(members)


def _npy_nbytes(path: str | os.PathLike[str], key: str, zf, member: str) -> int:
    """What the .npy ``member`` declares it holds, in bytes, from its header alone."""
    fmt = np.lib.format
    with zf.open(member) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise DataReadError(str(path), f"'{key}': .npy format {version} is not read")
    if dtype.hasobject:
        raise DataReadError(str(path), f"'{key}' holds Python objects (a pickle); refused")
    return math.prod(shape) * dtype.itemsize
