"""Combining the probabilities of several fitted runs: mean, vote, weighted, stack.

An ensemble run (``medtl ensemble``, :mod:`medtl.ensembles`) keeps its members' runs in
``members/<name>/`` and its combiner in ``model/ensemble.json``: the method, the members' weights
(``weighted``) or the stacker's logistic-regression coefficients (``stack``), as plain numbers, so
loading it executes nothing. :class:`EnsembleClassifier` loads every member and combines their
calibrated probabilities the same way the run was built from their predictions.csv.

Weights and stacker are fitted on validation with cross-fitting (:func:`cross_fit`): each
validation row's ensemble probability comes from a fit on the other folds only, so the ensemble's
validation figures and the operating points chosen on them are not fitted to themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data.splits import group_codes
from medtl.errors import MedtlError

METHODS = ("mean", "vote", "weighted", "stack")
COMBINER = "ensemble.json"
MAX_MEMBERS = 64
# vote: probabilities are the vote shares plus this much of the mean probability (renormalised),
# so that a tie of votes goes to the class the members find more probable on average, and no
# share moves by more than it (a vote is worth at least 1/64).
VOTE_TIE_BREAK = 1e-6
_EPS = 1e-12


# ------------------------------------------------------------------------------ combining
def combine(probas: Sequence[np.ndarray], method: str, params: dict[str, Any]) -> np.ndarray:
    """(n, k) probabilities from the members' (n, k) probabilities; NaN rows where any member
    has one (an image a member could not read is not scored by the ensemble)."""
    p = np.stack([np.asarray(q, dtype=np.float64) for q in probas])  # (m, n, k)
    bad = ~np.isfinite(p).all(axis=(0, 2))
    p = np.where(np.isfinite(p), p, 0.0)
    if method == "mean":
        out = p.mean(axis=0)
    elif method == "vote":
        out = vote(p)
    elif method == "weighted":
        w = np.asarray(params["weights"], dtype=np.float64)
        out = np.tensordot(w, p, axes=1)
    elif method == "stack":
        out = stack_proba(stack_features(p), params["coef"], params["intercept"])
    else:
        raise MedtlError(f"ensemble method {method!r} is not one of {', '.join(METHODS)}")
    out[bad] = np.nan
    return out


def vote(p: np.ndarray) -> np.ndarray:
    """Vote shares of the members' predicted classes, ties broken by the mean probability."""
    m, n, k = p.shape
    shares = np.zeros((n, k))
    for member in p:
        shares[np.arange(n), member.argmax(axis=1)] += 1.0 / m
    return (shares + VOTE_TIE_BREAK * p.mean(axis=0)) / (1.0 + VOTE_TIE_BREAK)


def stack_features(p: np.ndarray) -> np.ndarray:
    """The stacker's input: each member's probabilities side by side, (n, m * k)."""
    return np.concatenate(list(p), axis=1)


def stack_proba(x: np.ndarray, coef: Any, intercept: Any) -> np.ndarray:
    """A logistic regression's probabilities from its saved coefficients (as scikit-learn's
    ``predict_proba``: a sigmoid for two classes, a softmax otherwise)."""
    from scipy.special import expit, softmax

    coef, intercept = np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)
    z = x @ coef.T + intercept
    if coef.shape[0] == 1:
        p1 = expit(z[:, 0])
        return np.stack([1.0 - p1, p1], axis=1)
    return softmax(z, axis=1)


# ------------------------------------------------------------------------------ fitting
def fit_combiner(p: np.ndarray, y: np.ndarray, method: str, seed: int = 0) -> dict[str, Any]:
    """The combiner's parameters fitted on members' probabilities ``p`` (m, n, k), labels y."""
    if method in ("mean", "vote"):
        return {}
    if method == "weighted":
        return {"weights": log_loss_weights(p, y)}
    return fit_stacker(stack_features(p), y, p.shape[2], seed)


def log_loss_weights(p: np.ndarray, y: np.ndarray) -> list[float]:
    """Non-negative weights summing to 1 that minimise the log-loss of the weighted mean."""
    from scipy.optimize import minimize

    m = p.shape[0]
    picked = p[:, np.arange(len(y)), y]  # (m, n): each member's probability of the true class

    def loss(w: np.ndarray) -> float:
        return float(-np.mean(np.log(np.clip(w @ picked, _EPS, None))))

    res = minimize(loss, np.full(m, 1.0 / m), method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}])
    w = np.clip(res.x if np.isfinite(res.x).all() else np.full(m, 1.0 / m), 0.0, None)
    return (w / w.sum() if w.sum() > 0 else np.full(m, 1.0 / m)).tolist()


