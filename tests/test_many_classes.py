"""Datasets with many classes train to complete runs through the CLI (issue 14).

medtl 0.1 trained an 11-class dataset for its whole time and then failed in the confusion-matrix
plot (10 classes at most), leaving a run without config.json that `evaluate` and `--resume`
refused. Each run here goes through `medtl train` in a subprocess, as a user would.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_SPLITS = (("train", 6), ("val", 3), ("test", 3))


def write_many_classes(root: Path, k: int, size: int = 32, seed: int = 0) -> Path:
    """``k`` class folders per split of tiny images, each class a grating of its own angle,
    frequency and colour (so a frozen backbone tells them apart), with per-image noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for c in range(k):
        angle = np.pi * c / k
        wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * (0.4 + 0.05 * c))
        tint = np.array([1.0, (c % 3) / 2, (c % 5) / 4])
        for split, n in _SPLITS:
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = 128 + 90 * wave[..., None] * tint + rng.normal(0, 10, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{split}{i}.png")
    return root


@pytest.mark.parametrize("k", [11, 20])
def test_many_classes_train_to_a_complete_run_with_a_report(tmp_path, k):
    data = write_many_classes(tmp_path / "data", k)
    out = tmp_path / "run"
    # The environment (offline weights, the session's private cache) is inherited.
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("medtl")), "train", str(data),
         "--backbone", "mobilenet_v2", "--strategy", "hybrid", "--head", "knn",
         "--image-size", "32", "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "metrics.json", "predictions.csv", "report.html"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == [f"class_{c:02d}" for c in range(k)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.asarray(metrics["test"]["confusion_matrix"]).shape == (k, k)
    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(r["split"] == "test" for r in rows) == 3 * k

    page = (out / "report.html").read_text()
    assert "Figure left out" not in page
    figure = re.search(r'<img src="data:image/png;base64,([^"]+)" '
                       r'alt="Confusion matrix, test \(arg-max decision\)">', page)
    assert figure, "no confusion-matrix figure in report.html"
    img = Image.open(io.BytesIO(base64.b64decode(figure.group(1))))
    img.load()
    # Grown with the class count, so that its labels stay legible.
    assert img.width >= 40 * k
