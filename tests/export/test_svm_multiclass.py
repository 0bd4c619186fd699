"""An SVM head with three classes exports to ONNX: the Platt scaling per class (one-vs-rest
decision values, a sigmoid each, rows normalised) gives CalibratedClassifierCV's probabilities.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

import medtl
from medtl.data import load_dataset
from medtl.export.bundle import load_bundle
from medtl.export.writer import export_run
from tests.conftest import blob_image


def _three_classes(root, n: int = 8, size: int = 48):
    """disc, bar and plain noise: three classes a frozen backbone separates."""
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        for cls in ("disc", "bar", "plain"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = (blob_image(rng, cls, size) if cls != "plain"
                       else rng.integers(0, 60, (size, size), dtype=np.uint8))
                Image.fromarray(img).save(d / f"p{i:03d}_{split}_{cls}.png")
    return root


def test_three_class_svm_matches_predict_proba(tmp_path):
    data = _three_classes(tmp_path / "data")
    run = medtl.train(data, out=tmp_path / "run", backbone="mobilenet_v2", weights="imagenet",
                      image_size=64, quiet=True, strategy="hybrid", head="svm")
    test = load_dataset(data).split("test")
    want = run.load_model(quiet=True).predict_proba(test)
    got = load_bundle(export_run(run, tmp_path / "bundle")).predict_dataset(test)
    assert got.shape == want.shape == (24, 3)
    assert np.ptp(want, axis=0).min() > 0.01  # the probabilities vary: a real comparison
    np.testing.assert_allclose(got, want, atol=1e-4)
