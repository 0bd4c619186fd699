"""Heads on frozen features: what they are fitted on, and how they reach the network
(issue 14, step 0).

- feature-extractor: the linear head standardises with the TRAINING features' mean and std.
- hybrid: the scikit-learn estimator kept is fitted on the training features only; validation
  only chooses its hyper-parameters (no train + validation leak).
- auto / gradual: the linear probe folded into the network's classifier predicts what the
  probe itself predicts, to float precision.
"""

from __future__ import annotations

import shutil

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline

import medtl

from .conftest import FAST


# ACCESSOR: adapt when the core is restructured
def frozen_features(clf: medtl.TransferClassifier, data) -> np.ndarray:
    """The frozen backbone features a fitted frozen-strategy classifier computes for ``data``."""
    return clf.model_.features(data)


# ACCESSOR: adapt when the core is restructured
def linear_head_standardisation(clf: medtl.TransferClassifier) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) the fitted linear head subtracts from and divides its features by."""
    return clf.model_.head.mean.numpy(), clf.model_.head.std.numpy()


# ACCESSOR: adapt when the core is restructured
def sklearn_estimator(clf: medtl.TransferClassifier):
    """The fitted scikit-learn estimator of a hybrid classifier."""
    return clf.model_.head.estimator_


# ACCESSOR: adapt when the core is restructured
def climb_stages(clf: medtl.TransferClassifier) -> list[dict]:
    """config.json's ``stages``: one dict per climb stage with ``stage`` and ``accepted``."""
    return clf.stages_


def test_linear_head_standardises_with_the_training_features_statistics(blob_splits):
    train, val, _ = blob_splits
    clf = medtl.TransferClassifier(strategy="feature-extractor", epochs=5,
                                   **FAST).fit(train, val)
    x = frozen_features(clf, train).astype(np.float64)
    mean, std = linear_head_standardisation(clf)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
    # Either estimator of the std (n or n - 1) is right; features (near-)constant on train keep
    # a scale of 1 instead of a tiny divisor, as scikit-learn's StandardScaler does.
    sd = x.std(0, ddof=1)
    live = sd > 1e-2 * sd.mean()
    assert live.sum() > 0.2 * len(sd)  # at 32 px most ReLU6 features are 0 on every image
    np.testing.assert_allclose(std[live], sd[live], rtol=0.05)
    assert np.all(std > 0) and np.all(np.isfinite(std))


def test_hybrid_head_is_fitted_on_the_training_features_only(blob_splits):
    train, val, test = blob_splits
    clf = medtl.TransferClassifier(strategy="hybrid", head="logreg", **FAST).fit(train, val)
    est = sklearn_estimator(clf)
    # Refit the chosen pipeline (same C, same class weights) on the training features alone.
    ref = clone(est).fit(frozen_features(clf, train), train.labels)
    assert isinstance(est, Pipeline)
    for (name, fitted), (_, refit) in zip(est.steps, ref.steps, strict=True):
        for attr in ("mean_", "scale_", "coef_", "intercept_"):
            if hasattr(refit, attr):
                np.testing.assert_allclose(getattr(fitted, attr), getattr(refit, attr),
                                           rtol=1e-6, atol=1e-9, err_msg=f"{name}.{attr}")
    np.testing.assert_allclose(clf.predict_proba(test),
                               ref.predict_proba(frozen_features(clf, test)), atol=1e-9)


def test_validation_labels_choose_the_hybrid_head_but_never_fit_it(blobs, blob_splits,
                                                                  tmp_path):
    """Other validation labels may change which C wins, never the model of a given C."""
    train, val, test = blob_splits
    relabelled = tmp_path / "relabelled"
    shutil.copytree(blobs, relabelled)
    rng = np.random.default_rng(0)
    for image in sorted((relabelled / "val").rglob("*.png")):
        other = relabelled / "val" / rng.choice(["bar", "disc"]) / image.name
        image.rename(other)
    val_b = medtl.load_dataset(relabelled).split("val")
    assert not np.array_equal(val_b.labels, val.labels)
    a = medtl.TransferClassifier(strategy="hybrid", head="logreg", **FAST).fit(train, val)
    b = medtl.TransferClassifier(strategy="hybrid", head="logreg", **FAST).fit(train, val_b)
    est_a, est_b = sklearn_estimator(a), sklearn_estimator(b)
    if est_a.get_params() != est_b.get_params():  # b chose another C: fit a's C as b would
        est_b = clone(est_a).fit(frozen_features(b, train), train.labels)
    np.testing.assert_allclose(a.predict_proba(test),
                               est_b.predict_proba(frozen_features(b, test)), atol=1e-9)


def test_linear_probe_is_folded_exactly_into_the_networks_classifier(blob_splits, monkeypatch):
    """The climb (``fine-tune --gradual``; ``auto`` when the linear head wins) starts with a
    linear probe on frozen features; folded into the network's classifier (standardisation
    included) it must predict what ``feature-extractor`` does. ``auto`` also tries the hybrid
    heads, and on these separable blobs a kNN's hard probabilities win on log-loss, so the
    climb that keeps the linear head is the one tested here."""
    train, val, test = blob_splits
    probe = medtl.TransferClassifier(strategy="feature-extractor", **FAST).fit(train, val)
    # Every later stage is rejected (on separable blobs a fine-tuned stage can win on
    # log-loss), so the network ends as the folded probe.
    monkeypatch.setattr("medtl.transfer.gradual.decide", lambda *a, **k: (False, "held"))
    climbed = medtl.TransferClassifier(strategy="fine-tune", gradual=True, unfreeze=1,
                                       epochs=1, **FAST).fit(train, val)
    stages = climb_stages(climbed)
    assert stages[0]["accepted"] and stages[0]["val_auc"] == 1.0
    assert not any(s["accepted"] for s in stages[1:]), stages
    p_probe, p_net = probe.predict_proba(test), climbed.predict_proba(test)
    assert p_probe.std() > 0.05  # not a constant predictor that would hide any mistake
    # Two float32 paths (the network on pixels, the probe on cached ONNX features): ~1e-5.
    np.testing.assert_allclose(p_net, p_probe, atol=3e-5)
