"""The comparison report of ``medtl report``: a leaderboard by AUC, DeLong's paired test of each
run against the best, a ROC overlay and AUC against training time.

It works on plain data, not on run directories, so reporting sits below ``medtl.run`` in the
layers: ``medtl.workflow.report`` loads the runs and hands over one entry per run, a dict with

- ``name``: the label the leaderboard shows;
- ``config``: the run's config.json;
- ``metrics``: its metrics.json (at least ``metrics[split]``);
- ``rows``: its predictions.csv rows of the compared split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medtl.evaluation.stats import delong_test
from medtl.evaluation.summary import split_summary
from medtl.reporting import plots
from medtl.reporting.html import render_comparison

Entry = dict[str, Any]
_Image = tuple[str, str, str, str]  # path, slice, key, index: one row's image


def compare_runs(entries: Sequence[Entry], *, split: str = "test", title: str | None = None,
                 by_group: bool = False) -> str:
    """The self-contained HTML page comparing ``entries`` on ``split``, best AUC first.

    Each entry but the best gets a ``delong`` key: the test against the best, or why it could
    not be computed. ``by_group`` adds the best run per strategy and the AUC by transfer
    approach and by backbone.
    """
    entries = list(entries)
    entries.sort(key=lambda e: -(e["metrics"][split].get("auc") or -1.0))
    best = entries[0]
    for e in entries[1:]:
        e["delong"] = _delong_against(best, e)
    figures = {}
    curves = [c for e in entries if (c := _roc_curve_input(e)) is not None]
    if curves:
        figures[f"ROC curves, {split}"] = plots.roc_overlay_png(curves,
                                                                title=f"ROC curves, {split}")
    points = [{"run": e["name"], "auc": e["metrics"][split].get("auc"),
               "train_s": e["metrics"].get("timing", {}).get("train_s"),
               "strategy": e["config"].get("strategy"), "backbone": e["config"].get("backbone")}
              for e in entries]
    figures["AUC against training time"] = plots.scatter_cost_png(points)
    if by_group:
        figures["AUC by transfer approach"] = plots.grouped_png(points, group="strategy")
        figures["AUC by backbone"] = plots.grouped_png(points, group="backbone")
    return render_comparison(entries, figures=figures, split=split, title=title,
                             best_per="strategy" if by_group else None)


def cv_entry(name: str, config: Mapping[str, Any], rows: Sequence[Mapping[str, str]],
             fold_metrics: Sequence[Mapping[str, Any]], split: str) -> Entry:
    """A cross-validation run as an entry: its out-of-fold predictions (every train + val
    image, each scored by the fold that held it out) stand in for ``split``, so runs
    cross-validated on the same data can be ranked and compared with DeLong's test.

    ``rows`` are the run's predictions.csv rows, ``fold_metrics`` each fold's metrics.json.
    """
    cfg = dict(config)
    classes = cfg["classes"]
    positive = len(classes) - 1 if len(classes) == 2 else None
    cfg.setdefault("positive_class", classes[positive] if positive is not None else None)
    cfg.setdefault("strategy", cfg.get("options", {}).get("strategy"))
    ok = [r for r in rows if r.get(f"prob_{classes[0]}") not in (None, "")]
    y = np.array([classes.index(r["label"]) for r in ok])
    proba = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ok])
    timing = {"train_s": sum(m.get("timing", {}).get("train_s") or 0 for m in fold_metrics)}
    params = fold_metrics[0].get("params", {}) if fold_metrics else {}
    return {"name": name, "config": cfg,
            "metrics": {split: split_summary(y, proba, classes=classes, positive=positive),
                        "timing": timing, "params": params},
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
        # The slices of a volume and the images of an .npz share their path: the image is the
        # path with its slice or array key and index (empty for an image file).
        image = (r["path"], str(r.get("slice", "")), str(r.get("key", "")),
                 str(r.get("index", "")))
        labels[image] = int(r["label"] == positive)
        scores[image] = float(r[f"prob_{positive}"])
    return labels, scores


def _roc_curve_input(entry: Entry) -> tuple[str, list[int], list[float]] | None:
    ls = _labels_scores(entry)
    if ls is None or len(set(ls[0].values())) < 2:
        return None
    paths = sorted(ls[0])
    return entry["name"], [ls[0][p] for p in paths], [ls[1][p] for p in paths]


def _delong_against(best: Entry, other: Entry) -> dict[str, Any] | str:
    """DeLong's paired test of ``best`` against ``other``, or why it cannot be computed."""
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
    # Sign as "this run minus the best", which is what a leaderboard row reads.
    return {**result, "difference": -result["difference"]}
