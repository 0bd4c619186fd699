"""Uncertainty, comparison, operating points and calibration for a model's test-set output.

- ``bootstrap_ci``: stratified bootstrap percentile intervals for the metrics.json figures.
- ``delong_test``, ``delong_variance``, ``auc_ci_delong``: DeLong et al. (1988) for one ROC AUC or
  two correlated ones, computed with the midrank algorithm of Sun & Xu (2014).
- ``mcnemar_test``: McNemar's paired test of two classifiers' decisions (right or wrong) on the
  same images, for any number of classes.
- ``youden_threshold``, ``threshold_for_sensitivity``, ``operating_point``: binary thresholds,
  where a case is called positive when ``score >= threshold``.
- ``expected_calibration_error``, ``brier_score``, ``reliability_curve``, ``TemperatureScaler``.

Binary functions that take a ``score`` expect labels 0/1 with 1 the positive class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import stats

from medtl.errors import MedtlError
from medtl.evaluation.metrics import classification_metrics, confusion_counts

# Calibration is fitted at training time (transfer), so it lives below; re-exported here.
from medtl.training.calibration import TemperatureScaler, logits_from_proba  # noqa: F401

BOOTSTRAP_METRICS = (
    "auc",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
)

# Resamples are processed in blocks of about this many (resample, image) cells, to bound memory.
_BLOCK_CELLS = 2_000_000


# --------------------------------------------------------------------------------------------
# Input checks


def _labels_proba(y_true: Any, proba: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:
        # A single column is read as the probability of class 1 of a binary problem.
        p = np.stack([1.0 - p, p], axis=1)
    if y.ndim != 1 or p.ndim != 2:
        raise MedtlError("labels must be 1-D and probabilities 2-D (n_images, n_classes)")
    if len(y) != len(p):
        raise MedtlError(f"{len(y)} labels but {len(p)} rows of probabilities")
    if len(y) == 0:
        raise MedtlError("no images to evaluate")
    if p.shape[1] < 2:
        raise MedtlError("probabilities need at least two classes (columns)")
    if not np.all(np.isfinite(p)):
        raise MedtlError("probabilities contain NaN or infinite values")
    integral = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
    if not integral and not np.all(np.mod(y, 1) == 0):
        raise MedtlError("labels must be integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise MedtlError(f"labels must lie in 0..{p.shape[1] - 1} for {p.shape[1]} classes")
    return y, p


def _binary_labels_score(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise MedtlError("labels and scores must be 1-D")
    if len(y) != len(s):
        raise MedtlError(f"{len(y)} labels but {len(s)} scores")
    if not np.all(np.isfinite(s)):
        raise MedtlError("scores contain NaN or infinite values")
    if not np.all(np.isin(y, [0, 1])):
        raise MedtlError("binary labels must be 0 (negative) or 1 (positive)")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise MedtlError("labels hold a single class; both positives and negatives are needed")
    return y, s


# --------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_ci(
    y_true: Any,
    proba: Any,
    *,
    positive: int | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    metrics: Iterable[str] = ("auc", "accuracy", "balanced_accuracy", "sensitivity",
                              "specificity", "f1"),
) -> dict[str, list[float] | None]:
    """Stratified bootstrap percentile intervals ``{metric: [low, high]}`` of the test figures.

    Each resample draws, with replacement, as many images of every true class as the test set
    holds, so class sizes (and hence prevalence) stay fixed. Metrics are the figures of
    ``classification_metrics``, computed in a vectorised form that gives the same values.
    An interval is ``None`` where the metric is undefined on the original data; resamples in
    which a metric is undefined (e.g. precision with no predicted positives) are left out.
    """
    y, p = _labels_proba(y_true, proba)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in BOOTSTRAP_METRICS]
    if unknown:
        raise MedtlError(
            f"unknown metric(s) {', '.join(unknown)}; choose from: {', '.join(BOOTSTRAP_METRICS)}"
        )
    if n_resamples < 1:
        raise MedtlError("n_resamples must be at least 1")
    if not 0.0 < level < 1.0:
        raise MedtlError("level must lie strictly between 0 and 1")
    if p.shape[1] == 2 and positive not in (None, 0, 1):
        raise MedtlError("positive must be 0 or 1 for a binary problem")

    point = classification_metrics(y, p, positive=positive)
    defined = [m for m in names if point[m] is not None]
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // len(y))
    chunks: dict[str, list[np.ndarray]] = {m: [] for m in defined}
    done = 0
    while done < n_resamples and defined:
        b = min(block, n_resamples - done)
        idx = _stratified_indices(y, b, rng)
        for name, values in _resampled_metrics(y, p, idx, positive, defined).items():
            chunks[name].append(values)
        done += b

    return {name: _percentile_interval(chunks.get(name), level) for name in names}


def _percentile_interval(chunks: list[np.ndarray] | None, level: float) -> list[float] | None:
    """[low, high] of the finite resampled values; None when there are none."""
    if chunks is None:
        return None
    values = np.concatenate(chunks)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = (1.0 - level) / 2.0
    low, high = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return [float(low), float(high)]


def _stratified_indices(y: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) image indices, resampled with replacement within each true class."""
    idx = np.empty((n_resamples, len(y)), dtype=np.int64)
    start = 0
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        k = len(members)
        idx[:, start : start + k] = members[rng.integers(0, k, size=(n_resamples, k))]
        start += k
    return idx


