"""A run end to end on small synthetic data: files, learning, exact reproduction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import medtl
from medtl.cli import main

# ImageNet features (the offline package) make the synthetic shapes easy; random ones do not.
FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, quiet=True)


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    from .conftest import write_blob_images

    root = tmp_path_factory.mktemp("wf")
    data = write_blob_images(root / "blobs", n_per_class=30)
    run = medtl.train(data, strategy="hybrid", head="logreg", out=root / "run", **FAST)
    return data, run


def test_run_directory_has_every_file_of_the_design(hybrid_run):
    _, run = hybrid_run
    for name in ("config.json", "metrics.json", "predictions.csv", "history.csv", "log.txt",
                 "report.html", "model/model.json", "model/backbone.safetensors",
                 "model/head.skops"):
        assert (run.path / name).is_file(), name
    m = run.metrics
    for split in ("val", "test"):
        for k in ("n", "accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity",
                  "precision", "f1", "confusion_matrix"):
            assert k in m[split], (split, k)
    assert set(m["timing"]) >= {"train_s", "feature_s", "predict_images_per_s"}
    assert m["timing"]["predict_images_per_s"] > 0
    assert m["params"]["total"] > m["params"]["trainable"] > 0
    cfg = run.config
    assert cfg["weights"]["kind"] == "imagenet" and cfg["backbone"] == "mobilenet_v2"
    assert cfg["weights"]["source"].startswith("package:") and len(cfg["weights"]["sha256"]) == 64
    assert len(cfg["data"]["fingerprint"]) == 64
    html = (run.path / "report.html").read_text()
    assert "http://" not in html and "https://" not in html


def test_hybrid_learns_a_visible_shape_well_above_chance(hybrid_run):
    _, run = hybrid_run
    # Chance is 0.5.
    assert run.metrics["test"]["auc"] > 0.8


def test_evaluate_and_predict_reproduce_the_test_predictions_exactly(hybrid_run, tmp_path,
                                                                     monkeypatch):
    data, run = hybrid_run
    saved = [r for r in run.predictions() if r["split"] == "test"]
    # A fresh cache: the saved model must recompute the same numbers, not read them back.
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path / "fresh"))
    result = medtl.evaluate(run.path, quiet=True)
    again = {r["path"]: r for r in result["rows"]}
    classes = run.config["classes"]
    for row in saved:
        for c in classes:
            assert float(again[row["path"]][f"prob_{c}"]) == float(row[f"prob_{c}"])
    assert result["metrics"]["auc"] == run.metrics["test"]["auc"]

    out = tmp_path / "pred.csv"
    # The run names its images relative to the data (--paths relative); predict's files are
    # named as given to it, here absolute.
    files = [str(Path(data, r["path"]).resolve()) for r in saved]
    medtl.predict(run.path, files, output=out, quiet=True, paths="absolute")
    with open(out, newline="") as f:
        predicted = {r["path"]: r for r in csv.DictReader(f)}
    for row, file in zip(saved, files, strict=True):
        for c in classes:
            assert float(predicted[file][f"prob_{c}"]) == float(row[f"prob_{c}"])
        assert predicted[file]["prediction"] == row["prediction"]


def test_feature_extractor_strategy_trains_a_linear_head(tmp_path):
    from .conftest import write_blob_images

    data = write_blob_images(tmp_path / "d", n_per_class=30)
    run = medtl.train(data, strategy="feature-extractor", out=tmp_path / "run", epochs=60,
                      **FAST)
    assert (run.path / "model" / "head.safetensors").is_file()
    with open(run.path / "history.csv") as f:
        hist = list(csv.DictReader(f))
    assert len(hist) >= 2 and "val_auc" in hist[0]
    assert run.metrics["test"]["auc"] > 0.8


def test_second_run_reuses_cached_features(tmp_path, fresh_cache, monkeypatch):
    """Counted backbone passes: the second run (another head) sends no image through it."""
    from medtl.training import features

    from .conftest import write_blob_images

    data = write_blob_images(tmp_path / "d", n_per_class=10)
    passes = []
    real = features.FrozenFeatures._runner

    def counting_runner(self):
        run = real(self)

        def counted(pixels):
            passes.append(len(pixels))
            return run(pixels)
        return counted

    monkeypatch.setattr(features.FrozenFeatures, "_runner", counting_runner)
    medtl.train(data, strategy="hybrid", head="logreg", out=tmp_path / "a", **FAST)
    first = sum(passes)
    passes.clear()
    medtl.train(data, strategy="hybrid", head="knn", out=tmp_path / "b", **FAST)
    second = sum(passes)
    # 20 train+val and 20 test images, plus the throughput probe, which times the uncached
    # path on purpose (20 test images) in both runs.
    assert first == 20 + 20 + 20
    assert second == 20


def test_quiet_silences_progress(tmp_path, capsys):
    from .conftest import write_blob_images

    data = write_blob_images(tmp_path / "d", n_per_class=6)
    with pytest.raises(SystemExit) as exc:
        main(["train", str(data), "--weights", "random", "--image-size", "64", "--quiet",
              "--out", str(tmp_path / "r")])
    assert exc.value.code == 0
    _, err = capsys.readouterr()
    assert err.strip() == ""
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["accuracy"])


def test_python_api_fit_save_load_predict(tmp_path):
    """The design's API sketch: fit returns self, save gives a Run that predicts alone."""
    from .conftest import write_blob_images

    data = write_blob_images(tmp_path / "d", n_per_class=12)
    ds = medtl.load_dataset(data)
    clf = medtl.TransferClassifier(backbone="mobilenet_v2", strategy="hybrid", head="logreg",
                                   image_size=64, quiet=True)
    assert clf.fit(ds.split("train"), val=ds.split("val")) is clf
    proba = clf.predict_proba(ds.split("test"))
    assert proba.shape == (len(ds.split("test")), 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    # The ImageNet classifier is dropped: the bundle holds only what predicts.
    assert clf.model_.n_total == 2_223_872 + clf.model_.n_trainable
    run = medtl.save_run(clf, tmp_path / "saved")
    loaded = medtl.load_run(run.path).load_model(quiet=True)
    np.testing.assert_array_equal(loaded.predict_proba(ds.split("test")), proba)
    with pytest.raises(medtl.MedtlError, match="pass DATA"):
        medtl.evaluate(run.path, quiet=True)
    result = medtl.evaluate(run.path, data, quiet=True)
    assert result["metrics"]["n"] == len(ds.split("test"))
    # The first class as positive: evaluate's sensitivity is that class's recall.
    first = ds.classes[0]
    with pytest.raises(medtl.MedtlError, match="not one of the two classes"):
        medtl.save_run(clf, tmp_path / "bad", positive_class="nodule")
    saved = medtl.save_run(clf, tmp_path / "first", positive_class=first)
    assert saved.config["positive_class"] == first
    rows = medtl.evaluate(saved.path, data, quiet=True)
    hits = [r["prediction"] == first for r in rows["rows"] if r["label"] == first]
    assert rows["metrics"]["sensitivity"] == pytest.approx(sum(hits) / len(hits))


def test_a_damaged_model_file_is_a_one_line_error(hybrid_run, tmp_path, capsys):
    import shutil

    data, run = hybrid_run
    copy = tmp_path / "damaged"
    shutil.copytree(run.path, copy)
    (copy / "model" / "backbone.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(copy), str(Path(data, run.predictions()[0]["path"])), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert "backbone.safetensors" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_report_that_cannot_be_written_costs_the_report_not_the_run(tmp_path, monkeypatch,
                                                                       caplog):
    """Everything but report.html is on disk by then: the run completes without it."""
    from medtl.reporting import html

    from .conftest import write_blob_images

    def broken(*args, **kwargs):
        raise RuntimeError("no room for the page")

    monkeypatch.setattr(html, "write_run_report", broken)
    data = write_blob_images(tmp_path / "d", n_per_class=8)
    run = medtl.train(data, strategy="hybrid", out=tmp_path / "run", **{**FAST, "image_size": 32})
    assert medtl.load_run(run.path).config["kind"] == "single"
    assert (run.path / "predictions.csv").is_file() and not (run.path / "report.html").exists()
    assert "no report.html for this run: RuntimeError: no room for the page" in caplog.text
