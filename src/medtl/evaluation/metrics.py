"""Classification metrics in the layout of ``metrics.json`` (design.md, "Run directory").

Binary problems report sensitivity and specificity of the *positive* class (the last class unless
the caller says otherwise); multi-class problems report their macro averages, one-vs-rest.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn import metrics as skm

from medtl.training.selection import auc_or_none


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, *, positive: int | None = None
) -> dict[str, Any]:
    """Every figure of a metrics.json split entry, from labels and class probabilities.

    ``proba`` is (n, n_classes). Predictions are the arg-max class. AUC is ``None`` when the
    labels hold a single class, where it is undefined.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    n_classes = proba.shape[1]
    y_pred = proba.argmax(axis=1)
    labels = list(range(n_classes))
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)

    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "auc": auc_or_none(y_true, proba),
    }
    if n_classes == 2:
        pos = 1 if positive is None else positive
        tp, fn, tn, fp = confusion_counts(cm, pos)
        out["sensitivity"] = _ratio(tp, tp + fn)
        out["specificity"] = _ratio(tn, tn + fp)
        out["precision"] = _ratio(tp, tp + fp)
        out["f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
        out["positive_class"] = int(pos)
    else:
        tp = np.diag(cm).astype(float)
        fn = cm.sum(axis=1) - tp
        fp = cm.sum(axis=0) - tp
        tn = cm.sum() - tp - fn - fp
        out["sensitivity"] = _mean_ratio(tp, tp + fn)
        out["specificity"] = _mean_ratio(tn, tn + fp)
        out["precision"] = _mean_ratio(tp, tp + fp)
        out["f1"] = _mean_ratio(2 * tp, 2 * tp + fp + fn)
    out["confusion_matrix"] = cm.tolist()
    return out


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's, over the classes the labels hold; a predicted class absent from the
    labels is expected on small splits, so its warning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(skm.balanced_accuracy_score(y_true, y_pred))


def confusion_counts(cm: np.ndarray, positive: int) -> tuple[Any, Any, Any, Any]:
    """(tp, fn, tn, fp) of class ``positive`` of a binary confusion matrix (rows: truth), or of
    a stack of them (..., 2, 2), as the bootstrap has."""
    neg = 1 - positive
    return (cm[..., positive, positive], cm[..., positive, neg], cm[..., neg, neg],
            cm[..., neg, positive])


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def _mean_ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    ok = den > 0
    return float(np.mean(num[ok] / den[ok])) if ok.any() else None
