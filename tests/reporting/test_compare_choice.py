"""`medtl report` and `medtl bench` choose the best run on validation, never on test (issue 15,
acceptance 3), rank on the figure asked for, and test decisions with McNemar's paired test for
any number of classes. The runs are written directly (config.json, metrics.json,
predictions.csv, with medtl.run's helpers): nothing is trained."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from medtl import run as bundle
from medtl.cli import main
from medtl.evaluation.stats import delong_test, mcnemar_test
from medtl.evaluation.summary import split_summary
from medtl.files import write_csv, write_json
from medtl.reporting.compare import compare_runs, rank_on_validation, validation_score

from ..conftest import write_blob_images

MODEL_JSON = Path(__file__).parents[1] / "fixtures" / "run_v0_1" / "run" / "model" / "model.json"
BINARY = ["bar", "disc"]  # positive: disc
N_TEST, N_VAL = 40, 30


def _proba(y: np.ndarray, k: int, separation: float, shift: float, seed: int) -> np.ndarray:
    """Class probabilities whose true class is ``separation`` ahead (in logits) plus noise;
    ``shift`` is added to class 0's logit (a shifted threshold spoils accuracy, not AUC)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, (len(y), k))
    logits[np.arange(len(y)), y] += separation
    logits[:, 0] += shift
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _write_run(path: Path, classes: list[str], splits: dict, *, strategy: str = "hybrid",
               backbone: str = "mobilenet_v2", shuffle_seed: int | None = None) -> None:
    """A finished single run: ``splits`` maps a split to (image paths, labels, proba)."""
    (path / bundle.MODEL_DIR).mkdir(parents=True)
    # A model.json that load_run accepts (the report never loads the model itself).
    meta = json.loads(MODEL_JSON.read_text())
    write_json(path / bundle.MODEL_DIR / bundle.MODEL_META,
               {**meta, "classes": classes, "num_classes": len(classes)})
    positive = 1 if len(classes) == 2 else None
    metrics, rows = {}, []
    for split, (paths, y, proba) in splits.items():
        metrics[split] = split_summary(y, proba, classes=classes, positive=positive,
                                       n_resamples=0)
        rows += bundle.prediction_rows(paths, y, proba, classes, split)
    if shuffle_seed is not None:  # matched by path, not by row order
        rows = [rows[i] for i in np.random.default_rng(shuffle_seed).permutation(len(rows))]
    metrics["timing"], metrics["params"] = {"train_s": 10.0}, {"trainable": 1000, "total": 9000}
    write_json(path / bundle.METRICS, metrics)
    write_csv(path / bundle.PREDICTIONS, rows)
    bundle.write_config(path, {
        "kind": "single", "backbone": backbone, "strategy": strategy, "head": "logreg",
        "weights": {"kind": "random", "source": "random", "path": None, "sha256": None},
        "seed": 0, "classes": classes, "positive_class": classes[1] if positive else None,
        "medtl_version": "0.2.0", "view": {}, "data": {"source": "synthetic"},
        "preprocessing": {"size": 64, "mean": [0.485, 0.456, 0.406],
                          "std": [0.229, 0.224, 0.225]}})


def _binary_runs(root: Path, names: dict[str, str]) -> dict[str, Path]:
    """Three binary runs on the same test images:

    - ``valbest``: the best validation AUC (1.0), but a shifted threshold makes its validation
      accuracy 0.5;
    - ``testbest``: the best test AUC of the two that have validation figures, not the best
      validation AUC, but the best validation accuracy;
    - ``noval``: no validation split, and the best test AUC of all.
    """
    y_test, y_val = np.arange(N_TEST) % 2, np.arange(N_VAL) % 2
    test_paths = [f"test/{BINARY[c]}/img{i:03d}.png" for i, c in enumerate(y_test)]
    val_paths = [f"train/{BINARY[c]}/val{i:03d}.png" for i, c in enumerate(y_val)]
    val_sure = np.where(y_val[:, None] == 1, [0.6, 0.4], [0.7, 0.3])  # AUC 1, accuracy 0.5
    val_sure = val_sure + np.linspace(0, 0.05, N_VAL)[:, None] * [-1, 1]
    specs = {
        "valbest": {"val": val_sure, "test": _proba(y_test, 2, 1.0, 0.0, 1)},
        "testbest": {"val": _proba(y_val, 2, 2.0, 0.0, 2), "test": _proba(y_test, 2, 3.0, 0, 3)},
        "noval": {"test": _proba(y_test, 2, 6.0, 0.0, 4)},
    }
    paths = {}
    for key, proba in specs.items():
        splits = {s: ((val_paths, y_val) if s == "val" else (test_paths, y_test)) + (p,)
                  for s, p in proba.items()}
        paths[key] = root / names[key]
        _write_run(paths[key], BINARY, splits, strategy={"valbest": "hybrid"}.get(key, "full"),
                   shuffle_seed=None if key == "valbest" else 7)
    return paths


