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

from medtl.errors import MedtlError
from medtl.files import atomic_create, cache_root

PREFIX = "pt-"
_SALT_FILE = "salt"


def salt() -> bytes:
    """``MEDTL_SALT`` when set, else this machine's secret salt (created on first use, 0600).

    The salt file appears whole or not at all (``atomic_create``): a salt read empty, after a
    crash or beside a concurrent first use, would make every pseudonym a plain SHA-256 of the
    patient id, reversible by hashing candidate ids.
    """
    env = os.environ.get("MEDTL_SALT")
    if env:
        return env.encode()
    path = cache_root() / _SALT_FILE
    legacy = Path.home() / ".cache" / "medtl" / _SALT_FILE  # medtl 0.1 ignored XDG_CACHE_HOME
    if not path.exists() and legacy.is_file() and not os.environ.get("MEDTL_CACHE_DIR"):
        path = legacy  # keep the pseudonyms this machine already made
    if not path.exists():
        # Two processes starting at once must agree on one salt: the first to create it wins.
        atomic_create(path, secrets.token_hex(32).encode())
    value = path.read_bytes()
    if len(value) < 32:
        raise MedtlError(f"{path}: the pseudonym salt is damaged ({len(value)} bytes); delete "
                         "it only if no pseudonyms made with it are still needed, or set "
                         "MEDTL_SALT")
    return value


def pseudonym(identifier: str) -> str:
    """``pt-`` and 16 hex digits of SHA-256(salt, identifier): stable here, not reversible."""
    digest = hashlib.sha256(salt() + b"\0" + identifier.strip().encode("utf-8")).hexdigest()
    return PREFIX + digest[:16]