def fit_stacker(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> dict[str, Any]:
    """A logistic regression on the members' probabilities, as plain coefficients."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        raise MedtlError("stack: validation holds a single class; a stacker cannot be fitted")
    lr = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x, y)
    coef, intercept = lr.coef_, lr.intercept_
    if len(lr.classes_) != n_classes:  # a class absent from these rows: expand to all classes
        full_c, full_i = np.zeros((n_classes, x.shape[1])), np.full(n_classes, -30.0)
        rows = lr.classes_ if coef.shape[0] > 1 else lr.classes_[1:]
        full_c[rows], full_i[rows] = coef, intercept
        coef, intercept = full_c, full_i
    return {"coef": coef.tolist(), "intercept": intercept.tolist()}


def fold_assignment(y: np.ndarray, groups: Sequence[str | None] | None, n_folds: int,
                    seed: int) -> np.ndarray:
    """The cross-fitting fold (0..K-1) of each validation row: grouped by patient when every
    row has one (no patient's images on both sides), else stratified by class."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = np.bincount(y)
    k = int(min(n_folds, max(2, counts[counts > 0].min())))
    if groups is not None and all(groups) and len(set(groups)) >= k:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(y)), y, groups=group_codes(groups))
    else:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(len(y)), y)
    folds = np.full(len(y), -1)
    for f, (_, held) in enumerate(splits):
        folds[held] = f
    return folds


def cross_fit(p: np.ndarray, y: np.ndarray, method: str, folds: np.ndarray,
              seed: int = 0) -> np.ndarray:
    """Out-of-fold ensemble probabilities of the validation rows: each fold's rows combined by
    a combiner fitted on the other folds only."""
    out = np.full(p.shape[1:], np.nan)
    for f in np.unique(folds):
        held = folds == f
        params = fit_combiner(p[:, ~held], y[~held], method, seed)
        out[held] = combine(list(p[:, held]), method, params)
    return out


# ------------------------------------------------------------------------------ members
def member_files(member_dir: str | Path) -> list[str]:
    """The files of a member that decide its predictions: config.json and model/*."""
    d = Path(member_dir)
    model = sorted(p.relative_to(d).as_posix() for p in (d / "model").rglob("*")
                   if p.is_file() or p.is_symlink())
    return ["config.json", *model]


def sha256_file(path: Path) -> str:
    """sha256 of a file read now (no cache: a file changed in place must be seen)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def member_digests(member_dir: str | Path) -> dict[str, str]:
    return {f: sha256_file(Path(member_dir) / f) for f in member_files(member_dir)}


def check_member_files(member_dir: Path, recorded: dict[str, str]) -> None:
    """Refuse a member whose files differ from those the ensemble recorded: a file changed,
    missing, added, or a link (MedtlError naming it)."""
    if (member_dir / "model").is_symlink():
        raise MedtlError(f"{member_dir / 'model'}: is a link; an ensemble member's model is a "
                         "folder of its own")
    now = member_files(member_dir)
    extra = sorted(set(now) - set(recorded))
    if extra:
        raise MedtlError(f"{member_dir / extra[0]}: not a file of this ensemble member as "
                         "recorded (added after the ensemble was built)")
    for name, sha in recorded.items():
        p = member_dir / name
        if p.is_symlink() or not p.is_file():
            raise MedtlError(f"{p}: missing or not a regular file (the ensemble recorded it)")
        if sha256_file(p) != sha:
            raise MedtlError(f"{p}: sha256 differs from the one the ensemble recorded (the "
                             "member was changed after the ensemble was built)")


# ------------------------------------------------------------------------------ the model
class _EnsembleOOD:
    """The members' out-of-distribution guards as one: a member's score is its feature
    distance over its own threshold, and the ensemble's score is the highest of them, so an
    image is flagged (score > 1) when any member flags it."""

    threshold_ = 1.0

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def record(self) -> dict[str, Any]:
        first = self.records[0]
        return {"method": "max over members of distance / member threshold", "threshold": 1.0,
                "members": self.records, "modalities": list(first.get("modalities", [])),
                "body_parts": list(first.get("body_parts", []))}


class EnsembleModel:
    """The ``model_`` of an ensemble: what evaluate and predict use of a FittedModel."""

    temperature = None  # the members' probabilities are calibrated already
    engine = "ensemble"

    def __init__(self, members: list[Any], method: str, params: dict[str, Any]) -> None:
        self.members, self.method, self.params = members, method, params
        self.classes = list(members[0].classes_)
        oods = [m.model_.ood for m in members]
        self.ood = None if any(o is None for o in oods) else _EnsembleOOD(
            [o.record() for o in oods])

    @property
    def multilabel(self) -> bool:
        """Whether the members (and so the mean of their probabilities) are multi-label."""
        return bool(getattr(self.members[0].model_, "multilabel", False))

    @property
    def tta(self) -> str:
        """The members' test-time augmentation: each applies the one it recorded."""
        own = {getattr(m.model_, "tta", "none") for m in self.members}
        return "none" if own == {"none"} else "members' own (" + ", ".join(sorted(own)) + ")"

    @property
    def options(self):
        # Only read to override a run's settings (evaluate/predict --tta): each member keeps the
        # test-time augmentation its ensemble was built with.
        raise MedtlError("--tta is not supported for ensemble runs: each member applies the "
                         "test-time augmentation it recorded, as when the ensemble was built")

    def predict_proba(self, data, *, calibrated: bool = True, cache: bool = True) -> np.ndarray:
        return combine([m.model_.predict_proba(data, cache=cache) for m in self.members],
                       self.method, self.params)

    def predict_proba_ood(self, data, *, calibrated: bool = True, cache: bool = True,
                          ) -> tuple[np.ndarray, np.ndarray | None]:
        out = [m.model_.predict_proba_ood(data, cache=cache) for m in self.members]
        proba = combine([p for p, _ in out], self.method, self.params)
        if self.ood is None:
            return proba, None
        scores = np.stack([s / m.model_.ood.threshold_ for (_, s), m in zip(out, self.members,
                                                                           strict=True)])
        return proba, np.max(scores, axis=0)

    def calibrate(self, proba: np.ndarray) -> np.ndarray:
        return proba


