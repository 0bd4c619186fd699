"""Figures for reports: each function returns PNG bytes, ready to write or embed as a data URI.

Every figure is a fresh :class:`matplotlib.figure.Figure` drawn by its own Agg canvas. Pyplot is
never touched, so no global figure registry fills up, no window opens, and calls from several
threads do not share state.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc as _trapezoid_auc
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from medtl.errors import MedtlError

__all__ = [
    "confusion_png",
    "error_cooccurrence_png",
    "grouped_png",
    "learning_curve_png",
    "png_to_data_uri",
    "pr_png",
    "reliability_png",
    "roc_band",
    "roc_overlay_png",
    "roc_ovr_overlay_png",
    "roc_grid_png",
    "roc_png",
    "scatter_cost_png",
    "training_curves_png",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DPI = 100
_SIZE = (5.0, 4.0)
_MAX_CLASSES = 10
# Plain names for the keys that reports use; anything else is shown as its key.
_AXIS_NAMES = {
    "train_s": "training time (s)",
    "feature_s": "feature extraction time (s)",
    "auc": "AUC",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "trainable_params": "trainable parameters",
}


# --------------------------------------------------------------------------- helpers


def _figure(size: tuple[float, float] = _SIZE) -> Figure:
    fig = Figure(figsize=size, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" chunk: identical inputs give identical bytes across matplotlib versions.
    fig.canvas.print_png(buf, metadata={"Software": None})
    return buf.getvalue()


def png_to_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src=...>`` in a self-contained HTML page."""
    if bytes(png[:8]) != PNG_SIGNATURE:
        raise ValueError("not PNG bytes (the PNG signature is missing)")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _binary_inputs(y_true: Any, score: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0/1 labels and finite positive-class scores, with messages a user can act on."""
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=float)
    if y.ndim != 1 or s.ndim != 1:
        raise MedtlError(f"{what} needs 1-D labels and 1-D scores for the positive class "
                         f"(got shapes {y.shape} and {s.shape}; for probabilities of shape "
                         "(n, 2) pass proba[:, 1])")
    if len(y) != len(s):
        raise MedtlError(f"{what}: {len(y)} labels but {len(s)} scores")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise MedtlError(f"{what} needs binary labels 0/1 (1 = positive class); "
                         f"got values {sorted(values, key=str)[:5]}")
    if len(values) < 2:
        only = next(iter(values)) if values else "none"
        raise MedtlError(f"{what} needs both classes in y_true, but all {len(y)} labels are "
                         f"{only}: the curve is undefined (evaluate on a split with both "
                         "positive and negative cases)")
    if not np.isfinite(s).all():
        raise MedtlError(f"{what}: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return y.astype(int), s


def _num(v: Any) -> float | None:
    """A finite float, or None for missing values (None, '', NaN, text) as read from a CSV."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _note(ax: Any, text: str) -> None:
    """An empty-plot message: a report with a blank panel explains itself instead of failing."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- ROC / PR


def _tpr_on_grid(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    # A vertical segment has several TPRs at one FPR and np.interp needs a function: keep the
    # top of each segment (what a threshold at that FPR can reach).
    last = np.r_[fpr[1:] != fpr[:-1], True]
    return np.interp(grid, fpr[last], tpr[last])


def roc_band(y_true: Any, score: Any, *, n_resamples: int = 500, seed: int = 0,
             level: float = 0.95, grid: int = 101) -> dict[str, Any]:
    """Pointwise bootstrap confidence band of the ROC curve, for ``roc_png(band=...)``.

    Resamples within each class (stratified), so every resample keeps the observed prevalence
    and has both classes. Each resample's TPR is interpolated on a fixed FPR grid and the band
    is the central ``level`` percentile interval at each grid point.
    Returns ``{"fpr", "tpr_low", "tpr_high"}`` arrays of length ``grid`` plus ``level`` and
    ``n_resamples``.
    """
    y, s = _binary_inputs(y_true, score, "ROC band")
    if n_resamples < 2:
        raise MedtlError(f"ROC band needs n_resamples >= 2, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise MedtlError(f"ROC band level must be between 0 and 1, got {level}")
    if grid < 2:
        raise MedtlError(f"ROC band grid needs at least 2 points, got {grid}")
    pos, neg = s[y == 1], s[y == 0]
    labels = np.r_[np.ones(len(pos), dtype=int), np.zeros(len(neg), dtype=int)]
    fpr_grid = np.linspace(0.0, 1.0, grid)
    rng = np.random.default_rng(seed)
    pos_idx = rng.integers(0, len(pos), size=(n_resamples, len(pos)))
    neg_idx = rng.integers(0, len(neg), size=(n_resamples, len(neg)))
    tprs = np.empty((n_resamples, grid))
    for b in range(n_resamples):
        fpr, tpr, _ = roc_curve(labels, np.r_[pos[pos_idx[b]], neg[neg_idx[b]]])
        tprs[b] = _tpr_on_grid(fpr, tpr, fpr_grid)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(tprs, [alpha, 1.0 - alpha], axis=0)
    return {"fpr": fpr_grid, "tpr_low": np.clip(low, 0.0, 1.0),
            "tpr_high": np.clip(high, 0.0, 1.0), "level": float(level),
            "n_resamples": int(n_resamples)}


def roc_png(y_true: Any, score: Any, *, auc: float | None = None,
            auc_ci: tuple[float, float] | None = None, band: Mapping[str, Any] | None = None,
            title: str = "ROC curve") -> bytes:
    """ROC curve of binary labels (1 = positive) against the positive-class score.

    ``auc`` defaults to the area under the plotted curve; ``auc_ci`` is ``(low, high)``;
    ``band`` is a :func:`roc_band` result, shaded behind the curve.
    """
    y, s = _binary_inputs(y_true, score, "ROC curve")
    fpr, tpr, _ = roc_curve(y, s)
    if auc is None:
        auc = float(_trapezoid_auc(fpr, tpr))
    label = f"AUC {auc:.3f}"
    if auc_ci is not None:
        label += f" (95% CI {auc_ci[0]:.2f}–{auc_ci[1]:.2f})"

    fig = _figure()
    ax = fig.add_subplot()
    if band is not None:
        level = band.get("level", 0.95)
        ax.fill_between(band["fpr"], band["tpr_low"], band["tpr_high"], color="C0", alpha=0.2,
                        linewidth=0, label=f"{level:.0%} bootstrap band")
    ax.plot(fpr, tpr, color="C0", linewidth=2, label=label)
    _roc_axes(ax, title, fontsize=8)
    return _png(fig)


def _roc_axes(ax: Any, title: str, fontsize: int) -> None:
    """Chance diagonal, square unit axes, labels and legend of a ROC plot."""
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title,
           xlabel="1 − specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=fontsize)


def roc_overlay_png(curves: Sequence[tuple[str, Any, Any]], *,
                    title: str = "ROC curves, test") -> bytes:
    """Several runs' ROC curves on one axis: ``curves`` holds ``(name, labels, score)``."""
    fig = _figure((5.5, 4.5))
    ax = fig.add_subplot()
    for i, (name, y_true, score) in enumerate(curves):
        y, s = _binary_inputs(y_true, score, f"ROC curve of {name}")
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color=f"C{i % 10}", linewidth=1.5,
                label=f"{name} (AUC {_trapezoid_auc(fpr, tpr):.3f})")
    _roc_axes(ax, title, fontsize=7)
    return _png(fig)


