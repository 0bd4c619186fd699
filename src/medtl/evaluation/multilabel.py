"""Figures of a multi-label model: one independent probability per label, NaN targets masked.

- ``label_thresholds``: one decision threshold per label, chosen on validation (Youden's J).
- ``multilabel_summary``: the metrics.json entry of one split: per-label AUC (DeLong CI),
  average precision, sensitivity and specificity (Wilson CIs) at the thresholds; macro and
  micro AUC and mean average precision with bootstrap CIs; co-occurrence of errors.

Targets ``y`` are ``(n, K)`` floats: 1 present, 0 absent, NaN unknown. An unknown entry never
contributes to any figure (nor does its probability, which may be anything, NaN included).
A label is called present when ``probability >= threshold``, as in medtl.evaluation.stats.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps
from sklearn.metrics import average_precision_score, roc_auc_score

from medtl.errors import MedtlError
from medtl.evaluation.stats import _percentile_interval, auc_ci_delong, youden_threshold

DEFAULT_THRESHOLD = 0.5
# Resamples are processed in blocks of about this many (resample, entry) cells, to bound memory.
_BLOCK_CELLS = 2_000_000


# --------------------------------------------------------------------------------------------
# Inputs


def _inputs(y: Any, proba: Any, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """Targets, probabilities and the known mask, checked. Every figure reads entries through
    the mask, so values at unknown entries (NaN probabilities included) are never seen."""
    t = np.asarray(y, dtype=np.float64)
    p = np.asarray(proba, dtype=np.float64)
    k = len(classes)
    if t.ndim != 2 or p.ndim != 2:
        raise MedtlError(f"multi-label targets and probabilities must be 2-D (n_images, "
                         f"n_labels); got shapes {t.shape} and {p.shape}")
    if t.shape != p.shape:
        raise MedtlError(f"targets of shape {t.shape} but probabilities of shape {p.shape}")
    if t.shape[1] != k:
        raise MedtlError(f"{t.shape[1]} label columns but {k} label names")
    known = ~np.isnan(t)
    if not np.all(np.isin(t[known], (0.0, 1.0))):
        raise MedtlError("multi-label targets must be 1 (present), 0 (absent) or NaN (unknown)")
    if not np.all(np.isfinite(p[known])):
        raise MedtlError("probabilities contain NaN or infinite values where a label is known")
    return t, p, known


def _column(t: np.ndarray, p: np.ndarray, known: np.ndarray, j: int
            ) -> tuple[np.ndarray, np.ndarray]:
    rows = known[:, j]
    return t[rows, j].astype(np.int64), p[rows, j]


def _default_thresholds(classes: Sequence[str]) -> dict[str, Any]:
    return {"chosen_on": "default", **{str(c): DEFAULT_THRESHOLD for c in classes}}


# --------------------------------------------------------------------------------------------
# Thresholds


def label_thresholds(y_val: Any, proba_val: Any, classes: Sequence[str]) -> dict[str, Any]:
    """``{"chosen_on": "val", "rule": "youden", L: t, ...}``: Youden's J per label on the
    validation rows where that label is known (medtl.evaluation.stats.youden_threshold).

    A label without a known positive or a known negative in validation gets 0.5, and is listed
    under ``"fallback"`` (present only when some label fell back).
    """
    t, p, known = _inputs(y_val, proba_val, classes)
    out: dict[str, Any] = {"chosen_on": "val", "rule": "youden"}
    fallback = []
    for j, name in enumerate(classes):
        yj, pj = _column(t, p, known, j)
        if yj.size and 0 < yj.sum() < yj.size:
            out[str(name)] = youden_threshold(yj, pj)
        else:
            out[str(name)] = DEFAULT_THRESHOLD
            fallback.append(str(name))
    if fallback:
        out["fallback"] = fallback
    return out


def threshold_vector(thresholds: Mapping[str, Any] | None, classes: Sequence[str]
                     ) -> np.ndarray:
    """The thresholds of ``classes`` in order, as floats (None: 0.5 each); a MedtlError when
    one is missing or not a finite number (thresholds may come from another's run)."""
    if thresholds is None:
        return np.full(len(classes), DEFAULT_THRESHOLD)
    missing = [str(c) for c in classes if str(c) not in thresholds]
    if missing:
        raise MedtlError(f"no threshold for label(s) {', '.join(missing)}")
    values = [thresholds[str(c)] for c in classes]
    bad = [str(c) for c, v in zip(classes, values, strict=True)
           if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v)]
    if bad:
        raise MedtlError(f"the threshold of label(s) {', '.join(bad)} is not a finite number")
    return np.array(values, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Summary


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> list[float] | None:
    """Wilson's score interval ``[low, high]`` of a proportion; None with no trials."""
    if trials <= 0:
        return None
    z = float(sps.norm.ppf(0.5 + level / 2.0))
    phat = successes / trials
    denom = 1.0 + z * z / trials
    centre = (phat + z * z / (2 * trials)) / denom
    half = z * np.sqrt(phat * (1 - phat) / trials + z * z / (4 * trials * trials)) / denom
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def multilabel_summary(y: Any, proba: Any, classes: Sequence[str],
                       thresholds: Mapping[str, Any] | None, *, n_resamples: int = 2000,
                       seed: int = 0) -> dict[str, Any]:
    """The metrics.json entry of one split of a multi-label model.

    Per label, on the rows where it is known: ``auc`` (None without both classes) with
    DeLong's interval (None with fewer than two positives or negatives), ``average_precision``
    (None without a positive), and at the label's threshold ``sensitivity``, ``specificity``
    with Wilson score intervals, ``precision`` and ``f1`` (None where a denominator is zero).

    ``macro_auc`` (= ``auc``) is the mean AUC of the labels with both classes known;
    ``micro_auc`` the AUC of all known (image, label) entries pooled; ``map`` the mean average
    precision of the labels with a known positive. Their intervals are percentile bootstraps
    over images (``n_resamples`` resamples of the rows, seeded): in a resample a label that
    lacks a class (or a positive, for AP) is left out of that resample's mean.

    ``error_cooccurrence``: ``counts[i][j]`` images where labels i and j are both known and
    both wrong at their thresholds; the diagonal holds each label's errors.
    ``thresholds`` None means 0.5 for every label (``"chosen_on": "default"``).
    """
    t, p, known = _inputs(y, proba, classes)
    if n_resamples < 1:
        raise MedtlError("n_resamples must be at least 1")
    thresholds = dict(thresholds) if thresholds is not None else _default_thresholds(classes)
    cut = threshold_vector(thresholds, classes)
    pred = p >= cut
    truth = t == 1.0

    labels: dict[str, Any] = {}
    aucs, aps = [], []
    for j, name in enumerate(classes):
        yj, pj = _column(t, p, known, j)
        n_pos = int(yj.sum())
        n_neg = int(yj.size - n_pos)
        auc = float(roc_auc_score(yj, pj)) if n_pos and n_neg else None
        ap = float(average_precision_score(yj, pj)) if n_pos else None
        if auc is not None:
            aucs.append(auc)
        if ap is not None:
            aps.append(ap)
        dj = pj >= cut[j]
        tp = int(np.sum(dj & (yj == 1)))
        fp = int(np.sum(dj & (yj == 0)))
        fn, tn = n_pos - tp, n_neg - fp
        labels[str(name)] = {
            "n_known": int(yj.size),
            "n_positive": n_pos,
            "auc": auc,
            "auc_ci95": auc_ci_delong(yj, pj) if min(n_pos, n_neg) >= 2 else None,
            "average_precision": ap,
            "threshold": float(cut[j]),
            "sensitivity": _ratio(tp, n_pos),
            "sensitivity_ci95": wilson_interval(tp, n_pos),
            "specificity": _ratio(tn, n_neg),
            "specificity_ci95": wilson_interval(tn, n_neg),
            "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        }

    pooled_y, pooled_p = t[known].astype(np.int64), p[known]
    micro = (float(roc_auc_score(pooled_y, pooled_p))
             if 0 < pooled_y.sum() < pooled_y.size else None)
    macro = float(np.mean(aucs)) if aucs else None
    mean_ap = float(np.mean(aps)) if aps else None
    ci = _bootstrap(t, p, known, n_resamples=n_resamples, seed=seed,
                    want={"macro_auc": macro is not None, "micro_auc": micro is not None,
                          "map": mean_ap is not None})

    wrong = (known & (pred != truth)).astype(np.int64)
    return {
        "n": int(len(t)),
        "auc": macro,
        "auc_ci95": ci["macro_auc"],
        "macro_auc": macro,
        "macro_auc_ci95": ci["macro_auc"],
        "micro_auc": micro,
        "micro_auc_ci95": ci["micro_auc"],
        "map": mean_ap,
        "map_ci95": ci["map"],
        "labels": labels,
        "error_cooccurrence": {"labels": [str(c) for c in classes],
                               "counts": (wrong.T @ wrong).tolist()},
        "thresholds": thresholds,
    }


# --------------------------------------------------------------------------------------------
# Bootstrap


def _bootstrap(t: np.ndarray, p: np.ndarray, known: np.ndarray, *, n_resamples: int,
               seed: int, want: Mapping[str, bool], level: float = 0.95
               ) -> dict[str, list[float] | None]:
    """Percentile intervals of macro AUC, micro AUC and mAP over image resamples.

    Every figure is a weighted sum over images, each image weighted by how many times the
    resample drew it, so all resamples of a block are computed at once; the sorting is done
    once, before the resamples.
    """
    n, k = t.shape
    names = [m for m, ok in want.items() if ok]
    if not names or n == 0:
        return {m: None for m in want}
    aucs, aps = [], []
    for j in range(k):
        rows = np.flatnonzero(known[:, j])
        is_pos = t[rows, j] == 1.0
        if "macro_auc" in names and is_pos.any() and not is_pos.all():
            aucs.append(_AucPlan(rows, p[rows, j], is_pos))
        if "map" in names and is_pos.any():
            aps.append(_ApPlan(rows, p[rows, j], is_pos))
    entry_rows = np.nonzero(known)[0]
    micro = (_AucPlan(entry_rows, p[known], t[known] == 1.0) if "micro_auc" in names
             else None)

    rng = np.random.default_rng(seed)
    # The pooled entries (micro AUC) are the widest matrix: size the blocks by them.
    block = max(1, _BLOCK_CELLS // max(n, int(known.sum())))
    chunks: dict[str, list[np.ndarray]] = {m: [] for m in names}
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        weights = (np.bincount((idx + np.arange(b)[:, None] * n).ravel(), minlength=b * n)
                   .reshape(b, n).astype(np.float64))
        done += b
        with warnings.catch_warnings():
            # A resample where every label lacks a class: its mean is NaN, which the interval
            # leaves out; numpy's "Mean of empty slice" warning about it is noise.
            warnings.simplefilter("ignore", RuntimeWarning)
            if "macro_auc" in chunks:
                chunks["macro_auc"].append(
                    np.nanmean([a(weights) for a in aucs], axis=0) if aucs
                    else np.full(b, np.nan))
            if "map" in chunks:
                chunks["map"].append(np.nanmean([a(weights) for a in aps], axis=0) if aps
                                     else np.full(b, np.nan))
        if micro is not None:
            chunks["micro_auc"].append(micro(weights))
    return {m: _percentile_interval(chunks.get(m), level) for m in want}


class _AucPlan:
    """Mann-Whitney AUC (ties count one half) of fixed scores under image weights, as
    medtl.evaluation.stats._weighted_auc, with the sorting done once for every resample.

    ``rows[i]`` is the image (column of the weights) that score ``i`` belongs to."""

    def __init__(self, rows: np.ndarray, score: np.ndarray, is_pos: np.ndarray) -> None:
        neg = np.flatnonzero(~is_pos)
        order = neg[np.argsort(score[neg], kind="stable")]
        neg_sorted = score[order]
        pos = np.flatnonzero(is_pos)
        self.neg_rows, self.pos_rows = rows[order], rows[pos]
        self.below = np.searchsorted(neg_sorted, score[pos], side="left")
        self.up_to = np.searchsorted(neg_sorted, score[pos], side="right")

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        # Weighted count of negatives below each score: a cumulative sum over sorted negatives.
        cum = np.zeros((weights.shape[0], len(self.neg_rows) + 1))
        np.cumsum(weights[:, self.neg_rows], axis=1, out=cum[:, 1:])
        below, up_to = cum[:, self.below], cum[:, self.up_to]
        w_pos = weights[:, self.pos_rows]
        wins = np.sum(w_pos * (below + 0.5 * (up_to - below)), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # a class not drawn: NaN
            return wins / (w_pos.sum(axis=1) * cum[:, -1])


class _ApPlan:
    """scikit-learn's average precision, sum_k (R_k - R_{k-1}) P_k over the distinct scores in
    descending order, under image weights; NaN in a resample that drew no positive.

    A score whose images were not drawn adds no recall, so it adds nothing: the sum over all
    observed scores equals the sum over those present in the resample."""

    def __init__(self, rows: np.ndarray, score: np.ndarray, is_pos: np.ndarray) -> None:
        order = np.argsort(-score, kind="stable")
        s = score[order]
        self.rows, self.is_pos = rows[order], is_pos[order]
        # The last position of each run of equal scores: the counts at that threshold.
        self.last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        w = weights[:, self.rows]
        drawn = np.cumsum(w, axis=1)[:, self.last]
        tp = np.cumsum(w * self.is_pos, axis=1)[:, self.last]
        total = tp[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(drawn > 0, tp / np.where(drawn > 0, drawn, 1.0), 0.0)
            gain = np.diff(tp, axis=1, prepend=0.0)
            return np.where(total > 0, np.sum(gain * precision, axis=1) / total, np.nan)
