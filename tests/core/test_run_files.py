"""A run's metrics.json recomputed from its own predictions.csv (issue 14, step 0).

Only the files of a run written by ``medtl.train`` are read: the positive class is the last of
config.json's ``classes``; the test figures are those of the test rows' ``prob_<positive>``; the
thresholds are chosen on the VAL rows and the test operating points apply them to the test rows.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import medtl

from .conftest import FAST, write_noisy_binary

# Unequal classes and a few mislabelled images: no figure is perfect or symmetric.
COUNTS = {"train": {"bar": 24, "disc": 16},
          "val": {"bar": 18, "disc": 12},
          "test": {"bar": 18, "disc": 12}}


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("runfiles")
    data = write_noisy_binary(root / "data", COUNTS)
    medtl.train(data, strategy="hybrid", head="logreg", out=root / "run", **FAST)
    config = json.loads((root / "run" / "config.json").read_text())
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    with open(root / "run" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return config, metrics, rows


def _split(rows, split: str, positive: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is_positive, prob_<positive>, predicted_positive) of one split's rows."""
    mine = [r for r in rows if r["split"] == split]
    assert mine, f"no {split} rows in predictions.csv"
    y = np.array([r["label"] == positive for r in mine])
    score = np.array([float(r[f"prob_{positive}"]) for r in mine])
    pred = np.array([r["prediction"] == positive for r in mine])
    return y, score, pred


def _youden(y: np.ndarray, s: np.ndarray) -> float:
    """Brute force: the observed score maximising sensitivity + specificity (highest on ties)."""
    best = None
    for t in sorted(set(s.tolist()), reverse=True):
        tp, fp = int(np.sum((s >= t) & y)), int(np.sum((s >= t) & ~y))
        j = tp * int((~y).sum()) - fp * int(y.sum())  # J scaled to integers: exact ties
        if best is None or j > best[0]:
            best = (j, t)
    return best[1]


def _for_sensitivity(y: np.ndarray, s: np.ndarray, target: float) -> float:
    """Brute force: the highest observed score whose threshold reaches ``target``."""
    return next(t for t in sorted(set(s.tolist()), reverse=True)
                if np.sum((s >= t) & y) / y.sum() >= target)


def _sens_spec(y: np.ndarray, called: np.ndarray) -> tuple[float, float]:
    return float(np.sum(called & y) / y.sum()), float(np.sum(~called & ~y) / (~y).sum())


def test_the_positive_class_is_the_last_class(run_files):
    config, metrics, rows = run_files
    assert config["classes"] == ["bar", "disc"]
    assert config["positive_class"] == config["classes"][-1]


def test_test_figures_are_those_of_the_positive_class_probabilities(run_files):
    config, metrics, rows = run_files
    positive = config["classes"][-1]
    y, score, pred = _split(rows, "test", positive)
    m = metrics["test"]
    assert m["n"] == len(y)
    assert m["auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    # The arg-max prediction written in the CSV is the one the figures count.
    np.testing.assert_array_equal(pred, score > 0.5)
    sens, spec = _sens_spec(y, pred)
    assert sens != spec, "the data should make the two differ, or a swapped class hides"
    assert m["sensitivity"] == pytest.approx(sens, abs=1e-12)
    assert m["specificity"] == pytest.approx(spec, abs=1e-12)
    assert m["accuracy"] == pytest.approx(float(np.mean(pred == y)), abs=1e-12)


def test_thresholds_are_chosen_on_the_val_rows(run_files):
    config, metrics, rows = run_files
    positive = config["classes"][-1]
    y, score, _ = _split(rows, "val", positive)
    target = config["target_sensitivity"]
    th = metrics["thresholds"]
    assert th["chosen_on"] == "val"
    assert th["youden"] == pytest.approx(_youden(y, score), abs=1e-12)
    assert th["sensitivity_target"] == pytest.approx(_for_sensitivity(y, score, target),
                                                     abs=1e-12)
    # Chosen on test they would be others, so this test can tell the two apart.
    y_test, score_test, _ = _split(rows, "test", positive)
    assert (_youden(y_test, score_test), _for_sensitivity(y_test, score_test, target)) != (
        th["youden"], th["sensitivity_target"])


def test_test_operating_points_apply_the_val_thresholds_to_the_test_rows(run_files):
    config, metrics, rows = run_files
    positive = config["classes"][-1]
    y_val, score_val, _ = _split(rows, "val", positive)
    y, score, _ = _split(rows, "test", positive)
    chosen = {"youden": _youden(y_val, score_val),
              "sensitivity_target": _for_sensitivity(y_val, score_val,
                                                     config["target_sensitivity"])}
    points = metrics["test"]["operating_points"]
    assert set(points) == set(chosen)
    for name, threshold in chosen.items():
        sens, spec = _sens_spec(y, score >= threshold)
        assert points[name]["threshold"] == pytest.approx(threshold, abs=1e-12), name
        assert points[name]["sensitivity"] == pytest.approx(sens, abs=1e-12), name
        assert points[name]["specificity"] == pytest.approx(spec, abs=1e-12), name