_OVR_COLUMNS = 3
_OVR_PANEL_IN = 3.2


def roc_ovr_overlay_png(runs: Sequence[tuple[str, Any, Any]], class_names: Sequence[str], *,
                        title: str = "One-vs-rest ROC curves, test") -> bytes:
    """Multi-class runs' one-vs-rest ROC curves: one panel per class, each run a curve in it.

    ``runs`` holds ``(name, labels, proba)``: class indices into ``class_names`` and the (n, k)
    class probabilities, on the same images for every run. A class absent from the labels (or
    the only one present) gets an empty panel that says so.
    """
    k = len(class_names)
    cols = min(k, _OVR_COLUMNS)
    rows = math.ceil(k / cols)
    fig = _figure((_OVR_PANEL_IN * cols, _OVR_PANEL_IN * rows + 0.4))
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for c, (ax, name) in enumerate(zip(axes, class_names, strict=False)):
        for i, (run, y_true, proba) in enumerate(runs):
            y = (np.asarray(y_true) == c).astype(int)
            if y.min(initial=1) == y.max(initial=0):
                continue  # one-vs-rest undefined for this class on these images
            s = np.asarray(proba, dtype=float)[:, c]
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color=f"C{i % 10}", linewidth=1.2,
                    label=f"{run} ({_trapezoid_auc(fpr, tpr):.3f})")
        if not ax.lines:
            _note(ax, f"{name}: needs cases of it\nand of the other classes")
            ax.set_title(str(name)[:_LABEL_CHARS], fontsize=9)
            continue
        _roc_axes(ax, str(name)[:_LABEL_CHARS], fontsize=6)
        ax.title.set_fontsize(9)
        ax.xaxis.label.set_fontsize(7)
        ax.yaxis.label.set_fontsize(7)
    for ax in axes[k:]:
        ax.set_axis_off()
    return _png(fig)


