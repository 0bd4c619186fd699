"""``medtl curve``: learning curves that answer "how many labels do I need?" on the user's data.

For each labelled budget (images per class) and each repeat, a subset of the training pool
(train and val together: at a budget of 10 images per class, validation comes out of those 10
too, as it would for a user who has labelled only that many) is drawn by patient, and split
into train and val by patient again. Every strategy trains on the same subsets (so strategies
are compared pairwise within a repeat) and is scored once on the whole test split, which no
choice ever sees. Budgets of one repeat are nested: the patients drawn for 10 images per class
are among those drawn for 25.

Each (strategy, budget, repeat) is a cell: ``OUT/cells/NAME.json``, written atomically when the
cell is done, so an interrupted curve is simply run again. ``curve.csv`` (every cell),
``summary.csv`` (mean test AUC over repeats with a t interval), ``crossings.csv`` (where one
strategy overtakes another) and ``report.html`` are rebuilt from the cells at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import MedtlError
from medtl.files import atomic_write, read_json, write_csv, write_json

log = logging.getLogger("medtl")

DEFAULT_SIZES = "10,25,50,100,all"
DEFAULT_STRATEGIES = ("feature-extractor", "hybrid:logreg", "hybrid:prototype", "fine-tune",
                      "full")
ALL = 0  # the budget "all": every image of the pool


def parse_sizes(text: str | Sequence[int | str]) -> list[int]:
    """Budgets in labelled images per class, ascending, ``all`` (ALL) last."""
    items = text.split(",") if isinstance(text, str) else list(text)
    sizes: set[int] = set()
    for item in items:
        word = str(item).strip().lower()
        if word == "all":
            sizes.add(ALL)
            continue
        try:
            n = int(word)
        except ValueError:
            raise MedtlError(f"--sizes {text!r}: {word!r} is not a number of images per class "
                             "or 'all'") from None
        if n < 2:
            raise MedtlError(f"--sizes: {n} images per class is too few; a budget needs at "
                             "least 2 (one to train on, one to validate on)")
        sizes.add(n)
    if not sizes:
        raise MedtlError("--sizes: no budget given")
    return sorted(s for s in sizes if s != ALL) + ([ALL] if ALL in sizes else [])


def size_name(size: int) -> str:
    return "all" if size == ALL else str(size)


def draw_budgets(labels: np.ndarray, patients: Sequence[str | None], sizes: Sequence[int], *,
                 seed: int, val_fraction: float = 0.2,
                 class_names: Sequence[str] | None = None) -> dict[int, dict[str, np.ndarray]]:
    """For each budget, the ``train`` and ``val`` indices (into ``labels``) of one repeat.

    Patients are taken whole, in one random order per repeat, while every class they hold is
    still short of the budget: the draws of a repeat are nested, and a patient's images all go
    to one side. Each draw is then split into train and val by patient
    (:func:`medtl.data.splits.carve_validation`), so no patient is on both sides.
    """
    from medtl.data.splits import carve_validation, group_codes

    y = np.asarray(labels, dtype=np.int64)
    groups = group_codes(patients)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    members = [np.flatnonzero(groups == g) for g in range(n_groups)]
    order = np.random.default_rng(seed).permutation(n_groups)
    classes = np.unique(y)
    out: dict[int, dict[str, np.ndarray]] = {}
    for size in sizes:
        if size == ALL:
            chosen = np.arange(len(y))
        else:
            counts = dict.fromkeys(classes.tolist(), 0)
            taken = []
            for g in order:
                held = y[members[g]]
                if all(counts[c] < size for c in np.unique(held).tolist()):
                    taken.append(members[g])
                    for c in held.tolist():
                        counts[c] += 1
                if all(v >= size for v in counts.values()):
                    break
            chosen = np.sort(np.concatenate(taken))
        sub_patients = [patients[i] for i in chosen]
        val = carve_validation(y[chosen], sub_patients, fraction=val_fraction, seed=seed,
                               class_names=class_names)
        in_val = np.zeros(len(chosen), dtype=bool)
        in_val[val] = True
        out[size] = {"train": chosen[~in_val], "val": chosen[in_val]}
    return out


def _cell_name(strategy: str, size: int, repeat: int) -> str:
    return f"{strategy.replace(':', '-')}-n{size_name(size)}-r{repeat}"


def _strategy_options(strategy: str, epochs: int | None = None) -> dict[str, Any]:
    """TrainOptions fields of a cell: ``hybrid:logreg`` is strategy and head; ``epochs`` bounds
    the strategies that train the network only (a frozen head's own epochs are cheap and its
    default stays)."""
    from medtl.transfer.strategies import NetworkStrategy, get_strategy

    name, _, head = strategy.partition(":")
    out: dict[str, Any] = {"strategy": name, **({"head": head} if head else {})}
    if epochs is not None and issubclass(get_strategy(name), NetworkStrategy):
        out["epochs"] = epochs
    return out


def curve(data: str | Path, *, out: str | Path, sizes: str | Sequence[int | str] = DEFAULT_SIZES,
          strategies: Sequence[str] = DEFAULT_STRATEGIES, repeats: int = 3,
          seed: int = 0, val_fraction: float = 0.2, patient_regex: str | None = None,
          positive_class: str | None = None, window: str = "auto", slices: str = "middle",
          mode: str = "2d", epochs: int | None = None, quiet: bool = False,
          **train_options: Any) -> Path:
    """Train every (strategy, budget, repeat) not finished yet, then write the tables and
    the report. ``train_options`` go to every cell's TrainOptions (backbone, image_size,
    ...); ``epochs`` to the strategies that train the network. Returns ``out``."""
    from medtl.console import progress_bar
    from medtl.data import load_dataset
    from medtl.training.options import TrainOptions
    from medtl.transfer.estimator import TransferClassifier
    from medtl.workflow import positive_index

    budgets = parse_sizes(sizes)
    if repeats < 1:
        raise MedtlError(f"--repeats {repeats}: at least 1")
    if not strategies:
        raise MedtlError("--strategies: no strategy given")
    base = TrainOptions().replace(seed=seed, quiet=True, **train_options)
    for s in strategies:  # option mistakes before any slow work
        TransferClassifier.from_options(base.replace(**_strategy_options(s, epochs))
                                        ).make_strategy()
    ds = load_dataset(data, patient_regex=patient_regex, val_fraction=0, seed=seed,
                      window=window, slices=slices, mode=mode, skip_bad=base.skip_bad)
    if "test" not in ds.split_names():
        raise MedtlError(f"{data}: no test split; a learning curve scores every cell on the "
                         "same test images (add a test folder or a split column)")
    if ds.multilabel:
        raise MedtlError(f"{data}: multi-label data; learning curves draw budgets of images "
                         "per class, which needs one class per image (single-label data)")
    positive = positive_index(ds.classes, positive_class)
    pool_idx = [i for i, r in enumerate(ds.records) if r.split in ("train", "val")]
    pool, test = ds.subset(pool_idx), ds.split("test")
    counts = np.bincount(pool.labels, minlength=len(ds.classes))
    for size in budgets:
        short = [ds.classes[c] for c in range(len(ds.classes)) if 0 < counts[c] < size]
        if size != ALL and short:
            log.warning("budget %d images per class: %s %s fewer in the pool; %s all", size,
                        ", ".join(short), "has" if len(short) == 1 else "have",
                        "it takes" if len(short) == 1 else "they take")
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    draws = {r: draw_budgets(pool.labels, pool.patients, budgets, seed=seed + r,
                             val_fraction=val_fraction, class_names=ds.classes)
             for r in range(repeats)}
    todo = [(s, n, r) for r in range(repeats) for n in budgets for s in strategies
            if not (out / "cells" / f"{_cell_name(s, n, r)}.json").is_file()]
    total = len(strategies) * len(budgets) * repeats
    log.info("curve: %d cells (%d strategies x %d budgets x %d repeats), %d finished before",
             total, len(strategies), len(budgets), repeats, total - len(todo))
    with progress_bar("curve cells", len(todo), quiet=quiet) as bar:
        for strategy, size, r in todo:
            split = draws[r][size]
            options = base.replace(seed=seed + r, **_strategy_options(strategy, epochs))
            cell = _fit_cell(pool, test, split, options, positive)
            cell.update(strategy=strategy, size=size_name(size), repeat=r)
            write_json(out / "cells" / f"{_cell_name(strategy, size, r)}.json", cell)
            log.info("curve: %s, %s per class, repeat %d: test AUC %s (%.0f s)", strategy,
                     size_name(size), r, _f(cell["test_auc"]), cell["train_s"])
            bar(1)
    write_tables(out, strategies, budgets, repeats, title=f"medtl curve: {Path(str(data)).name}")
    return out


def _fit_cell(pool, test, split: dict[str, np.ndarray], options, positive: int | None
              ) -> dict[str, Any]:
    from medtl.evaluation.summary import split_summary
    from medtl.transfer.estimator import TransferClassifier

    train, val = pool.subset(split["train"]), pool.subset(split["val"])
    clf = TransferClassifier.from_options(options)
    t0 = time.perf_counter()
    clf.fit(train, val)
    train_s = time.perf_counter() - t0
    figures = {}
    for name, data in (("val", val), ("test", test)):
        proba = clf.predict_proba(data)
        figures[name] = split_summary(data.labels, proba, classes=clf.classes_,
                                      positive=positive, patients=data.patients,
                                      seed=options.seed)
    per_class = np.bincount(np.concatenate([train.labels, val.labels]),
                            minlength=len(pool.classes))
    ci = figures["test"].get("auc_ci95") or [None, None]
    return {"n_train": len(train), "n_val": len(val), "n_test": len(test),
            "labelled_per_class": dict(zip(pool.classes, per_class.tolist(), strict=True)),
            "patients": len({p for p in (*train.patients, *val.patients) if p is not None}),
            "val_auc": figures["val"].get("auc"), "test_auc": figures["test"].get("auc"),
            "test_auc_ci95": ci, "test_accuracy": figures["test"].get("accuracy"),
            "train_s": round(train_s, 2)}


# ---------------------------------------------------------------------------- tables, report


def t_interval(values: Sequence[float]) -> tuple[float, float | None, list[float | None]]:
    """Mean, SD and the 95 % t interval of the mean over repeats (None with one repeat)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None, [None, None]
    sd = float(v.std(ddof=1))
    half = float(t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v)))
    return mean, sd, [mean - half, mean + half]


