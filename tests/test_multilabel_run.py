"""A multi-label run end to end (issue 21) on synthetic images that may show a disc, a bar,
both or neither: metrics, predictions.csv, thresholds chosen on val, evaluate and predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import medtl
from medtl.cli import main
from medtl.errors import MedtlError

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, quiet=True)
LABELS = ("disc", "bar")


def shapes_image(rng: np.random.Generator, disc: bool, bar: bool, size: int = 48) -> np.ndarray:
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if disc:
        cy, cx = rng.integers(12, size - 12, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 230
    if bar:
        cy = int(rng.integers(6, size - 6))
        img[cy - 2:cy + 2, 4:size - 4] = 230
    return img


def write_shapes_manifest(root: Path, n_per_split: dict[str, int], seed: int = 0,
                          unknown_every: int = 7) -> Path:
    """``path,disc,bar,patient_id,split``: each image shows any subset of the two shapes; every
    ``unknown_every``-th bar target is blank (unknown)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, k = [], 0
    for split, n in n_per_split.items():
        for _ in range(n):
            disc, bar = bool(rng.integers(2)), bool(rng.integers(2))
            name = f"img{k:04d}.png"
            Image.fromarray(shapes_image(rng, disc, bar)).save(root / name)
            shown_bar = "" if k % unknown_every == 3 else int(bar)
            rows.append([name, int(disc), shown_bar, f"p{k // 2}", split])
            k += 1
    manifest = root / "labels.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", *LABELS, "patient_id", "split"])
        w.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    manifest = write_shapes_manifest(root / "data", {"train": 60, "val": 30, "test": 30})
    run = medtl.train(manifest, strategy="hybrid", head="logreg", out=root / "run", **FAST)
    return manifest, run


def _rows(run, split):
    return [r for r in run.predictions() if r["split"] == split]


def test_a_multi_label_run_records_the_task_and_per_label_figures(ml_run):
    _, run = ml_run
    assert run.config["task"] == "multilabel" and run.config["classes"] == list(LABELS)
    assert run.config["positive_class"] is None
    test = run.metrics["test"]
    assert set(test["labels"]) == set(LABELS)
    for k in ("macro_auc", "micro_auc", "map", "macro_auc_ci95", "error_cooccurrence"):
        assert k in test, k
    assert test["auc"] == test["macro_auc"] > 0.8  # the shapes are visible: chance is 0.5
    th = run.metrics["thresholds"]
    assert th["chosen_on"] == "val" and set(LABELS) <= set(th)
    html = (run.path / "report.html").read_text()
    assert "Per-label ROC" in html and "disc" in html
    assert "each map is for the label it is shown under" in html  # the Grad-CAM gallery


def test_per_label_metrics_equal_scikit_learns_on_predictions_csv(ml_run):
    _, run = ml_run
    rows = _rows(run, "test")
    assert list(rows[0])[:2] == ["path", "split"]
    aucs = []
    for name in LABELS:
        known = [r for r in rows if r[name] != ""]
        y = [int(r[name]) for r in known]
        p = [float(r[f"prob_{name}"]) for r in known]
        figures = run.metrics["test"]["labels"][name]
        assert figures["n_known"] == len(known)
        assert figures["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert figures["average_precision"] == pytest.approx(average_precision_score(y, p),
                                                             abs=1e-12)
        # decisions at the label's threshold, chosen on val
        t = run.metrics["thresholds"][name]
        assert all(int(r[f"pred_{name}"]) == int(float(r[f"prob_{name}"]) >= t) for r in rows)
        aucs.append(roc_auc_score(y, p))
    assert run.metrics["test"]["macro_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    # the blank targets are unknown: counted nowhere
    assert run.metrics["test"]["labels"]["bar"]["n_known"] < len(rows)


def test_probabilities_are_independent_per_label(ml_run):
    _, run = ml_run
    sums = [sum(float(r[f"prob_{n}"]) for n in LABELS) for r in _rows(run, "test")]
    assert max(abs(s - 1.0) for s in sums) > 0.05  # not a softmax over labels


def test_thresholds_are_chosen_on_validation_not_on_test(ml_run, tmp_path):
    manifest, run = ml_run
    # Flip every test target: val is untouched, so the thresholds must not move.
    flipped = tmp_path / "flipped.csv"
    with open(manifest) as fh, open(flipped, "w", newline="") as out:
        reader, writer = csv.DictReader(fh), None
        for r in reader:
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
                writer.writeheader()
            r["path"] = str(Path(manifest).parent / r["path"])
            if r["split"] == "test":
                for n in LABELS:
                    r[n] = "" if r[n] == "" else str(1 - int(r[n]))
            writer.writerow(r)
    other = medtl.train(flipped, strategy="hybrid", head="logreg", out=tmp_path / "run",
                        **FAST)
    for n in LABELS:
        assert other.metrics["thresholds"][n] == run.metrics["thresholds"][n]
    assert other.metrics["test"]["macro_auc"] < 0.5  # the flipped test targets were scored


def test_evaluate_and_predict_reproduce_the_run(ml_run, tmp_path, capsys):
    manifest, run = ml_run
    result = medtl.evaluate(run.path)
    assert result["metrics"]["macro_auc"] == pytest.approx(run.metrics["test"]["macro_auc"])
    saved = {Path(r["path"]).name: r for r in _rows(run, "test")}
    images = [Path(manifest).parent / n for n in sorted(saved)[:5]]
    rows = medtl.predict(run.path, [str(p) for p in images])
    assert [c for c in rows[0] if c.startswith(("prob_", "pred_"))] == [
        "prob_disc", "pred_disc", "prob_bar", "pred_bar"]
    for r in rows:
        s = saved[Path(r["path"]).name]
        for n in LABELS:
            assert float(r[f"prob_{n}"]) == pytest.approx(float(s[f"prob_{n}"]), abs=1e-6)
            assert int(r[f"pred_{n}"]) == int(s[f"pred_{n}"])
    with pytest.raises(SystemExit) as done:
        main(["evaluate", str(run.path), "--json"])
    assert done.value.code == 0
    assert "macro_auc" in json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["evaluate", str(run.path)])
    shown = capsys.readouterr().out
    assert "test: disc" in shown and "macro" in shown