_GRID_COLUMNS = 4
_GRID_PANEL_IN = 2.6


def roc_grid_png(y: Any, proba: Any, classes: Sequence[str], *,
                 title: str = "Per-label ROC curves") -> bytes:
    """A multi-label model's ROC curves: one small panel per label, its AUC in the title.

    ``y`` is ``(n, K)`` with 1, 0 or NaN (unknown) and ``proba`` ``(n, K)`` independent
    probabilities; each panel uses only the rows where its label is known (and its
    probability finite). A label lacking positives or negatives there gets a panel that says so.
    """
    t = np.asarray(y, dtype=float)
    p = np.asarray(proba, dtype=float)
    k = len(classes)
    if t.ndim != 2 or t.shape != p.shape or t.shape[1] != k:
        raise MedtlError(f"ROC grid needs targets and probabilities of shape (n, {k}); got "
                         f"{t.shape} and {p.shape}")
    cols = max(1, min(k, _GRID_COLUMNS))
    rows = max(1, math.ceil(k / cols))
    fig = _figure((_GRID_PANEL_IN * cols, _GRID_PANEL_IN * rows + 0.4))
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for j, (ax, name) in enumerate(zip(axes, classes, strict=False)):
        label = str(name)[:_LABEL_CHARS]
        known = ~np.isnan(t[:, j]) & np.isfinite(p[:, j])
        yj, sj = t[known, j].astype(int), p[known, j]
        n_pos = int(yj.sum())
        if n_pos == 0 or n_pos == len(yj):
            _note(ax, "no known labels" if len(yj) == 0 else
                  "no positives" if n_pos == 0 else "no negatives")
            ax.set_title(label, fontsize=9)
            continue
        fpr, tpr, _ = roc_curve(yj, sj)
        ax.plot(fpr, tpr, color="C0", linewidth=1.5,
                label=f"{n_pos} pos / {len(yj) - n_pos} neg")
        _roc_axes(ax, f"{label} (AUC {_trapezoid_auc(fpr, tpr):.3f})", fontsize=6)
        ax.title.set_fontsize(9)
        ax.xaxis.label.set_fontsize(6)
        ax.yaxis.label.set_fontsize(6)
        ax.tick_params(labelsize=6)
    for ax in axes[k:]:
        ax.set_axis_off()
    return _png(fig)