def _metric(path: Path, split: str, key: str):
    return bundle.Run(path).metrics[split][key]


def _test_scores(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, disc probability and correctness of a run's test rows, by path."""
    rows = sorted((r for r in bundle.Run(path).predictions() if r["split"] == "test"),
                  key=lambda r: r["path"])
    y = np.array([r["label"] == "disc" for r in rows], dtype=int)
    return y, np.array([float(r["prob_disc"]) for r in rows]), np.array(
        [r["label"] == r["prediction"] for r in rows])


def _row_of(page: str, name: str) -> str:
    return re.search(rf"<tr[^>]*><td>[^<]*</td><td><code>{name}</code>.*?</tr>", page).group(0)


def test_the_report_chooses_on_validation_and_tests_against_the_chosen_run(tmp_path, capsys):
    runs = _binary_runs(tmp_path, {"valbest": "valbest", "testbest": "testbest",
                                   "noval": "noval"})
    # The premise: ranking on test would choose another run.
    assert _metric(runs["testbest"], "test", "auc") > _metric(runs["valbest"], "test", "auc")
    assert _metric(runs["noval"], "test", "auc") > _metric(runs["testbest"], "test", "auc")
    assert _metric(runs["valbest"], "val", "auc") > _metric(runs["testbest"], "val", "auc")
    out = tmp_path / "compare.html"
    with pytest.raises(SystemExit) as exit_:
        main(["report", *(str(p) for p in runs.values()), "--out", str(out)])
    assert exit_.value.code in (0, None)
    assert "chosen on validation AUC" in capsys.readouterr().out
    page = out.read_text()
    assert "Chosen on validation AUC; test shown for the chosen run" in page
    order = [page.index(f"<code>{n}</code>") for n in ("valbest", "testbest", "noval")]
    assert order == sorted(order)
    assert "class='best'><td>1</td><td><code>valbest</code>" in page
    assert "no validation figures: cannot be chosen" in _row_of(page, "noval")
    assert "1 run without validation figures cannot be chosen" in page
    # The paired tests are against the chosen run, not against the test-best one.
    y, chosen, chosen_ok = _test_scores(runs["valbest"])
    _, other, other_ok = _test_scores(runs["testbest"])
    d = delong_test(y, chosen, other)
    m = mcnemar_test(chosen_ok, other_ok)
    row = _row_of(page, "testbest")
    assert f"{-d['difference']:+.3f}, p = {d['p_value']:.3f}" in row
    assert f"{(other_ok.mean() - chosen_ok.mean()):+.3f}, p = {m['p_value']:.3f}" in row
    # The test figures shown are the chosen run's.
    assert f"{_metric(runs['valbest'], 'test', 'auc'):.3f}" in _row_of(page, "valbest")

    # --rank-by accuracy: validation accuracy chooses the other run (AUC would not).
    with pytest.raises(SystemExit):
        main(["report", *(str(p) for p in runs.values()), "--out", str(out),
              "--rank-by", "accuracy"])
    page = out.read_text()
    assert "Chosen on validation accuracy; test shown for the chosen run" in page
    assert "class='best'><td>1</td><td><code>testbest</code>" in page
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(runs["valbest"]), "--out", str(out), "--rank-by", "test_auc"])
    assert exit_.value.code == 2
    assert "unknown --rank-by metric 'test_auc'" in capsys.readouterr().err


