"""The prototype (nearest class mean) head: the few-shot baseline of medtl curve."""

from __future__ import annotations

import numpy as np
import torch

from medtl.transfer.heads import PrototypeClassifier, SklearnHead


def _blobs(rng, n: int, k: int, shift: float = 3.0):
    y = np.arange(n) % k
    x = rng.normal(size=(n, 6))
    x[:, 0] += shift * y
    x[:, 1] *= 50.0  # a feature on another scale: standardising keeps it from dominating
    return x, y


def test_probabilities_are_a_softmax_over_distances_to_the_class_means():
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 30, 3)
    clf = PrototypeClassifier().fit(x, y)
    means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
    np.testing.assert_allclose(clf.centroids_, means)
    d2 = ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
    t = d2[np.arange(30), y].mean()
    want = np.exp(-d2 / t) / np.exp(-d2 / t).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(clf.predict_proba(x), want, rtol=1e-9)
    assert (clf.predict(x) == d2.argmin(axis=1)).all()


def test_the_head_is_blind_to_class_imbalance():
    # 50 images of one class and 5 of the other: a class mean does not move with the count,
    # so a point halfway between the means is an even call.
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (50, 4)), rng.normal(4, 1, (5, 4))
    clf = PrototypeClassifier().fit(np.vstack([a, b]), np.r_[np.zeros(50), np.ones(5)])
    middle = clf.centroids_.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(clf.predict_proba(middle), [[0.5, 0.5]], atol=1e-9)


def test_the_fitted_head_folds_into_one_linear_layer():
    rng = np.random.default_rng(2)
    for k in (2, 4):
        x, y = _blobs(rng, 40, k)
        xv, yv = _blobs(rng, 20, k)
        head = SklearnHead("prototype").fit(x, y, xv, yv)
        linear = head.as_linear()
        got = torch.softmax(linear(torch.from_numpy(xv).float()), dim=1).numpy()
        np.testing.assert_allclose(got, head.predict_proba(xv), atol=1e-5)
        assert head.n_parameters == k * 6
