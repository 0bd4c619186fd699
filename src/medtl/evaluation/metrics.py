"""Classification metrics in the layout of ``metrics.json`` (design.md, "Run directory").

Binary problems report sensitivity and specificity of the *positive* class (the last class unless
the caller says otherwise); multi-class problems report their macro averages, one-vs-rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


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
        "balanced_accuracy": float(_balanced_accuracy(cm)),
        "auc": _auc(y_true, proba),
    }
    if n_classes == 2:
        pos = 1 if positive is None else positive
        neg = 1 - pos
        tp, fn = cm[pos, pos], cm[pos, neg]
        tn, fp = cm[neg, neg], cm[neg, pos]
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


def _auc(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    if proba.shape[1] == 2:
        return float(skm.roc_auc_score(y_true, proba[:, 1]))
    # Macro one-vs-rest, as sklearn's multi_class="ovr" computes it, but over the classes the
    # labels hold: a class absent from a small test split has no AUC and must not be averaged.
    return float(np.mean([skm.roc_auc_score(y_true == c, proba[:, c]) for c in present]))


def _balanced_accuracy(cm: np.ndarray) -> float:
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def _mean_ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    ok = den > 0
    return float(np.mean(num[ok] / den[ok])) if ok.any() else None