def _resampled_metrics(
    y: np.ndarray, p: np.ndarray, idx: np.ndarray, positive: int | None, names: list[str]
) -> dict[str, np.ndarray]:
    """Each metric of ``classification_metrics`` for every resample (row of ``idx``) at once.

    Undefined values (a ``None`` there) are NaN here.
    """
    n_res, n = idx.shape
    k = p.shape[1]
    # How many times each image appears in each resample; every figure is a weighted sum.
    weights = (
        np.bincount((idx + np.arange(n_res)[:, None] * n).ravel(), minlength=n_res * n)
        .reshape(n_res, n)
        .astype(np.float64)
    )

    out: dict[str, np.ndarray] = {}
    if "auc" in names:
        if k == 2:
            out["auc"] = _weighted_auc(p[:, 1], y == 1, weights)
        else:
            # Over the classes the labels hold, as metrics' AUC does; stratified resamples keep
            # the same classes present.
            per_class = [_weighted_auc(p[:, c], y == c, weights) for c in np.unique(y)]
            out["auc"] = np.mean(per_class, axis=0)

    cell = y * k + p.argmax(axis=1)
    onehot = np.zeros((n, k * k))
    onehot[np.arange(n), cell] = 1.0
    cm = (weights @ onehot).reshape(n_res, k, k)
    diag = np.einsum("bii->bi", cm)
    support = cm.sum(axis=2)
    total = support.sum(axis=1)
    out["accuracy"] = diag.sum(axis=1) / total
    present = support[0] > 0  # class sizes are the same in every stratified resample
    out["balanced_accuracy"] = np.mean(diag[:, present] / support[:, present], axis=1)

    if k == 2:
        pos = 1 if positive is None else positive
        tp, fn, tn, fp = confusion_counts(cm, pos)
        out["sensitivity"] = _div(tp, tp + fn)
        out["specificity"] = _div(tn, tn + fp)
        out["precision"] = _div(tp, tp + fp)
        out["f1"] = _div(2 * tp, 2 * tp + fp + fn)
    else:
        fn = support - diag
        fp = cm.sum(axis=1) - diag
        tn = total[:, None] - diag - fn - fp
        out["sensitivity"] = _mean_div(diag, diag + fn)
        out["specificity"] = _mean_div(tn, tn + fp)
        out["precision"] = _mean_div(diag, diag + fp)
        out["f1"] = _mean_div(2 * diag, 2 * diag + fp + fn)
    return {name: out[name] for name in names}


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, np.nan)


def _mean_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # Macro mean over the classes whose denominator is non-zero, as metrics._mean_ratio does.
    ok = den > 0
    ratio = np.where(ok, num / np.where(ok, den, 1.0), 0.0)
    count = ok.sum(axis=1)
    return np.where(count > 0, ratio.sum(axis=1) / np.maximum(count, 1), np.nan)


def _weighted_auc(score: np.ndarray, is_pos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) per row of image multiplicities ``weights``."""
    pos = np.flatnonzero(is_pos)
    neg = np.flatnonzero(~is_pos)
    order = neg[np.argsort(score[neg], kind="stable")]
    neg_sorted = score[order]
    # Weighted count of negatives below each score: a cumulative sum over the sorted negatives.
    cum = np.zeros((weights.shape[0], len(order) + 1))
    np.cumsum(weights[:, order], axis=1, out=cum[:, 1:])
    below = cum[:, np.searchsorted(neg_sorted, score[pos], side="left")]
    up_to = cum[:, np.searchsorted(neg_sorted, score[pos], side="right")]
    w_pos = weights[:, pos]
    wins = np.sum(w_pos * (below + 0.5 * (up_to - below)), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a class absent: NaN, not a warning
        return wins / (w_pos.sum(axis=1) * cum[:, -1])


# --------------------------------------------------------------------------------------------
# DeLong


def _delong_components(
    y: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong's structural components for each row of ``scores`` (Sun & Xu, 2014).

    Returns ``auc`` (k,), ``v10`` (k, m) over positives and ``v01`` (k, n) over negatives.
    """
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    rank_pos = stats.rankdata(pos, axis=1)
    rank_neg = stats.rankdata(neg, axis=1)
    rank_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    # A positive's midrank among all minus its midrank among positives counts the negatives
    # below it (ties one half); likewise for negatives against positives.
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    auc = v10.mean(axis=1)
    return auc, v10, v01


