"""Patient-grouped, class-stratified splits.

Several images of one patient in both training and validation (or test) make every metric
optimistic: the model recognises the patient, not the disease. Whenever patients are known,
splits here keep each patient on one side; scikit-learn does the splitting.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import regex as regex_module

from medtl.errors import MedtlError

if TYPE_CHECKING:
    from medtl.data.dataset import Dataset

KERMANY_PATIENT_REGEX = r"(person\d+|IM-\d+)"
"""Patient id in Kermany et al. chest X-ray file names.

``person1946_bacteria_4874.jpeg`` -> ``person1946``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
``NORMAL2-IM-1427-0001.jpeg`` -> ``IM-1427``. The ``NORMAL2-`` prefix is dropped, so
``NORMAL2-IM-0383`` and ``IM-0383`` count as one patient: if they are in fact two, grouping them
costs a little split balance and never leaks.
"""


MAX_PATTERN = 1000
"""Characters of a patient regex: a file-name pattern is short; a long one is a mistake or an
attack (a run's config.json carries one to ``medtl evaluate``)."""

MATCH_TIMEOUT = 1.0
"""Seconds one search of one file name may take. A file name is at most 255 bytes and a sane
pattern takes microseconds on it; a catastrophic one (``(a+)+$``) would take years, so it is
stopped and refused instead of hanging ``evaluate`` or ``train``."""


def compile_patient_regex(regex: str | re.Pattern[str] | regex_module.Pattern[str],
                          ) -> regex_module.Pattern[str]:
    """Compile a user's ``--patient-regex`` (or a run's recorded one) with the ``regex``
    package, whose searches take a timeout (:func:`patient_from_name`); a bad or overlong
    pattern is a :class:`MedtlError`. A compiled ``re`` pattern is compiled again the same way,
    so it gets the timeout too."""
    if isinstance(regex, regex_module.Pattern):
        return regex
    text, flags = (regex.pattern, regex.flags) if isinstance(regex, re.Pattern) else (regex, 0)
    if not isinstance(text, str):
        raise MedtlError(f"invalid patient regex {text!r}: not text")
    return _compile_checked(text, flags)


# Names on which a pattern that backtracks catastrophically shows it at once: long runs of one
# kind of character that a file name may hold, then one that ends the run.
_PROBES = tuple(c * 200 + end for c in ("a", "A", "0", "_", "-", ".", " ") for end in ("!", ""))
_PROBE_TIMEOUT = 0.25


@functools.lru_cache(maxsize=64)
def _compile_checked(text: str, flags: int) -> regex_module.Pattern[str]:
    """Compile ``text`` and try it on :data:`_PROBES`: a pattern that needs more than
    ``_PROBE_TIMEOUT`` on one of them is refused before any data is read (every command that
    opens a run checks its recorded pattern this way); :func:`patient_from_name` stops any
    other slow search with its own timeout."""
    if len(text) > MAX_PATTERN:
        raise MedtlError(f"patient regex {text[:40]!r}...: {len(text)} characters, more than "
                         f"the {MAX_PATTERN} a file-name pattern needs")
    try:
        pattern = regex_module.compile(text, flags)
    except (regex_module.error, ValueError, OverflowError, RecursionError) as exc:
        raise MedtlError(f"invalid patient regex {text!r}: {exc}") from None
    for probe in _PROBES:
        try:
            pattern.search(probe, timeout=_PROBE_TIMEOUT)
        except TimeoutError:
            raise MedtlError(f"patient regex {text!r} took more than {_PROBE_TIMEOUT:g} s on a "
                             f"name of {len(probe)} characters: it backtracks catastrophically; "
                             "simplify it") from None
    return pattern


def patient_from_name(name: str, regex: str | re.Pattern[str] | regex_module.Pattern[str],
                      ) -> str:
    """Patient id in a file name: the first capture group of ``re.search``, else the whole match.

    ``name`` may be a path; only its last component is searched, so folder names (``PATIENT``,
    ``person``) cannot produce a false match. No match is a :class:`MedtlError` naming the file
    and the pattern, because silently treating the file as its own patient would reopen the leak.
    A search that takes longer than :data:`MATCH_TIMEOUT` is a :class:`MedtlError` too.
    """
    pattern = compile_patient_regex(regex)
    base = re.split(r"[\\/]", str(name))[-1]
    try:
        match = pattern.search(base, timeout=MATCH_TIMEOUT)
    except TimeoutError:
        raise MedtlError(f"patient regex '{pattern.pattern}' took more than {MATCH_TIMEOUT:g} s "
                         f"on the file name {base!r}: it backtracks catastrophically; simplify "
                         "it") from None
    if match is None:
        raise MedtlError(f"{name}: patient regex '{pattern.pattern}' does not match the file name")
    pid = match.group(1) if pattern.groups else match.group(0)
    if not pid:
        raise MedtlError(f"{name}: patient regex '{pattern.pattern}' matched an empty patient id")
    return pid


def group_codes(groups: Sequence[str | None]) -> np.ndarray:
    """Each image's patient as an integer, numbered in order of first appearance.

    Patient ids are salted pseudonyms (medtl.data.privacy), different on every machine, and
    scikit-learn's grouped splitters order groups by name before shuffling: grouped by the
    pseudonyms themselves, the same data, seed and code would split differently on a
    colleague's machine. Numbered by where they first appear in the (path-ordered) records, the
    split depends only on the data and the seed. An image with no known patient is its own
    group: it can go anywhere without leaking.
    """
    codes: dict[object, int] = {}
    out = np.empty(len(groups), dtype=np.int64)
    for i, g in enumerate(groups):
        key = g if g is not None else ("image", i)
        out[i] = codes.setdefault(key, len(codes))
    return out


def kfold_indices(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str | None] | None = None,
    *,
    n_splits: int = 5,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, held_out)`` index pairs of a stratified k-fold, grouped by patient when known.

    Uses :class:`~sklearn.model_selection.StratifiedGroupKFold` when any group is known and
    :class:`~sklearn.model_selection.StratifiedKFold` otherwise, both shuffled with ``seed``.
    Multi-label ``labels`` (an ``(n, K)`` matrix of 1, 0 and NaN): iterative stratification
    over patients (:func:`multilabel_folds`).
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels)
    n = len(y)
    if n_splits < 2:
        raise MedtlError(f"number of folds must be at least 2, got {n_splits}")
    if y.ndim == 2:
        return multilabel_folds(y, groups, n_splits=n_splits, seed=seed)
    x = np.zeros((n, 1))
    with warnings.catch_warnings():
        # "The least populated class in y has only N members": a small class then sits in fewer
        # folds, which is the best any split can do; the warning would only alarm users.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        if groups is not None and any(g is not None for g in groups):
            g = group_codes(groups)
            n_groups = len(set(g.tolist()))
            if n_groups < n_splits:
                raise MedtlError(
                    f"cannot make {n_splits} patient-grouped folds from {n_groups} patients"
                )
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            folds = splitter.split(x, y, g)
        else:
            splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            folds = splitter.split(x, y)
        try:
            return [(np.sort(tr), np.sort(te)) for tr, te in folds]
        except ValueError as exc:  # e.g. more folds than images of every class
            raise MedtlError(f"cannot make {n_splits} folds from {n} images: {exc}") from exc


