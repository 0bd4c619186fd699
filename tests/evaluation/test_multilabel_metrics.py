"""Multi-label figures (medtl.evaluation.multilabel): equal to scikit-learn's on the known
entries, blind to the unknown ones, thresholds chosen on validation only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special
from sklearn.metrics import average_precision_score, roc_auc_score
from statsmodels.stats.proportion import proportion_confint

from medtl.errors import MedtlError
from medtl.evaluation import multilabel as ml
from medtl.evaluation.stats import _weighted_auc, auc_ci_delong, youden_threshold

LABELS = ["effusion", "cardiomegaly", "edema", "nodule"]


def _data(n: int, seed: int, *, unknown: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Informative sigmoid scores (rounded, so with ties) and ~25 % unknown targets."""
    rng = np.random.default_rng(seed)
    k = len(LABELS)
    y = (rng.random((n, k)) < np.linspace(0.15, 0.5, k)).astype(float)
    p = np.round(special.expit(1.3 * (2 * y - 1) + rng.normal(size=(n, k))), 2)
    y[rng.random((n, k)) < unknown] = np.nan
    return y, p


def test_figures_equal_scikit_learn_on_the_known_entries():
    y, p = _data(200, 0)
    s = ml.multilabel_summary(y, p, LABELS, None, n_resamples=200)
    aucs, aps = [], []
    for j, name in enumerate(LABELS):
        known = ~np.isnan(y[:, j])
        auc = roc_auc_score(y[known, j], p[known, j])
        ap = average_precision_score(y[known, j], p[known, j])
        got = s["labels"][name]
        assert got["n_known"] == known.sum() and got["n_positive"] == y[known, j].sum()
        assert got["auc"] == pytest.approx(auc, abs=1e-12)
        assert got["average_precision"] == pytest.approx(ap, abs=1e-12)
        assert got["auc_ci95"] == pytest.approx(auc_ci_delong(y[known, j], p[known, j]))
        aucs.append(auc)
        aps.append(ap)
    known = ~np.isnan(y)
    assert s["macro_auc"] == s["auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert s["micro_auc"] == pytest.approx(roc_auc_score(y[known], p[known]), abs=1e-12)
    assert s["map"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert s["auc_ci95"] == s["macro_auc_ci95"]
    for key in ("macro_auc", "micro_auc", "map"):
        low, high = s[f"{key}_ci95"]
        assert low < s[key] < high, key
    assert set(s) == {"n", "auc", "auc_ci95", "macro_auc", "macro_auc_ci95", "micro_auc",
                      "micro_auc_ci95", "map", "map_ci95", "labels", "error_cooccurrence",
                      "thresholds"}
    assert s["thresholds"] == {"chosen_on": "default", **dict.fromkeys(LABELS, 0.5)}
    json.dumps(s, allow_nan=False)  # plain JSON values only


def test_unknown_entries_never_contribute():
    y, p = _data(150, 1)
    th = ml.label_thresholds(y, p, LABELS)
    base = ml.multilabel_summary(y, p, LABELS, th, n_resamples=300, seed=3)
    unknown = np.isnan(y)
    rng = np.random.default_rng(9)
    for fill in (rng.random(p.shape), np.full(p.shape, np.nan), 1.0 - p):
        other = np.where(unknown, fill, p)
        assert ml.label_thresholds(y, other, LABELS) == th
        assert ml.multilabel_summary(y, other, LABELS, th, n_resamples=300, seed=3) == base


def test_labels_without_both_classes_have_no_auc_and_leave_the_macro_mean():
    y, p = _data(120, 2)
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 0.0)  # no known positive
    y[:, 3] = np.nan  # nothing known
    s = ml.multilabel_summary(y, p, LABELS, None, n_resamples=100)
    for name in (LABELS[1], LABELS[3]):
        lab = s["labels"][name]
        assert lab["auc"] is None and lab["auc_ci95"] is None
        assert lab["average_precision"] is None and lab["sensitivity"] is None
    assert s["labels"][LABELS[3]]["specificity"] is None
    assert s["labels"][LABELS[1]]["specificity"] is not None
    kept = [s["labels"][n]["auc"] for n in (LABELS[0], LABELS[2])]
    assert s["macro_auc"] == pytest.approx(np.mean(kept))
    known = ~np.isnan(y)
    assert s["micro_auc"] == pytest.approx(roc_auc_score(y[known], p[known]))
    json.dumps(s, allow_nan=False)


def test_thresholds_are_chosen_on_validation_and_test_data_does_not_move_them():
    y_val, p_val = _data(120, 4)
    y_val[:, 2] = np.where(np.isnan(y_val[:, 2]), np.nan, 1.0)  # val lacks a negative
    th = ml.label_thresholds(y_val, p_val, LABELS)
    assert th["chosen_on"] == "val" and th["rule"] == "youden"
    assert th["fallback"] == [LABELS[2]] and th[LABELS[2]] == 0.5
    for j in (0, 1, 3):
        known = ~np.isnan(y_val[:, j])
        assert th[LABELS[j]] == youden_threshold(y_val[known, j], p_val[known, j])
    for seed in (5, 6):
        y_test, p_test = _data(100, seed)
        s = ml.multilabel_summary(y_test, p_test, LABELS, th, n_resamples=50)
        assert s["thresholds"] == th
        assert [s["labels"][n]["threshold"] for n in LABELS] == [th[n] for n in LABELS]
    with pytest.raises(MedtlError, match="no threshold for label"):
        ml.multilabel_summary(y_val, p_val, LABELS, {"chosen_on": "val"}, n_resamples=10)
    for crafted in ("0.5", None, True, float("nan")):
        with pytest.raises(MedtlError, match=f"label\\(s\\) {LABELS[0]} is not a finite"):
            ml.multilabel_summary(y_val, p_val, LABELS, {**th, LABELS[0]: crafted},
                                  n_resamples=10)


def test_decisions_at_the_thresholds_match_a_hand_count():
    nan = np.nan
    y = np.array([[1, 0], [1, 1], [0, nan], [0, 0], [1, 1], [nan, 0]], dtype=float)
    p = np.array([[0.9, 0.2], [0.3, 0.8], [0.6, 0.9], [0.1, 0.7], [0.7, 0.4], [0.99, 0.1]])
    th = {"chosen_on": "val", "a": 0.5, "b": 0.6}
    s = ml.multilabel_summary(y, p, ["a", "b"], th, n_resamples=20)
    a, b = s["labels"]["a"], s["labels"]["b"]
    # a, known rows 0-4: decisions 1,0,1,0,1 against 1,1,0,0,1 -> tp 2, fn 1, tn 1, fp 1.
    assert (a["sensitivity"], a["specificity"]) == (2 / 3, 1 / 2)
    assert (a["precision"], a["f1"]) == (2 / 3, 4 / 6)
    # b, known rows 0,1,3,4,5: decisions 0,1,1,0,0 against 0,1,0,1,0 -> tp 1, fn 1, tn 2, fp 1.
    assert (b["sensitivity"], b["specificity"]) == (1 / 2, 2 / 3)
    assert (b["precision"], b["f1"]) == (1 / 2, 2 / 4)
    assert a["sensitivity_ci95"] == pytest.approx(list(proportion_confint(2, 3,
                                                                          method="wilson")))
    assert b["specificity_ci95"] == pytest.approx(list(proportion_confint(2, 3,
                                                                          method="wilson")))
    # Wrong: a on rows 1, 2; b on rows 3, 4. Row 2's b is unknown, so never wrong.
    assert s["error_cooccurrence"] == {"labels": ["a", "b"], "counts": [[2, 0], [0, 2]]}
    p2 = p.copy()
    p2[1, 1] = 0.1  # row 1: now both labels wrong
    co = ml.multilabel_summary(y, p2, ["a", "b"], th, n_resamples=20)["error_cooccurrence"]
    assert co["counts"] == [[2, 1], [1, 3]]


def test_each_bootstrap_resample_equals_scikit_learn_on_the_resampled_rows():
    y, p = _data(90, 7)
    rng = np.random.default_rng(0)
    for _ in range(6):
        idx = rng.integers(0, len(y), len(y))
        w = np.bincount(idx, minlength=len(y)).astype(float)[None, :]
        yy, pp = y[idx], p[idx]
        for j in range(len(LABELS)):
            known, rk = ~np.isnan(y[:, j]), ~np.isnan(yy[:, j])
            rows = np.flatnonzero(known)
            ap = ml._ApPlan(rows, p[known, j], y[known, j] == 1)(w)
            assert ap[0] == pytest.approx(average_precision_score(yy[rk, j], pp[rk, j]),
                                          abs=1e-12)
            auc = ml._AucPlan(rows, p[known, j], y[known, j] == 1)(w)
            assert auc[0] == pytest.approx(_weighted_auc(p[known, j], y[known, j] == 1,
                                                         w[:, known])[0], abs=1e-12)
            assert auc[0] == pytest.approx(roc_auc_score(yy[rk, j], pp[rk, j]), abs=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_intervals_are_percentiles_of_scikit_learn_figures_on_the_same_resamples():
    y, p = _data(40, 10)
    y[:, 0] = np.nan
    y[:4, 0] = [1.0, 0.0, 0.0, 0.0]  # one known positive: absent from about a third of resamples
    n_res, seed = 60, 4
    s = ml.multilabel_summary(y, p, LABELS, None, n_resamples=n_res, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_res, len(y)))
    macro, micro, maps = [], [], []
    for rows in idx:
        yy, pp = y[rows], p[rows]
        aucs, aps = [], []
        for j in range(len(LABELS)):
            k = ~np.isnan(yy[:, j])
            if 0 < yy[k, j].sum() < k.sum():
                aucs.append(roc_auc_score(yy[k, j], pp[k, j]))
            if yy[k, j].sum() > 0:
                aps.append(average_precision_score(yy[k, j], pp[k, j]))
        k = ~np.isnan(yy)
        macro.append(np.mean(aucs))
        micro.append(roc_auc_score(yy[k], pp[k]))
        maps.append(np.mean(aps))
    for key, values in (("macro_auc", macro), ("micro_auc", micro), ("map", maps)):
        assert s[f"{key}_ci95"] == pytest.approx(list(np.percentile(values, [2.5, 97.5])),
                                                 abs=1e-12), key


def test_bootstrap_is_seeded_and_skips_a_label_missing_from_a_resample():
    y, p = _data(60, 8)
    y[:, 0] = np.nan
    y[:3, 0] = [1.0, 0.0, 0.0]  # one known positive: absent from about a third of resamples
    a = ml.multilabel_summary(y, p, LABELS, None, n_resamples=300, seed=1)
    assert a == ml.multilabel_summary(y, p, LABELS, None, n_resamples=300, seed=1)
    assert a["macro_auc_ci95"] != ml.multilabel_summary(y, p, LABELS, None, n_resamples=300,
                                                        seed=2)["macro_auc_ci95"]
    assert all(np.isfinite(a[f"{k}_ci95"]).all() for k in ("macro_auc", "micro_auc", "map"))


def test_bad_inputs_are_refused_with_a_reason():
    y, p = _data(20, 9)
    with pytest.raises(MedtlError, match="1 \\(present\\), 0"):
        ml.multilabel_summary(np.where(np.isnan(y), 2.0, y), p, LABELS, None)
    bad = p.copy()
    bad[~np.isnan(y)] = np.nan
    with pytest.raises(MedtlError, match="where a label is known"):
        ml.label_thresholds(y, bad, LABELS)
    with pytest.raises(MedtlError, match="label names"):
        ml.multilabel_summary(y, p, LABELS[:2], None)
