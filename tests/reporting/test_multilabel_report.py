"""A multi-label run's predictions.csv rows, figures and report.html (issue 21)."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import special
from sklearn.metrics import roc_auc_score

from medtl.data.dataset import Record
from medtl.errors import MedtlError
from medtl.evaluation.multilabel import label_thresholds, multilabel_summary
from medtl.reporting import html, plots
from medtl.run import multilabel_prediction_rows, write_csv

LABELS = ["disc", "bar", "ring"]


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.4).astype(float)
    p = special.expit(1.5 * (2 * y - 1) + rng.normal(size=y.shape))
    y[rng.random(y.shape) < 0.2] = np.nan
    return y, p


def test_prediction_rows_hold_truth_probability_and_decision_per_label():
    y = np.array([[1, 0, np.nan], [0, np.nan, 1], [1, 1, 0]])
    p = np.array([[0.8, 0.3, 0.5], [0.2, 0.9, 0.7], [np.nan, 0.1, 0.2]])
    th = {"chosen_on": "val", "disc": 0.5, "bar": 0.31, "ring": 0.7}
    rows = multilabel_prediction_rows(["/d/a.png", "/d/b.png", "/d/c.png"], y, p, LABELS, th,
                                      "test", show=lambda s: s.upper())
    assert list(rows[0]) == ["path", "split", "disc", "prob_disc", "pred_disc", "bar",
                             "prob_bar", "pred_bar", "ring", "prob_ring", "pred_ring"]
    assert rows[0] == {"path": "/D/A.PNG", "split": "test", "disc": 1, "prob_disc": 0.8,
                       "pred_disc": 1, "bar": 0, "prob_bar": 0.3, "pred_bar": 0, "ring": "",
                       "prob_ring": 0.5, "pred_ring": 0}
    assert (rows[1]["bar"], rows[1]["pred_ring"]) == ("", 1)  # unknown; 0.7 >= 0.7
    # An unreadable image: its truth stays, probabilities and decisions are empty.
    assert [rows[2][k] for k in ("disc", "prob_disc", "pred_disc", "prob_bar", "pred_bar")] \
        == [1, "", "", "", ""]

    predicted = multilabel_prediction_rows(["/d/a.png"], None, p[:1], LABELS, None, None)
    assert predicted == [{"path": "/d/a.png", "prob_disc": 0.8, "pred_disc": 1,
                          "prob_bar": 0.3, "pred_bar": 0, "prob_ring": 0.5, "pred_ring": 1}]
    with pytest.raises(MedtlError, match="no threshold for label\\(s\\) bar, ring"):
        multilabel_prediction_rows(["/d/a.png"], None, p[:1], LABELS, {"disc": 0.5}, None)


def test_prediction_rows_keep_the_location_columns_of_prediction_rows():
    recs = [Record("/d/v.nii.gz", 0, "test", slice=2), Record("/d/x.npz", 0, "test",
                                                                key="test_images", index=4)]
    rows = multilabel_prediction_rows(recs, np.ones((2, 3)), np.full((2, 3), 0.9), LABELS,
                                      None, "test")
    assert list(rows[0])[:5] == ["path", "slice", "key", "index", "split"]
    assert (rows[0]["slice"], rows[0]["key"]) == (2, "")
    assert (rows[1]["key"], rows[1]["index"], rows[1]["slice"]) == ("test_images", 4, "")


def test_per_label_auc_from_predictions_csv_equals_the_summary(tmp_path):
    y, p = _data(120, 0)
    th = label_thresholds(*_data(80, 1), LABELS)
    summary = multilabel_summary(y, p, LABELS, th, n_resamples=50)
    rows = multilabel_prediction_rows([f"/d/{i}.png" for i in range(len(y))], y, p, LABELS,
                                      th, "test")
    write_csv(tmp_path / "predictions.csv", rows)
    df = pd.read_csv(tmp_path / "predictions.csv")
    for name in LABELS:
        known = df[name].notna()
        auc = roc_auc_score(df.loc[known, name].astype(int), df.loc[known, f"prob_{name}"])
        assert auc == pytest.approx(summary["labels"][name]["auc"], abs=1e-12)
        pred = (df[f"prob_{name}"] >= th[name]).astype(int)
        assert (df[f"pred_{name}"] == pred).all()
    # The report reads the same rows back as arrays.
    read = pd.read_csv(tmp_path / "predictions.csv", dtype=str, keep_default_na=False)
    (split, (y2, p2)), = html.multilabel_arrays(read.to_dict("records"), LABELS).items()
    assert split == "test"
    np.testing.assert_array_equal(np.isnan(y2), np.isnan(y))
    np.testing.assert_allclose(np.nan_to_num(y2), np.nan_to_num(y))
    np.testing.assert_allclose(p2, p, rtol=1e-15)


def _decoded(page: str) -> dict[str, Image.Image]:
    """alt text -> decoded image of every embedded PNG."""
    out = {}
    for uri, alt in re.findall(r'<img src="([^"]+)" alt="([^"]*)"', page):
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        img.load()
        out[alt] = img
    return out


def test_report_shows_per_label_tables_roc_grid_and_error_cooccurrence():
    y_val, p_val = _data(90, 2)
    y_test, p_test = _data(100, 3)
    th = label_thresholds(y_val, p_val, LABELS)
    metrics = {"val": multilabel_summary(y_val, p_val, LABELS, th, n_resamples=50),
               "test": multilabel_summary(y_test, p_test, LABELS, th, n_resamples=50),
               "timing": {"train_s": 1.0}, "params": {"total": 10, "trainable": 2}}
    metrics = json.loads(json.dumps(metrics))  # as read back from metrics.json
    config = {"task": "multilabel", "backbone": "resnet18", "strategy": "hybrid",
              "classes": LABELS, "data": {"source": "m.csv", "counts": {
                  "test": {"disc": 40, "bar": 35, "ring": 41}}}}
    rows = (multilabel_prediction_rows(["v"] * 90, y_val, p_val, LABELS, th, "val")
            + multilabel_prediction_rows(["t"] * 100, y_test, p_test, LABELS, th, "test"))
    figures = html.multilabel_run_figures(classes=LABELS,
                                          splits=html.multilabel_arrays(rows, LABELS),
                                          metrics=metrics, history=[])
    page = html.render_run_report(config, metrics, figures=figures)
    assert page.count("<table class=perlabel>") == 2
    assert "<h3>Per label, test</h3>" in page and "<h3>Per label, val</h3>" in page
    test = metrics["test"]
    for key in ("macro_auc", "micro_auc", "map"):
        assert f"{test[key]:.3f} <small>({test[key + '_ci95'][0]:.3f}" in page, key
    lab = test["labels"]["bar"]
    assert (f"<td>bar</td><td>{lab['n_known']}</td><td>{lab['n_positive']}</td>"
            f"<td>{lab['auc']:.3f} <small>({lab['auc_ci95'][0]:.3f}") in page
    assert f"{lab['sensitivity']:.3f} <small>({lab['sensitivity_ci95'][0]:.3f}" in page
    images = _decoded(page)
    for split in ("val", "test"):
        assert images[f"Per-label ROC curves, {split}"].size[0] > 300
        assert images[f"Co-occurrence of errors, {split} (thresholds chosen on val)"]
    assert "Confusion matrix" not in page and "Operating points" not in page
    assert html.render_multilabel_report(config, metrics, figures=figures) == page


def test_roc_grid_says_why_a_panel_is_empty(monkeypatch):
    notes = []
    real = plots._note
    monkeypatch.setattr(plots, "_note", lambda ax, text: (notes.append(text), real(ax, text)))
    y, p = _data(40, 4)
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 0.0)
    y[:, 2] = np.nan
    png = plots.roc_grid_png(y, p, LABELS)
    assert png.startswith(plots.PNG_SIGNATURE)
    assert notes == ["no positives", "no known labels"]
    co = plots.error_cooccurrence_png(multilabel_summary(y, p, LABELS, None, n_resamples=10))
    assert Image.open(io.BytesIO(co)).size[0] > 300