def carve_validation(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str | None] | None = None,
    *,
    fraction: float = 0.2,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Sorted indices (into ``labels``) of a validation part carved from a training set.

    With patients (``groups`` not all ``None``): the first fold of a shuffled
    ``StratifiedGroupKFold`` with ``k = round(1 / fraction)`` folds, so the fraction is
    approximately ``1/k`` (0.2 -> 5 folds) and no patient is on both sides. Without patients:
    ``StratifiedShuffleSplit`` with exactly ``round(fraction * n)`` images (at least one per
    class). Both are deterministic for a given ``seed``.

    Multi-label ``labels`` (an ``(n, K)`` matrix of 1, 0 and NaN): the same, with iterative
    stratification over the labels (:func:`multilabel_folds`).
    """
    from sklearn.model_selection import StratifiedShuffleSplit

    if not 0.0 < fraction < 1.0:
        raise MedtlError(f"validation fraction must be between 0 and 1, got {fraction}")
    if np.ndim(labels) == 2:
        return _carve_multilabel(np.asarray(labels, dtype=np.float64), groups,
                                 fraction=fraction, seed=seed)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    present, counts = np.unique(y, return_counts=True)

    def name(label: int) -> str:
        return class_names[label] if class_names is not None else str(label)

    for label, count in zip(present, counts, strict=True):
        if count < 2:
            raise MedtlError(
                f"class '{name(int(label))}' has {count} training image; at least 2 are needed to "
                "carve a validation split (or provide a val split)"
            )

    if groups is not None and any(g is not None for g in groups):
        g = group_codes(groups)
        n_groups = len(set(g.tolist()))
        if n_groups < 2:
            raise MedtlError(
                "cannot carve a validation split: all training images belong to one patient"
            )
        k = min(max(2, round(1.0 / fraction)), n_groups)
        return kfold_indices(y, list(groups), n_splits=k, seed=seed)[0][1]

    n_classes = len(present)
    n_val = max(n_classes, round(fraction * n))
    if n - n_val < n_classes:
        raise MedtlError(
            f"too few training images ({n}) to carve a {fraction:.0%} validation split that "
            f"keeps each of the {n_classes} classes on both sides"
        )
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    _, val = next(splitter.split(np.zeros((n, 1)), y))
    return np.sort(val)


# ---- multi-label: iterative stratification (Sechidis et al. 2011) over patients ---------------


def _iterstrat() -> tuple[type, type]:
    try:
        from iterstrat.ml_stratifiers import (
            MultilabelStratifiedKFold,
            MultilabelStratifiedShuffleSplit,
        )
    except ImportError:  # a core dependency, missing only from an environment not reinstalled
        raise MedtlError("multi-label splits need the iterative-stratification package: "
                         "pip install iterative-stratification") from None
    return MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit


def patient_label_matrix(labels: np.ndarray,
                         groups: Sequence[str | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Each image's group (:func:`group_codes`) and one row per group: label ``k`` is present
    when any image of the patient has it (1); unknown (NaN) counts as absent.

    Stratifying images would split a patient; stratifying patients by what any of their
    images shows keeps every patient whole and the label shares alike on both sides.
    """
    y = np.asarray(labels, dtype=np.float64)
    codes = group_codes(groups if groups is not None else [None] * len(y))
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    present = np.zeros((n_groups, y.shape[1]), dtype=bool)
    np.logical_or.at(present, codes, y == 1.0)  # NaN == 1.0 is False: unknown counts as 0
    return codes, present