def error_cooccurrence_png(summary: Mapping[str, Any], *,
                           title: str = "Co-occurrence of errors") -> bytes:
    """Heat map of ``summary["error_cooccurrence"]`` (medtl.evaluation.multilabel): cell (i, j)
    counts the images where labels i and j are both wrong at their thresholds, the diagonal
    each label's errors. Counts are printed while they fit a cell."""
    co = summary.get("error_cooccurrence") if isinstance(summary, Mapping) else None
    if not isinstance(co, Mapping) or "counts" not in co:
        raise MedtlError("error co-occurrence plot needs a multi-label summary with "
                         "'error_cooccurrence' {labels, counts}")
    m = np.asarray(co["counts"], dtype=float)
    names = [str(c) for c in co.get("labels") or range(len(m))]
    k = len(names)
    if m.ndim != 2 or m.shape != (k, k) or k == 0:
        raise MedtlError(f"error co-occurrence counts must be {k}x{k}, got shape {m.shape}")
    if (m < 0).any() or not np.isfinite(m).all():
        raise MedtlError("error co-occurrence counts must be finite and non-negative")
    side = min(max(4.0, 0.42 * k + 2.0), _MAX_SIDE_IN)
    fig = _figure((side + 1.0, side))
    ax = fig.add_subplot()
    top = max(float(m.max()), 1.0)
    im = ax.imshow(m, cmap=colormaps[_CMAP], norm=Normalize(0.0, top))
    cell_pt = 72 * side / (k + 2)
    digits = len(str(int(top)))
    font = min(9.0, 0.8 * cell_pt / (0.6 * digits), 0.6 * cell_pt)
    if font >= _MIN_FONT:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=font,
                        color=_cell_text_colour(m[i, j] / top),
                        fontweight="bold" if i == j else "normal")
    labels = [n if len(n) <= _LABEL_CHARS else n[:_LABEL_CHARS - 1] + "…" for n in names]
    tick_font = max(_MIN_FONT, min(9.0, 0.7 * cell_pt))
    ax.set_xticks(range(k), labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else
                  "center", fontsize=tick_font)
    ax.set_yticks(range(k), labels, fontsize=tick_font)
    ax.set(title=title, xlabel="label also wrong", ylabel="label wrong")
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("images (diagonal: errors of the label)")
    return _png(fig)


def pr_png(y_true: Any, score: Any, *, title: str = "Precision-recall") -> bytes:
    """Precision-recall curve with average precision, and prevalence as the chance baseline."""
    y, s = _binary_inputs(y_true, score, "Precision-recall curve")
    precision, recall, _ = precision_recall_curve(y, s)
    ap = float(average_precision_score(y, s))
    prevalence = float(y.mean())

    fig = _figure()
    ax = fig.add_subplot()
    # Average precision is the area under the step curve, so draw steps, not interpolation.
    ax.plot(recall, precision, drawstyle="steps-post", color="C0", linewidth=2,
            label=f"AP {ap:.3f}")
    ax.axhline(prevalence, linestyle="--", color="0.6", linewidth=1,
               label=f"prevalence {prevalence:.2f} (chance)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title,
           xlabel="recall (sensitivity)", ylabel="precision (positive predictive value)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


# --------------------------------------------------------------------------- confusion matrix


def confusion_png(cm: Any, class_names: Sequence[str], *,
                  title: str = "Confusion matrix") -> bytes:
    """Confusion matrix (rows true, columns predicted), cells coloured by row percentage.

    Cells are coloured by row percentage (recall per class), so a rare class's errors are as
    visible as a common one's. Up to 10 classes each cell prints its count and row percentage;
    beyond that the figure grows with the class count and prints the non-zero counts while they
    fit in a cell, so any number of classes gives a legible figure.
    """
    m = np.asarray(cm, dtype=float)
    k = len(class_names)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise MedtlError(f"confusion matrix must be square, got shape {m.shape}")
    if m.shape[0] != k:
        raise MedtlError(f"confusion matrix is {m.shape[0]}x{m.shape[0]} but {k} class names "
                         "were given")
    if k < 2:
        raise MedtlError(f"confusion matrix plot needs at least 2 classes, got {k}")
    if (m < 0).any() or not np.isfinite(m).all():
        raise MedtlError("confusion matrix counts must be finite and non-negative")
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(rows > 0, m / rows, np.nan)
    if k > _MAX_CLASSES:
        return _confusion_many_png(m, frac, [str(c) for c in class_names], title)

    fig = _figure(_SIZE if k <= 5 else (6.0, 5.0))
    ax = fig.add_subplot()
    im = _confusion_image(ax, frac)
    fontsize = 10 if k <= 3 else 8 if k <= 6 else 6
    for i in range(k):
        for j in range(k):
            pct = "–" if np.isnan(frac[i, j]) else f"{100 * frac[i, j]:.1f}%"
            ax.text(j, i, f"{int(round(m[i, j]))}\n{pct}", ha="center", va="center",
                    fontsize=fontsize, color=_cell_text_colour(frac[i, j]))
    rotate = k > 3 or max(len(str(c)) for c in class_names) > 8
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=45 if rotate else 0,
                  ha="right" if rotate else "center", fontsize=fontsize)
    ax.set_yticks(range(k), [str(c) for c in class_names], fontsize=fontsize)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    _confusion_colorbar(fig, im, ax)
    return _png(fig)


