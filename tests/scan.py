"""Search every file medtl wrote for strings that must not be there (patient identifiers, the
absolute path of the user's folders), in every form a file may hold them.

A byte search alone misses a numpy string array (UTF-32), a compressed zip member (.npz,
.skops, .pt) or a UTF-16 text, so each file is searched as bytes in UTF-8, UTF-16 and UTF-32,
and its zip members, the strings of its .npy/.npz arrays and a safetensors header are
searched decoded.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def files_under(*roots: Path) -> list[Path]:
    """Every regular file under ``roots`` (a root that is a file is itself)."""
    found: list[Path] = []
    for root in roots:
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(p for p in sorted(root.rglob("*")) if p.is_file())
    return found


def _array_texts(data: bytes) -> Iterator[str]:
    """The strings held by an .npy payload, decoded (a numpy str array is UTF-32)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - not an array: its bytes are searched anyway
        return
    arrays = [array[k] for k in array.files] if isinstance(array, np.lib.npyio.NpzFile) else [
        array]
    for a in arrays:
        if a.dtype.kind in "US":
            yield "\n".join(str(x) for x in a.ravel())
        yield str(a.dtype)


def _safetensors_header(data: bytes) -> Iterator[str]:
    if len(data) < 8:
        return
    (n,) = struct.unpack("<Q", data[:8])
    if 0 < n <= len(data) - 8:
        try:
            yield json.dumps(json.loads(data[8:8 + n]))
        except ValueError:
            return


def views(name: str, data: bytes, depth: int = 0) -> Iterator[bytes | str]:
    """``data`` as bytes, and every decoded form of what it holds."""
    yield data
    if name.endswith((".npy", ".npz")):
        yield from _array_texts(data)
    if name.endswith(".safetensors"):
        yield from _safetensors_header(data)
    if depth < 2 and zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for member in z.namelist():
                yield member
                yield from views(member, z.read(member), depth + 1)


def occurrences(files: Iterable[Path], needles: Iterable[str]) -> list[str]:
    """``"needle in file"`` for each needle found in any form of any file."""
    needles = [n for n in needles if n]
    found = []
    for f in files:
        for view in views(f.name, f.read_bytes()):
            for needle in needles:
                if isinstance(view, str):
                    hit = needle in view
                else:
                    hit = any(needle.encode(enc) in view
                              for enc in ("utf-8", "utf-16-le", "utf-32-le"))
                if hit:
                    found.append(f"{needle!r} in {f}")
    return sorted(set(found))