def _indicator(present: np.ndarray) -> np.ndarray:
    # iterstrat accepts only scikit-learn's multilabel-indicator layout, which needs two columns
    # or more: a single label gets a constant zero companion, which weighs in nowhere.
    if present.shape[1] == 1:
        present = np.hstack([present, np.zeros_like(present)])
    return present.astype(np.int64)


def multilabel_folds(labels: np.ndarray, groups: Sequence[str | None] | None = None, *,
                     n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, held_out)`` image index pairs of a multi-label k-fold: iterstrat's
    ``MultilabelStratifiedKFold`` (shuffled with ``seed``) over one row per patient
    (:func:`patient_label_matrix`; an image with no patient is its own), so each patient's
    images are in one fold and each label's positive patients are spread evenly."""
    kfold, _ = _iterstrat()
    if n_splits < 2:
        raise MedtlError(f"number of folds must be at least 2, got {n_splits}")
    codes, present = patient_label_matrix(labels, groups)
    n_groups = len(present)
    if n_groups < n_splits:
        grouped = groups is not None and any(g is not None for g in groups)
        raise MedtlError(f"cannot make {n_splits} patient-grouped folds from {n_groups} patients"
                         if grouped else
                         f"cannot make {n_splits} folds from {n_groups} images")
    splitter = kfold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = []
    for _, held in splitter.split(np.zeros((n_groups, 1)), _indicator(present)):
        in_held = np.isin(codes, held)
        folds.append((np.flatnonzero(~in_held), np.flatnonzero(in_held)))
    return folds