_CMAP = "Blues"
# Beyond 10 classes: the side of a cell (inches) while the figure stays under _MAX_SIDE; past
# ~40 classes cells shrink instead, so a 100-class matrix is still one screen wide.
_CELL_IN = 0.42
_MAX_SIDE_IN = 17.0
_MIN_FONT = 4.5  # points; smaller text is not read, only squinted at
_LABEL_CHARS = 24  # longer class names are cut with an ellipsis on the axes


def _confusion_image(ax: Any, frac: np.ndarray) -> Any:
    return ax.imshow(np.nan_to_num(frac), cmap=colormaps[_CMAP], norm=Normalize(0.0, 1.0))


def _cell_text_colour(frac: float) -> str:
    r, g, b, _ = colormaps[_CMAP](float(np.nan_to_num(frac)))
    # Relative luminance decides the text colour, so it stays readable on any cell.
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else "black"


def _confusion_colorbar(fig: Figure, im: Any, ax: Any) -> None:
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("% of true class (row)")
    cbar.ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")


def _confusion_many_png(m: np.ndarray, frac: np.ndarray, names: list[str], title: str) -> bytes:
    """More than 10 classes: a figure that grows with the class count, labels rotated and cut,
    and counts printed only where the text fits its cell (a heat map beyond that)."""
    k = len(names)
    cell = min(_CELL_IN, _MAX_SIDE_IN / k)
    cell_pt = cell * 72
    labels = [n if len(n) <= _LABEL_CHARS else n[:_LABEL_CHARS - 1] + "…" for n in names]
    label_font = min(9.0, 0.7 * cell_pt)
    # Where even the smallest legible font is taller than a cell, name every n-th class only.
    step = max(1, math.ceil(_MIN_FONT / label_font))
    label_font = max(label_font, _MIN_FONT)
    # Room for the rotated labels (about 0.55 of the font size per character) and colour bar.
    label_in = 0.55 * label_font * max(len(n) for n in labels) / 72 + 0.6
    fig = _figure((k * cell + label_in + 1.6, k * cell + label_in + 0.8))
    ax = fig.add_subplot()
    im = _confusion_image(ax, frac)
    digits = len(str(int(round(m.max())))) if m.size else 1
    # A digit is about 0.6 of the font size wide; keep a margin inside the cell.
    count_font = min(10.0, 0.8 * cell_pt / (0.6 * digits), 0.6 * cell_pt)
    counts_fit = count_font >= _MIN_FONT
    if counts_fit:
        for i, j in zip(*np.nonzero(m), strict=True):
            # Zero cells stay blank: in a large matrix they are most cells, and noise.
            ax.text(j, i, str(int(round(m[i, j]))), ha="center", va="center",
                    fontsize=count_font, color=_cell_text_colour(frac[i, j]))
    ticks = range(0, k, step)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, ha="center",
                  fontsize=label_font)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=label_font)
    ax.set_xlabel("predicted class" + ("" if counts_fit else
                                       f" (counts too small to print at {k} classes)"))
    ax.set(ylabel="true class", title=f"{title} ({k} classes)")
    _confusion_colorbar(fig, im, ax)
    return _png(fig)


# --------------------------------------------------------------------------- calibration


