"""Ensembles as runs (issue 17): built from the members' predictions.csv, scored like a run,
cross-fitted on validation, and predicting like the combination of its members."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import medtl
from medtl.cli import main
from medtl.errors import MedtlError
from medtl.transfer import ensemble as comb

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, quiet=True)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two runs on the same data: hybrid logistic regression and a trained linear head."""
    from .conftest import write_blob_images

    root = tmp_path_factory.mktemp("ens")
    data = write_blob_images(root / "blobs", n_per_class=20)
    a = medtl.train(data, strategy="hybrid", head="logreg", out=root / "a", **FAST)
    # Another input size: other features, so the members' OOD scores differ too.
    b = medtl.train(data, strategy="feature-extractor", epochs=8, out=root / "b",
                    **{**FAST, "image_size": 80})
    return root, data, a, b


def _probs(run, split: str, cls: str) -> dict[str, float]:
    return {r["path"]: float(r[f"prob_{cls}"]) for r in run.predictions() if r["split"] == split}


def test_mean_ensemble_scores_what_the_mean_of_the_members_predictions_says(members):
    root, _, a, b = members
    ens = medtl.ensemble([a.path, b.path], method="mean", out=root / "mean", quiet=True)
    cfg, pos = ens.config, ens.config["positive_class"]
    assert cfg["kind"] == "ensemble" and cfg["method"] == "mean"
    for split in ("val", "test"):
        pa, pb, pe = (_probs(r, split, pos) for r in (a, b, ens))
        assert pe.keys() == pa.keys()
        for path, p in pe.items():
            assert p == pytest.approx((pa[path] + pb[path]) / 2, abs=1e-12)
        labels = [r["label"] == pos for r in ens.predictions() if r["split"] == split]
        mean = [(pa[p] + pb[p]) / 2 for p in pe]
        assert ens.metrics[split]["auc"] == pytest.approx(roc_auc_score(labels, mean))
        assert len(ens.metrics[split]["auc_ci95"]) == 2
    assert ens.metrics["thresholds"]["chosen_on"] == "val"
    # Self-contained: each member copied with the sha256 of its files, the report written.
    for m in cfg["members"]:
        member = ens.path / "members" / m["name"]
        assert (member / "model" / "model.json").is_file()
        assert m["files"]["config.json"] == comb.sha256_file(member / "config.json")
        assert m["backbone"] == "mobilenet_v2" and m["weights"]["sha256"]
    assert (ens.path / "report.html").is_file()
    assert medtl.load_run(ens.path).kind == "ensemble"


def test_vote_shares_and_ties_broken_by_mean_probability():
    p = np.array([[[0.9, 0.1], [0.4, 0.6]],    # member 1: class 0, class 1
                  [[0.2, 0.8], [0.45, 0.55]],  # member 2: class 1, class 1
                  [[0.7, 0.3], [0.3, 0.7]],    # member 3: class 0, class 1
                  [[0.1, 0.9], [0.6, 0.4]]])   # member 4: class 1, class 0
    out = comb.combine(list(p), "vote", {})
    assert out[0] == pytest.approx([0.5, 0.5], abs=1e-5)  # a tie of votes...
    # ...goes to the higher mean probability (class 1: 0.525 against 0.475), not to the first
    assert out[0].argmax() == 1
    assert out[1] == pytest.approx([0.25, 0.75], abs=1e-5)


def test_vote_ensemble_run_predicts_the_majority(members):
    root, _, a, b = members
    ens = medtl.ensemble([a.path, b.path, a.path], method="vote", out=root / "vote",
                         quiet=True)
    assert [m["name"] for m in ens.config["members"]] == ["a", "b", "a-2"]
    classes = ens.config["classes"]
    rows_a = {r["path"]: r for r in a.predictions()}
    rows_b = {r["path"]: r for r in b.predictions()}
    for r in ens.predictions():
        votes = [rows_a[r["path"]]["prediction"]] * 2 + [rows_b[r["path"]]["prediction"]]
        assert r["prediction"] == max(classes, key=votes.count)
        assert float(r[f"prob_{r['prediction']}"]) == pytest.approx(
            votes.count(r["prediction"]) / 3, abs=1e-5)


def test_weighted_weights_are_non_negative_and_sum_to_one(members):
    root, _, a, b = members
    ens = medtl.ensemble([a.path, b.path], method="weighted", out=root / "weighted", quiet=True)
    w = np.array(ens.config["combiner"]["weights"])
    assert w.shape == (2,) and (w >= 0).all() and w.sum() == pytest.approx(1.0)
    # The weights minimise validation log-loss: no other mix on a grid does better.
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1], size=(3, 50))
    y = rng.integers(0, 2, 50)
    best = np.array(comb.log_loss_weights(p, y))
    assert (best >= 0).all() and best.sum() == pytest.approx(1.0)

    def loss(v):
        return -np.mean(np.log(np.tensordot(v, p, axes=1)[np.arange(50), y]))
    for v in rng.dirichlet([1, 1, 1], size=200):
        assert loss(best) <= loss(v) + 1e-6