def test_positive_class_is_refused_for_multi_label_data(ml_run, tmp_path):
    manifest, _ = ml_run
    with pytest.raises(MedtlError, match="positive-class"):
        medtl.train(manifest, strategy="hybrid", positive_class="disc", out=tmp_path / "r",
                    **FAST)


def test_report_compares_multi_label_runs_per_label_with_holm_adjusted_delong(ml_run,
                                                                              tmp_path):
    from medtl.evaluation.stats import delong_test
    from medtl.reporting.compare import holm, multilabel_delong
    from medtl.workflow import _report_entry, report

    manifest, run = ml_run
    other = medtl.train(manifest, strategy="feature-extractor", epochs=3,
                        out=tmp_path / "fe", **FAST)
    a, b = _report_entry(run.path, "test"), _report_entry(other.path, "test")
    line = multilabel_delong(a, b)
    p_raw = []
    for name in LABELS:
        known = sorted(r["path"] for r in a["rows"] if r[name] != "")
        pa = {r["path"]: float(r[f"prob_{name}"]) for r in a["rows"]}
        pb = {r["path"]: float(r[f"prob_{name}"]) for r in b["rows"]}
        truth = {r["path"]: int(r[name]) for r in a["rows"] if r[name] != ""}
        d = delong_test([truth[p] for p in known], [pa[p] for p in known],
                        [pb[p] for p in known])
        assert f"{name} {-d['difference']:+.3f}" in line
        p_raw.append(d["p_value"])
    for p in holm(p_raw):
        assert f"(p {p:.3g})" in line
    html = Path(report([run.path, other.path], tmp_path / "cmp.html")).read_text()
    assert "DeLong per label, Holm-adjusted" in html


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    from medtl.reporting.compare import holm

    p = [0.01, 0.04, 0.03, 0.2, 0.001]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))


def test_cross_validation_of_multi_label_data_keeps_patients_and_reports_macro_auc(ml_run,
                                                                                 tmp_path):
    manifest, _ = ml_run
    run = medtl.train(manifest, strategy="hybrid", head="logreg", folds=2,
                      out=tmp_path / "cv", **FAST)
    cv = run.metrics["cv"]
    assert set(cv["mean"]) == {"auc", "macro_auc", "micro_auc", "map"}
    assert cv["mean"]["macro_auc"] > 0.7
    held = {}
    for r in run.predictions():
        held.setdefault(r["fold"], set()).add(r["path"])
    assert len(held) == 2 and not (held["1"] & held["2"])
    # medtl report takes the cross-validated run too (its out-of-fold rows, scored per label)
    from medtl.workflow import report

    html = Path(report([run.path, ml_run[1].path], tmp_path / "cmp.html")).read_text()
    # out-of-fold train + val images against test images: no paired test, and it says so
    assert "different test images" in html and "cv mean" in html