def delong_variance(y_true: Any, score: Any) -> tuple[float, float]:
    """``(auc, variance)`` of one ROC AUC by DeLong's method."""
    y, s = _binary_labels_score(y_true, score)
    _need_two_each(y)
    auc, v10, v01 = _delong_components(y, s[None, :])
    var = np.var(v10[0], ddof=1) / v10.shape[1] + np.var(v01[0], ddof=1) / v01.shape[1]
    return float(auc[0]), float(var)


def auc_ci_delong(y_true: Any, score: Any, level: float = 0.95) -> list[float]:
    """Normal-approximation ``[low, high]`` interval of the ROC AUC, clipped to [0, 1]."""
    if not 0.0 < level < 1.0:
        raise MedtlError("level must lie strictly between 0 and 1")
    auc, var = delong_variance(y_true, score)
    half = stats.norm.ppf(0.5 + level / 2.0) * np.sqrt(var)
    return [float(max(0.0, auc - half)), float(min(1.0, auc + half))]


def delong_test(y_true: Any, score_a: Any, score_b: Any) -> dict[str, Any]:
    """DeLong's paired test of two ROC AUCs measured on the same images (two-sided).

    If the variance of the difference is zero (e.g. identical rankings) and the AUCs are equal,
    ``z`` is 0 and ``p_value`` 1; if they differ with zero variance, ``z`` is infinite and
    ``p_value`` 0 (the estimate sees no uncertainty; treat it with suspicion).
    """
    y, a = _binary_labels_score(y_true, score_a)
    _, b = _binary_labels_score(y_true, score_b)
    _need_two_each(y)
    auc, v10, v01 = _delong_components(y, np.stack([a, b]))
    m, n = v10.shape[1], v01.shape[1]
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(auc[0] - auc[1])
    # From the differenced components rather than cov: exactly 0 when the rankings coincide.
    var = float(np.var(v10[0] - v10[1], ddof=1) / m + np.var(v01[0] - v01[1], ddof=1) / n)
    if var > 0:
        z = diff / np.sqrt(var)
        p_value = float(2.0 * stats.norm.sf(abs(z)))
    elif diff == 0:
        z, p_value = 0.0, 1.0
    else:
        z, p_value = float(np.copysign(np.inf, diff)), 0.0
    return {
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
        "difference": diff,
        "variance": var,
        "z": float(z),
        "p_value": p_value,
        "covariance": cov.tolist(),
    }


# Below this many discordant images the chi-square approximation is poor: exact binomial test.
MCNEMAR_EXACT_BELOW = 25


def mcnemar_test(correct_a: Any, correct_b: Any, *, exact: bool | None = None) -> dict[str, Any]:
    """McNemar's paired test of two classifiers' decisions on the same images (two-sided).

    ``correct_a`` and ``correct_b`` say, image by image, whether each classifier's decision was
    right, so any number of classes is covered. Only the discordant images count: ``a_only``
    (a right, b wrong) and ``b_only``. ``exact`` (default: fewer than
    :data:`MCNEMAR_EXACT_BELOW` discordant images) uses the binomial test, whose ``statistic``
    is ``min(a_only, b_only)``; otherwise the chi-square statistic with continuity correction
    ``(|a_only - b_only| - 1)^2 / (a_only + b_only)``. Both are statsmodels' ``mcnemar(table,
    exact=..., correction=True)`` conventions; no discordant image gives ``p_value`` 1.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise MedtlError(f"McNemar's test needs one decision per image for both classifiers "
                         f"(got shapes {a.shape} and {b.shape})")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = a_only + b_only
    if exact is None:
        exact = discordant < MCNEMAR_EXACT_BELOW
    if discordant == 0:  # nothing to tell them apart (and binomtest refuses n = 0)
        statistic, p_value = 0.0, 1.0
    elif exact:
        statistic = float(min(a_only, b_only))
        p_value = stats.binomtest(min(a_only, b_only), discordant, 0.5).pvalue
    else:
        statistic = (abs(a_only - b_only) - 1) ** 2 / discordant
        p_value = stats.chi2.sf(statistic, 1)
    return {"n": int(len(a)), "a_only": a_only, "b_only": b_only, "exact": bool(exact),
            "statistic": float(statistic), "p_value": float(min(p_value, 1.0)),
            "difference": (a_only - b_only) / len(a) if len(a) else 0.0}


def _need_two_each(y: np.ndarray) -> None:
    if min(int(y.sum()), int(len(y) - y.sum())) < 2:
        raise MedtlError("DeLong's method needs at least two positives and two negatives")


# --------------------------------------------------------------------------------------------
# Operating points


def _roc_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct score values as thresholds (descending) with the tp and fp counts at each."""
    thresholds = np.unique(s)[::-1]
    pos_sorted = np.sort(s[y == 1])
    neg_sorted = np.sort(s[y == 0])
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = len(neg_sorted) - np.searchsorted(neg_sorted, thresholds, side="left")
    return thresholds, tp, fp