class EnsembleClassifier:
    """A loaded ensemble run: ``classes_``, ``predict_proba`` and ``model_`` as a
    TransferClassifier has them, for ``evaluate`` and ``predict``."""

    def __init__(self, members: list[Any], method: str, params: dict[str, Any],
                 seed: int = 0) -> None:
        self.model_ = EnsembleModel(members, method, params)
        self.classes_ = self.model_.classes
        self.seed = seed

    def predict_proba(self, data, *, calibrated: bool = True) -> np.ndarray:
        return self.model_.predict_proba(data)


def check_combiner(meta: Any, n_members: int, n_classes: int, source: Path) -> dict[str, Any]:
    """model/ensemble.json's values checked: method known, weights/coefficients finite numbers
    of the right shape; anything else is a MedtlError naming ``source``."""
    if not isinstance(meta, dict) or meta.get("method") not in METHODS:
        raise MedtlError(f"{source}: not an ensemble combiner (method one of {METHODS})")
    params = meta.get("params") or {}
    try:
        if meta["method"] == "weighted":
            w = np.asarray(params["weights"], dtype=np.float64)
            if w.shape != (n_members,) or not np.isfinite(w).all() or (w < 0).any():
                raise ValueError("weights")
        if meta["method"] == "stack":
            c = np.asarray(params["coef"], dtype=np.float64)
            b = np.asarray(params["intercept"], dtype=np.float64)
            rows = 1 if n_classes == 2 else n_classes
            if (c.shape != (rows, n_members * n_classes) or b.shape != (rows,)
                    or not (np.isfinite(c).all() and np.isfinite(b).all())):
                raise ValueError("coefficients")
    except (KeyError, TypeError, ValueError) as exc:
        raise MedtlError(f"{source}: the {meta['method']} combiner's {exc} are not valid") from None
    return {"method": meta["method"], "params": params}


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def safe_name(text: str) -> bool:
    """A member's folder name: one plain path component (no separator, not . or ..)."""
    return (isinstance(text, str) and 0 < len(text) <= 100 and set(text) <= _NAME_CHARS
            and text not in (".", "..") and not text.startswith("."))


def check_members_record(members: Any) -> list[dict[str, Any]]:
    """config.json's ``members`` of an ensemble run: 2..MAX_MEMBERS entries, each a safe folder
    name and the sha256 of each of its files (config.json and model/...; no path leaves the
    member's folder). A MedtlError otherwise (the caller names the file)."""
    from medtl.models.weights import is_sha256

    if not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS:
        raise MedtlError(f"members is not a list of 2 to {MAX_MEMBERS} runs")
    names = set()
    for m in members:
        if not isinstance(m, dict) or not safe_name(m.get("name")) or m["name"] in names:
            raise MedtlError("a member's name is not a plain, unique folder name")
        names.add(m["name"])
        files = m.get("files")
        if not isinstance(files, dict) or "config.json" not in files:
            raise MedtlError(f"member {m['name']}: no file digests")
        for rel, sha in files.items():
            parts = rel.split("/") if isinstance(rel, str) else []
            if not (rel == "config.json" or (len(parts) >= 2 and parts[0] == "model"
                                             and all(safe_name(q) for q in parts[1:]))):
                raise MedtlError(f"member {m['name']}: file {rel!r} is not config.json or "
                                 "under model/")
            if not is_sha256(sha):
                raise MedtlError(f"member {m['name']}: {rel} sha256 is not 64 hex digits")
    return members
