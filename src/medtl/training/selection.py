"""The one model-selection score: what validation maximises when it chooses an epoch, a head's
hyper-parameters or a stage of the climb.

AUC (binary, or macro one-vs-rest over the classes the labels hold), falling back to accuracy
where AUC is undefined (validation holds a single class). ``evaluation.metrics`` reports the
same AUC, from here.

Multi-label targets (``y`` of shape (n, K), 1/0/NaN, NaN unknown) are told apart by ``y.ndim ==
2``: the AUC is the mean over labels of each label's AUC on its known rows (labels whose known
validation rows hold a positive and a negative), the accuracy the share of known entries that
``p >= 0.5`` gets right. Unknown entries count nowhere.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc_or_none(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """AUC of (n, n_classes) probabilities, ``None`` when the labels hold a single class
    (multi-label: the mean label AUC, ``None`` when no label has one)."""
    if np.ndim(y_true) == 2:
        return mean_label_auc(y_true, proba)
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    if proba.shape[1] == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    # Macro one-vs-rest, as sklearn's multi_class="ovr" computes it, but over the classes the
    # labels hold: a class absent from a small split has no AUC and must not be averaged.
    return float(np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in present]))


def label_aucs(y_true: np.ndarray, proba: np.ndarray) -> list[float | None]:
    """Multi-label: each label's AUC on the rows where it is known, ``None`` for a label whose
    known rows lack a positive or a negative."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(proba, dtype=np.float64)
    out: list[float | None] = []
    for k in range(y.shape[1]):
        known = ~np.isnan(y[:, k])
        t = y[known, k]
        out.append(float(roc_auc_score(t, p[known, k]))
                   if (t == 1).any() and (t == 0).any() else None)
    return out


def mean_label_auc(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """Multi-label: the mean of :func:`label_aucs` over the labels that have one."""
    aucs = [a for a in label_aucs(y_true, proba) if a is not None]
    return float(np.mean(aucs)) if aucs else None


def known_accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Multi-label: the share of known entries that ``p >= 0.5`` gets right (NaN: none)."""
    y = np.asarray(y_true, dtype=np.float64)
    known = ~np.isnan(y)
    if not known.any():
        return float("nan")
    right = (np.asarray(proba, dtype=np.float64) >= 0.5) == (y == 1)
    return float(right[known].mean())


def val_summary(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """The validation columns of history.csv."""
    if np.ndim(y_true) == 2:
        return {"val_auc": mean_label_auc(y_true, proba),
                "val_accuracy": known_accuracy(y_true, proba)}
    accuracy = float(np.mean(np.asarray(proba).argmax(axis=1) == np.asarray(y_true)))
    return {"val_auc": auc_or_none(y_true, proba), "val_accuracy": accuracy}


def selection_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Validation AUC, or accuracy where AUC is undefined."""
    s = val_summary(y_true, proba)
    return s["val_auc"] if s["val_auc"] is not None else s["val_accuracy"]
