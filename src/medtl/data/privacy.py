"""Pseudonyms for patient identifiers read from DICOM tags.

medtl needs patient identity only to keep a patient's images on one side of a split. The value
itself (PatientID, or PatientName when there is no ID) never reaches a Record: it is replaced at
read time by a salted SHA-256, so nothing medtl writes (run directory, report, logs, cache,
manifests) can hold it. The salt is a secret of this machine, created once, so the same patient
gets the same pseudonym in every run here and a pseudonym cannot be reversed by hashing a list of
candidate IDs without it. Set ``MEDTL_SALT`` to share pseudonyms between machines.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

PREFIX = "pt-"
_SALT_FILE = "salt"


def _cache_dir() -> Path:
    return Path(os.environ.get("MEDTL_CACHE_DIR", Path.home() / ".cache" / "medtl"))


def salt() -> bytes:
    """``MEDTL_SALT`` when set, else this machine's secret salt (created on first use, 0600)."""
    env = os.environ.get("MEDTL_SALT")
    if env:
        return env.encode()
    path = _cache_dir() / _SALT_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_hex(32).encode()
        # O_EXCL: two processes starting at once must agree on one salt; the loser reads it.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        return value


def pseudonym(identifier: str) -> str:
    """``pt-`` and 16 hex digits of SHA-256(salt, identifier): stable here, not reversible."""
    digest = hashlib.sha256(salt() + b"\0" + identifier.strip().encode("utf-8")).hexdigest()
    return PREFIX + digest[:16]
