"""The one model-selection score: what validation maximises when it chooses an epoch, a head's
hyper-parameters or a stage of the climb.

AUC (binary, or macro one-vs-rest over the classes the labels hold), falling back to accuracy
where AUC is undefined (validation holds a single class). ``evaluation.metrics`` reports the
same AUC, from here.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc_or_none(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """AUC of (n, n_classes) probabilities, ``None`` when the labels hold a single class."""
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


def val_summary(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """The validation columns of history.csv."""
    accuracy = float(np.mean(np.asarray(proba).argmax(axis=1) == np.asarray(y_true)))
    return {"val_auc": auc_or_none(y_true, proba), "val_accuracy": accuracy}


def selection_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Validation AUC, or accuracy where AUC is undefined."""
    s = val_summary(y_true, proba)
    return s["val_auc"] if s["val_auc"] is not None else s["val_accuracy"]