def test_cross_fitted_prediction_of_a_row_never_used_its_label():
    """Change one validation row's label: its own out-of-fold prediction does not move, while
    the stacker fitted on all rows (which predicts test) does."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p = np.stack([np.clip(np.eye(2)[y] * 0.6 + rng.uniform(0, 0.4, (60, 2)), 0, 1)
                  for _ in range(3)])
    p /= p.sum(axis=2, keepdims=True)
    folds = comb.fold_assignment(y, None, 5, seed=0)
    assert sorted(np.unique(folds)) == [0, 1, 2, 3, 4]
    for method in ("stack", "weighted"):
        before = comb.cross_fit(p, y, method, folds)
        y2 = y.copy()
        y2[7] = 1 - y2[7]
        after = comb.cross_fit(p, y2, method, folds)
        assert np.array_equal(before[7], after[7])
        others = folds != folds[7]
        assert not np.allclose(before[others], after[others])  # the label is used elsewhere
    full = comb.fit_combiner(p, y, "stack")
    full2 = comb.fit_combiner(p, y2, "stack")
    assert not np.allclose(full["coef"], full2["coef"])


def test_patients_never_straddle_cross_fitting_folds():
    y = np.array([0, 0, 1, 1] * 10)
    groups = [f"p{i // 2}" for i in range(40)]  # two images per patient
    folds = comb.fold_assignment(y, groups, 5, seed=0)
    for g in set(groups):
        assert len({folds[i] for i in range(40) if groups[i] == g}) == 1


def test_stack_run_validation_rows_are_cross_fitted_and_test_uses_the_full_fit(members):
    root, _, a, b = members
    ens = medtl.ensemble([a.path, b.path], method="stack", out=root / "stack", quiet=True)
    cfg, classes = ens.config, ens.config["classes"]

    def member_p(split):
        return np.stack([[[float(r[f"prob_{c}"]) for c in classes] for r in m.predictions()
                          if r["split"] == split] for m in (a, b)])
    y = np.array([classes.index(r["label"]) for r in a.predictions() if r["split"] == "val"])
    folds = comb.fold_assignment(y, None, 5, seed=cfg["seed"])
    expected_val = comb.cross_fit(member_p("val"), y, "stack", folds, seed=cfg["seed"])
    got = {s: np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ens.predictions()
                        if r["split"] == s]) for s in ("val", "test")}
    np.testing.assert_allclose(got["val"], expected_val, atol=1e-12)
    expected_test = comb.combine(list(member_p("test")), "stack", cfg["combiner"])
    np.testing.assert_allclose(got["test"], expected_test, atol=1e-12)
    assert cfg["fit"]["cross_fit_folds"] == folds.max() + 1
    # The saved coefficients give what scikit-learn's own logistic regression gives.
    from sklearn.linear_model import LogisticRegression

    x = comb.stack_features(member_p("val"))
    lr = LogisticRegression(C=1.0, max_iter=2000, random_state=cfg["seed"]).fit(x, y)
    np.testing.assert_allclose(comb.stack_proba(x, cfg["combiner"]["coef"],
                                                cfg["combiner"]["intercept"]),
                               lr.predict_proba(x), atol=1e-9)


def test_members_of_other_classes_or_data_are_refused(members, tmp_path):
    root, _, a, b = members
    other = tmp_path / "fp"
    shutil.copytree(b.path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["data"]["fingerprint"] = "0" * 64
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MedtlError, match=r"fp: its data fingerprint \(000000000000\) differs"):
        medtl.ensemble([a.path, other], out=tmp_path / "e1")
    # A run of other classes: the same model, its classes renamed in config.json and model.json.
    c = tmp_path / "rods"
    shutil.copytree(b.path, c)
    for f in (c / "config.json", c / "model" / "model.json"):
        f.write_text(f.read_text().replace('"bar"', '"rod"'))
    with pytest.raises(SystemExit) as exc:
        main(["ensemble", str(a.path), str(b.path), str(c), "--out",
              str(tmp_path / "e2"), "--quiet"])
    assert exc.value.code == 2
    assert not (tmp_path / "e2").exists()
    with pytest.raises(MedtlError, match=r"rods: its classes .* differs"):
        medtl.ensemble([a.path, c], out=tmp_path / "e3")


def test_predict_and_evaluate_combine_the_members(members, tmp_path):
    root, data, a, b = members
    ens = medtl.ensemble([a.path, b.path], method="stack", out=root / "stack-p", quiet=True)
    saved = [r for r in ens.predictions() if r["split"] == "test"]
    files = [str(Path(data, r["path"]).resolve()) for r in saved]
    got = medtl.predict(ens.path, files, quiet=True, paths="absolute")
    each = [medtl.predict(ens.path / "members" / n, files, quiet=True, paths="absolute")
            for n in ("a", "b")]
    classes, cfg = ens.config["classes"], ens.config
    probs = [np.array([[r[f"prob_{c}"] for c in classes] for r in rows]) for rows in each]
    expected = comb.combine(probs, "stack", cfg["combiner"])
    np.testing.assert_allclose([[r[f"prob_{c}"] for c in classes] for r in got], expected,
                               atol=1e-9)
    # and equals what the run saved for those test images (built from predictions.csv)
    np.testing.assert_allclose(expected, [[float(r[f"prob_{c}"]) for c in classes]
                                          for r in saved], atol=1e-6)
    if all((ens.path / "members" / n / "model" / "ood.npz").is_file() for n in ("a", "b")):
        # The OOD score: the highest member distance over its own threshold.
        runs = [medtl.load_run(ens.path / "members" / n).load_model(quiet=True)
                for n in ("a", "b")]
        scaled = [np.array([r["ood_score"] for r in rows]) / m.model_.ood.threshold_
                  for rows, m in zip(each, runs, strict=True)]
        assert not np.allclose(scaled[0], scaled[1])
        np.testing.assert_allclose([r["ood_score"] for r in got], np.max(scaled, axis=0))
    ev = medtl.evaluate(ens.path, quiet=True)
    assert ev["metrics"]["auc"] == pytest.approx(ens.metrics["test"]["auc"])
    # explain, export and serve of ensembles: tests/test_ensemble_deploy.py


def test_a_tampered_member_is_refused(members, tmp_path):
    root, data, a, b = members
    ens = medtl.ensemble([a.path, b.path], out=root / "tamper", quiet=True)
    copy = tmp_path / "copy"
    shutil.copytree(ens.path, copy)
    medtl.load_run(copy)  # intact
    head = copy / "members" / "a" / "model" / "head.skops"
    data_bytes = bytearray(head.read_bytes())
    data_bytes[-10] ^= 1
    head.write_bytes(bytes(data_bytes))
    with pytest.raises(MedtlError, match=r"head.skops: sha256 differs"):
        medtl.load_run(copy)
    head.unlink()
    (copy / "members" / "a" / "model" / "extra.bin").write_bytes(b"x")
    with pytest.raises(MedtlError, match="extra.bin: not a file of this ensemble member"):
        medtl.load_run(copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["members"][0]["name"] = "../a"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(copy), str(Path(data, a.predictions()[0]["path"])), "--quiet"])
    assert exc.value.code == 2


def test_mismatched_rows_are_refused(members, tmp_path):
    root, _, a, b = members
    other = tmp_path / "rows"
    shutil.copytree(b.path, other)
    with open(other / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(other / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[1:])
    with pytest.raises(MedtlError, match="name other images"):
        medtl.ensemble([a.path, other], out=tmp_path / "e")


def test_bench_ranks_the_ensemble_of_its_best_cells(members, tmp_path):
    """The module's two runs stand as a bench's finished cells (so nothing trains again)."""
    import csv as _csv

    from medtl.bench import bench

    _, data, a, b = members
    cells = {"mobilenet_v2-hybrid-logreg-seed0": a, "mobilenet_v2-feature-extractor-seed0": b}
    for name, run in cells.items():
        shutil.copytree(run.path, tmp_path / "bench" / "cells" / name)
    out = bench(data, backbones=["mobilenet_v2"], strategies=["hybrid:logreg",
                                                              "feature-extractor"],
                out=tmp_path / "bench", quiet=True, ensemble=2, ensemble_method="weighted")
    with open(out / "leaderboard.csv", newline="") as f:
        rows = {r["cell"]: r for r in _csv.DictReader(f)}
    ens = rows["top2-weighted"]
    assert ens["backbone"] == "ensemble" and ens["head"] == "weighted" and ens["val_value"]
    run = medtl.load_run(ens["run_dir"])
    assert {m["name"] for m in run.config["members"]} == set(cells)
    assert float(ens["auc"]) == run.metrics["test"]["auc"]
    assert "top2-weighted" in (out / "report.html").read_text()
    with pytest.raises(MedtlError, match="--ensemble-method"):
        bench(data, backbones=["mobilenet_v2"], strategies=["hybrid:logreg"], out=tmp_path / "b",
              ensemble=2, ensemble_method="median")
