"""The comparison report of ``medtl report``: runs ranked and one chosen on validation, their
test figures, DeLong's (binary) and McNemar's (any number of classes) paired tests of each run
against the chosen one, ROC overlays (one-vs-rest panels for multi-class runs) and AUC against
training time.

The choice is made on validation figures only (a cross-validation run's mean over its held-out
folds), never on the compared split: choosing on test would make the winner's figures
optimistic and every "vs chosen" p-value invalid. A run without validation figures is listed
but cannot be chosen.

It works on plain data, not on run directories, so reporting sits below ``medtl.run`` in the
layers: ``medtl.workflow.report`` loads the runs and hands over one entry per run, a dict with

- ``name``: the label the leaderboard shows;
- ``config``: the run's config.json;
- ``metrics``: its metrics.json (``metrics[split]``, and ``val`` or ``cv`` for the choice);
- ``rows``: its predictions.csv rows of the compared split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medtl.errors import check_choice
from medtl.evaluation.stats import delong_test, mcnemar_test
from medtl.evaluation.summary import split_summary
from medtl.reporting import plots
from medtl.reporting.html import render_comparison

Entry = dict[str, Any]
_Image = tuple[str, str, str, str]  # path, slice, key, index: one row's image

# The metrics.json figures a comparison can rank on (read on validation, shown on test).
RANK_METRICS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
_OVR_MAX_CLASSES = 24  # one panel per class: beyond this the figure is too big to read


def check_rank_by(rank_by: str) -> str:
    """``rank_by`` if it is one of :data:`RANK_METRICS`, else a MedtlError naming them."""
    return check_choice("--rank-by metric", rank_by, RANK_METRICS)


def validation_score(metrics: Mapping[str, Any], rank_by: str = "auc") -> tuple[float | None, str]:
    """The figure a run is chosen on, and where it comes from (or why there is none).

    ``metrics`` is a metrics.json: its ``val`` figure, or for a cross-validation run the mean of
    its held-out folds (``cv.mean``). Never the test figure.
    """
    if isinstance(metrics.get("cv"), Mapping):
        source, figures = "cv mean", metrics["cv"].get("mean")
    elif isinstance(metrics.get("val"), Mapping):
        source, figures = "validation", metrics["val"]
    else:
        return None, "no validation figures"
    value = figures.get(rank_by) if isinstance(figures, Mapping) else None
    # metrics.json comes from a run directory, which may be someone else's: numbers only.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None, f"no {source} {rank_by}"
    return float(value), source


def rank_on_validation(entries: Sequence[Entry], rank_by: str = "auc") -> list[Entry]:
    """``entries`` best validation figure first, each given ``choice`` (the figure, or None)
    and ``choice_source``; those that cannot be chosen follow in the order given."""
    entries = list(entries)
    for e in entries:
        e["choice"], e["choice_source"] = validation_score(e["metrics"], rank_by)
    # A stable sort on validation alone: ties keep the order given, never the test figures.
    entries.sort(key=lambda e: (e["choice"] is None, -(e["choice"] or 0.0)))
    return entries


def compare_runs(entries: Sequence[Entry], *, split: str = "test", title: str | None = None,
                 by_group: bool = False, rank_by: str = "auc") -> str:
    """The self-contained HTML page comparing ``entries`` on ``split``.

    Runs are ranked on their validation ``rank_by`` (:func:`rank_on_validation`) and the first
    is the chosen run; ``split``'s figures are shown. Each other entry gets ``delong`` and
    ``mcnemar`` keys: the paired test against the chosen run, or why it could not be made.
    ``by_group`` adds the chosen run per strategy and the AUC by transfer approach and by
    backbone.
    """
    rank_by = check_rank_by(rank_by)
    entries = rank_on_validation(entries, rank_by)
    chosen = entries[0] if entries and entries[0]["choice"] is not None else None
    for e in entries:
        if e is chosen:
            continue
        if chosen is None:
            e["delong"] = e["mcnemar"] = "no run chosen (no validation figures)"
        elif "multilabel" in (e["config"].get("task"), chosen["config"].get("task")):
            # One score per image and label: DeLong per label, Holm-adjusted across labels.
            e["delong"] = multilabel_delong(chosen, e)
            e["mcnemar"] = "multi-label: per-label DeLong only"
        else:
            e["delong"], e["mcnemar"] = _delong_against(chosen, e), _mcnemar_against(chosen, e)
    figures = _roc_figures(entries, split)
    points = [{"run": e["name"], "auc": e["metrics"][split].get("auc"),
               "train_s": e["metrics"].get("timing", {}).get("train_s"),
               "strategy": e["config"].get("strategy"), "backbone": e["config"].get("backbone")}
              for e in entries]
    figures["AUC against training time"] = plots.scatter_cost_png(points)
    if by_group:
        figures["AUC by transfer approach"] = plots.grouped_png(points, group="strategy")
        figures["AUC by backbone"] = plots.grouped_png(points, group="backbone")
    return render_comparison(entries, figures=figures, split=split, title=title,
                             best_per="strategy" if by_group else None, rank_by=rank_by)


def _roc_figures(entries: Sequence[Entry], split: str) -> dict[str, bytes]:
    """The binary runs' ROC overlay and the multi-class runs' one-vs-rest panels."""
    figures = {}
    curves = [c for e in entries if (c := _roc_curve_input(e)) is not None]
    if curves:
        figures[f"ROC curves, {split}"] = plots.roc_overlay_png(curves,
                                                                title=f"ROC curves, {split}")
    multi = [e for e in entries if len(e["config"].get("classes") or []) > 2]
    if multi:
        # The panels are classes, so only runs with the first multi-class run's classes.
        classes = list(multi[0]["config"]["classes"])
        runs = [r for e in multi if list(e["config"]["classes"]) == classes
                and (r := _labels_proba(e, classes)) is not None]
        if runs and len(classes) <= _OVR_MAX_CLASSES:
            caption = f"One-vs-rest ROC curves, {split}"
            figures[caption] = plots.roc_ovr_overlay_png(runs, classes, title=caption)
    return figures


def cv_entry(name: str, config: Mapping[str, Any], rows: Sequence[Mapping[str, str]],
             fold_metrics: Sequence[Mapping[str, Any]], split: str,
             cv: Mapping[str, Any] | None = None) -> Entry:
    """A cross-validation run as an entry: its out-of-fold predictions (every train + val
    image, each scored by the fold that held it out) stand in for ``split``, so runs
    cross-validated on the same data can be ranked and compared with DeLong's test.

    ``rows`` are the run's predictions.csv rows, ``fold_metrics`` each fold's metrics.json,
    ``cv`` its metrics.json ``cv`` summary (whose mean over folds the run is chosen on).
    """
    cfg = dict(config)
    classes = cfg["classes"]
    if cfg.get("task") == "multilabel":
        return _multilabel_cv_entry(name, cfg, rows, fold_metrics, split, cv)
    positive = len(classes) - 1 if len(classes) == 2 else None
    cfg.setdefault("positive_class", classes[positive] if positive is not None else None)
    cfg.setdefault("strategy", cfg.get("options", {}).get("strategy"))
    ok = [r for r in rows if r.get(f"prob_{classes[0]}") not in (None, "")]
    y = np.array([classes.index(r["label"]) for r in ok])
    proba = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ok])
    timing = {"train_s": sum(m.get("timing", {}).get("train_s") or 0 for m in fold_metrics)}
    params = fold_metrics[0].get("params", {}) if fold_metrics else {}
    metrics = {split: split_summary(y, proba, classes=classes, positive=positive),
               "timing": timing, "params": params}
    if cv is not None:
        metrics["cv"] = cv
    return {"name": name, "config": cfg, "metrics": metrics,
            "rows": [{**r, "split": split} for r in ok]}


def _multilabel_cv_entry(name: str, cfg: dict[str, Any], rows: Sequence[Mapping[str, str]],
                         fold_metrics: Sequence[Mapping[str, Any]], split: str,
                         cv: Mapping[str, Any] | None) -> Entry:
    """cv_entry of a multi-label cross-validation run: its out-of-fold rows scored per label
    (at 0.5: each fold chose its own thresholds, which the pooled rows do not share)."""
    from medtl.evaluation.multilabel import multilabel_summary
    from medtl.reporting.html import multilabel_arrays

    classes = cfg["classes"]
    ok = [r for r in rows if all(r.get(f"prob_{c}") not in (None, "") for c in classes)]
    y, proba = multilabel_arrays([{**r, "split": split} for r in ok], classes).get(
        split, (np.zeros((0, len(classes))), np.zeros((0, len(classes)))))
    metrics = {split: multilabel_summary(y, proba, classes, None),
               "timing": {"train_s": sum(m.get("timing", {}).get("train_s") or 0
                                         for m in fold_metrics)},
               "params": fold_metrics[0].get("params", {}) if fold_metrics else {}}
    if cv is not None:
        metrics["cv"] = cv
    return {"name": name, "config": cfg, "metrics": metrics,
            "rows": [{**r, "split": split} for r in ok]}


def _labels_scores(entry: Entry) -> tuple[dict[_Image, int], dict[_Image, float]] | None:
    """{image: 0/1 label} and {image: positive-class probability} of a binary run's rows."""
    positive = entry["config"].get("positive_class")
    if positive is None:
        return None
    labels, scores = {}, {}
    for r in entry["rows"]:
        if r.get(f"prob_{positive}") in (None, ""):
            continue
        labels[_image(r)] = int(r["label"] == positive)
        scores[_image(r)] = float(r[f"prob_{positive}"])
    return labels, scores