def reliability_png(curve: Mapping[str, Sequence[Any]], *, ece: float | None = None,
                    title: str = "Reliability diagram") -> bytes:
    """Accuracy against mean confidence per bin, with the diagonal and a count histogram below.

    ``curve`` is ``{"confidence", "accuracy", "count"}``, one entry per bin; empty bins may be
    NaN/None or left out. The key names of ``medtl.evaluation.stats.reliability_curve``
    (``mean_confidence``, ``counts``, and ``bin_edges`` for true-width bars) work as well.
    """
    def column(*keys: str) -> np.ndarray:
        for key in keys:
            if key in curve:
                return np.array([_num(v) for v in curve[key]], dtype=float)
        raise MedtlError(f"reliability curve lacks {keys[0]!r}; it needs 'confidence', "
                         "'accuracy' and 'count'")

    conf = column("confidence", "mean_confidence")
    acc = column("accuracy")
    count = column("count", "counts")
    if not len(conf) == len(acc) == len(count):
        raise MedtlError(f"reliability curve lists differ in length: confidence {len(conf)}, "
                         f"accuracy {len(acc)}, count {len(count)}")
    edges = np.array([_num(v) for v in curve.get("bin_edges") or []], dtype=float)
    if len(edges) != len(count) + 1 or not np.isfinite(edges).all():
        edges = None
    all_counts = np.nan_to_num(count)
    n_bins = max(len(conf), 1)
    keep = np.isfinite(conf) & np.isfinite(acc) & (np.nan_to_num(count, nan=1.0) > 0)
    conf, acc, count = conf[keep], acc[keep], np.nan_to_num(count[keep])
    if ece is not None:
        title = f"{title} (ECE {ece:.3f})"

    fig = _figure()
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1,
             label="perfect calibration")
    if len(conf):
        # Gaps from the diagonal are what calibration error measures: make them visible.
        top.vlines(conf, conf, acc, color="C3", alpha=0.5, linewidth=2, label="gap")
        top.plot(conf, acc, marker="o", color="C0", linewidth=1.5, label="model")
    else:
        top.text(0.5, 0.5, "no non-empty bins", ha="center", va="center", color="0.4")
    if edges is not None:
        bottom.bar(edges[:-1], all_counts, width=np.diff(edges), align="edge", color="C0",
                   alpha=0.7, edgecolor="white")
    elif len(conf):
        # Without edges only the mean confidence is known: narrow bars centred on it.
        bottom.bar(conf, count, width=min(0.05, 0.9 / n_bins), color="C0", alpha=0.7)
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="observed accuracy", title=title)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="predicted confidence", ylabel="cases")
    bottom.grid(alpha=0.3, axis="y")
    return _png(fig)


# --------------------------------------------------------------------------- training history

_LOSSES = (("train_loss", "train loss", "C0"), ("val_loss", "validation loss", "C1"))
_SCORES = (("val_auc", "validation AUC", "C2", "-"),
           ("val_accuracy", "validation accuracy", "C4", ":"))


class _History:
    """history.csv rows on one x axis: row k at x = k + 1, whatever epoch number it carries,
    so stages whose epochs restart at 1 follow one another."""

    def __init__(self, history: Sequence[Mapping[str, Any]]) -> None:
        self.rows = list(history)
        self.stages = [r.get("stage") for r in self.rows]
        self.has_stages = any(s not in (None, "") for s in self.stages)
        # First row of each stage (row 0 always starts one, named or not).
        self.starts = [i for i in range(len(self.rows))
                       if i == 0 or self.stages[i] != self.stages[i - 1]]
        self.marker = {"marker": "o", "markersize": 3 if len(self.rows) < 40 else 1.5}

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """x and y of one column, missing values (None, '', NaN) left out."""
        steps = np.arange(1, len(self.rows) + 1)
        vals = [_num(r.get(key)) for r in self.rows]
        ok = np.array([v is not None for v in vals], dtype=bool)
        xs, ys = steps[ok].astype(float), np.array([v for v in vals if v is not None], float)
        if self.has_stages and len(xs):
            # A NaN at each stage boundary breaks the line: a new stage restarts from the best
            # weights, so joining its first epoch to the last stage's final one would mislead.
            breaks = np.array([i + 0.5 for i in self.starts[1:]])
            at = np.searchsorted(xs, breaks)
            xs, ys = np.insert(xs, at, breaks), np.insert(ys, at, np.nan)
        return xs, ys