def test_a_multi_label_npz_trains_like_medmnist_chestmnist(tmp_path):
    """MedMNIST's multi-label layout: labels (n, K) of 0/1, named by --labels."""
    rng = np.random.default_rng(3)
    arrays = {}
    for split, n in (("train", 60), ("val", 30), ("test", 30)):
        y = rng.integers(0, 2, (n, 2)).astype(np.uint8)
        arrays[f"{split}_images"] = np.stack([shapes_image(rng, bool(d), bool(b))
                                              for d, b in y])
        arrays[f"{split}_labels"] = y
    np.savez(tmp_path / "shapes.npz", **arrays)
    run = medtl.train(tmp_path / "shapes.npz", strategy="hybrid", head="logreg",
                      labels=list(LABELS), out=tmp_path / "run", **FAST)
    assert run.config["classes"] == list(LABELS) and run.config["data"]["labels"] == list(LABELS)
    assert run.metrics["test"]["macro_auc"] > 0.8
    rows = _rows(run, "test")
    assert {"key", "index", "prob_disc", "pred_bar"} <= set(rows[0])
    assert [int(r["disc"]) for r in rows] == arrays["test_labels"][:, 0].tolist()
    assert medtl.evaluate(run.path)["metrics"]["macro_auc"] == pytest.approx(
        run.metrics["test"]["macro_auc"])


@pytest.mark.parametrize("head", ["svm", "rf", "knn"])
def test_a_one_vs_rest_head_without_a_linear_form_exports_per_label(ml_run, tmp_path, head):
    """auto may end with any hybrid head: each label's binary estimator is converted and the
    graph gives the run's per-label probabilities."""
    from medtl.export.writer import export_run
    from medtl.run import load_run

    manifest, _ = ml_run
    run = medtl.train(manifest, strategy="hybrid", head=head, out=tmp_path / "run", **FAST)
    bundle = export_run(load_run(run.path), tmp_path / "bundle")
    saved = {Path(r["path"]).name: r for r in _rows(run, "test")}
    images = [str(Path(manifest).parent / n) for n in sorted(saved)[:8]]
    rows = medtl.predict(bundle, images)
    for r in rows:
        for n in LABELS:
            assert float(r[f"prob_{n}"]) == pytest.approx(
                float(saved[Path(r["path"]).name][f"prob_{n}"]), abs=1e-4)


def test_a_mean_ensemble_of_multi_label_runs_is_a_multi_label_run(ml_run, tmp_path):
    """medtl ensemble --method mean: per-label probabilities averaged, thresholds re-chosen on
    validation; evaluate and predict take the ensemble like a run; other methods refused."""
    from medtl.ensembles import ensemble
    from medtl.evaluation.multilabel import label_thresholds

    manifest, run = ml_run
    other = medtl.train(manifest, strategy="feature-extractor", epochs=3,
                        out=tmp_path / "fe", **FAST)
    ens = ensemble([run.path, other.path], method="mean", out=tmp_path / "ens", quiet=True)
    assert ens.config["task"] == "multilabel"
    members = [{Path(r["path"]).name: r for r in m.predictions()} for m in (run, other)]
    val_y, val_p = [], []
    for r in ens.predictions():
        name = Path(r["path"]).name
        for n in LABELS:
            mean = np.mean([float(m[name][f"prob_{n}"]) for m in members])
            assert float(r[f"prob_{n}"]) == pytest.approx(mean, abs=1e-9)
        if r["split"] == "val":
            val_y.append([float(r[n]) if r[n] != "" else np.nan for n in LABELS])
            val_p.append([float(r[f"prob_{n}"]) for n in LABELS])
    chosen = label_thresholds(np.array(val_y), np.array(val_p), list(LABELS))
    assert all(ens.metrics["thresholds"][n] == pytest.approx(chosen[n]) for n in LABELS)
    assert medtl.evaluate(ens.path)["metrics"]["macro_auc"] == pytest.approx(
        ens.metrics["test"]["macro_auc"])
    image = str(Path(manifest).parent / Path(ens.predictions()[0]["path"]).name)
    row = medtl.predict(ens.path, [image])[0]
    assert float(row["prob_disc"]) == pytest.approx(float(ens.predictions()[0]["prob_disc"]),
                                                    abs=1e-5)
    with pytest.raises(MedtlError, match="--method mean"):
        ensemble([run.path, other.path], method="stack", out=tmp_path / "stack", quiet=True)
    from medtl.export.writer import export_run

    with pytest.raises(MedtlError, match="multi-label ensemble is not exported"):
        export_run(ens, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    # explain maps a label of the ensemble (the members' label maps, combined)
    from medtl.workflow import explain

    result = explain(ens.path, [image], out=tmp_path / "maps", target="bar", quiet=True)
    assert [r["target"] for r in result["rows"]] == ["bar"]
