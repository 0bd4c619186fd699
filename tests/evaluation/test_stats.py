from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats
from sklearn import metrics as skm

from medtl.errors import MedtlError
from medtl.evaluation import stats as st
from medtl.evaluation.metrics import classification_metrics


def _binary_data(n: int, seed: int, *, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Informative but imperfect binary scores; about 60 % positives."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(np.int64)
    logit = 1.2 * (2 * y - 1) + rng.normal(size=n)
    if ties:
        logit = np.round(logit)  # few distinct values, so many ties
    p1 = special.expit(logit)
    return y, np.stack([1 - p1, p1], axis=1)


def _multiclass_data(n: int, seed: int, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    return y, special.softmax(logits, axis=1)


# --------------------------------------------------------------------------------------------
# Bootstrap


@pytest.mark.parametrize(
    ("data", "positive"),
    [
        (_binary_data(150, 1), None),
        (_binary_data(150, 2), 0),
        (_binary_data(120, 3, ties=True), None),
        (_multiclass_data(150, 4), None),
        # Degenerate: one class only, and a multi-class problem with a class absent.
        ((np.ones(30, dtype=np.int64), _binary_data(30, 5)[1]), None),
        ((_multiclass_data(60, 6)[0] % 2, _multiclass_data(60, 6)[1]), None),
    ],
)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_vectorised_resample_metrics_equal_classification_metrics(data, positive):
    y, proba = data
    rng = np.random.default_rng(7)
    idx = st._stratified_indices(y, 25, rng)
    got = st._resampled_metrics(y, proba, idx, positive, list(st.BOOTSTRAP_METRICS))
    for b in range(len(idx)):
        want = classification_metrics(y[idx[b]], proba[idx[b]], positive=positive)
        for name in st.BOOTSTRAP_METRICS:
            expected = np.nan if want[name] is None else want[name]
            np.testing.assert_allclose(got[name][b], expected, rtol=1e-12, err_msg=name)


def test_resamples_are_stratified():
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    idx = st._stratified_indices(y, 50, np.random.default_rng(0))
    for row in idx:
        assert np.bincount(y[row], minlength=3).tolist() == [7, 3, 5]
    # Resampling with replacement: some rows must repeat an image.
    assert any(len(np.unique(row)) < len(row) for row in idx)


def test_bootstrap_ci_contains_point_and_narrows_with_more_images():
    y, proba = _binary_data(300, 10)
    point = classification_metrics(y, proba)
    ci = st.bootstrap_ci(y, proba, n_resamples=1000)
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        low, high = ci[name]
        assert low < point[name] < high, name

    y4, proba4 = _binary_data(1200, 11)
    ci4 = st.bootstrap_ci(y4, proba4, n_resamples=1000)
    for name in ("auc", "accuracy"):
        width, width4 = np.diff(ci[name])[0], np.diff(ci4[name])[0]
        # Width scales as 1/sqrt(n): about half with 4x the images.
        assert 0.3 < width4 / width < 0.75, name


def test_bootstrap_ci_is_the_percentile_interval_of_the_resamples():
    y, proba = _binary_data(200, 15)
    ci = st.bootstrap_ci(y, proba, n_resamples=400, seed=3, level=0.9)
    idx = st._stratified_indices(y, 400, np.random.default_rng(3))
    values = st._resampled_metrics(y, proba, idx, None, ["auc", "f1"])
    for name in ("auc", "f1"):
        assert ci[name] == pytest.approx(np.percentile(values[name], [5, 95]), abs=1e-12)


def test_bootstrap_ci_is_reproducible_by_seed():
    y, proba = _multiclass_data(200, 12)
    a = st.bootstrap_ci(y, proba, n_resamples=300, seed=5)
    b = st.bootstrap_ci(y, proba, n_resamples=300, seed=5)
    c = st.bootstrap_ci(y, proba, n_resamples=300, seed=6)
    assert a == b
    assert a["auc"] != c["auc"]
    assert set(a) == {"auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1"}


def test_bootstrap_ci_level_and_undefined_metrics():
    y, proba = _binary_data(200, 13)
    wide = st.bootstrap_ci(y, proba, n_resamples=500, level=0.99, metrics=("auc",))["auc"]
    narrow = st.bootstrap_ci(y, proba, n_resamples=500, level=0.5, metrics=("auc",))["auc"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]

    # Only positives: AUC and specificity are undefined, sensitivity is not.
    ones = np.ones(20, dtype=np.int64)
    p = np.random.default_rng(0).random(20)
    ci = st.bootstrap_ci(ones, np.stack([1 - p, p], 1), n_resamples=50)
    assert ci["auc"] is None and ci["specificity"] is None
    assert ci["sensitivity"] is not None

    with pytest.raises(MedtlError, match="unknown metric"):
        st.bootstrap_ci(y, proba, metrics=("auroc",))
    with pytest.raises(MedtlError):
        st.bootstrap_ci(y, proba[:-1])


def test_bootstrap_ci_many_blocks_matches_layout(monkeypatch):
    # Resamples processed in several memory blocks must still give n_resamples values.
    y, proba = _binary_data(100, 14)
    seen = []
    real = st._resampled_metrics

    def spy(*args):
        out = real(*args)
        seen.append(len(out["auc"]))
        return out

    monkeypatch.setattr(st, "_BLOCK_CELLS", 100 * 64)
    monkeypatch.setattr(st, "_resampled_metrics", spy)
    st.bootstrap_ci(y, proba, n_resamples=200, metrics=("auc",))
    assert seen == [64, 64, 64, 8]


# --------------------------------------------------------------------------------------------
# DeLong


def _delong_reference(y, a, b):
    """Direct O(m n) DeLong (1988) from the structural components."""
    scores = np.stack([a, b])
    x, z = scores[:, y == 1], scores[:, y == 0]
    m, n = x.shape[1], z.shape[1]
    psi = (x[:, :, None] > z[:, None, :]) + 0.5 * (x[:, :, None] == z[:, None, :])
    auc = psi.mean(axis=(1, 2))
    v10 = psi.mean(axis=2)  # (2, m): each positive against all negatives
    v01 = psi.mean(axis=1)  # (2, n): each negative against all positives
    s10 = np.cov(v10)
    s01 = np.cov(v01)
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    z_stat = (auc[0] - auc[1]) / np.sqrt(var)
    p = 2 * stats.norm.sf(abs(z_stat))
    return auc, var, z_stat, p, s10 / m + s01 / n


@pytest.mark.parametrize("seed", range(5))
def test_delong_matches_direct_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 200))
    y = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(np.int64)
    a = y * rng.uniform(0.5, 2) + rng.normal(size=n)
    b = 0.6 * a + y * rng.uniform(0, 1) + rng.normal(size=n)  # correlated with a
    if seed % 2:
        a, b = np.round(a * 2), np.round(b)  # integer-valued: many ties
    auc, var, z, p, cov = _delong_reference(y, a, b)
    got = st.delong_test(y, a, b)
    assert got["auc_a"] == pytest.approx(auc[0], abs=1e-10)
    assert got["auc_b"] == pytest.approx(auc[1], abs=1e-10)
    assert got["auc_a"] == pytest.approx(skm.roc_auc_score(y, a), abs=1e-10)
    assert got["auc_b"] == pytest.approx(skm.roc_auc_score(y, b), abs=1e-10)
    assert got["difference"] == pytest.approx(auc[0] - auc[1], abs=1e-10)
    assert got["variance"] == pytest.approx(var, abs=1e-10)
    assert got["z"] == pytest.approx(z, abs=1e-10)
    assert got["p_value"] == pytest.approx(p, abs=1e-10)
    np.testing.assert_allclose(got["covariance"], cov, atol=1e-10)

    auc_a, var_a = st.delong_variance(y, a)
    assert auc_a == pytest.approx(auc[0], abs=1e-10)
    assert var_a == pytest.approx(cov[0, 0], abs=1e-10)


