"""Classifier heads on frozen features: a torch linear head and scikit-learn's classifiers.

The torch head standardises features with the training set's statistics before its linear
layer, which makes one learning rate work across backbones whose features differ in scale.
scikit-learn heads are chosen on validation AUC over a small grid (Kim et al.'s "feature
extractor hybrid"), then kept as fitted on the training split only, so validation figures stay
honest.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC
from torch import nn

from medtl.errors import check_choice
from medtl.evaluation.metrics import classification_metrics

SKLEARN_HEADS = ("logreg", "svm", "rf", "knn")

# skops refuses to load types it does not trust by default; these are the ones our own heads
# contain. Anything else in a head file is refused rather than executed.
_SKOPS_TRUSTED = [
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.model_selection._split.KFold",
]


IMBALANCE_RATIO = 0.5


def needs_balancing(y: np.ndarray) -> bool:
    """Minority/majority class ratio below 0.5: weight classes so the head does not simply
    learn the prevalence (Kermany's train split is 74 % pneumonia, for instance)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    counts = counts[counts > 0]
    return bool(len(counts) > 1 and counts.min() / counts.max() < IMBALANCE_RATIO)


def _score(y: np.ndarray, proba: np.ndarray) -> float:
    """Validation criterion: AUC, falling back to accuracy when AUC is undefined."""
    m = classification_metrics(y, proba)
    return m["auc"] if m["auc"] is not None else m["accuracy"]


# ---------------------------------------------------------------- scikit-learn heads (hybrid)
def _grid(head: str, seed: int, class_weight: str | None,
          ) -> list[tuple[dict[str, Any], ClassifierMixin]]:
    cw = class_weight
    if head == "logreg":
        return [({"C": c}, make_pipeline(StandardScaler(), LogisticRegression(
                    C=c, max_iter=2000, class_weight=cw)))
                for c in (0.001, 0.01, 0.1, 1.0)]
    if head == "svm":
        return [({"C": c}, make_pipeline(StandardScaler(),
                                         SVC(C=c, kernel="rbf", class_weight=cw)))
                for c in (0.3, 1.0, 3.0, 10.0)]
    if head == "rf":
        return [({"min_samples_leaf": leaf, "max_features": mf},
                 RandomForestClassifier(n_estimators=300, min_samples_leaf=leaf, max_features=mf,
                                        class_weight=cw, n_jobs=-1, random_state=seed))
                for leaf, mf in itertools.product((1, 3), ("sqrt", 0.1))]
    if head == "knn":
        # L2-normalised CNN features: Euclidean distance then ranks like cosine similarity.
        return [({"n_neighbors": k}, make_pipeline(
                    Normalizer(), KNeighborsClassifier(n_neighbors=k, weights="distance")))
                for k in (5, 11, 21, 41)]
    raise AssertionError(head)


@dataclass
class SklearnHead:
    """A scikit-learn classifier chosen on validation; ``predict_proba`` on features."""

    head: str = "logreg"
    seed: int = 0
    class_weight: str | None = None
    estimator_: Any = None
    params_: dict[str, Any] = field(default_factory=dict)
    search_: list[dict[str, Any]] = field(default_factory=list)

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            ) -> SklearnHead:
        check_choice("head", self.head, SKLEARN_HEADS)
        best = None
        for params, est in _grid(self.head, self.seed, self.class_weight):
            k = params.get("n_neighbors")
            if k is not None and k > len(x):
                continue
            est = clone(est).fit(x, y)
            est = self._probabilistic(est, x_val, y_val)
            score = _score(y_val, est.predict_proba(x_val))
            self.search_.append({**params, "val_score": score})
            if best is None or score > best[0]:
                best = (score, params, est)
        _, self.params_, self.estimator_ = best
        return self

    def _probabilistic(self, est, x_val, y_val):
        # SVC has no probabilities of its own; Platt scaling fitted on validation gives them
        # without the 5-fold internal CV that probability=True would cost.
        if self.head == "svm":
            # A frozen estimator predicts the same whatever the folds, so the folds only have to
            # be valid: the default stratified 5-fold fails on a validation split with fewer
            # than five images of a class.
            cal = CalibratedClassifierCV(FrozenEstimator(est), method="sigmoid",
                                         cv=KFold(n_splits=2))
            return cal.fit(x_val, y_val)
        return est

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.estimator_.predict_proba(x)

    @property
    def n_parameters(self) -> int:
        """Values set by fitting: weights for logreg/svm, split nodes for rf, 0 for kNN."""
        est = self.estimator_
        inner = est.steps[-1][1] if isinstance(est, Pipeline) else est
        if isinstance(inner, LogisticRegression):
            return int(inner.coef_.size + inner.intercept_.size)
        if isinstance(inner, CalibratedClassifierCV):
            svc = inner.estimator.estimator.steps[-1][1]
            return int(svc.dual_coef_.size + svc.intercept_.size)
        if isinstance(inner, RandomForestClassifier):
            return int(sum(t.tree_.node_count for t in inner.estimators_))
        return 0

    def save(self, path: Path) -> None:
        import skops.io as sio

        sio.dump(self.estimator_, path)

    @classmethod
    def load(cls, path: Path, head: str) -> SklearnHead:
        import skops.io as sio

        untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in _SKOPS_TRUSTED]
        if untrusted:
            from medtl.errors import MedtlError
            raise MedtlError(f"{path}: refusing to load untrusted types {untrusted}")
        return cls(head=head, estimator_=sio.load(path, trusted=_SKOPS_TRUSTED))


