"""The run directory (design.md, "Run directory"): save and load a trained model bundle.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written ``metrics.json`` that a later ``evaluate`` would trust.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import MedtlError

RUN_FILES = ("config.json", "metrics.json", "predictions.csv", "history.csv", "log.txt",
             "report.html")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            # repr() keeps every bit of a float, so a reloaded run reproduces it exactly.
            w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def prediction_rows(images: Sequence[Any], labels: Sequence[int] | None, proba: np.ndarray,
                    classes: Sequence[str], split: str | None) -> list[dict[str, Any]]:
    """One row per image: path, split, label, one probability per class, prediction.

    ``images`` are :class:`medtl.data.Record` objects, or plain paths (a volume's aggregate
    row). ``path`` is always the file; when some record is a slice of a volume or an image in an
    .npz, a ``slice`` column or ``key`` and ``index`` columns follow it (empty where a row has
    none), so that each row still names one image. Datasets of image files get none of them.
    """
    located = [(im, {}) if isinstance(im, str) else (im.path, im.location()) for im in images]
    columns = [c for c in ("slice", "key", "index") if any(c in loc for _, loc in located)]
    rows = []
    for i, (path, loc) in enumerate(located):
        row: dict[str, Any] = {"path": path}
        for c in columns:
            row[c] = loc.get(c, "")
        if split is not None:
            row["split"] = split
        if labels is not None:
            row["label"] = classes[int(labels[i])]
        ok = bool(np.isfinite(proba[i]).all())
        for c, cls in enumerate(classes):
            row[f"prob_{cls}"] = float(proba[i, c]) if ok else ""
        row["prediction"] = classes[int(np.argmax(proba[i]))] if ok else "UNREADABLE"
        rows.append(row)
    return rows


class Run:
    """A run directory on disk: its config, metrics, predictions and model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    @property
    def metrics(self) -> dict[str, Any]:
        p = self.path / "metrics.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def predictions(self) -> list[dict[str, str]]:
        with open(self.path / "predictions.csv", newline="") as f:
            return list(csv.DictReader(f))

    def load_model(self, *, device: str = "auto", quiet: bool = False, skip_bad: bool = False):
        from medtl.transfer.strategies import TransferClassifier

        return TransferClassifier.load_model(self.path / "model", device=device, quiet=quiet,
                                             skip_bad=skip_bad)


def load_run(path: str | Path) -> Run:
    """Open a run directory written by ``medtl train``; a clear error when it is not one."""
    p = Path(path)
    if not p.exists():
        raise MedtlError(f"{p}: no such run directory")
    if (p / "folds").is_dir() and not (p / "model").exists():
        raise MedtlError(f"{p}: a cross-validation run has one model per fold; use "
                         f"{p / 'folds' / 'fold-1'} (or another fold)")
    if not (p / "config.json").is_file() or not (p / "model" / "model.json").is_file():
        raise MedtlError(f"{p}: not a medtl run directory (config.json or model/ missing)")
    return Run(p)
