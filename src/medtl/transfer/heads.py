"""Classifier heads on frozen features: a torch linear head and scikit-learn's classifiers.

The torch head standardises features with the training set's statistics before its linear
layer, which makes one learning rate work across backbones whose features differ in scale.
scikit-learn heads are chosen on validation AUC over a small grid (Kim et al.'s "feature
extractor hybrid"), then kept as fitted on the training split only, so validation figures stay
honest.

Multi-label targets ((n, K) floats, NaN unknown): the torch head's K outputs are independent
sigmoids (masked binary cross-entropy, training.loop); a scikit-learn head is one-vs-rest
(:class:`MaskedOneVsRest`), one binary estimator per label fitted on the rows where that label
is known, the grid point chosen on the mean validation AUC over labels.
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
    learn the prevalence (Kermany's train split is 74 % pneumonia, for instance).

    Multi-label ``y`` (n, K): some label's positive/negative ratio among its known targets is
    below 0.5, either way round (a label never or always present counts as imbalanced)."""
    if np.ndim(y) == 2:
        ratios = label_balance(y)
        return bool(len(ratios) and min(ratios) < IMBALANCE_RATIO)
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


def label_balance(y: np.ndarray) -> list[float]:
    """Multi-label: each label's min(positives, negatives) / max(...) over its known targets
    (0 for a label with known targets of one value only; labels never known are left out)."""
    y = np.asarray(y, dtype=np.float64)
    out = []
    for k in range(y.shape[1]):
        pos, neg = int((y[:, k] == 1).sum()), int((y[:, k] == 0).sum())
        if pos + neg:
            out.append(min(pos, neg) / max(pos, neg))
    return out


class HeadDataError(MedtlError, ValueError):
    """Data a head cannot be fitted on: one line for the user (MedtlError), and a candidate
    ``auto``'s frozen stage leaves out (it catches ValueError) rather than a failed run."""