def training_curves_png(history: Sequence[Mapping[str, Any]], *,
                        title: str = "Training") -> bytes:
    """Losses (left axis) and validation AUC/accuracy (right axis) per epoch.

    ``history`` is a list of history.csv rows. The x axis counts rows 1..n, so stages whose
    epochs restart at 1 follow one another; with a ``stage`` key each stage is separated and
    named. Missing values (None, '', NaN) are skipped.
    """
    hist = _History(history)
    # Headroom at the top for the stage names, so they do not cover the curves.
    headroom = 0.3 if hist.has_stages else 0.0
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_title(title)
    handles = _plot_losses(ax, hist)
    handles += _plot_scores(ax, hist, headroom)
    if not handles:
        _note(ax, "no loss or validation scores recorded")
        return _png(fig)

    has_loss = bool(ax.lines)  # the scores, if any, are on the twin axis
    if has_loss:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + headroom * (hi - lo))
    else:
        ax.set_yticks([])
    if hist.has_stages:
        _mark_stages(ax, hist)
    ax.set_xlim(0.5, len(hist.rows) + 0.5)
    # A federated run's rows are rounds (medtl.federated), a trained run's epochs.
    unit = "round" if hist.rows and "round" in hist.rows[0] else "epoch"
    ax.set_xlabel(f"{unit} (all stages, in order)" if hist.has_stages else unit)
    if has_loss:
        ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    # Outside the axes: a legend inside would hide part of a curve whatever its corner.
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    # Whole epochs only: fractional ticks on a count axis confuse.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def _plot_losses(ax: Any, hist: _History) -> list[Any]:
    """The loss curves on the left axis; their legend handles."""
    handles = []
    for key, name, colour in _LOSSES:
        xs, ys = hist.series(key)
        if np.isfinite(ys).any():
            handles += ax.plot(xs, ys, color=colour, label=name, **hist.marker)
    return handles


def _plot_scores(ax: Any, hist: _History, headroom: float) -> list[Any]:
    """The validation scores on a right axis of their own (a 0..1 scale, unlike losses);
    their legend handles. No right axis when no score was recorded."""
    scores = [(name, colour, ls, *hist.series(key)) for key, name, colour, ls in _SCORES]
    scores = [s for s in scores if np.isfinite(s[4]).any()]
    if not scores:
        return []
    handles = []
    right = ax.twinx()
    for name, colour, ls, xs, ys in scores:
        handles += right.plot(xs, ys, color=colour, linestyle=ls, label=name, **hist.marker)
    low = min(0.5, float(min(np.nanmin(s[4]) for s in scores))) - 0.02
    right.set_ylim(low, 1.0 + max(0.02, headroom * (1.0 - low)))
    # Ticks stop at 1: an AUC axis labelled 1.1 would puzzle a reader.
    right.set_yticks([t for t in MaxNLocator(nbins=6).tick_values(low, 1.0)
                      if low <= t <= 1.0 + 1e-9])
    right.set_ylabel(" / ".join(s[0] for s in scores))
    return handles


def _mark_stages(ax: Any, hist: _History) -> None:
    """A line between stages and each stage's name at the top of its first epoch."""
    for i in hist.starts:
        if i > 0:
            ax.axvline(i + 0.5, color="0.5", linewidth=1, alpha=0.7)
        # Placed in axes coordinates vertically: at the top whatever the data range.
        ax.text(i + 0.6, 0.98, str(hist.stages[i]), transform=ax.get_xaxis_transform(),
                ha="left", va="top", fontsize=7, color="0.2", rotation=90, zorder=5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})


# --------------------------------------------------------------------------- leaderboard


