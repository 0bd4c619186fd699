"""Report figures: valid PNGs of a sensible size, sound ROC bands, clear errors, no pyplot leaks."""

from __future__ import annotations

import base64
import io
import threading

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from medtl.errors import MedtlError
from medtl.reporting.plots import (
    PNG_SIGNATURE,
    confusion_png,
    png_to_data_uri,
    pr_png,
    reliability_png,
    roc_band,
    roc_png,
    scatter_cost_png,
    training_curves_png,
)


def _scores(n: int, seed: int = 0, prevalence: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores with a moderate separation (AUC around 0.85)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    return y, rng.normal(size=n) + 1.5 * y


def _check_png(b: bytes) -> Image.Image:
    assert isinstance(b, bytes)
    assert b.startswith(PNG_SIGNATURE)
    img = Image.open(io.BytesIO(b))
    img.load()
    assert img.format == "PNG"
    assert 400 <= img.width <= 800
    assert 300 <= img.height <= 700
    return img


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


# --------------------------------------------------------------------------- ROC / PR


def test_roc_png_plain_and_with_ci_and_band():
    y, s = _scores(300)
    img = _check_png(roc_png(y, s))
    assert img.size == (500, 400)
    band = roc_band(y, s, n_resamples=100)
    _check_png(roc_png(y, s, auc=0.953, auc_ci=(0.93, 0.97), band=band, title="Test ROC"))


def test_roc_accepts_bool_labels_and_lists():
    y, s = _scores(80)
    _check_png(roc_png(y.astype(bool).tolist(), s.tolist()))


@pytest.mark.parametrize("fn", [roc_png, pr_png, roc_band])
@pytest.mark.parametrize("label", [0, 1])
def test_single_class_labels_raise_a_clear_error(fn, label):
    with pytest.raises(MedtlError, match="both classes"):
        fn(np.full(20, label), np.linspace(0, 1, 20))


@pytest.mark.parametrize("y, s, match", [
    ([0, 1, 2], [0.1, 0.5, 0.9], "binary labels"),
    ([0, 1, 1], [0.1, 0.5], "3 labels but 2 scores"),
    ([0, 1], [[0.9, 0.1], [0.2, 0.8]], r"proba\[:, 1\]"),
    ([0, 1, 1], [0.1, float("nan"), 0.9], "NaN"),
])
def test_bad_roc_inputs_raise(y, s, match):
    with pytest.raises(MedtlError, match=match):
        roc_png(y, s)


def test_roc_band_is_ordered_bounded_and_shrinks_with_n():
    y, s = _scores(200, seed=1)
    small = roc_band(y, s, n_resamples=300, seed=0)
    assert small["fpr"].shape == small["tpr_low"].shape == small["tpr_high"].shape == (101,)
    assert small["fpr"][0] == 0.0 and small["fpr"][-1] == 1.0
    y_big, s_big = _scores(2000, seed=1)
    big = roc_band(y_big, s_big, n_resamples=300, seed=0)
    for band in (small, big):
        assert (band["tpr_low"] <= band["tpr_high"]).all()
        assert (band["tpr_low"] >= 0).all() and (band["tpr_high"] <= 1).all()
        assert band["tpr_high"][-1] == 1.0
    width = lambda b: float(np.mean(b["tpr_high"] - b["tpr_low"]))  # noqa: E731
    assert width(big) < 0.6 * width(small)


def test_roc_band_is_reproducible_and_honours_level():
    y, s = _scores(150)
    a = roc_band(y, s, n_resamples=200, seed=3, grid=21)
    b = roc_band(y, s, n_resamples=200, seed=3, grid=21)
    np.testing.assert_array_equal(a["tpr_low"], b["tpr_low"])
    narrow = roc_band(y, s, n_resamples=200, seed=3, grid=21, level=0.5)
    assert (narrow["tpr_high"] - narrow["tpr_low"] <= a["tpr_high"] - a["tpr_low"] + 1e-12).all()
    assert a["level"] == 0.95 and narrow["level"] == 0.5


def test_roc_band_defaults_cover_the_observed_curve():
    """The default band (500 resamples, 101 points, 95 %) on a Kermany-sized test split.

    No wall-clock bound: a busy machine made one flaky, and the cost is the resample count,
    which is checked instead.
    """
    from sklearn.metrics import roc_curve

    y, s = _scores(624, seed=2, prevalence=390 / 624)
    band = roc_band(y, s)
    assert band["n_resamples"] == 500 and band["level"] == 0.95
    assert band["fpr"].shape == (101,)
    fpr, tpr, _ = roc_curve(y, s)
    observed = np.interp(band["fpr"], fpr, tpr)
    inside = (band["tpr_low"] - 1e-9 <= observed) & (observed <= band["tpr_high"] + 1e-9)
    assert inside.mean() > 0.9


def test_pr_png():
    y, s = _scores(300)
    _check_png(pr_png(y, s))
    _check_png(pr_png(y, s, title="PR, rare positives"))


# --------------------------------------------------------------------------- confusion matrix


def test_confusion_png_two_classes():
    img = _check_png(confusion_png([[230, 4], [12, 378]], ["NORMAL", "PNEUMONIA"]))
    assert img.size == (500, 400)


def test_confusion_png_five_classes_with_an_empty_row():
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 50, size=(5, 5)) + np.diag([200] * 5)
    cm[3] = 0  # a class absent from the split: its percentages are undefined, not an error
    _check_png(confusion_png(cm, ["a", "bb", "ccc", "dddd", "a long class name"]))


