"""The sites of a simulated federation: one DATA source each, or one manifest with a ``site``
column (each value a site), and their names."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path

from medtl.errors import DataReadError, MedtlError
from medtl.files import atomic_open

SITE_COLUMN = "site"


def site_names(sites: Sequence[str | Path]) -> list[str]:
    """Each site's name: its folder's or file's name (without suffix), made unique."""
    names: list[str] = []
    for s in sites:
        base = _safe(Path(s).stem or "site")
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "site"


def has_site_column(source: str | Path) -> bool:
    p = Path(source)
    if p.suffix.lower() != ".csv" or not p.is_file():
        return False
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataReadError(str(p), f"cannot read manifest ({exc})") from exc
    return SITE_COLUMN in [h.strip().lower() for h in header]


def split_by_site(manifest: str | Path, where: Path) -> list[Path]:
    """One manifest per value of ``manifest``'s site column, written into ``where`` (paths made
    absolute, the other columns kept), in the order the sites first appear."""
    manifest = Path(manifest)
    base = Path(os.path.abspath(manifest)).parent
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            rows = [(reader.line_num, row) for row in reader]
            columns = [c for c in reader.fieldnames if c != SITE_COLUMN]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataReadError(str(manifest), f"cannot read manifest ({exc})") from exc
    groups: dict[str, list[dict[str, str]]] = {}
    for line, row in rows:
        site = (row.get(SITE_COLUMN) or "").strip()
        if not site:
            raise MedtlError(f"{manifest}, line {line}: empty site")
        path = Path((row.get("path") or "").strip()).expanduser()
        row = {c: (row.get(c) or "") for c in columns}
        row["path"] = str(path if path.is_absolute() else base / path)
        groups.setdefault(site, []).append(row)
    where.mkdir(parents=True, exist_ok=True)
    out = []
    for site, name in zip(groups, site_names(list(groups)), strict=True):
        path = where / f"{name}.csv"
        with atomic_open(path, "w") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(groups[site])
        out.append(path)
    return out