def crossings(cells: Sequence[dict[str, Any]], strategies: Sequence[str],
              sizes: Sequence[str]) -> list[dict[str, Any]]:
    """Every budget at which strategy A's mean test AUC rises above B's after being at or
    below it at the budget before, with the paired difference (same subsets, same repeat) at
    that budget and its 95 % t interval."""
    by = {(c["strategy"], c["size"], c["repeat"]): c["test_auc"] for c in cells
          if c["test_auc"] is not None}
    rows = []
    for a in strategies:
        for b in strategies:
            if a == b:
                continue
            previous = None
            for size in sizes:
                diffs = [by[(a, size, r)] - by[(b, size, r)] for (s, n, r) in by
                         if s == a and n == size and (b, size, r) in by]
                if not diffs:
                    continue
                mean, _, ci = t_interval(diffs)
                if previous is not None and previous[1] <= 0 < mean:
                    rows.append({"overtakes": a, "overtaken": b, "from_size": previous[0],
                                 "at_size": size, "auc_difference": mean,
                                 "difference_ci95_low": ci[0], "difference_ci95_high": ci[1],
                                 "repeats": len(diffs)})
                previous = (size, mean)
    return rows


def write_tables(out: Path, strategies: Sequence[str], budgets: Sequence[int], repeats: int, *,
                 title: str) -> None:
    """curve.csv, summary.csv, crossings.csv and report.html from the finished cells."""
    from medtl.reporting.html import render_curve_report

    sizes = [size_name(n) for n in budgets]
    cells = []
    for s in strategies:
        for n in budgets:
            for r in range(repeats):
                path = out / "cells" / f"{_cell_name(s, n, r)}.json"
                if path.is_file():
                    cells.append(read_json(path))
    rows = [{k: c[k] for k in ("strategy", "size", "repeat", "n_train", "n_val", "n_test",
                               "patients", "val_auc", "test_auc", "test_accuracy", "train_s")}
            | {"test_auc_ci95_low": c["test_auc_ci95"][0],
               "test_auc_ci95_high": c["test_auc_ci95"][1],
               **{f"labelled_{k}": v for k, v in c["labelled_per_class"].items()}}
            for c in cells]
    write_csv(out / "curve.csv", rows)
    summary = []
    for s in strategies:
        for size in sizes:
            mine = [c for c in cells if c["strategy"] == s and c["size"] == size
                    and c["test_auc"] is not None]
            if not mine:
                continue
            mean, sd, ci = t_interval([c["test_auc"] for c in mine])
            ci = [None if v is None else min(max(v, 0.0), 1.0) for v in ci]  # AUC is bounded
            labelled = [sum(c["labelled_per_class"].values()) / len(c["labelled_per_class"])
                        for c in mine]
            summary.append({"strategy": s, "size": size, "repeats": len(mine),
                            "labelled_per_class_mean": float(np.mean(labelled)),
                            "test_auc_mean": mean, "test_auc_sd": sd,
                            "test_auc_ci95_low": ci[0], "test_auc_ci95_high": ci[1],
                            "val_auc_mean": _mean([c["val_auc"] for c in mine]),
                            "train_s_mean": float(np.mean([c["train_s"] for c in mine]))})
    write_csv(out / "summary.csv", summary)
    crossed = crossings(cells, strategies, sizes)
    write_csv(out / "crossings.csv", crossed)
    atomic_write(out / "report.html", render_curve_report(title, summary, crossed, sizes))


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