def _image(row: Mapping[str, Any]) -> _Image:
    # The slices of a volume and the images of an .npz share their path: the image is the
    # path with its slice or array key and index (empty for an image file).
    return (str(row["path"]), str(row.get("slice", "")), str(row.get("key", "")),
            str(row.get("index", "")))


def _scored(entry: Entry) -> list[Mapping[str, Any]]:
    """The rows the run could score (an unreadable image has empty probabilities)."""
    classes = entry["config"].get("classes") or []
    return [r for r in entry["rows"]
            if classes and all(r.get(f"prob_{c}") not in (None, "") for c in classes)]


def _labels_proba(entry: Entry, classes: Sequence[str]) -> tuple[str, list[int], Any] | None:
    """``(name, class indices, (n, k) probabilities)`` of a run's labelled rows."""
    rows = [r for r in _scored(entry) if r.get("label") in classes]
    if not rows:
        return None
    proba = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return entry["name"], [classes.index(r["label"]) for r in rows], proba


def _decisions(entry: Entry) -> dict[_Image, tuple[str, str]]:
    """{image: (label, the run's decision)} of the rows the run scored."""
    return {_image(r): (str(r.get("label")), str(r.get("prediction"))) for r in _scored(entry)}


def _roc_curve_input(entry: Entry) -> tuple[str, list[int], list[float]] | None:
    ls = _labels_scores(entry)
    if ls is None or len(set(ls[0].values())) < 2:
        return None
    paths = sorted(ls[0])
    return entry["name"], [ls[0][p] for p in paths], [ls[1][p] for p in paths]