def test_delong_identical_scores_and_clear_difference():
    y, proba = _binary_data(200, 20)
    s = proba[:, 1]
    same = st.delong_test(y, s, s)
    assert same["difference"] == 0 and same["variance"] == 0
    assert same["z"] == 0 and same["p_value"] == 1.0
    # Same ranking on another scale is the same ROC curve.
    assert st.delong_test(y, s, 10 * s - 3)["p_value"] == 1.0

    noise = np.random.default_rng(0).random(200)
    clear = st.delong_test(y, s, noise)
    assert clear["difference"] > 0.2 and clear["p_value"] < 1e-6


def test_delong_rejects_bad_labels():
    with pytest.raises(MedtlError):
        st.delong_test([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(MedtlError):
        st.delong_variance([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(MedtlError):
        st.delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4])


def test_auc_ci_delong_covers_and_clips():
    y, proba = _binary_data(300, 21)
    auc, var = st.delong_variance(y, proba[:, 1])
    low, high = st.auc_ci_delong(y, proba[:, 1])
    assert low < auc < high
    assert high - low == pytest.approx(2 * 1.959963984540054 * np.sqrt(var))

    # Nearly perfect separation: the interval would pass 1 without the clip.
    y2 = np.array([0] * 10 + [1] * 10)
    s2 = np.arange(20.0)
    s2[[9, 10]] = s2[[10, 9]]
    low2, high2 = st.auc_ci_delong(y2, s2)
    assert high2 == 1.0 and low2 < 0.99


# --------------------------------------------------------------------------------------------
# Operating points


def test_youden_threshold_known_by_construction():
    # Negatives at 0..9 and 12; positives at 10..19 and 3. Threshold 10 gives sens 10/11 and
    # spec 10/11; any other observed score is worse.
    neg = np.r_[np.arange(10.0), 12.0]
    pos = np.r_[np.arange(10.0, 20.0), 3.0]
    y = np.r_[np.zeros(11), np.ones(11)].astype(np.int64)
    s = np.r_[neg, pos]
    assert st.youden_threshold(y, s) == 10.0
    op = st.operating_point(y, s, 10.0)
    assert op["sensitivity"] == pytest.approx(10 / 11)
    assert op["specificity"] == pytest.approx(10 / 11)
    assert op["ppv"] == pytest.approx(10 / 11)
    assert op["npv"] == pytest.approx(10 / 11)
    assert (op["tp"], op["fp"], op["tn"], op["fn"]) == (10, 1, 10, 1)


def test_youden_threshold_ties_go_to_the_highest():
    # J is 1/2 at thresholds 4 and 2 (and 0 at 3 and 1).
    assert st.youden_threshold([0, 1, 0, 1], [1.0, 2.0, 3.0, 4.0]) == 4.0


@pytest.mark.parametrize("seed", range(30, 38))
def test_youden_threshold_matches_brute_force(seed):
    y, proba = _binary_data(300, seed, ties=seed % 2 == 1)
    s = proba[:, 1]
    candidates = np.unique(s)
    j = np.array([_j(y, s, t) for t in candidates])
    # Highest of the (near-)maximal thresholds: the most specific of equally good ones.
    want = candidates[np.flatnonzero(j >= j.max() - 1e-12)].max()
    assert st.youden_threshold(y, s) == want


def _j(y, s, t):
    pred = s >= t
    return pred[y == 1].mean() + (~pred[y == 0]).mean() - 1


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity_is_highest_reaching_target(target):
    y, proba = _binary_data(300, 31, ties=True)
    s = proba[:, 1]
    t = st.threshold_for_sensitivity(y, s, target)
    assert st.operating_point(y, s, t)["sensitivity"] >= target
    higher = np.unique(s[s > t])
    assert all(st.operating_point(y, s, h)["sensitivity"] < target for h in higher)


def test_threshold_for_sensitivity_exact_fraction():
    # 9 of 10 positives is exactly 0.9: must not be pushed to 10 of 10 by rounding.
    y = np.r_[np.zeros(5), np.ones(10)].astype(np.int64)
    s = np.r_[np.arange(5.0), np.arange(10.0, 20.0)]
    assert st.threshold_for_sensitivity(y, s, 0.9) == 11.0
    with pytest.raises(MedtlError):
        st.threshold_for_sensitivity(y, s, 0.0)


def test_operating_point_undefined_ratios_are_none():
    op = st.operating_point([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], 0.9)
    assert op["ppv"] is None and op["sensitivity"] == 0.0 and op["npv"] == 0.5


# --------------------------------------------------------------------------------------------
# Calibration


def _calibrated(n: int, seed: int, k: int = 3, scale: float = 1.5):
    """Labels drawn from softmax(logits): those probabilities are calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(n, k))
    proba = special.softmax(logits, axis=1)
    u = rng.random(n)[:, None]
    y = (u > np.cumsum(proba, axis=1)).sum(axis=1)
    return logits, proba, np.minimum(y, k - 1)


def _nll(y, proba):
    return -np.mean(np.log(proba[np.arange(len(y)), y]))


def test_ece_small_when_calibrated_large_when_overconfident():
    rng = np.random.default_rng(40)
    p1 = rng.random(50_000)
    y = (rng.random(50_000) < p1).astype(np.int64)
    calibrated = np.stack([1 - p1, p1], 1)
    sharp = special.expit(4 * special.logit(np.clip(p1, 1e-9, 1 - 1e-9)))
    overconfident = np.stack([1 - sharp, sharp], 1)
    assert st.expected_calibration_error(y, calibrated) < 0.01
    assert st.expected_calibration_error(y, overconfident) > 0.1

    logits, proba, y3 = _calibrated(30_000, 41)
    assert st.expected_calibration_error(y3, proba) < 0.015
    assert st.expected_calibration_error(y3, special.softmax(4 * logits, axis=1)) > 0.1


def test_ece_equals_hand_computation():
    y = np.array([1, 0, 1, 1])
    p1 = np.array([0.95, 0.85, 0.65, 0.52])  # top-label confidences, as all are >= 0.5
    proba = np.stack([1 - p1, p1], 1)
    # Two bins of width 0.5: (0.5, 1] holds all; accuracy 3/4, mean confidence 0.7425.
    assert st.expected_calibration_error(y, proba, n_bins=2) == pytest.approx(0.75 - 0.7425)
    # Ten bins, one image in each of four: 0.95 right, 0.85 wrong, 0.65 right, 0.52 right.
    want = (0.05 + 0.85 + 0.35 + 0.48) / 4
    assert st.expected_calibration_error(y, proba, n_bins=10) == pytest.approx(want)
    # A confidence on an edge belongs to the bin it closes: 0.5 is in (0.4, 0.5].
    on_edge = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert st.reliability_curve([1, 1], on_edge, n_bins=10)["counts"][4] == 1
    assert st.reliability_curve([1, 1], on_edge, n_bins=4)["counts"] == [0, 1, 1, 0]


def test_temperature_scaling_fixes_overconfidence():
    logits, _, y = _calibrated(20_000, 42)
    over = 4 * logits
    fit, test = slice(0, 10_000), slice(10_000, None)
    raw = special.softmax(over[test], axis=1)

    scaler = st.TemperatureScaler().fit(over[fit], y[fit])
    assert scaler.temperature_ == pytest.approx(4, rel=0.15)
    scaled = scaler.transform(over[test])
    assert st.expected_calibration_error(y[test], scaled) < st.expected_calibration_error(
        y[test], raw
    )
    assert _nll(y[test], scaled) < _nll(y[test], raw)
    assert np.array_equal(scaled.argmax(1), raw.argmax(1))

    # Log-probabilities work as logits.
    from_proba = st.TemperatureScaler().fit(st.logits_from_proba(raw), y[test])
    assert from_proba.temperature_ == pytest.approx(scaler.temperature_, rel=0.15)


def test_temperature_scaler_needs_fit_and_valid_input():
    with pytest.raises(MedtlError, match="not fitted"):
        st.TemperatureScaler().transform(np.zeros((2, 2)))
    with pytest.raises(MedtlError):
        st.TemperatureScaler().fit(np.zeros((3, 2)), [0, 1])


def test_logits_from_proba_round_trips_through_softmax():
    _, proba, _ = _calibrated(100, 43)
    np.testing.assert_allclose(special.softmax(st.logits_from_proba(proba), axis=1), proba)
    assert np.isfinite(st.logits_from_proba(np.array([[0.0, 1.0]]))).all()


def test_brier_binary_matches_sklearn_and_multiclass_sum():
    y, proba = _binary_data(300, 50)
    assert st.brier_score(y, proba) == pytest.approx(skm.brier_score_loss(y, proba[:, 1]))
    assert st.brier_score(y, proba[:, 1]) == pytest.approx(skm.brier_score_loss(y, proba[:, 1]))

    y3 = np.array([0, 1, 2])
    p3 = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
    want = (0.0 + (0.25 + 0.25) + (0.04 + 0.04 + 0.16)) / 3
    assert st.brier_score(y3, p3) == pytest.approx(want)


def test_reliability_curve_bins():
    y = np.array([1, 0, 1, 1])
    p1 = np.array([0.95, 0.85, 0.6, 0.55])
    curve = st.reliability_curve(y, np.stack([1 - p1, p1], 1), n_bins=4)
    assert curve["bin_centres"] == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert curve["counts"] == [0, 0, 2, 2]
    assert curve["mean_confidence"][:2] == [None, None]
    assert curve["mean_confidence"][2:] == pytest.approx([0.575, 0.9])
    assert curve["accuracy"][2:] == pytest.approx([1.0, 0.5])
    assert len(curve["bin_edges"]) == 5