class MaskedOneVsRest(ClassifierMixin, BaseEstimator):
    """Multi-label one-vs-rest: ``estimators_[k]`` is a binary classifier of label k, fitted on
    the rows where label k is known (not NaN); ``predict_proba`` is (n, K) P(label present).

    Unlike scikit-learn's OneVsRestClassifier, unknown targets are left out per label rather
    than read as absent. A label whose known training (or, for a head calibrated on
    validation, validation) targets are of one value only cannot be learnt: MedtlError."""

    def __init__(self, estimator: Any = None, labels: Sequence[str] | None = None) -> None:
        self.estimator = estimator
        self.labels = labels

    def _name(self, k: int) -> str:
        return str(self.labels[k]) if self.labels is not None else f"label {k}"

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None, probabilistic: Callable | None = None,
            ) -> MaskedOneVsRest:
        """``probabilistic(est, x_val, y_val)``: what makes a fitted binary estimator give
        probabilities (SklearnHead._probabilistic), fed label k's known validation rows."""
        x = np.asarray(x)
        y = np.asarray(y, dtype=np.float64)
        self.estimators_ = []
        for k in range(y.shape[1]):
            known = ~np.isnan(y[:, k])
            t = y[known, k].astype(np.int64)
            if len(np.unique(t)) < 2:
                raise HeadDataError(f"{self._name(k)}: the training split's known targets are all "
                                 f"{'positive' if len(t) and t[0] == 1 else 'negative'}; a "
                                 "one-vs-rest head needs both to learn it")
            est = clone(self.estimator).fit(x[known], t)
            if probabilistic is not None and not hasattr(est, "predict_proba"):
                kv = ~np.isnan(y_val[:, k])
                tv = y_val[kv, k].astype(np.int64)
                if len(np.unique(tv)) < 2:
                    raise HeadDataError(f"{self._name(k)}: the validation split's known targets "
                                     "are of one value only; Platt scaling of this head "
                                     "needs both")
                est = probabilistic(est, x_val[kv], tv)
            self.estimators_.append(est)
        self.n_features_in_ = x.shape[1]
        self.classes_ = np.arange(y.shape[1])
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "estimators_")
        out = np.empty((len(x), len(self.estimators_)))
        for k, est in enumerate(self.estimators_):
            proba = est.predict_proba(x)
            # The column of class 1 (a binary estimator's classes_ are [0, 1]).
            out[:, k] = proba[:, list(est.classes_).index(1)]
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.predict_proba(x) >= 0.5).astype(np.int64)


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
            labels: Sequence[str] | None = None) -> SklearnHead:
        """Choose the grid point on validation; multi-label ``y`` (n, K): one-vs-rest
        (:class:`MaskedOneVsRest`, ``labels`` name them in messages), the grid point chosen
        on the mean validation AUC over labels, one setting shared by all labels."""
        check_choice("head", self.head, HEADS)
        multilabel = np.ndim(y) == 2
        # kNN: a grid point needs as many images as neighbours (each label's known ones).
        n_fit = (int(np.min((~np.isnan(np.asarray(y, dtype=np.float64))).sum(axis=0)))
                 if multilabel else len(x))
        best = None
        for params, est in HEADS[self.head](self.seed, self.class_weight):
            k = params.get("n_neighbors")
            if k is not None and k > n_fit:
                continue
            if multilabel:
                est = MaskedOneVsRest(est, labels).fit(x, y, x_val, y_val, self._probabilistic)
            else:
                est = clone(est).fit(x, y)
                est = self._probabilistic(est, x_val, y_val)
            score = selection_score(y_val, est.predict_proba(x_val))
            self.search_.append({**params, "val_score": score})
            if best is None or score > best[0]:
                best = (score, params, est)
        _, self.params_, self.estimator_ = best
        return self

    @property
    def multilabel(self) -> bool:
        return isinstance(self.estimator_, MaskedOneVsRest)

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
        if isinstance(est, MaskedOneVsRest):
            return sum(SklearnHead(self.head, estimator_=e).n_parameters
                       for e in est.estimators_)
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
        for heads that are no linear map of the features.

        Multi-label (one-vs-rest): one ``nn.Linear`` with K outputs whose SIGMOID equals
        ``predict_proba``, label k's row the difference of its binary estimator's two softmax
        rows."""
        est = self.estimator_
        if isinstance(est, MaskedOneVsRest):
            layers = [SklearnHead(self.head, estimator_=e).as_linear() for e in est.estimators_]
            if any(layer is None for layer in layers):
                return None
            weight = torch.stack([lin.weight[1] - lin.weight[0] for lin in layers])
            bias = torch.stack([lin.bias[1] - lin.bias[0] for lin in layers])
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            return linear.requires_grad_(False)
        if not (isinstance(est, Pipeline) and len(est.steps) == 2
                and isinstance(est.steps[0][1], StandardScaler)
                and isinstance(est.steps[-1][1], LogisticRegression | PrototypeClassifier)):
            return None
        return logreg_as_linear(est)

    @classmethod
    def load(cls, path: Path, head: str, *, multilabel: bool = False) -> SklearnHead:
        """A head file; ``multilabel``: it must hold a :class:`MaskedOneVsRest` (the only case
        where that type is trusted), and a single-label one must not."""
        import skops.io as sio

        trusted = list(HEAD_TRUSTED_TYPES.get(head, ()))
        if multilabel:
            trusted.append(_OVR_TYPE)
        try:
            untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in trusted]
        except Exception as exc:  # not a zip, no schema: skops raises several types
            raise MedtlError(f"{path}: not a head file ({type(exc).__name__})") from exc
        if untrusted:
            raise MedtlError(f"{path}: refusing to load types a {head} head does not hold: "
                             f"{untrusted}")
        estimator = sio.load(path, trusted=trusted)
        if isinstance(estimator, MaskedOneVsRest) != multilabel:
            raise MedtlError(f"{path}: holds a {'multi' if not multilabel else 'single'}-label "
                             f"head, the model is {'multi' if multilabel else 'single'}-label")
        try:
            if multilabel:
                if (not isinstance(estimator.estimators_, list) or not estimator.estimators_
                        or any(isinstance(e, MaskedOneVsRest) for e in estimator.estimators_)):
                    raise ValueError("one-vs-rest head without binary estimators")
                for e in estimator.estimators_:
                    _check_index_structures(e)
            else:
                _check_index_structures(estimator)
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise MedtlError(f"{path}: not a head medtl wrote ({type(exc).__name__})") from exc
        return cls(head=head, estimator_=estimator)


_OVR_TYPE = f"{MaskedOneVsRest.__module__}.{MaskedOneVsRest.__qualname__}"


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
        """Multi-label ``y`` (n, K) floats with NaN unknown: K sigmoid outputs trained with the
        loop's masked binary cross-entropy (``balanced``: per-label positive weights), the best
        epoch on the mean validation AUC over labels."""
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
                         xt, _targets(y), torch.from_numpy(np.asarray(x_val)).float(),
                         _targets(y_val), config,
                         inputs=Inputs(), on_epoch_end=lambda epoch: advance(1))
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        return head.eval()


def _targets(y: np.ndarray) -> torch.Tensor:
    """Class indices as int64; multi-label (n, K) targets as float32, NaN kept (masked)."""
    y = np.asarray(y)
    return (torch.from_numpy(y.astype(np.float32)) if y.ndim == 2
            else torch.from_numpy(y).long())
