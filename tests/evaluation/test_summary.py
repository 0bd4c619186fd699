"""metrics.json split entries: CIs, operating points chosen on val, per class, per patient."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from medtl.evaluation.metrics import classification_metrics
from medtl.evaluation.summary import choose_thresholds, per_class_metrics, split_summary


def _binary(n: int, seed: int, shift: float = 1.2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = 1 / (1 + np.exp(-(rng.normal(size=n) + shift * (2 * y - 1))))
    return y, np.stack([1 - score, score], axis=1)


def _multiclass(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_binary_entry_has_cis_that_cover_the_point_estimates():
    y, p = _binary(300, 0)
    m = split_summary(y, p, classes=["neg", "pos"], positive=1)
    for name in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1"):
        low, high = m[f"{name}_ci95"]
        assert low <= m[name] <= high, name
        assert high - low > 0.01, name  # 300 images leave real uncertainty
    low, high = m["auc_ci95_delong"]
    assert low < m["auc"] < high
    assert m["calibration"]["brier"] == pytest.approx(skm.brier_score_loss(y, p[:, 1]))


def test_operating_points_apply_the_validation_thresholds_to_test():
    yv, pv = _binary(200, 1)
    yt, pt = _binary(400, 2, shift=0.8)  # a harder test set: its own best threshold differs
    th = choose_thresholds(yv, pv, positive=1, target_sensitivity=0.9)
    fpr, tpr, thr = skm.roc_curve(yv, pv[:, 1], drop_intermediate=False)
    assert th["youden"] == thr[np.argmax(tpr - fpr)]
    assert th["sensitivity_target"] == thr[np.argmax(tpr >= 0.9)]
    m = split_summary(yt, pt, classes=["a", "b"], positive=1, thresholds=th)
    for name in ("youden", "sensitivity_target"):
        op = m["operating_points"][name]
        pred = (pt[:, 1] >= th[name]).astype(int)
        assert op["threshold"] == th[name]
        assert op["sensitivity"] == pytest.approx(skm.recall_score(yt, pred))
        assert op["specificity"] == pytest.approx(skm.recall_score(yt, pred, pos_label=0))
    # The target is met on validation by construction, not necessarily on test.
    assert m["operating_points"]["sensitivity_target"]["sensitivity"] != pytest.approx(0.9,
                                                                                       abs=1e-9)


def test_no_thresholds_for_multiclass_or_a_one_class_validation():
    y, p = _multiclass(90, 3, 0)
    assert choose_thresholds(y, p, positive=None) is None
    yb, pb = _binary(50, 0)
    assert choose_thresholds(np.ones_like(yb), pb, positive=1) is None


def test_multiclass_auc_per_class_and_weighted_match_sklearn():
    y, p = _multiclass(400, 4, 3)
    m = split_summary(y, p, classes=list("abcd"), n_resamples=200)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    assert m["auc_weighted"] == pytest.approx(
        skm.roc_auc_score(y, p, multi_class="ovr", average="weighted"))
    pred = p.argmax(axis=1)
    f1 = skm.f1_score(y, pred, average=None)
    recall = skm.recall_score(y, pred, average=None)
    for c, name in enumerate("abcd"):
        entry = m["per_class"][name]
        assert entry["auc"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
        assert entry["f1"] == pytest.approx(f1[c])
        assert entry["sensitivity"] == pytest.approx(recall[c])
        assert entry["specificity"] == pytest.approx(
            skm.recall_score(y != c, pred != c))
    assert "operating_points" not in m


def test_a_class_missing_from_the_labels_does_not_make_auc_nan():
    y, p = _multiclass(200, 3, 4)
    y[y == 2] = 0  # class 2 never occurs in this (small) test split
    m = classification_metrics(y, p)
    assert m["auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, p[:, c])
                                              for c in (0, 1)]))
    assert per_class_metrics(y, p, list("abc"))["c"]["auc"] is None


def test_per_patient_scores_each_patient_by_their_mean_probability():
    y_pat, p_pat = _binary(60, 5)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4, len(y_pat))
    patients = [f"p{i}" for i, s in enumerate(sizes) for _ in range(s)]
    y = np.repeat(y_pat, sizes)
    noise = rng.normal(0, 0.05, (len(y), 1))
    p_img = np.clip(np.repeat(p_pat, sizes, axis=0) + np.hstack([-noise, noise]), 0, 1)
    m = split_summary(y, p_img, classes=["a", "b"], positive=1, patients=patients)
    pp = m["per_patient"]
    mean_p = np.array([p_img[[i for i, q in enumerate(patients) if q == f"p{k}"]].mean(axis=0)
                       for k in range(len(y_pat))])
    assert pp["n"] == len(y_pat)
    assert pp["auc"] == pytest.approx(skm.roc_auc_score(y_pat, mean_p[:, 1]))
    assert pp["accuracy"] == pytest.approx(skm.accuracy_score(y_pat, mean_p.argmax(axis=1)))
    assert pp["mixed_label_patients_left_out"] == 0


def test_per_patient_is_absent_without_patients_or_with_one_image_each():
    y, p = _binary(40, 6)
    assert "per_patient" not in split_summary(y, p, classes=["a", "b"], positive=1)
    one_each = [f"p{i}" for i in range(40)]
    assert "per_patient" not in split_summary(y, p, classes=["a", "b"], positive=1,
                                              patients=one_each)


def test_a_patient_with_two_labels_is_left_out_and_counted():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    p = np.tile([[0.4, 0.6]], (8, 1))
    patients = ["a", "a", "b", "b", "c", "c", "d", "e"]  # c has one normal and one abnormal
    pp = split_summary(y, p, classes=["n", "y"], positive=1, patients=patients,
                       n_resamples=0)["per_patient"]
    assert pp["n"] == 4
    assert pp["mixed_label_patients_left_out"] == 1
