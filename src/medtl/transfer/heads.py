"""Classifier heads on frozen features: a torch linear head and scikit-learn's classifiers.

The torch head standardises features with the training set's statistics before its linear
layer, which makes one learning rate work across backbones whose features differ in scale.
scikit-learn heads are chosen on validation AUC over a small grid (Kim et al.'s "feature
extractor hybrid"), then kept as fitted on the training split only, so validation figures stay
honest.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted
from torch import nn

from medtl.errors import MedtlError, check_choice
from medtl.training.selection import selection_score

# skops refuses to load types it does not trust by default. Each head trusts only the types its
# own estimators contain (register_head's ``trusted``): a logistic-regression head file holding a
# Tree is refused, and the index structures a trusted type may carry are checked before use.
_CALIBRATION_TYPES = ("sklearn.calibration._CalibratedClassifier",
                      "sklearn.calibration._SigmoidCalibration",
                      "sklearn.model_selection._split.KFold")  # in heads of medtl 0.1
_TREE_TYPES = ("sklearn.tree._tree.Tree",)
_NEIGHBOUR_TYPES = ("sklearn.metrics._dist_metrics.EuclideanDistance64",
                    "sklearn.neighbors._kd_tree.KDTree", "sklearn.neighbors._ball_tree.BallTree")


IMBALANCE_RATIO = 0.5


def needs_balancing(y: np.ndarray) -> bool:
    """Minority/majority class ratio below 0.5: weight classes so the head does not simply
    learn the prevalence (Kermany's train split is 74 % pneumonia, for instance)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    counts = counts[counts > 0]
    return bool(len(counts) > 1 and counts.min() / counts.max() < IMBALANCE_RATIO)


# ---------------------------------------------------------------- scikit-learn heads (hybrid)
# A head is a name and its grid: (seed, class_weight) -> [(params, unfitted estimator), ...],
# the candidates that validation chooses among. register_head adds one from anywhere.
HeadGrid = Callable[[int, "str | None"], list[tuple[dict[str, Any], ClassifierMixin]]]
HEADS: dict[str, HeadGrid] = {}
HEAD_TRUSTED_TYPES: dict[str, tuple[str, ...]] = {}


def register_head(name: str, *, trusted: Sequence[str] = ()) -> Callable[[HeadGrid], HeadGrid]:
    """Add a head; ``trusted``: the types beyond skops' defaults that its fitted estimators hold
    (``skops.io.get_untrusted_types`` of a saved one), the only ones its head files may hold."""
    def add(grid: HeadGrid) -> HeadGrid:
        HEADS[name] = grid
        HEAD_TRUSTED_TYPES[name] = tuple(trusted)
        return grid
    return add


@register_head("logreg")
def _logreg(seed: int, cw: str | None):
    return [({"C": c}, make_pipeline(StandardScaler(), LogisticRegression(
                C=c, max_iter=2000, class_weight=cw)))
            for c in (0.001, 0.01, 0.1, 1.0)]


@register_head("svm", trusted=_CALIBRATION_TYPES)
def _svm(seed: int, cw: str | None):
    # SVC has no probabilities of its own: SklearnHead adds Platt scaling fitted on validation.
    return [({"C": c}, make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf", class_weight=cw)))
            for c in (0.3, 1.0, 3.0, 10.0)]


@register_head("rf", trusted=_TREE_TYPES)
def _rf(seed: int, cw: str | None):
    return [({"min_samples_leaf": leaf, "max_features": mf},
             RandomForestClassifier(n_estimators=300, min_samples_leaf=leaf, max_features=mf,
                                    class_weight=cw, n_jobs=-1, random_state=seed))
            for leaf, mf in itertools.product((1, 3), ("sqrt", 0.1))]


@register_head("knn", trusted=_NEIGHBOUR_TYPES)
def _knn(seed: int, cw: str | None):
    # L2-normalised CNN features: Euclidean distance then ranks like cosine similarity.
    return [({"n_neighbors": k}, make_pipeline(
                Normalizer(), KNeighborsClassifier(n_neighbors=k, weights="distance")))
            for k in (5, 11, 21, 41)]


class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Nearest class mean as probabilities: softmax over classes of ``-||x - c_k||^2 / t_``.

    The few-shot baseline (prototypical networks, Snell et al. 2017, on frozen features): one
    mean per class and nothing else to fit, so it cannot overfit a handful of images and is
    blind to class imbalance. ``t_`` is the training images' mean squared distance to their own
    class mean, which keeps the logits of order one whatever the feature scale. The logits are
    ``(2 x.c_k - ||c_k||^2) / t_`` plus a term common to all classes, a linear map of x: after a
    StandardScaler the head folds into one ``nn.Linear`` (SklearnHead.as_linear) and exports,
    serves and explains like logistic regression. scikit-learn's NearestCentroid was not used:
    its probabilities divide by per-feature within-class spreads, which 5 images per class
    cannot estimate, and skl2onnx has no converter for it.
    """

    def fit(self, x: np.ndarray, y: np.ndarray) -> PrototypeClassifier:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        self.centroids_ = np.stack([x[y == c].mean(axis=0) for c in self.classes_])
        own = self.centroids_[np.searchsorted(self.classes_, y)]
        self.temperature_ = float(max(((x - own) ** 2).sum(axis=1).mean(), 1e-12))
        self.n_features_in_ = x.shape[1]
        return self

    def linear(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weight (k, d), bias (k,))`` whose softmax equals predict_proba."""
        c = self.centroids_
        return 2.0 * c / self.temperature_, -(c ** 2).sum(axis=1) / self.temperature_

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import softmax

        check_is_fitted(self, "centroids_")
        weight, bias = self.linear()
        return softmax(np.asarray(x, dtype=np.float64) @ weight.T + bias, axis=1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


@register_head("prototype", trusted=("medtl.transfer.heads.PrototypeClassifier",))
def _prototype(seed: int, cw: str | None):
    # Standardised features, so that no single feature's scale dominates the distances. One
    # candidate: with nothing to tune, a few validation images choose nothing.
    return [({}, make_pipeline(StandardScaler(), PrototypeClassifier()))]


SKLEARN_HEADS = tuple(HEADS)  # the built-in ones, in the order the docs list them


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
        check_choice("head", self.head, HEADS)
        best = None
        for params, est in HEADS[self.head](self.seed, self.class_weight):
            k = params.get("n_neighbors")
            if k is not None and k > len(x):
                continue
            est = clone(est).fit(x, y)
            est = self._probabilistic(est, x_val, y_val)
            score = selection_score(y_val, est.predict_proba(x_val))
            self.search_.append({**params, "val_score": score})
            if best is None or score > best[0]:
                best = (score, params, est)
        _, self.params_, self.estimator_ = best
        return self

    def _probabilistic(self, est, x_val, y_val):
        # An estimator without probabilities of its own (SVC) gets Platt scaling fitted on
        # validation, without the 5-fold internal CV that probability=True would cost.
        if not hasattr(est, "predict_proba"):
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
        """Values set by fitting: weights for logreg/svm, split nodes for rf, class means for
        prototype, 0 for kNN."""
        est = self.estimator_
        inner = est.steps[-1][1] if isinstance(est, Pipeline) else est
        if isinstance(inner, LogisticRegression):
            return int(inner.coef_.size + inner.intercept_.size)
        if isinstance(inner, CalibratedClassifierCV):
            svc = inner.estimator.estimator.steps[-1][1]
            return int(svc.dual_coef_.size + svc.intercept_.size)
        if isinstance(inner, RandomForestClassifier):
            return int(sum(t.tree_.node_count for t in inner.estimators_))
        if isinstance(inner, PrototypeClassifier):
            return int(inner.centroids_.size)
        return 0

    def as_linear(self) -> nn.Linear | None:
        """A fitted ``StandardScaler -> LogisticRegression`` pipeline as one ``nn.Linear`` whose
        softmax equals the pipeline's ``predict_proba`` (binary: logits -z/2 and z/2); ``None``
        for heads that are no linear map of the features."""
        est = self.estimator_
        if not (isinstance(est, Pipeline) and len(est.steps) == 2
                and isinstance(est.steps[0][1], StandardScaler)
                and isinstance(est.steps[-1][1], LogisticRegression | PrototypeClassifier)):
            return None
        return logreg_as_linear(est)

    @classmethod
    def load(cls, path: Path, head: str) -> SklearnHead:
        import skops.io as sio

        trusted = list(HEAD_TRUSTED_TYPES.get(head, ()))
        try:
            untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in trusted]
        except Exception as exc:  # not a zip, no schema: skops raises several types
            raise MedtlError(f"{path}: not a head file ({type(exc).__name__})") from exc
        if untrusted:
            raise MedtlError(f"{path}: refusing to load types a {head} head does not hold: "
                             f"{untrusted}")
        estimator = sio.load(path, trusted=trusted)
        try:
            _check_index_structures(estimator)
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise MedtlError(f"{path}: not a head medtl wrote ({type(exc).__name__})") from exc
        return cls(head=head, estimator_=estimator)


def _check_index_structures(estimator) -> None:
    """Refuse the trees whose node indices a crafted head file could point anywhere: skops does
    not check them (it distrusts ``Tree`` for that reason), and scikit-learn's compiled
    ``predict`` follows them without bounds checks. A forest's child and feature indices, and a
    kNN index's sample indices and node ranges, must stay inside their arrays."""
    steps = [s for _, s in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]
    for step in steps:
        if isinstance(step, RandomForestClassifier):
            for tree in step.estimators_:
                _check_tree(tree.tree_, step.n_features_in_)
        if isinstance(step, KNeighborsClassifier) and getattr(step, "_tree", None) is not None:
            data, idx, nodes, _ = step._tree.get_arrays()
            n = len(data)
            if len(idx) != n or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
                raise ValueError("kNN index points outside its samples")
            if len(nodes) and not (nodes["idx_start"].min() >= 0
                                   and nodes["idx_end"].max() <= n
                                   and (nodes["idx_start"] <= nodes["idx_end"]).all()):
                raise ValueError("kNN index nodes outside its samples")


def _check_tree(tree, n_features: int) -> None:
    n = tree.node_count
    left, right, feature = tree.children_left, tree.children_right, tree.feature
    if not (len(left) == len(right) == len(feature) == n and tree.value.shape[0] == n):
        raise ValueError("tree arrays of unequal lengths")
    leaf = left == -1
    inner = ~leaf
    # scikit-learn numbers nodes depth first, so a child comes after its parent: that also rules
    # out a cycle, which would keep predict walking for ever.
    node = np.arange(n)
    if (right[leaf] != -1).any() or ((left[inner] <= node[inner]) | (left[inner] >= n)).any() \
            or ((right[inner] <= node[inner]) | (right[inner] >= n)).any():
        raise ValueError("tree child index outside the tree or before its parent")
    if ((feature[inner] < 0) | (feature[inner] >= n_features)).any():
        raise ValueError("tree feature index outside the features")


def logreg_as_linear(pipeline) -> nn.Linear:
    """``StandardScaler -> LogisticRegression`` (or PrototypeClassifier) as one frozen
    ``nn.Linear`` (see as_linear)."""
    scaler, last = pipeline.steps[0][1], pipeline.steps[-1][1]
    coef, intercept = (last.linear() if isinstance(last, PrototypeClassifier)
                       else (last.coef_, last.intercept_))
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    if weight.shape[0] == 1:
        weight = np.concatenate([-weight, weight]) / 2
        bias = np.concatenate([-bias, bias]) / 2
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))
    return linear.requires_grad_(False)


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

    def standardise_like(self, x: torch.Tensor) -> None:
        """Mean and scale of the training features ``x``."""
        self.mean.copy_(x.mean(0))
        # Features (near-)constant on train, e.g. dead ReLUs, keep scale 1 as in scikit-learn's
        # StandardScaler: dividing by their tiny std would blow up any variation on new images.
        std = x.std(0)
        self.std.copy_(torch.where(std > 1e-3 * std.mean(), std, torch.ones_like(std)))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one linear layer on raw features equal to this head in eval mode:
        (f - mean) / std @ W.T + b  ==  f @ (W / std).T + (b - (W / std) @ mean)."""
        with torch.no_grad():
            weight = self.fc.weight / self.std
            return weight.clone(), (self.fc.bias - weight @ self.mean).clone()


@dataclass
class LinearHeadTrainer:
    """Train a LinearHead on cached features with the shared loop (early stopping on the
    validation selection score)."""

    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    patience: int = 20
    seed: int = 0
    balanced: bool = False
    quiet: bool = True
    threads: int | None = None
    history_: list[dict[str, Any]] = field(default_factory=list)
    best_epoch_: int = 0

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            num_classes: int) -> LinearHead:
        from medtl.training.loop import Inputs, TrainConfig, fit, seeded

        xt = torch.from_numpy(np.asarray(x)).float()
        with seeded(self.seed):  # the same initial head for the same seed, whatever ran before
            head = LinearHead(xt.shape[1], num_classes)
        head.standardise_like(xt)
        config = TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, weight_decay=self.weight_decay,
            patience=self.patience, min_delta=1e-4, schedule="constant", seed=self.seed,
            class_weight="balanced" if self.balanced else None, quiet=True,
            threads=self.threads)
        from medtl.console import progress_bar

        with progress_bar("train head", self.epochs, quiet=self.quiet) as advance:
            result = fit(head, [{"name": "head", "params": head.parameters(), "lr": self.lr}],
                         xt, torch.from_numpy(np.asarray(y)).long(),
                         torch.from_numpy(np.asarray(x_val)).float(),
                         torch.from_numpy(np.asarray(y_val)).long(), config,
                         inputs=Inputs(), on_epoch_end=lambda epoch: advance(1))
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        return head.eval()