def youden_threshold(y_true: Any, score: Any) -> float:
    """The score value maximising Youden's J = sensitivity + specificity - 1.

    Candidates are the observed scores; of equally good ones the highest (most specific) wins.
    """
    y, s = _binary_labels_score(y_true, score)
    thresholds, tp, fp = _roc_counts(y, s)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    # J scaled by n_pos * n_neg, in integers so that equal J values tie exactly.
    return float(thresholds[np.argmax(tp * n_neg - fp * n_pos)])


def threshold_for_sensitivity(y_true: Any, score: Any, target: float) -> float:
    """The highest observed score whose threshold reaches sensitivity >= ``target``."""
    if not 0.0 < target <= 1.0:
        raise MedtlError("target sensitivity must lie in (0, 1]")
    y, s = _binary_labels_score(y_true, score)
    thresholds, tp, _ = _roc_counts(y, s)
    # Same division as operating_point reports; sensitivity only grows as the threshold falls,
    # so the first hit is the highest threshold.
    return float(thresholds[np.argmax(tp / y.sum() >= target)])


def operating_point(y_true: Any, score: Any, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV when ``score >= threshold`` is called positive.

    A ratio whose denominator is zero is ``None``; the four counts come along.
    """
    y, s = _binary_labels_score(y_true, score)
    pred = (s >= threshold).astype(np.int64)
    cm = np.zeros((2, 2), dtype=np.int64)
    np.add.at(cm, (y.astype(np.int64), pred), 1)
    tp, fn, tn, fp = (int(v) for v in confusion_counts(cm, 1))

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# --------------------------------------------------------------------------------------------
# Calibration


def _confidence_bins(
    y: np.ndarray, p: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-label confidence, correctness and equal-width bin of each image; bins are (lo, hi]."""
    if n_bins < 1:
        raise MedtlError("n_bins must be at least 1")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Against the same edges that reliability_curve reports, so a confidence on an edge lands
    # where the edges say; side="left" makes the bins (lo, hi].
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    counts = np.bincount(which, minlength=n_bins)
    return confidence, correct, which, counts


def expected_calibration_error(y_true: Any, proba: Any, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al., 2017): sum over equal-width bins of ``n_b/n |acc_b - conf_b|``."""
    y, p = _labels_proba(y_true, proba)
    confidence, correct, which, _ = _confidence_bins(y, p, n_bins)
    gap = np.bincount(which, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


def brier_score(y_true: Any, proba: Any) -> float:
    """Brier score: for two classes sklearn's ``mean((p_1 - y)^2)``, else the multi-class sum.

    With more than two classes it is ``mean_i sum_k (p_ik - [y_i = k])^2`` (Brier, 1950), which
    for two classes would be exactly twice the binary figure given here.
    """
    y, p = _labels_proba(y_true, proba)
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - (y == 1)) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def reliability_curve(y_true: Any, proba: Any, n_bins: int = 10) -> dict[str, Any]:
    """Top-label reliability diagram data over equal-width confidence bins.

    ``mean_confidence`` and ``accuracy`` are ``None`` for empty bins.
    """
    y, p = _labels_proba(y_true, proba)
    confidence, correct, which, counts = _confidence_bins(y, p, n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct, minlength=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "bin_edges": edges.tolist(),
        "bin_centres": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "mean_confidence": [
            float(s / c) if c else None for s, c in zip(conf_sum, counts, strict=True)
        ],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, counts, strict=True)],
        "counts": counts.tolist(),
    }
