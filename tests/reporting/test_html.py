"""RUN/report.html and `medtl report`: self-contained pages whose images decode, checked as text
and as rendered by headless Chromium with every network request routed to a recording proxy."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

import medtl
from medtl.cli import main
from medtl.evaluation.stats import delong_test

from ..conftest import write_blob_images
from .chromium import screenshot

_SRC = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.I)
_URL = re.compile(r"""(?:https?:)?//[^\s"')]+|url\(""", re.I)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = write_blob_images(root / "blobs", n_per_class=16)
    common = dict(patient_regex=r"(p\d+)", image_size=64, quiet=True)
    a = medtl.train(data, strategy="hybrid", head="logreg", out=root / "logreg", **common)
    b = medtl.train(data, strategy="feature-extractor", calibrate=True, out=root / "fe",
                    **common)
    return a, b


def _images(page: str) -> list[Image.Image]:
    out = []
    for uri in re.findall(r'<img src="([^"]+)"', page):
        assert uri.startswith("data:image/png;base64,"), uri[:60]
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        img.load()  # decodes every pixel; a truncated PNG raises here
        out.append(img)
    return out


def _assert_self_contained(page: str) -> None:
    for ref in _SRC.findall(page):
        assert ref.startswith(("data:", "#")), f"external reference {ref[:80]}"
    text_outside_data = re.sub(r"data:[^\"']+", "", page)
    assert not _URL.search(text_outside_data), _URL.search(text_outside_data).group(0)


def test_run_report_is_self_contained_with_plots_and_confident_errors(two_runs):
    a, b = two_runs
    page = (a.path / "report.html").read_text()
    _assert_self_contained(page)
    for section in ("Data", "Configuration", "Metrics", "Operating points", "Calibration",
                    "Plots", "Most confident errors", "Cost"):
        assert f">{section}" in page, section
    images = _images(page)
    # ROC, PR, confusion, reliability; thumbnails for each listed error.
    n_errors = page.count("<td class=thumb>")
    assert len(images) >= 4 + n_errors
    assert all(min(img.size) > 32 for img in images)
    test = a.metrics["test"]
    assert f"{test['auc']:.3f}" in page
    assert f"{test['auc_ci95'][0]:.3f}" in page

    calibrated = (b.path / "report.html").read_text()
    assert "temperature" in calibrated and "ECE before scaling" in calibrated
    _images(calibrated)


def test_medtl_report_ranks_runs_and_reports_delong_against_the_chosen(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "compare.html"
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(a.path), str(b.path), "--out", str(out)])
    assert exit_.value.code in (0, None)
    page = out.read_text()
    _assert_self_contained(page)
    assert len(_images(page)) == 2  # ROC overlay and AUC against training time
    # Ranked and chosen on validation (ties keep the order given), never on test.
    runs = sorted([a, b], key=lambda r: -r.metrics["val"]["auc"])
    assert "Chosen on validation AUC; test shown for the chosen run" in page
    assert page.index(f"<code>{runs[0].path.name}</code>") < page.index(
        f"<code>{runs[1].path.name}</code>")

    def scores(run):
        rows = sorted((r for r in run.predictions() if r["split"] == "test"),
                      key=lambda r: r["path"])
        pos = run.config["positive_class"]
        return (np.array([r["label"] == pos for r in rows], dtype=int),
                np.array([float(r[f"prob_{pos}"]) for r in rows]))

    y, best = scores(runs[0])
    _, other = scores(runs[1])
    d = delong_test(y, best, other)
    assert f"{-d['difference']:+.3f}" in page
    p = d["p_value"]
    assert (f"p = {p:.3f}" if p >= 0.001 else "p &lt; 0.001") in page


def test_comparison_prints_small_p_values_as_journals_do():
    from medtl.reporting.html import render_comparison

    def entry(name, p):
        return {"name": name, "config": {"backbone": "b", "strategy": "s", "head": "logreg"},
                "metrics": {"test": {"auc": 0.9}},
                "delong": None if p is None else {"difference": -0.05, "p_value": p}}

    page = render_comparison([entry("a", None), entry("b", 0.0002), entry("c", 0.0412)],
                             best_per="head")
    assert page.count("p &lt; 0.001") == 1 and "p = 0.041" in page
    assert "p = &lt;" not in page and "p = <" not in page


def test_report_of_a_directory_that_is_not_a_run_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert exit_.value.code == 2
    assert "not a medtl run directory" in capsys.readouterr().err


