"""Dataset inspection: what ``medtl info`` reports, every image decoded once."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from medtl.console import progress_bar
from medtl.data.sources import load_dataset
from medtl.errors import DataReadError


def dataset_summary(source: str | os.PathLike[str], *, patient_regex: str | None = None,
                    skip_bad: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Classes, counts and patients per split, image sizes, and every unreadable file.

    Decoding every image is the only way to find truncated files before a long run; files that
    fail the cheap load-time check are reported with the same reasons when ``skip_bad``.
    """
    ds = load_dataset(source, patient_regex=patient_regex, skip_bad=skip_bad)
    unreadable = [f"{p}: {why}" for p, why in ds.skipped]
    sizes: Counter[str] = Counter()
    with progress_bar("reading images", len(ds), quiet=quiet) as advance:
        for i in range(len(ds)):
            try:
                img = ds.read(i)
                sizes[f"{img.shape[1]}x{img.shape[0]}"] += 1
            except DataReadError as exc:
                if not skip_bad:
                    raise
                unreadable.append(f"{exc.path}: {exc.reason}")
            advance(1)
    patients: dict[str, int] = {}
    for split in ds.split_names():
        ids = {p for p in ds.split(split).patients if p is not None}
        if ids:
            patients[split] = len(ids)
    return {
        "source": str(source),
        "classes": ds.classes,
        "counts": ds.counts(),
        "patients": patients,
        "image_sizes": dict(sizes.most_common(10)),
        "distinct_image_sizes": len(sizes),
        "unreadable": unreadable,
    }