def _delong_against(best: Entry, other: Entry) -> dict[str, Any] | str:
    """DeLong's paired test of ``best`` (the chosen run) against ``other``, or why not."""
    a, b = _labels_scores(best), _labels_scores(other)
    if a is None or b is None:
        return "binary runs only"
    if set(a[0]) != set(b[0]):
        return "different test images"
    paths = sorted(a[0])
    if any(a[0][p] != b[0][p] for p in paths) or len(set(a[0].values())) < 2:
        return "labels differ or hold one class"
    result = delong_test([a[0][p] for p in paths], [a[1][p] for p in paths],
                         [b[1][p] for p in paths])
    # Sign as "this run minus the chosen one", which is what a leaderboard row reads.
    return {**result, "difference": -result["difference"]}


def multilabel_delong(best: Entry, other: Entry) -> str:
    """DeLong's paired test per label of two multi-label runs on the same images, as one line:
    each label's AUC difference (``other`` minus ``best``) and its p-value adjusted by Holm's
    step-down method across the labels (one test per label, so some p < 0.05 by chance alone
    otherwise). Rows whose truth for a label is unknown are left out of that label's test."""
    classes = list(best["config"].get("classes") or [])
    if ("multilabel", classes) != (other["config"].get("task"),
                                   list(other["config"].get("classes") or [])):
        return "not both multi-label runs with the same labels"
    rows_a, rows_b = ({_image(r): r for r in e["rows"]} for e in (best, other))
    if set(rows_a) != set(rows_b):
        return "different test images"
    tests = []
    for name in classes:
        images = sorted(i for i in rows_a if rows_a[i].get(name) not in (None, "")
                        and rows_a[i].get(f"prob_{name}") not in (None, "")
                        and rows_b[i].get(f"prob_{name}") not in (None, ""))
        truth = [int(float(rows_a[i][name])) for i in images]
        if any(str(rows_b[i].get(name)) != str(rows_a[i][name]) for i in images):
            return f"label {name}: the runs' truths differ"
        if len(set(truth)) < 2:
            tests.append((name, None, None))
            continue
        result = delong_test(truth, [float(rows_a[i][f"prob_{name}"]) for i in images],
                             [float(rows_b[i][f"prob_{name}"]) for i in images])
        tests.append((name, -result["difference"], result["p_value"]))
    adjusted = holm([p for _, _, p in tests if p is not None])
    parts, k = [], 0
    for name, diff, p in tests:
        if p is None:
            parts.append(f"{name}: one class")
            continue
        parts.append(f"{name} {diff:+.3f} (p {adjusted[k]:.3g})")
        k += 1
    return "DeLong per label, Holm-adjusted: " + "; ".join(parts)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (family-wise error), in their order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


def _mcnemar_against(chosen: Entry, other: Entry) -> dict[str, Any] | str:
    """McNemar's paired test of the decisions of ``chosen`` and ``other``, or why not."""
    a, b = _decisions(chosen), _decisions(other)
    if not a or not b:
        return "no scored images"
    if set(a) != set(b):
        return "different test images"
    images = sorted(a)
    if any(a[i][0] != b[i][0] for i in images):
        return "labels differ"
    result = mcnemar_test([a[i][0] == a[i][1] for i in images],
                          [b[i][0] == b[i][1] for i in images])
    # Accuracy difference as "this run minus the chosen one".
    return {**result, "difference": -result["difference"]}
