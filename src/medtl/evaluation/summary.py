"""One split's entry of ``metrics.json``: point figures, their 95 % CIs, operating points,
calibration, per-class and per-patient results (design.md, "Run directory").

Thresholds are chosen on validation (``choose_thresholds``) and only applied to test, so the
test figures at an operating point are an honest estimate of what a deployed model would do.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from medtl.evaluation import stats
from medtl.evaluation.metrics import classification_metrics

CI_METRICS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
DEFAULT_TARGET_SENSITIVITY = 0.9
N_RESAMPLES = 2000


def choose_thresholds(y_val: np.ndarray, proba_val: np.ndarray, positive: int | None,
                      target_sensitivity: float | None = DEFAULT_TARGET_SENSITIVITY,
                      ) -> dict[str, Any] | None:
    """Youden's J and the target-sensitivity threshold on validation (binary problems only).

    ``None`` for multi-class problems, or when validation lacks one of the classes.
    """
    if proba_val.shape[1] != 2 or positive is None:
        return None
    y = (np.asarray(y_val) == positive).astype(int)
    if y.min() == y.max():
        return None
    score = proba_val[:, positive]
    out: dict[str, Any] = {"chosen_on": "val", "youden": stats.youden_threshold(y, score)}
    if target_sensitivity is not None:
        out["target_sensitivity"] = float(target_sensitivity)
        out["sensitivity_target"] = stats.threshold_for_sensitivity(y, score, target_sensitivity)
    return out


def split_summary(
    y_true: np.ndarray,
    proba: np.ndarray,
    *,
    classes: Sequence[str],
    positive: int | None = None,
    patients: Sequence[str | None] | None = None,
    volumes: Sequence[str | None] | None = None,
    thresholds: dict[str, Any] | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Every figure of a metrics.json split entry for labels ``y_true`` and ``proba`` (n, k).

    Adds to ``classification_metrics``: ``*_ci95`` (stratified bootstrap, ``n_resamples``,
    seeded), ``auc_ci95_delong`` (binary), ``calibration`` (ECE, Brier, reliability curve),
    ``operating_points`` (binary, at ``thresholds``), ``per_class`` and ``auc_weighted``
    (multi-class), ``per_patient`` (mean probability per patient) when patients are known, and
    ``per_volume`` (mean probability over a volume's slices) for volumes.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    out = classification_metrics(y, p, positive=positive)
    if len(y) == 0:
        return out
    out.update(_intervals(y, p, positive, n_resamples, seed))
    binary = p.shape[1] == 2
    pos = (1 if positive is None else positive) if binary else None
    if binary and min(np.sum(y == 0), np.sum(y == 1)) >= 2:  # DeLong needs two of each
        out["auc_ci95_delong"] = stats.auc_ci_delong((y == pos).astype(int), p[:, pos])
    if not binary:
        out["per_class"] = per_class_metrics(y, p, classes)
        present = [c for c in out["per_class"].values() if c["auc"] is not None]
        support = sum(c["n"] for c in present)
        out["auc_weighted"] = (float(sum(c["auc"] * c["n"] for c in present) / support)
                               if present else None)
    out["calibration"] = {
        "ece": stats.expected_calibration_error(y, p),
        "brier": stats.brier_score(y, p),
        "reliability": stats.reliability_curve(y, p),
    }
    if thresholds and binary and len(np.unique(y)) == 2:
        yb = (y == pos).astype(int)
        out["operating_points"] = {
            name: stats.operating_point(yb, p[:, pos], thresholds[name])
            for name in ("youden", "sensitivity_target") if name in thresholds}
    for name, groups in (("per_patient", patients), ("per_volume", volumes)):
        if groups is not None:
            grouped = group_summary(y, p, groups, positive=positive, n_resamples=n_resamples,
                                    seed=seed)
            if grouped is not None:
                out[name] = grouped
    return out


def _intervals(y: np.ndarray, p: np.ndarray, positive: int | None, n_resamples: int,
               seed: int) -> dict[str, Any]:
    if n_resamples <= 0:
        return {}
    cis = stats.bootstrap_ci(y, p, positive=positive, n_resamples=n_resamples, seed=seed,
                             metrics=CI_METRICS)
    return {f"{name}_ci95": ci for name, ci in cis.items()}


def per_class_metrics(y: np.ndarray, p: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """One-vs-rest AUC, sensitivity, specificity, precision and F1 of every class."""
    k = p.shape[1]
    pred = p.argmax(axis=1)
    cm = skm.confusion_matrix(y, pred, labels=list(range(k)))
    out = {}
    for c in range(k):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        is_c = y == c
        auc = (float(skm.roc_auc_score(is_c, p[:, c])) if 0 < is_c.sum() < len(y) else None)
        out[classes[c]] = {
            "n": int(is_c.sum()), "auc": auc,
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        }
    return out


def group_summary(y: np.ndarray, p: np.ndarray, patients: Sequence[str | None], *,
                  positive: int | None, n_resamples: int, seed: int) -> dict[str, Any] | None:
    """Figures over groups (patients, volumes), each scored by the mean probability of its
    images.

    ``None`` when no image has a group, or every group has a single image (the per-image
    figures already say it all). Images without a group count as groups of their own; a
    group whose images carry different labels is left out and counted.
    """
    if not any(patients) or len({q for q in patients if q}) == sum(1 for q in patients if q):
        return None
    groups: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(patients):
        groups[q if q else f"\0image-{i}"].append(i)
    ys, ps, mixed = [], [], 0
    for key in sorted(groups):  # by patient id, so the bootstrap does not hang on file order
        idx = groups[key]
        labels = set(y[idx].tolist())
        if len(labels) > 1:
            mixed += 1
            continue
        ys.append(labels.pop())
        ps.append(p[idx].mean(axis=0))
    if not ys:
        return None
    yp, pp = np.asarray(ys), np.asarray(ps)
    out = classification_metrics(yp, pp, positive=positive)
    out.update(_intervals(yp, pp, positive, n_resamples, seed))
    out["mixed_label_patients_left_out"] = mixed
    return out


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None