def _carve_multilabel(y: np.ndarray, groups: Sequence[str | None] | None, *, fraction: float,
                      seed: int) -> np.ndarray:
    """carve_validation for an ``(n, K)`` target matrix: with patients, the first of
    ``round(1 / fraction)`` multi-label stratified folds over patients; without, iterstrat's
    ``MultilabelStratifiedShuffleSplit`` with ``round(fraction * n)`` images."""
    _, shuffle_split = _iterstrat()
    n = len(y)
    if groups is not None and any(g is not None for g in groups):
        n_groups = len(set(group_codes(groups).tolist()))
        if n_groups < 2:
            raise MedtlError(
                "cannot carve a validation split: all training images belong to one patient"
            )
        k = min(max(2, round(1.0 / fraction)), n_groups)
        return multilabel_folds(y, groups, n_splits=k, seed=seed)[0][1]
    n_val = max(1, round(fraction * n))
    if n - n_val < 1:
        raise MedtlError(f"too few training images ({n}) to carve a {fraction:.0%} validation "
                         "split")
    _, present = patient_label_matrix(y, None)
    splitter = shuffle_split(n_splits=1, test_size=n_val, random_state=seed)
    _, val = next(splitter.split(np.zeros((n, 1)), _indicator(present)))
    return np.sort(val)


def cross_validation_folds(dataset: Dataset, n_splits: int, *, seed: int = 0,
                           val_fraction: float = 0.2) -> list[Dataset]:
    """One dataset per fold over the train and val records: the fold as ``heldout``, a
    validation part carved from the rest as ``val`` (for early stopping and choices), the
    remainder ``train``. Stratified, and grouped by patient when patients are known, so no
    patient is in two folds nor on both sides of a fold. Test records take no part.
    Multi-label datasets are stratified on their labels (:func:`multilabel_folds`).
    """
    pool = dataset.subset(i for i, r in enumerate(dataset.records)
                          if r.split in ("train", "val"))
    folds = []
    for train_idx, held_idx in kfold_indices(pool.labels, pool.patients, n_splits=n_splits,
                                             seed=seed):
        rest = pool.subset(train_idx)
        val = set(carve_validation(rest.labels, rest.patients, fraction=val_fraction,
                                   seed=seed, class_names=dataset.classes).tolist())
        names = ["val" if i in val else "train" for i in range(len(rest))]
        fold = pool.subset([*train_idx, *held_idx]).with_splits(
            names + ["heldout"] * len(held_idx))
        folds.append(fold)
    return folds


def patient_overlap(dataset: Dataset, a: str = "train", b: str = "val") -> list[str]:
    """Sorted patients with images in both split ``a`` and split ``b`` (empty if either is absent).

    Images with no known patient are ignored: leakage by identical content is a separate check.
    """
    side_a = {r.patient_id for r in dataset.records if r.split == a and r.patient_id is not None}
    side_b = {r.patient_id for r in dataset.records if r.split == b and r.patient_id is not None}
    return sorted(side_a & side_b)


def assert_no_patient_overlap(dataset: Dataset, a: str = "train", b: str = "val") -> None:
    """Raise :class:`MedtlError` naming the patients that are in both split ``a`` and ``b``."""
    shared = patient_overlap(dataset, a, b)
    if shared:
        shown = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        where = dataset.source or "dataset"
        raise MedtlError(f"{where}: {len(shared)} patient(s) in both {a} and {b}: {shown}")
