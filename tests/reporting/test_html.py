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


def test_medtl_report_ranks_runs_and_reports_delong_against_the_best(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "compare.html"
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(a.path), str(b.path), "--out", str(out)])
    assert exit_.value.code in (0, None)
    page = out.read_text()
    _assert_self_contained(page)
    assert len(_images(page)) == 2  # ROC overlay and AUC against training time
    runs = sorted([a, b], key=lambda r: -r.metrics["test"]["auc"])
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
