"""Acceptance on real chest X-rays (Kermany et al. 2018): ImageNet transfer beats random
weights by a margin. Skipped when ../shared/data is absent (a user's fresh clone)."""

from __future__ import annotations

import numpy as np
import pytest

import medtl
from medtl.data.splits import patient_overlap

from .conftest import kermany_or_skip

REGEX = r"(person\d+|IM-\d+)"


@pytest.fixture(scope="module")
def kermany_manifest(tmp_path_factory):
    """500 training images (seeded, both classes) and the full 624-image official test set."""
    root = kermany_or_skip()
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for cls, n in (("NORMAL", 250), ("PNEUMONIA", 250)):
        files = sorted((root / "train" / cls).glob("*.jpeg"))
        for f in rng.choice(files, n, replace=False):
            rows.append(f"{f},{cls},train")
    for cls in ("NORMAL", "PNEUMONIA"):
        for f in sorted((root / "test" / cls).glob("*.jpeg")):
            rows.append(f"{f},{cls},test")
    path = tmp_path_factory.mktemp("kermany") / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(kermany_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("kermany-runs")
    common = dict(backbone="mobilenet_v2", strategy="hybrid", head="logreg",
                  patient_regex=REGEX, quiet=True,
                  paths="absolute")  # the manifest's rows point outside its folder
    imagenet = medtl.train(kermany_manifest, weights="imagenet", out=out / "imagenet", **common)
    random = medtl.train(kermany_manifest, weights="random", out=out / "random", **common)
    return imagenet, random


def test_imagenet_features_reach_auc_090_on_the_full_test_set(runs):
    imagenet, _ = runs
    test = imagenet.metrics["test"]
    assert test["n"] == 624
    assert imagenet.config["weights"]["source"].startswith("package:")
    assert test["auc"] >= 0.90, test


def test_imagenet_weights_beat_random_weights(runs):
    """ImageNet features beat the same architecture's random features.

    The issue asked for a margin of 0.05 AUC. Measured here it is smaller: random MobileNetV2
    features, standardised, reach AUC ~0.91 on this test set, 0.031 +- 0.018 below ImageNet
    features over 8 seeds of 400 training images (benchmarks/imagenet_vs_random.py,
    docs/benchmarks.md). The test holds the ordering, which held on every seed, not a margin
    the data does not support.
    """
    imagenet, random = runs
    assert random.config["weights"]["kind"] == "random"
    assert random.metrics["test"]["auc"] < imagenet.metrics["test"]["auc"]


def test_patient_regex_keeps_patients_out_of_two_splits():
    root = kermany_or_skip()
    ds = medtl.load_dataset(root, patient_regex=REGEX)
    assert {"train", "val", "test"} <= set(ds.split_names())
    assert not patient_overlap(ds, "train", "val")
    # The official split has several images per patient: a random split would leak them.
    train_patients = [p for p in ds.split("train").patients]
    assert len(set(train_patients)) < len(train_patients)


# --------------------------------------------------------------------------- metrics.json
def _direct_delong_ci(y: np.ndarray, s: np.ndarray) -> list[float]:
    """DeLong's AUC variance from its structural components, computed pair by pair (O(n^2))."""
    from scipy.stats import norm

    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    z = norm.ppf(0.975)
    return [max(0.0, auc - z * se), min(1.0, auc + z * se)]


def _ece(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y)
    total = 0.0
    for lo, hi in zip(np.linspace(0, 1, n_bins + 1)[:-1], np.linspace(0, 1, n_bins + 1)[1:],
                      strict=True):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf <= hi)
        if inside.any():
            total += inside.sum() / len(y) * abs(correct[inside].mean() - conf[inside].mean())
    return total


def _figures(y: np.ndarray, p: np.ndarray) -> dict:
    """The point figures of a binary split, by scikit-learn, from labels and probabilities."""
    from sklearn import metrics as skm

    pred = p.argmax(axis=1)
    return {
        "n": len(y), "positive_class": 1,
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "auc": skm.roc_auc_score(y, p[:, 1]),
        "sensitivity": skm.recall_score(y, pred, pos_label=1),
        "specificity": skm.recall_score(y, pred, pos_label=0),
        "precision": skm.precision_score(y, pred),
        "f1": skm.f1_score(y, pred),
        "confusion_matrix": skm.confusion_matrix(y, pred).tolist(),
    }


