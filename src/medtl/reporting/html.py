"""``RUN/report.html``: one self-contained page (no external URL) summarising a run."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
code{background:#f6f6f6;padding:0 .2em}"""

_FIGURES = ("n", "auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity",
            "precision", "f1")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def render_run_report(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    splits = [s for s in ("val", "test") if s in metrics]
    head = "".join(f"<th>{s}</th>" for s in splits)
    rows = "".join(
        f"<tr><td>{k}</td>{''.join(f'<td>{_fmt(metrics[s].get(k))}</td>' for s in splits)}</tr>"
        for k in _FIGURES)
    cms = ""
    classes = config.get("classes", [])
    for s in splits:
        cm = metrics[s].get("confusion_matrix")
        if not cm:
            continue
        hdr = "".join(f"<th>pred {html.escape(c)}</th>" for c in classes)
        body = "".join(
            f"<tr><td>true {html.escape(classes[i])}</td>"
            + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for i, row in enumerate(cm))
        cms += f"<h3>Confusion matrix, {s}</h3><table><tr><th></th>{hdr}</tr>{body}</table>"
    w = config.get("weights", {})
    timing = metrics.get("timing", {})
    params = metrics.get("params", {})
    data = config.get("data", {})
    counts = data.get("counts", {})
    count_rows = "".join(
        f"<tr><td>{html.escape(s)}</td>"
        + "".join(f"<td>{c.get(k, 0)}</td>" for k in classes) + "</tr>"
        for s, c in counts.items())
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8">
<title>medtl run: {html.escape(config.get('backbone', ''))}</title><style>{_CSS}</style></head>
<body><h1>medtl run</h1>
<p>Backbone <code>{html.escape(config.get('backbone', ''))}</code>, strategy
<code>{html.escape(config.get('strategy', ''))}</code>
{('head <code>' + html.escape(str(config.get('head'))) + '</code>') if config.get('head') else ''};
weights {html.escape(str(w.get('kind')))} from <code>{html.escape(str(w.get('source')))}</code>
(sha256 <code>{html.escape(str(w.get('sha256'))[:16])}…</code>).</p>
<h2>Data</h2><p><code>{html.escape(str(data.get('source')))}</code>, fingerprint
<code>{html.escape(str(data.get('fingerprint', ''))[:16])}</code></p>
<table><tr><th>split</th>{''.join(f'<th>{html.escape(c)}</th>' for c in classes)}</tr>
{count_rows}</table>
<h2>Metrics</h2><table><tr><th></th>{head}</tr>{rows}</table>{cms}
<h2>Cost</h2><table><tr><th>figure</th><th>value</th></tr>
<tr><td>train time (s)</td><td>{_fmt(timing.get('train_s'))}</td></tr>
<tr><td>feature extraction (s)</td><td>{_fmt(timing.get('feature_s'))}</td></tr>
<tr><td>inference (images/s)</td><td>{_fmt(timing.get('predict_images_per_s'))}</td></tr>
<tr><td>parameters, total</td><td>{_fmt(params.get('total'))}</td></tr>
<tr><td>parameters, trainable</td><td>{_fmt(params.get('trainable'))}</td></tr></table>
<p>medtl {html.escape(str(config.get('medtl_version')))}</p></body></html>
"""


def write_run_report(run_dir: Path, config: dict[str, Any], metrics: dict[str, Any]) -> Path:
    from medtl.run import atomic_write_text

    path = Path(run_dir) / "report.html"
    atomic_write_text(path, render_run_report(config, metrics))
    return path
