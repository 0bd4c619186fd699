"""--folds K: patient-grouped folds, no patient in two folds, and a mean that is the folds'."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import medtl
from medtl.data import load_dataset
from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path
from medtl.data.splits import cross_validation_folds
from medtl.workflow import CV_FIGURES


@pytest.fixture(scope="module")
def demo():
    return load_dataset(demo_data_path(), patient_regex=DEMO_PATIENT_REGEX)


def test_folds_partition_train_and_val_by_patient(demo):
    folds = cross_validation_folds(demo, 5, seed=0)
    pool = [r.path for r in demo.records if r.split in ("train", "val")]
    held = [f.split("heldout") for f in folds]
    # Every train/val image is held out exactly once, and no test image ever takes part.
    assert sorted(p for h in held for p in h.paths) == sorted(pool)
    patients_per_fold = [set(h.patients) for h in held]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not patients_per_fold[i] & patients_per_fold[j]
    for fold in folds:
        sides = {s: set(fold.split(s).patients) for s in ("train", "val", "heldout")}
        assert not sides["train"] & sides["val"]
        assert not sides["train"] & sides["heldout"]
        assert not sides["val"] & sides["heldout"]
        assert "test" not in fold.split_names()


def test_cv_run_writes_folds_whose_metrics_average_to_the_mean(tmp_path):
    out = tmp_path / "cv"
    run = medtl.train(demo_data_path(), strategy="hybrid", image_size=64, folds=3,
                      patient_regex=DEMO_PATIENT_REGEX, out=out, quiet=True)
    cv = run.metrics["cv"]
    assert cv["folds"] == 3 and len(cv["per_fold"]) == 3
    for k in range(1, 4):
        fold = medtl.load_run(out / "folds" / f"fold-{k}")
        assert fold.metrics["heldout"]["auc"] == cv["per_fold"][k - 1]["auc"]
        assert "test" not in fold.metrics
    for f in CV_FIGURES:
        values = [row[f] for row in cv["per_fold"]]
        assert cv["mean"][f] == pytest.approx(np.mean(values), abs=1e-12)
        assert cv["sd"][f] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert cv["mean"]["auc"] > 0.8  # real X-rays: frozen ImageNet features do learn
    with open(out / "predictions.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    assert len(oof) == 300 and len({r["path"] for r in oof}) == 300  # each image once
    with pytest.raises(medtl.MedtlError, match="one model per fold"):
        medtl.evaluate(out)


def test_an_interrupted_cv_keeps_finished_folds(tmp_path, monkeypatch):
    out = tmp_path / "cv"
    medtl.train(demo_data_path(), strategy="hybrid", image_size=64, folds=2,
                patient_regex=DEMO_PATIENT_REGEX, out=out, quiet=True)
    first = (out / "folds" / "fold-1" / "config.json").read_text()
    (out / "folds" / "fold-2" / "config.json").unlink()  # as if killed during fold 2
    (out / "config.json").unlink()
    run = medtl.train(demo_data_path(), strategy="hybrid", image_size=64, folds=2,
                      patient_regex=DEMO_PATIENT_REGEX, out=out, resume=True, quiet=True)
    assert (out / "folds" / "fold-1" / "config.json").read_text() == first  # not redone
    assert len(run.metrics["cv"]["per_fold"]) == 2


def test_one_fold_is_refused(tmp_path):
    with pytest.raises(medtl.MedtlError, match="at least 2 folds"):
        medtl.train(demo_data_path(), strategy="hybrid", folds=1, out=tmp_path / "x")