def test_confusion_png_ten_classes():
    _check_png(confusion_png(np.eye(10, dtype=int) * 9 + 1, [f"class {i}" for i in range(10)]))


@pytest.mark.parametrize("k", [11, 20, 40])
def test_confusion_png_grows_with_many_classes(k):
    """Past 10 classes the figure grows with the count: at least 40 px a cell up to 40 classes,
    where tick labels and counts stay legible (a 6x5 inch figure gave 20 classes 20 px)."""
    rng = np.random.default_rng(k)
    cm = rng.integers(0, 3, size=(k, k)) + np.diag(rng.integers(5, 300, k))
    cm[1] = 0  # an empty row among many classes
    names = [f"class {i}" if i % 5 else f"a very long class name, number {i}" for i in range(k)]
    png = confusion_png(cm, names, title="Confusion matrix, test")
    assert png.startswith(PNG_SIGNATURE)
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.width >= 40 * k and img.height >= 40 * k
    assert max(img.size) <= 2200


def test_confusion_png_with_hundreds_of_classes_stays_one_screen_wide():
    k = 150
    img = Image.open(io.BytesIO(confusion_png(np.eye(k, dtype=int) * 1000 + 1,
                                              [f"c{i}" for i in range(k)])))
    img.load()
    assert max(img.size) <= 2200
    # Still a heat map a reader can zoom into: several pixels a cell.
    assert min(img.size) >= 8 * k


@pytest.mark.parametrize("cm, names, match", [
    ([[1, 2], [3, 4]], ["a", "b", "c"], "3 class names"),
    ([[1, 2, 3], [3, 4, 5]], ["a", "b"], "square"),
    ([[5]], ["a"], "at least 2 classes"),
    ([[1, -2], [3, 4]], ["a", "b"], "non-negative"),
])
def test_confusion_png_bad_inputs(cm, names, match):
    with pytest.raises(MedtlError, match=match):
        confusion_png(cm, names)


# --------------------------------------------------------------------------- calibration


def test_reliability_png_with_empty_bins_as_nan_none_or_omitted():
    curve = {"confidence": [0.55, 0.65, float("nan"), 0.85, 0.95],
             "accuracy": [0.5, 0.7, float("nan"), 0.8, 0.97],
             "count": [10, 25, 0, 60, 300]}
    _check_png(reliability_png(curve, ece=0.0312))
    curve_none = {k: [None if (isinstance(v, float) and np.isnan(v)) else v for v in vals]
                  for k, vals in curve.items()}
    _check_png(reliability_png(curve_none))
    omitted = {k: [v for i, v in enumerate(vals) if i != 2] for k, vals in curve.items()}
    _check_png(reliability_png(omitted, title="Calibration (test)"))


def test_reliability_png_all_bins_empty_still_renders():
    _check_png(reliability_png({"confidence": [], "accuracy": [], "count": []}))