def _bootstrap(y: np.ndarray, p: np.ndarray, seed: int) -> dict:
    """95 % percentile intervals with scikit-learn's metrics on each of medtl's resamples.

    The resampling scheme (stratified by class, 2,000 resamples from the run's seed) is medtl's
    own; what is checked is every metric value computed on them.
    """
    from sklearn import metrics as skm

    from medtl.evaluation.stats import _stratified_indices

    idx = _stratified_indices(y, 2000, np.random.default_rng(seed))
    keys = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
    values = {k: [] for k in keys}
    for rows in idx:
        yr, pred = y[rows], p[rows].argmax(axis=1)
        values["auc"].append(skm.roc_auc_score(yr, p[rows, 1]))
        values["accuracy"].append(skm.accuracy_score(yr, pred))
        values["balanced_accuracy"].append(skm.balanced_accuracy_score(yr, pred))
        values["sensitivity"].append(skm.recall_score(yr, pred, pos_label=1))
        values["specificity"].append(skm.recall_score(yr, pred, pos_label=0))
        values["f1"].append(skm.f1_score(yr, pred))
    return {f"{k}_ci95": list(np.percentile(values[k], [2.5, 97.5])) for k in keys}


# 46 s of bootstrap recomputation: slow (make test-all). The same figures are checked against
# scikit-learn on synthetic predictions in tests/evaluation without ../shared.
@pytest.mark.slow
def test_every_metrics_json_figure_is_recomputed_from_predictions_csv_by_sklearn(runs):
    """Acceptance (issue 4): metrics.json of a real run agrees with sklearn, figure by figure,
    and nothing in it goes unchecked."""
    import re

    from sklearn import metrics as skm

    run, _ = runs
    cfg, metrics = run.config, run.metrics
    pos = cfg["positive_class"]
    assert cfg["classes"].index(pos) == 1
    rows = run.predictions()
    split_rows = {s: [r for r in rows if r["split"] == s] for s in ("val", "test")}

    def arrays(split):
        rs = split_rows[split]
        y = np.array([cfg["classes"].index(r["label"]) for r in rs])
        p = np.array([[float(r[f"prob_{c}"]) for c in cfg["classes"]] for r in rs])
        patients = [re.search(REGEX, r["path"]).group(1) for r in rs]
        return y, p, patients

    yv, pv, _ = arrays("val")
    fpr, tpr, thr = skm.roc_curve(yv, pv[:, 1], drop_intermediate=False)
    th = metrics["thresholds"]
    target = cfg["target_sensitivity"]
    assert th == {"chosen_on": "val", "youden": thr[np.argmax(tpr - fpr)],
                  "target_sensitivity": target,
                  "sensitivity_target": thr[np.argmax(tpr >= target)]}

    for split in ("val", "test"):
        m = dict(metrics[split])
        y, p, patients = arrays(split)
        expected = {**_figures(y, p), **_bootstrap(y, p, cfg["seed"]),
                    "auc_ci95_delong": _direct_delong_ci(y, p[:, 1])}
        assert m.pop("confusion_matrix") == expected.pop("confusion_matrix")
        for key, value in expected.items():
            assert m.pop(key) == pytest.approx(value, abs=1e-9), (split, key)

        cal = m.pop("calibration")
        assert cal["brier"] == pytest.approx(skm.brier_score_loss(y, p[:, 1]), abs=1e-12)
        assert cal["ece"] == pytest.approx(_ece(y, p), abs=1e-12)
        assert sum(cal["reliability"]["counts"]) == len(y)

        # Thresholds come from val, so only the splits after it get operating points.
        ops = m.pop("operating_points") if split == "test" else {}
        assert split == "test" or "operating_points" not in metrics[split]
        for name, op in ops.items():
            pred = (p[:, 1] >= th[name]).astype(int)
            tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
            assert op == pytest.approx({
                "threshold": th[name], "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                "sensitivity": skm.recall_score(y, pred), "ppv": skm.precision_score(y, pred),
                "specificity": skm.recall_score(y, pred, pos_label=0),
                "npv": skm.precision_score(y, pred, pos_label=0)}, abs=1e-12), (split, name)

        pp = m.pop("per_patient")
        ids = sorted(set(patients))
        y_pat = np.array([y[[i for i, q in enumerate(patients) if q == k]][0] for k in ids])
        p_pat = np.array([p[[i for i, q in enumerate(patients) if q == k]].mean(axis=0)
                          for k in ids])
        assert pp.pop("mixed_label_patients_left_out") == 0
        expected = {**_figures(y_pat, p_pat), **_bootstrap(y_pat, p_pat, cfg["seed"])}
        assert pp.pop("confusion_matrix") == expected.pop("confusion_matrix")
        for key, value in expected.items():
            assert pp.pop(key) == pytest.approx(value, abs=1e-9), (split, "patient", key)
        assert pp == {}, f"per-patient figures nobody checked: {sorted(pp)}"
        assert m == {}, f"{split} figures nobody checked: {sorted(m)}"
