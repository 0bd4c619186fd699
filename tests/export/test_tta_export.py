"""Test-time augmentation in an exported bundle: the graph builds and averages the views
itself, so the bundle's probabilities (and OOD score, of the unaugmented view) equal the run's
TTA predictions, for a scikit-learn head's merged ONNX graph and a fine-tuned network's graph
and TorchScript module; preprocessing.json records the views."""

from __future__ import annotations

import json

import numpy as np
import pytest

import medtl
from medtl.data import load_dataset
from medtl.data.tta import view_names
from medtl.errors import MedtlError
from medtl.export.bundle import PREPROCESSING_FILE, load_bundle
from medtl.export.writer import export_run
from medtl.run import load_run
from medtl.workflow import predict
from tests.conftest import write_blob_images

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, epochs=1, quiet=True)
RUNS = {"svm": dict(strategy="hybrid", head="svm", tta="standard"),
        "fine-tune": dict(strategy="fine-tune", calibrate=True, tta="flip")}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("tta_export") / "blobs", n_per_class=4,
                             size=64, splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def runs(blobs, tmp_path_factory):
    root = tmp_path_factory.mktemp("tta_export_runs")
    return {name: medtl.train(blobs, out=root / name, **FAST, **opts).path
            for name, opts in RUNS.items()}


@pytest.mark.slow  # about 90 s of training; make test-all runs it
@pytest.mark.parametrize("name", list(RUNS))
def test_bundle_applies_the_runs_tta(name, runs, blobs, tmp_path):
    test = load_dataset(blobs).split("test")
    model = load_run(runs[name]).load_model(quiet=True).model_
    want_p, want_s = model.predict_proba_ood(test)
    model.options = model.options.replace(tta="none")
    plain_p = model.predict_proba(test, cache=False)
    assert np.abs(want_p - plain_p).max() > 1e-4  # TTA changes these probabilities
    formats = ["onnx", "torchscript"] if name == "fine-tune" else ["onnx"]
    for fmt in formats:
        bundle = export_run(load_run(runs[name]), tmp_path / fmt, format=fmt)
        record = json.loads((bundle / PREPROCESSING_FILE).read_text())
        assert record["tta"]["mode"] == RUNS[name]["tta"]
        assert record["tta"]["views"] == view_names(RUNS[name]["tta"], flip=True)
        got_p, got_s = load_bundle(bundle).predict_dataset_ood(test)
        np.testing.assert_allclose(got_p, want_p, atol=1e-4)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-3)
    with pytest.raises(MedtlError, match="bundle applies"):
        predict(bundle, [blobs / "test"], tta="none", quiet=True)