def test_without_validation_figures_no_run_is_chosen(tmp_path):
    runs = _binary_runs(tmp_path, {"valbest": "a", "testbest": "b", "noval": "c"})
    for name in ("a", "b"):  # drop their validation figures
        m = bundle.Run(runs[{"a": "valbest", "b": "testbest"}[name]]).metrics
        del m["val"]
        write_json(tmp_path / name / bundle.METRICS, m)
    entries = [{"name": p.name, "config": bundle.Run(p).config, "metrics": bundle.Run(p).metrics,
                "rows": [r for r in bundle.Run(p).predictions() if r["split"] == "test"]}
               for p in runs.values()]
    page = compare_runs(entries)
    assert "No run is chosen" in page and "class='best'" not in page
    assert all(e["choice"] is None and "no run chosen" in e["delong"] for e in entries)


def test_the_bench_leaderboard_chooses_on_validation_and_says_so(tmp_path, capsys):
    data = write_blob_images(tmp_path / "blobs", n_per_class=2)
    out = tmp_path / "bench"
    # Cells already finished (config.json written): bench ranks and reports, trains nothing.
    cells = {"valbest": "mobilenet_v2-feature-extractor-seed0",
             "testbest": "mobilenet_v2-hybrid-logreg-seed0"}
    _binary_runs(out / "cells", {**cells, "noval": "unused"})
    args = ["bench", str(data), "--backbones", "mobilenet_v2", "--strategies",
            "feature-extractor,hybrid:logreg", "--out", str(out)]
    for rank_by, chosen in (("auc", "valbest"), ("accuracy", "testbest")):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--rank-by", rank_by])
        assert exit_.value.code in (0, None)
        printed = capsys.readouterr().out
        metric = {"auc": "AUC"}.get(rank_by, rank_by)
        assert (f"chosen on validation {metric}; test shown for the chosen run: "
                f"{cells[chosen]}") in printed
        with open(out / "leaderboard.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["cell"] for r in rows][0] == cells[chosen]
        assert rows[0]["chosen"] == "yes" and rows[1]["chosen"] == ""
        assert {r["rank_by"] for r in rows} == {rank_by}
        best = bundle.Run(out / "cells" / cells[chosen]).metrics
        assert float(rows[0]["val_value"]) == pytest.approx(best["val"][rank_by])
        assert float(rows[0]["auc"]) == pytest.approx(best["test"]["auc"])
        assert float(rows[1]["auc"]) > float(rows[0]["auc"]) or rank_by != "auc"
        page = (out / "report.html").read_text()
        assert f"Chosen on validation {metric}; test shown for the chosen run" in page
        assert f"class='best'><td>1</td><td><code>{cells[chosen]}</code>" in page


def test_a_cross_validation_run_is_chosen_on_its_mean_over_folds():
    cv = {"cv": {"mean": {"auc": 0.7, "accuracy": 0.9}}, "test": {"auc": 0.99}}
    assert validation_score(cv, "accuracy") == (0.9, "cv mean")
    assert validation_score({"test": {"auc": 0.99}}) == (None, "no validation figures")
    # A crafted metrics.json: a figure that is not a finite number cannot choose.
    for bad in ("0.9", True, float("nan"), None, [1]):
        assert validation_score({"val": {"auc": bad}})[0] is None
    ranked = rank_on_validation([{"name": "t", "metrics": {"val": {"auc": 0.6},
                                                            "test": {"auc": 0.99}}},
                                 {"name": "c", "metrics": cv},
                                 {"name": "n", "metrics": {"test": {"auc": 1.0}}}])
    assert [e["name"] for e in ranked] == ["c", "t", "n"]


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_equals_statsmodels_in_both_branches(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    a = rng.random(n) < rng.uniform(0.4, 0.95)
    b = np.where(rng.random(n) < rng.uniform(0.5, 1.0), a, ~a)
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    for exact in (True, False, None):
        ours = mcnemar_test(a, b, exact=exact)
        if not ours["a_only"] + ours["b_only"] and not ours["exact"]:
            continue  # statsmodels divides by zero there; ours says p = 1
        ref = sm_mcnemar(table, exact=ours["exact"], correction=True)
        assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
        assert ours["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert mcnemar_test(a, b)["exact"] == (ours["a_only"] + ours["b_only"] < 25)


def _three_class_runs(root: Path) -> dict[str, Path]:
    """Three 3-class runs on the same 90 test images: ``near`` differs from ``chosen`` on a few
    images' decisions (exact McNemar), ``far`` on many (chi-square)."""
    classes = ["glioma", "meningioma", "none"]
    y, y_val = np.arange(90) % 3, np.arange(30) % 3
    test = [f"test/{classes[c]}/scan{i:03d}.png" for i, c in enumerate(y)]
    val = [f"train/{classes[c]}/v{i:03d}.png" for i, c in enumerate(y_val)]
    chosen = _proba(y, 3, 2.0, 0.0, 10)
    rng = np.random.default_rng(11)
    runs = {}
    for name, n_changed, val_sep in (("chosen", 0, 3.0), ("near", 12, 2.0), ("far", 45, 1.0)):
        proba = chosen.copy()
        rows = rng.choice(90, n_changed, replace=False)
        proba[rows] = np.roll(proba[rows], 1, axis=1)  # another decision on those images
        runs[name] = root / name
        _write_run(runs[name], classes, {"val": (val, y_val, _proba(y_val, 3, val_sep, 0, 12)),
                                         "test": (test, y, proba)},
                   shuffle_seed=None if name == "chosen" else 5)
    return runs


def _correct(path: Path) -> dict[str, bool]:
    return {r["path"]: r["label"] == r["prediction"] for r in bundle.Run(path).predictions()
            if r["split"] == "test"}


def test_mcnemar_on_a_three_class_comparison_equals_statsmodels(tmp_path):
    runs = _three_class_runs(tmp_path)
    entries = [{"name": p.name, "config": bundle.Run(p).config, "metrics": bundle.Run(p).metrics,
                "rows": [r for r in bundle.Run(p).predictions() if r["split"] == "test"]}
               for p in runs.values()]
    page = compare_runs(entries)
    by_name = {e["name"]: e for e in entries}
    assert entries[0]["name"] == "chosen"
    ref = _correct(runs["chosen"])
    branches = set()
    for name in ("near", "far"):
        other = _correct(runs[name])
        a = np.array([ref[k] for k in sorted(ref)])
        b = np.array([other[k] for k in sorted(ref)])
        table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
        m = by_name[name]["mcnemar"]
        exact = int(table[0][1] + table[1][0]) < 25
        expected = sm_mcnemar(table, exact=exact, correction=True)
        assert m["exact"] == exact
        assert m["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert m["statistic"] == pytest.approx(expected.statistic, rel=1e-12)
        assert m["difference"] == pytest.approx(b.mean() - a.mean())
        assert by_name[name]["delong"] == "binary runs only"
        branches.add(exact)
    assert branches == {True, False}  # both branches of the test were exercised

    # The comparison page: the one-vs-rest ROC panels (one per class), no binary overlay.
    out = tmp_path / "compare.html"
    with pytest.raises(SystemExit) as exit_:
        main(["report", *(str(p) for p in runs.values()), "--out", str(out)])
    assert exit_.value.code in (0, None)
    page = out.read_text()
    assert "ROC curves, test" not in page.replace("One-vs-rest ROC curves, test", "")
    uri = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="One-vs-rest ROC curves, '
                    r'test"', page)
    assert uri is not None
    img = Image.open(io.BytesIO(base64.b64decode(uri.group(1))))
    img.load()
    assert img.width > 2.5 * img.height  # three panels side by side
    for name in ("near", "far"):
        p = by_name[name]["mcnemar"]["p_value"]
        assert (f"p = {p:.3f}" if p >= 0.001 else "p &lt; 0.001") in _row_of(page, name)