# ---------------------------------------------------------------- torch linear head
class LinearHead(nn.Module):
    """Standardise with the training features' statistics, dropout, then one linear layer."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout((features - self.mean) / self.std))


@dataclass
class TorchHeadTrainer:
    """Train a LinearHead on cached features; early stopping on validation AUC."""

    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    patience: int = 20
    seed: int = 0
    balanced: bool = False
    history_: list[dict[str, Any]] = field(default_factory=list)
    best_epoch_: int = 0

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            num_classes: int, progress=None) -> LinearHead:
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
        xv = torch.from_numpy(x_val).float()
        head = LinearHead(x.shape[1], num_classes)
        head.mean.copy_(xt.mean(0))
        # Features (near-)constant on train, e.g. dead ReLUs, keep scale 1 as in scikit-learn's
        # StandardScaler: dividing by their tiny std would blow up any variation on new images.
        std = xt.std(0)
        head.std.copy_(torch.where(std > 1e-3 * std.mean(), std, torch.ones_like(std)))
        opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        weight = None
        if self.balanced:  # scikit-learn's "balanced": n / (n_classes * count)
            counts = torch.bincount(yt, minlength=num_classes).float().clamp_min(1)
            weight = counts.sum() / (num_classes * counts)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        best_score, best_state, waited = -math.inf, None, 0
        for epoch in range(1, self.epochs + 1):
            head.train()
            perm = torch.randperm(len(xt), generator=g)
            total = 0.0
            for i in range(0, len(xt), self.batch_size):
                idx = perm[i:i + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(head(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            head.eval()
            with torch.no_grad():
                proba = torch.softmax(head(xv), 1).numpy()
            val = classification_metrics(y_val, proba)
            score = val["auc"] if val["auc"] is not None else val["accuracy"]
            self.history_.append({"epoch": epoch, "train_loss": total / len(xt),
                                  "val_auc": val["auc"], "val_accuracy": val["accuracy"],
                                  "lr": self.lr,
                                  "trainable_params": sum(p.numel() for p in head.parameters())})
            if progress:
                progress(1)
            if score > best_score + 1e-4:
                best_score, best_state, waited = score, copy.deepcopy(head.state_dict()), 0
                self.best_epoch_ = epoch
            else:
                waited += 1
                if waited >= self.patience:
                    break
        head.load_state_dict(best_state)
        return head.eval()
