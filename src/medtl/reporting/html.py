"""Self-contained HTML reports: ``RUN/report.html`` for one run, and ``medtl report`` comparing
several. Every image is embedded as a data URI and the page names no external URL, so a report
can be mailed, archived with a paper, or opened on a hospital machine with no internet.
"""

from __future__ import annotations

import html
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtl.reporting import plots

log = logging.getLogger("medtl")

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:64em;color:#222;
padding:0 1em}table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;
padding:.3em .6em;text-align:right;vertical-align:middle}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}code{background:#f6f6f6;padding:0 .2em}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0}
.figs img{max-width:30em;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{color:#555;font-size:.9em}td.thumb img{width:96px;height:96px;object-fit:contain;
background:#000}.best{background:#eef7ee}table.kv td,table.kv th{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:1em}figure.cam{margin:0;width:20em}
figure.cam img{width:9.8em;height:9.8em;object-fit:contain;background:#000}
figure.cam code{word-break:break-all}.figs figure.wide{flex-basis:100%}
.figs figure.wide img{max-width:100%}.figs figure.huge{flex-basis:100%;overflow-x:auto}
.figs figure.huge img{max-width:none}.figs p.failed{max-width:30em;margin:0;padding:.6em;
border:1px dashed #c99;background:#fff8f5}table.cm td,table.cm th{padding:.1em .35em;
font-size:.85em}table.cm td.hit{font-weight:bold;background:#eef3fa}"""

_FIGURES = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision",
            "f1")
# Beyond this many classes the report lays out class-wide tables the long way (one row per
# class) and adds the confusion matrix as a table, as the figure then leaves zero cells blank.
_MANY_CLASSES = 10
# PNG widths (pixels) above which a figure gets the page's full width, and above which it
# keeps its natural size in a scrolling box, since scaling it down would make it unreadable.
_WIDE_PX, _HUGE_PX = 700, 1400
_NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "f1": "F1",
          "youden": "Youden's J", "sensitivity_target": "target sensitivity"}


def _e(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return _e(v)


def _with_ci(m: Mapping[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci95")
    text = _fmt(m.get(key))
    if ci and m.get(key) is not None:
        text += f" <small>({ci[0]:.3f}–{ci[1]:.3f})</small>"
    return text


def _page(title: str, body: str, *, wide: bool = False) -> str:
    style = _CSS + ("body{max-width:90em}table{font-size:.92em}" if wide else "")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{style}</style></head><body>{body}</body></html>\n")


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{plots.png_to_data_uri(png)}" alt="{_e(alt)}">'


@dataclass(frozen=True)
class FigureFailure:
    """A figure that could not be drawn. ``run_figures`` puts it in place of the PNG, and the
    report shows ``reason`` where the figure would have been."""

    reason: str


def _figures_html(figures: Mapping[str, bytes | FigureFailure]) -> str:
    out = []
    for cap, fig in figures.items():
        if isinstance(fig, FigureFailure):
            out.append(f"<figure><p class=\"note failed\">Figure left out: <b>{_e(cap)}</b> "
                       f"could not be drawn ({_e(fig.reason)}). The run and its other figures "
                       "are complete.</p></figure>")
            continue
        # Width from the PNG header (IHDR): a large figure scaled into a column is unreadable.
        width = int.from_bytes(bytes(fig[16:20]), "big")
        css = " class=huge" if width > _HUGE_PX else " class=wide" if width > _WIDE_PX else ""
        out.append(f"<figure{css}>{_img(fig, cap)}<figcaption>{_e(cap)}</figcaption></figure>")
    return "<h2>Plots</h2><div class=figs>" + "".join(out) + "</div>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = (),
           css: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        f"<tr{' class=' + repr(classes[i]) if i < len(classes) and classes[i] else ''}>"
        + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
    return f"<table{' class=' + css if css else ''}><tr>{head}</tr>{body}</table>"


# ------------------------------------------------------------------------------ one run
def run_figures(*, classes: Sequence[str], positive: int | None, split: str,
                y_true: np.ndarray, proba: np.ndarray, metrics: Mapping[str, Any],
                history: Sequence[Mapping[str, Any]]) -> dict[str, bytes | FigureFailure]:
    """The report's plots, as ``{caption: png}``: ROC with its CI band and PR (binary),
    confusion matrix, reliability diagram and training curves.

    Each figure is drawn on its own: one that raises becomes a :class:`FigureFailure` under
    its caption (and a warning in the log), so a figure can cost the report that figure, never
    a finished run its report.
    """
    figs: dict[str, bytes | FigureFailure] = {}
    ok = np.isfinite(proba).all(axis=1)
    y, p = np.asarray(y_true)[ok], np.asarray(proba)[ok]
    if positive is not None and len(np.unique(y)) == 2:
        yb, score = (y == positive).astype(int), p[:, positive]

        def roc() -> bytes:
            band = plots.roc_band(yb, score, n_resamples=500, seed=0)
            return plots.roc_png(yb, score, auc=metrics.get("auc"),
                                 auc_ci=metrics.get("auc_ci95"), band=band,
                                 title=f"ROC curve, {split}")

        _draw(figs, f"ROC curve, {split}, with its 95% bootstrap band", roc)
        _draw(figs, f"Precision-recall, {split}",
              lambda: plots.pr_png(yb, score, title=f"Precision-recall, {split}"))
    if metrics.get("confusion_matrix"):
        _draw(figs, f"Confusion matrix, {split} (arg-max decision)",
              lambda: plots.confusion_png(metrics["confusion_matrix"], classes,
                                          title=f"Confusion matrix, {split}"))
    cal = metrics.get("calibration")
    if cal:
        _draw(figs, f"Reliability diagram, {split}",
              lambda: plots.reliability_png(cal["reliability"], ece=cal["ece"],
                                            title=f"Reliability, {split}"))
    if history and any("val_auc" in r or "train_loss" in r or "loss" in r for r in history):
        _draw(figs, "Training curves", lambda: plots.training_curves_png(history))
    return figs


def _draw(figs: dict[str, bytes | FigureFailure], caption: str,
          draw: Callable[[], bytes]) -> None:
    try:
        figs[caption] = draw()
    except Exception as exc:  # noqa: BLE001 - the run is finished; only this figure is lost
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        reason = reason if len(reason) <= 200 else reason[:199] + "…"
        log.warning("figure %r left out of the report: %s", caption, reason)
        figs[caption] = FigureFailure(reason)


def confident_errors(data, proba: np.ndarray, classes: Sequence[str], *, n: int = 8,
                     size: int = 96) -> list[dict[str, Any]]:
    """The ``n`` wrong predictions made with the highest confidence, with PNG thumbnails.

    ``data`` is the Dataset the probabilities belong to; an image that cannot be read again
    gets no thumbnail rather than failing the report, and a DICOM saying BurnedInAnnotation
    YES gets none at all (``withheld``): its pixels may show the patient's name.
    """
    proba = np.asarray(proba)
    ok = np.isfinite(proba).all(axis=1)
    pred = np.where(ok, np.nan_to_num(proba).argmax(axis=1), -1)
    wrong = np.flatnonzero(ok & (pred != data.labels))
    order = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:n]
    out = []
    for i in order:
        withheld = data.records[i].burned_in
        out.append({"path": data.records[i].path, "label": classes[int(data.labels[i])],
                    "prediction": classes[int(pred[i])],
                    "confidence": float(proba[i, pred[i]]),
                    "thumbnail": None if withheld else _thumbnail(data, int(i), size),
                    "withheld": withheld})
    return out


def _thumbnail(data, i: int, size: int) -> bytes | None:
    from PIL import Image

    try:
        img = Image.fromarray(data.read(i))
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - a thumbnail is a courtesy, never a failure
        return None


def render_run_report(config: Mapping[str, Any], metrics: Mapping[str, Any], *,
                      figures: Mapping[str, bytes | FigureFailure] | None = None,
                      errors: Sequence[Mapping[str, Any]] | None = None,
                      explanations: Mapping[str, Any] | None = None) -> str:
    """The HTML of ``RUN/report.html``; a multi-label run (``config["task"] ==
    "multilabel"``) gets :func:`render_multilabel_report`'s page."""
    if config.get("task") == "multilabel":
        return render_multilabel_report(config, metrics, figures=figures, errors=errors,
                                        explanations=explanations)
    classes = list(config.get("classes", []))
    splits = [s for s, m in metrics.items()
              if isinstance(m, Mapping) and "accuracy" in m]
    parts = [f"<h1>medtl run: {_e(config.get('backbone', ''))}, "
             f"{_e(config.get('strategy', ''))}</h1>",
             _summary_paragraph(config, metrics),
             _data_html(config.get("data", {}), classes),
             _config_html(config),
             _positive_html(config),
             _metrics_html(metrics, splits, classes)]
    return _run_page(parts, config, metrics, splits, figures, errors, explanations)


def _positive_html(config: Mapping[str, Any]) -> str:
    """Which class the binary figures are about: sensitivity of 'normal' reads very unlike
    sensitivity of 'disease'."""
    positive = config.get("positive_class")
    if not positive:
        return ""
    return (f"<p class=positive>Positive class: <b>{_e(positive)}</b>. Sensitivity, "
            "specificity, precision, the operating points and the ROC and precision-recall "
            "curves refer to it.</p>")


def _data_html(data: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Where the data came from (source and fingerprint), its counts, and skipped files."""
    parts = ["<h2>Data</h2>",
             f"<p><code>{_e(data.get('source'))}</code>, fingerprint "
             f"<code>{_e(str(data.get('fingerprint', ''))[:16])}</code></p>",
             _counts_html(data.get("counts", {}), classes)]
    if data.get("skipped"):
        parts.append(f"<p class=note>{len(data['skipped'])} unreadable images skipped.</p>")
    return "".join(parts)


def _config_html(config: Mapping[str, Any]) -> str:
    """The settings that made the run: what a reader needs to reproduce it."""
    w = config.get("weights", {})
    conf_rows = [["backbone", f"<code>{_e(config.get('backbone'))}</code>"],
                 ["strategy", _e(config.get("strategy"))],
                 ["head", _e(config.get("head"))],
                 ["weights", f"{_e(w.get('kind'))} from <code>{_e(w.get('source'))}</code>"],
                 ["weights sha256", f"<code>{_e(str(w.get('sha256'))[:16])}…</code>"],
                 ["seed", _e(config.get("seed"))], ["device", _e(config.get("device"))]]
    pre = config.get("preprocessing") or {}
    if pre:
        conf_rows.append(["preprocessing", _e(", ".join(f"{k} {v}" for k, v in pre.items()))])
    for k, v in (config.get("strategy_params") or {}).items():
        conf_rows.append([_e(k), _e(v)])
    cal = config.get("calibration")
    if cal:
        conf_rows.append(["calibration", f"temperature {cal['temperature']:.3f} fitted on "
                                         f"{_e(cal['fitted_on'])}"])
    return "<h2>Configuration</h2>" + _table(["setting", "value"], conf_rows, css="kv")


def _metrics_html(metrics: Mapping[str, Any], splits: Sequence[str],
                  classes: Sequence[str]) -> str:
    """Every figure per split with its interval, then operating points, calibration, per-class
    and per-group tables; with many classes the confusion matrix as a table too."""
    parts = ["<h2>Metrics</h2><p class=note>95% confidence intervals in brackets: "
             "stratified bootstrap of the images (2,000 resamples). Decisions are the "
             "arg-max class unless an operating point says otherwise.</p>",
             _table(["figure", *map(_e, splits)], [
                 [_NAMES.get(k, k), *(_with_ci(metrics[s], k) for s in splits)]
                 for k in ("n", *_FIGURES)]),
             _operating_points_html(metrics, splits),
             _calibration_html(metrics, splits),
             _per_class_html(metrics, splits),
             _per_group_html(metrics, splits)]
    if splits and len(classes) > _MANY_CLASSES:
        parts.append(_confusion_html(metrics[splits[-1]], classes, splits[-1]))
    return "".join(parts)


def _counts_html(counts: Mapping[str, Mapping[str, int]], classes: Sequence[str]) -> str:
    """Images per split and class: splits as rows, or with many classes (too many columns
    for a page) classes as rows."""
    if not counts:
        return ""
    if len(classes) <= _MANY_CLASSES:
        return _table(["split", *map(_e, classes), "all"], [
            [_e(s), *(_fmt(c.get(k, 0)) for k in classes), _fmt(sum(c.values()))]
            for s, c in counts.items()])
    rows = [[_e(k), *(_fmt(c.get(k, 0)) for c in counts.values()),
             _fmt(sum(c.get(k, 0) for c in counts.values()))] for k in classes]
    rows.append(["all", *(_fmt(sum(c.values())) for c in counts.values()),
                 _fmt(sum(sum(c.values()) for c in counts.values()))])
    return _table(["class", *map(_e, counts), "all"], rows)


def _confusion_html(m: Mapping[str, Any], classes: Sequence[str], split: str) -> str:
    """The confusion matrix as a table: every count, readable and copyable, however many
    classes. Columns are numbered, as names would make the table too wide for a page."""
    cm = m.get("confusion_matrix")
    if not cm or len(cm) != len(classes):
        return ""
    head = "".join(f"<th>{j + 1}</th>" for j in range(len(classes)))
    body = "".join(
        f"<tr><th>{i + 1}. {_e(c)}</th>" + "".join(
            f"<td{' class=hit' if i == j else ''}>{_fmt(int(v)) if v else ''}</td>"
            for j, v in enumerate(row)) + "</tr>"
        for i, (c, row) in enumerate(zip(classes, cm, strict=True)))
    return (f"<h3>Confusion matrix, {_e(split)}</h3><p class=note>Rows: true class; columns: "
            "predicted class, numbered as the rows; blank cells are zero.</p>"
            f"<table class=cm><tr><th>true ↓, predicted →</th>{head}</tr>{body}</table>")


def _summary_paragraph(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    test = metrics.get("test")
    if not isinstance(test, Mapping):
        return ""
    auc = _with_ci(test, "auc")
    return (f"<p>On {test['n']:,} test images: AUC {auc}, accuracy {_with_ci(test, 'accuracy')}, "
            f"sensitivity {_with_ci(test, 'sensitivity')}, specificity "
            f"{_with_ci(test, 'specificity')}.</p>")


def _operating_points_html(metrics: Mapping[str, Any], splits: Sequence[str]) -> str:
    th = metrics.get("thresholds")
    if not th:
        return ""
    rows = []
    for s in splits:
        for name, op in metrics[s].get("operating_points", {}).items():
            label = _NAMES.get(name, name)
            if name == "sensitivity_target":
                label = f"sensitivity ≥ {th['target_sensitivity']:.2f} on val"
            rows.append([_e(s), label, _fmt(op["threshold"]), _fmt(op["sensitivity"]),
                         _fmt(op["specificity"]), _fmt(op["ppv"]), _fmt(op["npv"])])
    if not rows:
        return ""
    return ("<h3>Operating points</h3><p class=note>Thresholds on the positive-class "
            "probability, chosen on validation and applied unchanged to test.</p>"
            + _table(["split", "operating point", "threshold", "sensitivity", "specificity",
                      "PPV", "NPV"], rows))


def _calibration_html(metrics: Mapping[str, Any], splits: Sequence[str]) -> str:
    rows = []
    for s in splits:
        cal = metrics[s].get("calibration")
        if cal:
            rows.append([_e(s), _fmt(cal["ece"]), _fmt(cal["brier"]),
                         _fmt(cal.get("ece_uncalibrated")), _fmt(cal.get("brier_uncalibrated"))])
    if not rows:
        return ""
    return ("<h3>Calibration</h3>" + _table(
        ["split", "ECE", "Brier", "ECE before scaling", "Brier before scaling"], rows))


def _per_class_html(metrics: Mapping[str, Any], splits: Sequence[str]) -> str:
    out = []
    for s in splits:
        pc = metrics[s].get("per_class")
        if not pc:
            continue
        out.append(f"<h3>Per class, {_e(s)}</h3><p class=note>weighted one-vs-rest AUC "
                   f"{_fmt(metrics[s].get('auc_weighted'))}</p>" + _table(
                       ["class", "n", "AUC", "sensitivity", "specificity", "precision", "F1"],
                       [[_e(c), _fmt(v["n"]), _fmt(v["auc"]), _fmt(v["sensitivity"]),
                         _fmt(v["specificity"]), _fmt(v["precision"]), _fmt(v["f1"])]
                        for c, v in pc.items()]))
    return "".join(out)


def _per_group_html(metrics: Mapping[str, Any], splits: Sequence[str]) -> str:
    out = []
    for key, title, what in (("per_volume", "Per volume", "volume by the mean probability of "
                              "its slices"),
                             ("per_patient", "Per patient", "patient by the mean probability "
                              "of their images")):
        have = [s for s in splits if metrics[s].get(key)]
        if have:
            out.append(f"<h3>{title}</h3><p class=note>Each {what}.</p>" + _table(
                ["figure", *map(_e, have)],
                [[_NAMES.get(k, k), *(_with_ci(metrics[s][key], k) for s in have)]
                 for k in ("n", "auc", "accuracy", "sensitivity", "specificity")]))
    return "".join(out)


def _errors_html(errors: Sequence[Mapping[str, Any]], split: str) -> str:
    if not errors:
        return f"<h2>Most confident errors, {_e(split)}</h2><p>No errors.</p>"
    rows = [[(_img(e["thumbnail"], Path(str(e["path"])).name) if e.get("thumbnail") else
              "withheld" if e.get("withheld") else "–"),
             f"<code>{_e(_short(e['path']))}</code>", _e(e["label"]), _e(e["prediction"]),
             _fmt(e["confidence"])] for e in errors]
    table = _table(["image", "path", "true", "predicted", "confidence"], rows)
    return (f"<h2>Most confident errors, {_e(split)}</h2><p class=note>The wrong predictions "
            "the model was surest of: the first place to look for label noise, shortcuts "
            "and hard cases." + _withheld_note(sum(bool(e.get("withheld")) for e in errors))
            + "</p>" + table.replace("<td><img", "<td class=thumb><img"))


def _withheld_note(n: int) -> str:
    """What the page says when burned-in DICOM images are left out of it."""
    if not n:
        return ""
    return (f" {n} image{'s' if n > 1 else ''} withheld: {'their' if n > 1 else 'its'} DICOM "
            "says BurnedInAnnotation YES (text in the pixels may identify the patient).")


_GALLERY_NOTES = {
    "gradcam": "Grad-CAM (Selvaraju et al.): the top feature map weighted by the gradient of "
               "the class score",
    "occlusion": "occlusion: how much the class probability drops when a patch is covered",
}


def _gallery_html(gallery: Mapping[str, Any], split: str) -> str:
    entries = gallery.get("entries") or []
    method = str(gallery.get("method"))
    head = f"<h2>Where the model looks, {_e(split)}</h2>"
    withheld = _withheld_note(int(gallery.get("withheld") or 0))
    if withheld:
        head += f"<p class=note>{withheld.strip()} They are never chosen here.</p>"
    if not entries:
        return head + "<p>No images to show.</p>"
    binary = entries[0]["kind"] in ("true positive", "false positive", "false negative",
                                    "true negative")
    target = (f"every map is for the positive class <b>{_e(entries[0]['target'])}</b>"
              if binary else "each map is for the label it is shown under"
              if gallery.get("multilabel") else "each map is for the predicted class")
    note = (f"<p class=note>The most confident images of each kind; {target}. Method: "
            f"{_e(_GALLERY_NOTES.get(method, method))}."
            + (f" {_e(gallery['note'])}, so occlusion replaces Grad-CAM." if gallery.get("note")
               else "")
            + " Opacity is the map times the class's probability, so an image with little "
            "evidence shows little colour; red is the strongest evidence. "
            "<code>medtl explain</code> maps any image with other methods.</p>")
    cards = "".join(
        f"<figure class=cam>{_img(e['image'], 'image')}{_img(e['overlay'], 'map')}"
        f"<figcaption><b>{_e(e['kind'])}</b>: {_e(e['label'])}, predicted "
        f"{_e(e['prediction'])} (p {_fmt(e['probability'])})<br>"
        f"<code>{_e(_short(e['path']))}</code></figcaption></figure>" for e in entries)
    return head + note + f"<div class=gallery>{cards}</div>"


def _short(path: str) -> str:
    """The last three parts of a path: enough to find the file, short enough to read."""
    parts = Path(str(path)).parts
    return str(Path(*parts[-3:])) if len(parts) > 3 else str(path)


def _cost_html(metrics: Mapping[str, Any]) -> str:
    timing, params = metrics.get("timing", {}), metrics.get("params", {})
    return "<h2>Cost</h2>" + _table(["figure", "value"], [
        ["train time (s)", _fmt(timing.get("train_s"), 1)],
        ["feature extraction (s)", _fmt(timing.get("feature_s"), 1)],
        ["inference (images/s)", _fmt(timing.get("predict_images_per_s"), 1)],
        ["engine", _fmt(timing.get("engine"))],
        ["parameters, total", _fmt(params.get("total"))],
        ["parameters, trainable", _fmt(params.get("trainable"))]])


def write_run_report(run_dir: Path, config: Mapping[str, Any], metrics: Mapping[str, Any], *,
                     figures: Mapping[str, bytes | FigureFailure] | None = None,
                     errors: Sequence[Mapping[str, Any]] | None = None,
                     explanations: Mapping[str, Any] | None = None) -> Path:
    from medtl.files import atomic_write

    path = Path(run_dir) / "report.html"
    atomic_write(path, render_run_report(config, metrics, figures=figures, errors=errors,
                                         explanations=explanations))
    return path


# ------------------------------------------------------------------------------ multi-label run
def multilabel_arrays(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (y, proba)}`` from a multi-label run's predictions.csv rows (as read, strings,
    or as medtl.run.multilabel_prediction_rows made them): ``y`` (n, K) with NaN where a label
    is unknown, ``proba`` (n, K) with NaN for an unreadable image. Splits in order of rows."""
    def value(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):  # "" or None: unknown / unreadable
            return float("nan")

    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(str(r.get("split", "")), []).append(r)
    return {split: (np.array([[value(r.get(str(c))) for c in classes] for r in rs],
                             dtype=float).reshape(len(rs), len(classes)),
                    np.array([[value(r.get(f"prob_{c}")) for c in classes] for r in rs],
                             dtype=float).reshape(len(rs), len(classes)))
            for split, rs in grouped.items()}


def multilabel_run_figures(*, classes: Sequence[str],
                           splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                           metrics: Mapping[str, Any],
                           history: Sequence[Mapping[str, Any]] = ()
                           ) -> dict[str, bytes | FigureFailure]:
    """A multi-label report's plots, as ``{caption: png}``: for each split of ``splits``
    (``{split: (y, proba)}``, e.g. from :func:`multilabel_arrays`) the per-label ROC grid and,
    from ``metrics[split]``, the co-occurrence of errors; then the training curves. Each figure
    is guarded as in :func:`run_figures`."""
    figs: dict[str, bytes | FigureFailure] = {}
    for split, (y, proba) in splits.items():
        _draw(figs, f"Per-label ROC curves, {split}",
              lambda y=y, proba=proba, split=split: plots.roc_grid_png(
                  y, proba, classes, title=f"Per-label ROC curves, {split}"))
        m = metrics.get(split)
        if isinstance(m, Mapping) and m.get("error_cooccurrence"):
            chosen = (m.get("thresholds") or {}).get("chosen_on", "val")
            _draw(figs, f"Co-occurrence of errors, {split} (thresholds chosen on {chosen})",
                  lambda m=m, split=split: plots.error_cooccurrence_png(
                      m, title=f"Co-occurrence of errors, {split}"))
    if history and any("val_auc" in r or "train_loss" in r or "loss" in r for r in history):
        _draw(figs, "Training curves", lambda: plots.training_curves_png(history))
    return figs


def render_multilabel_report(config: Mapping[str, Any], metrics: Mapping[str, Any], *,
                             figures: Mapping[str, bytes | FigureFailure] | None = None,
                             errors: Sequence[Mapping[str, Any]] | None = None,
                             explanations: Mapping[str, Any] | None = None) -> str:
    """The HTML of a multi-label run's ``report.html``: macro and micro AUC and mean average
    precision per split, a per-label table per split, then ``figures``
    (:func:`multilabel_run_figures`). No confusion matrix, operating points or single ROC:
    each label has its own threshold and curve."""
    classes = [str(c) for c in config.get("classes", [])]
    splits = [s for s, m in metrics.items()
              if isinstance(m, Mapping) and "labels" in m and "macro_auc" in m]
    parts = [f"<h1>medtl run: {_e(config.get('backbone', ''))}, "
             f"{_e(config.get('strategy', ''))}, multi-label</h1>",
             _multilabel_summary_paragraph(metrics, classes),
             _multilabel_data_html(config.get("data", {}), classes),
             _config_html(config),
             _multilabel_metrics_html(metrics, splits)]
    return _run_page(parts, config, metrics, splits, figures, errors, explanations)


def _run_page(parts: list[str], config: Mapping[str, Any], metrics: Mapping[str, Any],
              splits: Sequence[str], figures, errors, explanations) -> str:
    """A run report's page: ``parts`` (heading, summary, data, metrics), then the figures,
    errors, explanation gallery and cost every report shares."""
    if figures:
        parts.append(_figures_html(figures))
    if errors is not None:
        parts.append(_errors_html(errors, splits[-1] if splits else "test"))
    if explanations is not None:
        parts.append(_gallery_html(explanations, splits[-1] if splits else "test"))
    parts.append(_cost_html(metrics))
    parts.append(f"<p class=note>medtl {_e(config.get('medtl_version'))}, "
                 f"{_e(config.get('created', ''))}</p>")
    return _page(f"medtl run: {config.get('backbone', '')}", "".join(parts))


def _multilabel_summary_paragraph(metrics: Mapping[str, Any], classes: Sequence[str]) -> str:
    test = metrics.get("test")
    if not isinstance(test, Mapping) or "macro_auc" not in test:
        return ""
    return (f"<p>On {test['n']:,} test images and {len(classes)} labels: macro AUC "
            f"{_with_ci(test, 'macro_auc')}, micro AUC {_with_ci(test, 'micro_auc')}, mean "
            f"average precision {_with_ci(test, 'map')}.</p>")


def _multilabel_data_html(data: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Source, fingerprint, and per split the images where each label is present (an image
    may have several labels or none, so there is no total)."""
    parts = ["<h2>Data</h2>",
             f"<p><code>{_e(data.get('source'))}</code>, fingerprint "
             f"<code>{_e(str(data.get('fingerprint', ''))[:16])}</code></p>"]
    counts = data.get("counts") or {}
    if counts:
        parts.append("<p class=note>Images where each label is present.</p>" + _table(
            ["split", *map(_e, classes)],
            [[_e(s), *(_fmt(c.get(k, 0)) for k in classes)] for s, c in counts.items()]))
    if data.get("skipped"):
        parts.append(f"<p class=note>{len(data['skipped'])} unreadable images skipped.</p>")
    return "".join(parts)


_ML_FIGURES = (("n", "images"), ("macro_auc", "macro AUC"), ("micro_auc", "micro AUC"),
               ("map", "mean average precision"))


def _multilabel_metrics_html(metrics: Mapping[str, Any], splits: Sequence[str]) -> str:
    parts = ["<h2>Metrics</h2><p class=note>Unknown labels never count. 95% confidence "
             "intervals in brackets: macro AUC (mean over labels with both classes known), "
             "micro AUC (all known image-label pairs pooled) and mean average precision by a "
             "percentile bootstrap of the images (2,000 resamples); a label's AUC by DeLong's "
             "method; sensitivity and specificity by Wilson's score interval.</p>",
             _table(["figure", *map(_e, splits)],
                    [[name, *(_with_ci(metrics[s], k) for s in splits)]
                     for k, name in _ML_FIGURES])]
    for s in splits:
        labels = metrics[s].get("labels") or {}
        th = metrics[s].get("thresholds") or {}
        chosen = th.get("chosen_on", "val")
        note = (f"Each label is called present when its probability reaches its threshold, "
                f"chosen on {_e(chosen)}"
                + (" by Youden's J" if th.get("rule") == "youden" else "")
                + (f"; 0.5 for {_e(', '.join(th['fallback']))}, which validation lacks a "
                   "positive or a negative of" if th.get("fallback") else "") + ".")
        parts.append(
            f"<h3>Per label, {_e(s)}</h3><p class=note>{note}</p>" + _table(
                ["label", "known", "positive", "AUC (95% CI)", "average precision",
                 "threshold", "sensitivity (95% CI)", "specificity (95% CI)", "precision",
                 "F1"],
                [[_e(name), _fmt(v.get("n_known")), _fmt(v.get("n_positive")),
                  _with_ci(v, "auc"), _fmt(v.get("average_precision")),
                  _fmt(v.get("threshold")), _with_ci(v, "sensitivity"),
                  _with_ci(v, "specificity"), _fmt(v.get("precision")), _fmt(v.get("f1"))]
                 for name, v in labels.items()], css="perlabel"))
    return "".join(parts)


# ------------------------------------------------------------------------------ comparison
_RANK_NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "f1": "F1"}


def render_comparison(entries: Sequence[Mapping[str, Any]], *,
                      figures: Mapping[str, bytes] | None = None, split: str = "test",
                      title: str | None = None, best_per: str | None = None,
                      rank_by: str = "auc") -> str:
    """The leaderboard page of ``medtl report``.

    ``entries`` are dicts with ``name``, ``config``, ``metrics``, ranked on validation
    (medtl.reporting.compare): ``choice`` is the validation ``rank_by`` figure a run is chosen
    on (None: it cannot be chosen), and when the first entry has one it is the chosen run.
    ``delong`` and ``mcnemar`` hold the paired tests against it, or why they could not be made.
    """
    metric = _RANK_NAMES.get(rank_by, rank_by)
    chosen = entries[0] if entries and entries[0].get("choice") is not None else None
    extra = rank_by not in ("auc", "accuracy", "sensitivity", "specificity")
    rows, marks = [], []
    for i, e in enumerate(entries):
        m, cfg = e["metrics"].get(split, {}), e["config"]
        timing, params = e["metrics"].get("timing", {}), e["metrics"].get("params", {})
        rows.append([str(i + 1) if e.get("choice") is not None else "–",
                     f"<code>{_e(e['name'])}</code>", _e(cfg.get("backbone")),
                     _e(cfg.get("strategy")), _choice_cell(e), _with_ci(m, "auc"),
                     _vs(e, "delong", chosen), _vs(e, "mcnemar", chosen),
                     _with_ci(m, "accuracy"), *([_with_ci(m, rank_by)] if extra else []),
                     _fmt(m.get("sensitivity")), _fmt(m.get("specificity")),
                     _fmt(params.get("trainable")), _fmt(timing.get("train_s"), 1),
                     _fmt(timing.get("predict_images_per_s"), 1)])
        marks.append("best" if e is chosen else "")
    heading = title or "medtl"
    header = ["#", "run", "backbone", "strategy", f"validation {_e(metric)} (choice)",
              f"{_e(split)} AUC (95% CI)", "vs chosen: ΔAUC, DeLong",
              "vs chosen: Δaccuracy, McNemar", f"{_e(split)} accuracy (95% CI)",
              *([f"{_e(split)} {_e(metric)}"] if extra else []), "sensitivity", "specificity",
              "trainable params", "train s", "images/s"]
    body = [f"<h1>{_e(heading)}: {len(entries)} runs compared on {_e(split)}</h1>",
            _choice_note(entries, chosen, metric, split), _table(header, rows, marks)]
    if best_per:
        body.append(_best_per_html(entries, best_per, split, metric))
    if figures:
        body.append("<h2>Plots</h2><div class=figs>" + "".join(
            f"<figure>{_img(png, cap)}<figcaption>{_e(cap)}</figcaption></figure>"
            for cap, png in figures.items()) + "</div>")
    return _page(heading, "".join(body), wide=True)


def _choice_note(entries: Sequence[Mapping[str, Any]], chosen: Mapping[str, Any] | None,
                 metric: str, split: str) -> str:
    """How the run was chosen and what the paired tests compare, as the page says it."""
    if chosen is None:
        how = ("<b>No run is chosen</b>: none has validation figures, and choosing on "
               f"{_e(split)} would make the winner's figures optimistic. Runs are listed in "
               "the order given, without paired tests.")
    else:
        unchoosable = sum(e.get("choice") is None for e in entries)
        how = (f"<b>Chosen on validation {_e(metric)}; {_e(split)} shown for the chosen "
               f"run</b> (and for the others, for reference). Runs are ranked on validation "
               f"{_e(metric)} (for a cross-validation run, its mean over the held-out folds), "
               f"never on {_e(split)}: choosing on {_e(split)} would make the winner's figures "
               "optimistic and the p-values invalid."
               + (f" {unchoosable} run{'s' if unchoosable > 1 else ''} without validation "
                  f"figures cannot be chosen and {'are' if unchoosable > 1 else 'is'} listed "
                  "last." if unchoosable else ""))
        if split in ("val", "validation"):
            how += " The figures shown are the ones the choice was made on: optimistic."
        if any("cv" in e["metrics"] for e in entries):
            how += (" A cross-validation run's figures are its pooled out-of-fold predictions, "
                    "the same images its choice figure comes from.")
    return (f"<p class=note>{how} Paired tests against the chosen run, on the same images, "
            "two-sided: DeLong's test of the AUCs (binary runs) and McNemar's test of the "
            "decisions, right or wrong (any number of classes; exact binomial test when fewer "
            "than 25 images are discordant, otherwise chi-square with continuity correction). "
            "95% confidence intervals in brackets.</p>")


def _choice_cell(e: Mapping[str, Any]) -> str:
    if e.get("choice") is None:
        why = e.get("choice_source") or "no validation figures"
        return f"<span class=note>{_e(why)}: cannot be chosen</span>"
    source = e.get("choice_source")
    return _fmt(e["choice"]) + (f" <small>({_e(source)})</small>"
                                if source and source != "validation" else "")


def _vs(e: Mapping[str, Any], test: str, chosen: Mapping[str, Any] | None) -> str:
    """One "vs chosen" cell: the difference and p-value, or why the test was not made."""
    if e is chosen:
        return "chosen"
    d = e.get(test)
    if isinstance(d, Mapping):
        exact = " <small>(exact)</small>" if d.get("exact") else ""
        return f"{d['difference']:+.3f}, {_p(d['p_value'])}{exact}"
    return f"<span class=note>{_e(d or '–')}</span>"


def _best_per_html(entries: Sequence[Mapping[str, Any]], key: str, split: str,
                   metric: str = "AUC") -> str:
    """The run chosen for each value of ``config[key]`` (entries come ranked on validation;
    runs that cannot be chosen are left out), with its paired tests against the chosen one."""
    chosen = entries[0] if entries and entries[0].get("choice") is not None else None
    seen: dict[str, Mapping[str, Any]] = {}
    for e in entries:
        if e.get("choice") is not None:
            seen.setdefault(str(e["config"].get(key)), e)
    rows = [[_e(value), f"<code>{_e(e['name'])}</code>", _choice_cell(e),
             _with_ci(e["metrics"].get(split, {}), "auc"),
             "chosen overall" if e is chosen else _vs(e, "delong", chosen),
             "chosen overall" if e is chosen else _vs(e, "mcnemar", chosen)]
            for value, e in seen.items()]
    return (f"<h2>Best run per {_e(key)}</h2><p class=note>Chosen on validation {_e(metric)}; "
            f"{_e(split)} shown.</p>"
            + _table([_e(key), "run", f"validation {_e(metric)}", f"{_e(split)} AUC (95% CI)",
                      "vs chosen: ΔAUC, DeLong", "vs chosen: Δaccuracy, McNemar"], rows))


def _p(p: float) -> str:
    """A p-value as journals print it, escaped for HTML."""
    return "p &lt; 0.001" if p < 0.001 else f"p = {p:.3f}"


# ------------------------------------------------------------------------------ learning curves
def render_curve_report(title: str, summary: Sequence[Mapping[str, Any]],
                        crossings: Sequence[Mapping[str, Any]], sizes: Sequence[str]) -> str:
    """``medtl curve``'s page: the curves, the mean test AUC per strategy and budget, and the
    budgets at which one strategy overtakes another."""
    strategies = list(dict.fromkeys(str(r["strategy"]) for r in summary))
    cell = {(str(r["strategy"]), str(r["size"])): r for r in summary}

    def shown(r: Mapping[str, Any] | None) -> str:
        if r is None:
            return "–"
        ci = (f" <small>({r['test_auc_ci95_low']:.3f}–{r['test_auc_ci95_high']:.3f})</small>"
              if r.get("test_auc_ci95_low") is not None else "")
        return f"{r['test_auc_mean']:.3f}{ci}"

    header = ["strategy"] + [f"{_e(n)} per class" for n in sizes]
    rows = [[_e(s)] + [shown(cell.get((s, n))) for n in sizes] for s in strategies]
    drawn = ["labelled per class (mean drawn)"] + [
        _fmt(next((float(r["labelled_per_class_mean"]) for r in summary
                   if str(r["size"]) == n), None), 1) for n in sizes]
    cross = [[_e(c["overtakes"]), _e(c["overtaken"]), f"{_e(c['from_size'])} → {_e(c['at_size'])}",
              f"{c['auc_difference']:+.3f}" + (
                  f" <small>({c['difference_ci95_low']:+.3f} to {c['difference_ci95_high']:+.3f})"
                  "</small>" if c.get("difference_ci95_low") is not None else "")]
             for c in crossings]
    body = (f"<h1>{_e(title)}</h1><p class=note>Test AUC, mean over repeated draws of the "
            "labelled subset (by patient), with the 95 % t interval over repeats. Every cell "
            "is scored once on the same test split; validation comes out of the labelled "
            "budget.</p>"
            + _figures_html({"learning curves": plots.learning_curve_png(summary)})
            + "<h2>Test AUC by budget</h2>" + _table(header, [*rows, drawn])
            + "<h2>Crossings</h2><p class=note>Budgets between which one strategy's mean test "
            "AUC rises above another's; the difference is paired (the same subsets) at the "
            "second budget. A reading of the curves, not a choice: nothing here is chosen on "
            "test.</p>"
            + (_table(["strategy", "overtakes", "between budgets", "ΔAUC (95% CI)"], cross)
               if cross else "<p>No strategy overtakes another within these budgets.</p>"))
    return _page(title, body, wide=True)
