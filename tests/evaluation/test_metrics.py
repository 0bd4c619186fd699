import numpy as np
import pytest
from sklearn import metrics as skm

from medtl.evaluation.metrics import classification_metrics


def test_binary_metrics_match_sklearn_and_hand_counts():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    proba = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, proba)
    pred = proba.argmax(1)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    assert m["sensitivity"] == pytest.approx(tp / (y == 1).sum())
    assert m["specificity"] == pytest.approx(tn / (y == 0).sum())
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["n"] == 200


def test_positive_class_can_be_the_first():
    y = np.array([0, 0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    m1 = classification_metrics(y, proba)
    m0 = classification_metrics(y, proba, positive=0)
    assert m0["sensitivity"] == m1["specificity"]
    assert m0["specificity"] == m1["sensitivity"]


def test_multiclass_macro_and_single_class_auc_undefined():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 30)
    proba = rng.dirichlet(np.ones(3), 90)
    proba[np.arange(90), y] += 1
    proba /= proba.sum(1, keepdims=True)
    m = classification_metrics(y, proba)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr"))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, proba.argmax(1),
                                                              average="macro"))
    assert classification_metrics(np.zeros(4, int), np.full((4, 2), 0.5))["auc"] is None
