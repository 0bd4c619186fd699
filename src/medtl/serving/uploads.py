"""Uploaded files, treated as untrusted: the kind judged from the bytes, the pixel count read
from the header before anything is decoded, and the file kept only in a temporary folder.

Each problem is an :class:`UploadError` carrying the HTTP status the API answers with (415 for
a file that is not an image, 422 for one too large or unreadable); its message names the
upload as its sender called it, never the temporary path, and says nothing from DICOM tags.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtl.errors import DataReadError, MedtlError

# The kinds medtl reads, by their first bytes; the extension the file is stored under tells
# medtl's readers how to decode it (a DICOM by pydicom, the others by Pillow).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"II*\x00", "tiff"),
          (b"MM\x00*", "tiff"))
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}
KINDS_TEXT = "PNG, JPEG, TIFF or DICOM"
MAX_NAME = 255


class UploadError(MedtlError):
    """An upload the API refuses; ``status`` is the HTTP status of the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sniff(head: bytes) -> str | None:
    """The kind of a file from its first 132 bytes ("png", "jpeg", "tiff", "dicom"), or None.

    A DICOM file (Part 10) has "DICM" after its 128-byte preamble; a file without the
    preamble is not accepted, as medtl's readers expect one. The marker is checked first: the
    preamble is free bytes, and some DICOM files (pydicom's CT_small.dcm) start with a TIFF
    header there."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def display_name(filename: str | None, index: int) -> str:
    """The upload's base name as its sender gave it (folders dropped, control characters
    removed, bounded), for the answer only: it is never logged or written to disk."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:MAX_NAME] or f"file-{index + 1}"


def pixel_count(path: Path, kind: str) -> int:
    """Pixels the file holds, from its header alone (Pillow opens lazily; for a DICOM, Rows x
    Columns x frames with the pixel data left unread)."""
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
            return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * frames
        except Exception as exc:  # pydicom's error types vary with the damage
            raise UploadError(422, f"not a readable DICOM file ({type(exc).__name__})") \
                from None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        # Pillow refuses to even open an image over twice its MAX_IMAGE_PIXELS
        return 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError...
        raise UploadError(422, f"cannot read the image header ({type(exc).__name__})") from None
    return width * height


class RequestFiles:
    """Where one request's uploads are written: the server's private folder (mode 0700,
    removed at shutdown), under names of a random token and an index (never the sender's
    names), every one removed when the request ends. One folder for the server rather than one
    per request: creating and removing a folder costs more than a small image's decoding."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(8)
        self.paths: list[Path] = []

    def path(self, index: int, suffix: str) -> Path:
        path = self.root / f"{self.token}-{index}{suffix}"
        self.paths.append(path)
        return path

    def __enter__(self) -> RequestFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


@dataclass
class Upload:
    """One accepted upload, stored as ``path`` in the request's temporary folder."""

    name: str  # the sender's base name, for the answer
    kind: str
    path: Path
    size: int


def store(data: bytes, filename: str | None, index: int, files: RequestFiles, *,
          max_pixels: int) -> Upload:
    """Check ``data`` (an uploaded file) and write it among the request's ``files``: 415 when
    it is not a PNG, JPEG, TIFF or DICOM, 422 when its header gives more than ``max_pixels``
    pixels or cannot be read."""
    name = display_name(filename, index)
    kind = sniff(data[:132])
    if kind is None:
        raise UploadError(415, f"{name}: not a {KINDS_TEXT} file (judged by its content, not "
                               "its name)")
    path = files.path(index, SUFFIXES[kind])
    with open(path, "xb") as f:  # a new file, never one planted under the name
        f.write(data)
    try:
        pixels = pixel_count(path, kind)
    except UploadError as exc:
        raise UploadError(exc.status, f"{name}: {exc}") from None
    if pixels > max_pixels:
        raise UploadError(422, f"{name}: {pixels:,} pixels, more than the {max_pixels:,} this "
                               "server accepts (--max-pixels); refused before decoding")
    if pixels < 1:
        raise UploadError(422, f"{name}: the header gives an empty image")
    return Upload(name, kind, path, len(data))


def decode(model, upload: Upload) -> np.ndarray:
    """The upload as medtl reads it for ``model`` (an ExportedModel): (H, W, 3) uint8, DICOM
    windowed as the model's view says. An unreadable file is a 422 naming the upload."""
    try:
        ds = model.dataset([upload.path])
        return ds.read(0)
    except DataReadError as exc:
        raise UploadError(422, f"{upload.name}: {_scrub(exc.reason, upload)}") from None
    except MedtlError as exc:
        raise UploadError(422, f"{upload.name}: {_scrub(str(exc), upload)}") from None


def _scrub(message: str, upload: Upload) -> str:
    """A reader's message without the temporary path (the sender knows the file by its name)."""
    return (message.replace(str(upload.path), upload.name)
            .replace(str(upload.path.parent), "").strip(": /") or "cannot be read")