def test_chromium_renders_the_comparison_and_requests_nothing_external(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "compare.html"
    medtl.workflow.report([a.path, b.path], out)
    for page in (out, a.path / "report.html"):
        png = tmp_path / f"{page.parent.name}-{page.stem}.png"
        requests = screenshot(page, png)
        assert requests == [], requests
        shot = np.asarray(Image.open(png).convert("L"))
        assert shot.shape == (3000, 1200)
        # Something was drawn: text and plots, not a blank page.
        assert (shot < 128).mean() > 0.005


def test_the_proxy_catches_an_external_image(tmp_path):
    """The check above can fail: a page that names an external image is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://example.org/x.png">'
                    "</body></html>")
    requests = screenshot(page, tmp_path / "leaky.png")
    assert any("example.org" in r for r in requests), requests


# ------------------------------------------------------------------ figures that fail, many classes


def _boom(*args, **kwargs):
    raise RuntimeError("the figure broke\nsecond line of a long traceback message")


def test_a_figure_that_raises_is_left_out_with_a_note_and_a_warning(monkeypatch, caplog):
    from medtl.reporting import html as report_html
    from medtl.reporting import plots

    monkeypatch.setattr(plots, "confusion_png", _boom)
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    p1 = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    proba = np.c_[1 - p1, p1]
    metrics = {"n": 60, "accuracy": 0.8, "auc": 0.85, "confusion_matrix": [[25, 5], [7, 23]]}
    with caplog.at_level("WARNING", logger="medtl"):
        figs = report_html.run_figures(classes=["a", "b"], positive=1, split="test", y_true=y,
                                       proba=proba, metrics=metrics, history=[])
    failed = figs["Confusion matrix, test (arg-max decision)"]
    assert isinstance(failed, report_html.FigureFailure)
    assert failed.reason == "RuntimeError: the figure broke"
    # The other figures are drawn all the same.
    assert all(isinstance(v, bytes) for k, v in figs.items() if not k.startswith("Confusion"))
    assert len(figs) == 3
    assert any(r.name == "medtl" and "Confusion matrix, test" in r.getMessage()
               and "the figure broke" in r.getMessage() for r in caplog.records)
    page = report_html.render_run_report({"classes": ["a", "b"]}, {"test": metrics},
                                         figures=figs)
    assert ("Figure left out: <b>Confusion matrix, test (arg-max decision)</b> could not be "
            "drawn (RuntimeError: the figure broke)") in page
    assert "second line" not in page
    assert len(_images(page)) == 2


def test_a_run_whose_figure_raises_is_still_complete(tmp_path, monkeypatch):
    """Through the public API: the run ends with config.json and a report noting the loss."""
    from medtl.reporting import plots

    monkeypatch.setattr(plots, "reliability_png", _boom)
    # The Grad-CAM gallery, not under test, would take most of this test's time.
    monkeypatch.setattr("medtl.explain.gallery", _boom)
    data = write_blob_images(tmp_path / "blobs", n_per_class=8)
    run = medtl.train(data, strategy="hybrid", head="knn", patient_regex=r"(p\d+)",
                      image_size=32, out=tmp_path / "run", quiet=True)
    assert (run.path / "config.json").is_file()
    page = (run.path / "report.html").read_text()
    assert "Figure left out: <b>Reliability diagram, test</b>" in page
    assert "RuntimeError: the figure broke" in page
    assert 'alt="Confusion matrix, test (arg-max decision)"' in page
    _assert_self_contained(page)


@pytest.mark.parametrize("k", [11, 20])
def test_every_figure_and_table_of_a_many_class_report(k):
    from medtl.evaluation.summary import split_summary
    from medtl.reporting.html import render_run_report, run_figures

    rng = np.random.default_rng(k)
    classes = [f"class {i:02d}" for i in range(k)]
    y = np.repeat(np.arange(k), 4)
    logits = rng.normal(size=(len(y), k)) + 3.0 * np.eye(k)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = split_summary(y, proba, classes=classes, n_resamples=20)
    history = [{"stage": "hybrid", "C": c, "val_score": 0.9} for c in (0.1, 1.0)]
    figs = run_figures(classes=classes, positive=None, split="test", y_true=y, proba=proba,
                       metrics=metrics, history=history)
    assert set(figs) == {"Confusion matrix, test (arg-max decision)",
                         "Reliability diagram, test"}
    assert all(isinstance(v, bytes) for v in figs.values()), figs
    config = {"classes": classes,
              "data": {"counts": {s: dict.fromkeys(classes, 4) for s in ("train", "test")}}}
    page = render_run_report(config, {"test": metrics}, figures=figs)
    assert "Figure left out" not in page
    # The confusion matrix gets the page's width, not a 30em column.
    assert re.search(r'<figure class=(wide|huge)><img [^>]*alt="Confusion matrix', page)
    # ... and a table with every count, one row per true class.
    table = page[page.index("<table class=cm>"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == k + 1
    assert table.count("<td class=hit>") == k
    # Counts per split: one row per class (plus the total), not k + 2 columns.
    assert "<tr><th>class</th><th>train</th><th>test</th><th>all</th></tr>" in page
    assert f"<tr><td>{classes[-1]}</td><td>4</td><td>4</td><td>8</td></tr>" in page
