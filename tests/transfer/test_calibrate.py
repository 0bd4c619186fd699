"""--calibrate: temperature scaling fitted on validation, kept in the saved model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

import medtl
from medtl.evaluation.stats import logits_from_proba


def _nll(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1))))


@pytest.mark.parametrize("strategy", ["feature-extractor", "hybrid"])
def test_calibrate_fits_a_temperature_that_lowers_validation_nll_and_keeps_decisions(
        blob_data, tmp_path, strategy):
    ds = medtl.load_dataset(blob_data, patient_regex=r"(p\d+)")
    clf = medtl.TransferClassifier(strategy=strategy, calibrate=True, image_size=64,
                                   quiet=True).fit(ds.split("train"), ds.split("val"))
    t = clf.model_.temperature
    assert t is not None and t > 0 and t != 1.0
    val = ds.split("val")
    raw = clf.predict_proba(val, calibrated=False)
    cal = clf.predict_proba(val)
    assert _nll(val.labels, cal) <= _nll(val.labels, raw) + 1e-9
    assert np.allclose(cal, special.softmax(logits_from_proba(raw) / t, axis=1))
    test = ds.split("test")
    assert np.array_equal(clf.predict_proba(test).argmax(1),
                          clf.predict_proba(test, calibrated=False).argmax(1))

    run = medtl.save_run(clf, tmp_path / "run")
    again = run.load_model()
    assert again.model_.temperature == t
    assert np.allclose(again.predict_proba(test), clf.predict_proba(test))


def test_without_calibrate_probabilities_are_the_models_own(blob_data):
    ds = medtl.load_dataset(blob_data, patient_regex=r"(p\d+)")
    clf = medtl.TransferClassifier(strategy="feature-extractor", image_size=64,
                                   quiet=True).fit(ds.split("train"), ds.split("val"))
    assert clf.model_.temperature is None
    test = ds.split("test")
    assert np.array_equal(clf.predict_proba(test), clf.predict_proba(test, calibrated=False))