def _pareto(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs that no cheaper run beats: the best score money (time) can buy."""
    order = np.lexsort((-ys, xs))
    fx, fy, best = [], [], -np.inf
    for i in order:
        if ys[i] > best:
            fx.append(xs[i])
            fy.append(ys[i])
            best = ys[i]
    return np.array(fx), np.array(fy)


def scatter_cost_png(points: Sequence[Mapping[str, Any]], *, x: str = "train_s", y: str = "auc",
                     label: str = "run", title: str | None = None) -> bytes:
    """Performance (``y``) against training cost (``x``, log scale), each point labelled.

    Points lacking a value, or with a non-positive cost (no place on a log axis), are left
    out. The dashed line joins the runs no cheaper run beats.
    """
    xname, yname = _AXIS_NAMES.get(x, x), _AXIS_NAMES.get(y, y)
    if title is None:
        title = f"{yname} against {xname}"
    kept = [(cx, cy, str(p.get(label, ""))) for p in points
            if (cx := _num(p.get(x))) is not None and cx > 0 and (cy := _num(p.get(y))) is not None]

    fig = _figure()
    ax = fig.add_subplot()
    ax.set_title(title)
    if not kept:
        _note(ax, f"no runs with both {x} > 0 and {y}")
        return _png(fig)
    xs = np.array([k[0] for k in kept])
    ys = np.array([k[1] for k in kept])
    ax.set_xscale("log")
    fx, fy = _pareto(xs, ys)
    if len(fx) > 1:
        ax.plot(fx, fy, drawstyle="steps-post", linestyle="--", color="0.6", linewidth=1,
                label="best at this cost")
        ax.legend(loc="lower right", fontsize=8)
    ax.scatter(xs, ys, color="C0", zorder=3)
    for cx, cy, name in kept:
        ax.annotate(name, (cx, cy), xytext=(4, 4), textcoords="offset points", fontsize=7)
    # Room for the labels at the right and top edges.
    ax.margins(x=0.15, y=0.1)
    ax.set(xlabel=f"{xname}, log scale", ylabel=yname)
    ax.grid(alpha=0.3)
    return _png(fig)


def grouped_png(points: Sequence[Mapping[str, Any]], *, group: str, y: str = "auc",
                title: str | None = None) -> bytes:
    """One column per value of ``group`` (e.g. strategy, backbone), each run a dot, the
    group's mean a bar: the "performance by approach / by backbone" figure of the reviews."""
    yname = _AXIS_NAMES.get(y, y)
    kept = [(str(p.get(group)), v) for p in points if (v := _num(p.get(y))) is not None]
    fig = _figure((max(4.0, 1.1 * len({g for g, _ in kept}) + 1.5), 4.0))
    ax = fig.add_subplot()
    ax.set_title(title or f"{yname} by {group}")
    if not kept:
        _note(ax, f"no runs with {y}")
        return _png(fig)
    names = list(dict.fromkeys(g for g, _ in kept))
    for i, name in enumerate(names):
        values = np.array([v for g, v in kept if g == name])
        ax.bar(i, values.mean(), width=0.6, color="C0", alpha=0.25)
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + jitter, values, color="C0", zorder=3, s=18)
    lows = [v for _, v in kept]
    ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(lows) + 0.03) if y != "train_s"
                else max(lows) * 1.1)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set(ylabel=yname)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def learning_curve_png(summary: Sequence[Mapping[str, Any]], *,
                       title: str = "Test AUC against labelled images per class") -> bytes:
    """One line per strategy: the mean test AUC over repeats at each budget (x: the mean
    labelled images per class actually drawn, log scale) with its 95 % t interval as a band."""
    fig = _figure((6.4, 4.2))
    ax = fig.add_subplot()
    ax.set_title(title)
    strategies = list(dict.fromkeys(str(r["strategy"]) for r in summary))
    if not strategies:
        _note(ax, "no finished cells")
        return _png(fig)
    for i, name in enumerate(strategies):
        rows = sorted((r for r in summary if r["strategy"] == name
                       and _num(r.get("test_auc_mean")) is not None),
                      key=lambda r: float(r["labelled_per_class_mean"]))
        x = np.array([float(r["labelled_per_class_mean"]) for r in rows])
        y = np.array([float(r["test_auc_mean"]) for r in rows])
        ax.plot(x, y, marker="o", color=f"C{i}", label=name)
        lo = [_num(r.get("test_auc_ci95_low")) for r in rows]
        hi = [_num(r.get("test_auc_ci95_high")) for r in rows]
        if all(v is not None for v in (*lo, *hi)):
            ax.fill_between(x, np.clip(lo, 0, 1), np.clip(hi, 0, 1), color=f"C{i}", alpha=0.12)
    ax.set_xscale("log")
    ax.set(xlabel="labelled images per class (train + val)", ylabel="test AUC")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)