def test_reliability_png_bad_curve():
    with pytest.raises(MedtlError, match="'count'"):
        reliability_png({"confidence": [0.5], "accuracy": [0.5]})
    with pytest.raises(MedtlError, match="differ in length"):
        reliability_png({"confidence": [0.5, 0.6], "accuracy": [0.5], "count": [1]})


# --------------------------------------------------------------------------- training curves


def _history(n: int, stage: str | None = None) -> list[dict]:
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e + 0.05,
               "val_auc": 0.9 + 0.01 * e, "val_accuracy": 0.8 + 0.01 * e}
        if stage is not None:
            row = {"stage": stage, **row}
        rows.append(row)
    return rows


def test_training_curves_without_stage():
    _check_png(training_curves_png(_history(8)))


def test_training_curves_with_stages_and_csv_strings():
    rows = _history(1, "probe") + _history(4, "block 5") + _history(3, "blocks 4-5")
    # As read back from history.csv: every value a string, missing ones empty.
    as_csv = [{k: ("" if k == "val_loss" and r["stage"] == "probe" else str(v))
               for k, v in r.items()} for r in rows]
    _check_png(training_curves_png(as_csv, title="Gradual unfreezing"))


def test_training_curves_skip_none_and_missing_keys():
    rows = _history(6)
    rows[0]["val_loss"] = None
    rows[2]["val_auc"] = float("nan")
    rows[3] = {"epoch": 4, "train_loss": 0.3}
    for r in rows:
        r.pop("val_accuracy", None)
    _check_png(training_curves_png(rows))
    _check_png(training_curves_png([{"epoch": 1, "val_auc": 0.9}]))


def test_training_curves_without_plottable_values_render_a_note():
    _check_png(training_curves_png([]))
    _check_png(training_curves_png([{"stage": "hybrid", "C": "0.1", "val_score": "0.99"}]))


# --------------------------------------------------------------------------- leaderboard


def test_scatter_cost_png():
    points = [
        {"run": "linear-probe", "train_s": 12.0, "auc": 0.91},
        {"run": "hybrid", "train_s": 40.0, "auc": 0.95},
        {"run": "fine-tune", "train_s": 900.0, "auc": 0.97},
        {"run": "scratch", "train_s": 1500.0, "auc": 0.88},
        {"run": "no timing", "train_s": None, "auc": 0.9},  # left out
        {"run": "zero", "train_s": 0, "auc": 0.9},  # no place on a log axis: left out
    ]
    _check_png(scatter_cost_png(points))
    _check_png(scatter_cost_png(points[:1], title="One run"))
    _check_png(scatter_cost_png([{"name": "a", "secs": "3.5", "acc": "0.8"}],
                                x="secs", y="acc", label="name"))


def test_scatter_cost_png_without_points_renders_a_note():
    _check_png(scatter_cost_png([]))


# --------------------------------------------------------------------------- data URI, threads


def test_png_to_data_uri_round_trips():
    png = pr_png(*_scores(50))
    uri = png_to_data_uri(png)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == png
    with pytest.raises(ValueError, match="PNG"):
        png_to_data_uri(b"GIF89a")


def test_identical_inputs_give_identical_bytes_across_threads():
    y, s = _scores(200)
    expected = roc_png(y, s)
    results: list[bytes] = []

    def work() -> None:
        results.append(roc_png(y, s))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


def test_no_pyplot_figure_is_left_open():
    y, s = _scores(60)
    roc_png(y, s, band=roc_band(y, s, n_resamples=20))
    pr_png(y, s)
    confusion_png([[5, 1], [2, 7]], ["a", "b"])
    reliability_png({"confidence": [0.6, 0.9], "accuracy": [0.5, 0.85], "count": [4, 9]})
    training_curves_png(_history(3, "s"))
    scatter_cost_png([{"run": "a", "train_s": 1.0, "auc": 0.8}])
    assert plt.get_fignums() == []


def test_reliability_png_takes_the_stats_module_keys():
    # The shape of medtl.evaluation.stats.reliability_curve: None for empty bins, with edges.
    curve = {"bin_edges": [0.0, 0.25, 0.5, 0.75, 1.0],
             "mean_confidence": [None, 0.45, 0.7, 0.9],
             "accuracy": [None, 0.5, 0.6, 0.95],
             "counts": [0, 12, 40, 200]}
    _check_png(reliability_png(curve, ece=0.05))
