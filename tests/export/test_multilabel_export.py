"""medtl export of a multi-label run (issue 21): the graph gives the run's per-label sigmoids,
preprocessing.json records the task and one threshold per label (refused when crafted), the
model card reports per-label figures, ``medtl predict BUNDLE`` writes prob_/pred_ columns per
label; and a single-label bundle keeps exactly the files it had before.

The run is tests/export/multilabel.py's (disc / bar, 64 px, one epoch, random weights)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medtl.errors import MedtlError
from medtl.export.bundle import PREPROCESSING_FILE, load_bundle, write_manifest
from medtl.export.writer import export_run
from medtl.run import load_run
from tests.conftest import write_blob_images
from tests.export.multilabel import LABELS, disc_bar_run, split_images
from tests.export.test_writer import onnx_proba


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    return disc_bar_run(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(multilabel, tmp_path_factory):
    _, run = multilabel
    return export_run(load_run(run), tmp_path_factory.mktemp("ml-export") / "bundle")


def _run_test_proba(run_dir) -> np.ndarray:
    """The run's own test probabilities, from its predictions.csv (prob_<label> columns)."""
    with open(run_dir / "predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    return np.array([[float(r[f"prob_{label}"]) for label in LABELS] for r in rows])


def test_onnx_gives_the_runs_per_label_sigmoids(multilabel, bundle):
    from medtl.data import load_dataset

    data, run_dir = multilabel
    test = load_dataset(data / "manifest.csv").split("test")
    got = onnx_proba(bundle, test)  # onnxruntime fed only what preprocessing.json says
    want = _run_test_proba(run_dir)
    assert got.shape == want.shape == (12, 2)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # independent sigmoids: rows do not sum to 1 (a softmax head would make them)
    assert np.abs(got.sum(axis=1) - 1).max() > 0.05
    # and the sigmoid of each label's own logit, as the run's torch module computes it
    import torch

    from medtl.explain.runs import model_input

    clf = load_run(run_dir).load_model(quiet=True, device="cpu")
    pixels = model_input(clf.model_.preprocessing, [test.read(i) for i in range(len(test))])
    with torch.no_grad():
        logits = clf.model_.torch_module()(pixels).double().numpy()
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits)), atol=1e-5)


def test_torchscript_bundle_gives_the_same_sigmoids(multilabel, bundle, tmp_path):
    data, run_dir = multilabel
    script = export_run(load_run(run_dir), tmp_path / "ts", format="torchscript")
    files = split_images(data)
    loaded = load_bundle(script)
    assert loaded.multilabel
    np.testing.assert_allclose(loaded.predict_proba(files), load_bundle(bundle)
                               .predict_proba(files), atol=1e-5)


def test_tta_graph_averages_each_labels_sigmoid_over_the_views(multilabel, tmp_path):
    """With test-time augmentation the graph holds the views and the mean of each label's
    sigmoid over them, as the run predicts with the same TTA (ONNX and TorchScript)."""
    import onnxruntime as ort

    from medtl.data import dataset_from_files
    from medtl.explain.runs import model_input
    from medtl.export.writer import write_onnx, write_torchscript

    data, run_dir = multilabel
    model = load_run(run_dir).load_model(quiet=True, device="cpu").model_
    model.options = model.options.replace(tta="flip")
    paths = split_images(data)
    ds = dataset_from_files([str(p) for p in paths], classes=model.classes)
    want = model.predict_proba(ds, cache=False)
    pixels = model_input(model.preprocessing, [ds.read(i) for i in range(len(ds))]).numpy()
    session = ort.InferenceSession(str(write_onnx(model, tmp_path / "tta.onnx")),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["probabilities"], {"image": pixels})[0], want,
                               atol=1e-5)
    import torch

    write_torchscript(model, tmp_path / "tta.pt")
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "tta.pt"))(torch.from_numpy(pixels))
    np.testing.assert_allclose((got[0] if isinstance(got, tuple) else got).numpy(), want,
                               atol=1e-5)
    # the mean of sigmoids differs from the run without TTA: the views are in the graph
    model.options = model.options.replace(tta="none")
    assert np.abs(model.predict_proba(ds, cache=False) - want).max() > 1e-4


def test_preprocessing_records_the_task_and_each_labels_threshold(multilabel, bundle):
    _, run_dir = multilabel
    thresholds = load_run(run_dir).metrics["thresholds"]
    pre = json.loads((bundle / PREPROCESSING_FILE).read_text())
    assert pre["task"] == "multilabel" and pre["classes"] == LABELS
    assert pre["thresholds"] == {k: thresholds[k] for k in ("chosen_on", "rule", *LABELS)}
    assert pre["positive_class"] is None and pre["operating_points"] == {}
    assert pre["temperature"] is None
    loaded = load_bundle(bundle)
    assert loaded.multilabel is True and loaded.classes == LABELS
    assert loaded.thresholds == pre["thresholds"]
    assert all(0 <= loaded.thresholds[label] <= 1 for label in LABELS)


def test_predict_with_the_bundle_writes_prob_and_pred_per_label(multilabel, bundle, tmp_path):
    """`medtl predict BUNDLE`: one probability and one decision column per label, decided at
    the label's recorded threshold, and no single-label columns."""
    from medtl.cli import main

    data, _ = multilabel
    out = tmp_path / "predictions.csv"
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(bundle), *map(str, split_images(data)), "--output", str(out),
              "--quiet"])
    assert exc.value.code in (0, None)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert [c for c in rows[0] if c.startswith(("prob_", "pred_"))] == [
        "prob_disc", "pred_disc", "prob_bar", "pred_bar"]
    assert "prediction" not in rows[0]
    loaded = load_bundle(bundle)
    proba = loaded.predict_proba(split_images(data))
    for row, p in zip(rows, proba, strict=True):
        for j, label in enumerate(LABELS):
            assert float(row[f"prob_{label}"]) == pytest.approx(p[j], abs=1e-6)
            assert int(row[f"pred_{label}"]) == int(p[j] >= loaded.thresholds[label])


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(disc=7), "threshold of 'disc' '7': not a number in"),
    (lambda t: t.update(bar="x"), "threshold of 'bar' 'x': not a number in"),
    (lambda t: t.update(disc=-0.1), "not a number in"),
    (lambda t: t.update(disc=True), "not a number in"),
    (lambda t: t.update(disc=float("nan")), "not a number in"),
    (lambda t: t.pop("bar"), "none for the label 'bar'"),
    (lambda t: t.update(cancer=0.5), "thresholds must map each label"),
    (lambda t: t.update(fallback=["cancer"]), "fallback must list labels"),
])
def test_crafted_thresholds_are_refused(bundle, tmp_path, change, message):
    """A manifest rewritten to match the crafted preprocessing.json proves nothing: each
    threshold must be a finite number in [0, 1], one per label; one line naming the file."""
    import shutil

    crafted = tmp_path / "crafted"
    shutil.copytree(bundle, crafted)
    pre = json.loads((crafted / PREPROCESSING_FILE).read_text())
    change(pre["thresholds"])
    (crafted / PREPROCESSING_FILE).write_text(json.dumps(pre))
    write_manifest(crafted)
    with pytest.raises(MedtlError, match=f"preprocessing.json: .*{message}") as caught:
        load_bundle(crafted)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("key, value, message", [
    ("task", "multiclass", "task 'multiclass': not 'multilabel'"),
    ("positive_class", "disc", "no positive_class and no operating_points"),
    ("operating_points", {"youden": 0.5}, "no positive_class and no operating_points"),
    ("temperature", 2.0, "a multi-label model has no temperature"),
])
def test_a_crafted_task_is_refused(bundle, tmp_path, key, value, message):
    import shutil

    crafted = tmp_path / "crafted"
    shutil.copytree(bundle, crafted)
    pre = json.loads((crafted / PREPROCESSING_FILE).read_text())
    pre[key] = value
    (crafted / PREPROCESSING_FILE).write_text(json.dumps(pre))
    write_manifest(crafted)
    with pytest.raises(MedtlError, match=f"preprocessing.json: .*{message}"):
        load_bundle(crafted)


def test_model_card_reports_each_label(multilabel, bundle):
    _, run_dir = multilabel
    metrics = load_run(run_dir).metrics
    card = json.loads((bundle / "model-card.json").read_text())
    assert card["summary"]["task"].startswith("multi-label")
    assert card["metrics"]["task"] == "multi-label"
    chosen = card["metrics"]["decision_thresholds"]
    assert (chosen["chosen_on"], chosen["rule"]) == ("val", "youden")
    for label in LABELS:
        lab = metrics["test"]["labels"][label]
        assert chosen["per_label"][label] == {
            "threshold": metrics["thresholds"][label],
            "test_sensitivity": lab["sensitivity"], "test_specificity": lab["specificity"]}
        shown = card["quantitative_analyses"]["test"]["labels"][label]
        assert shown["auc"] == {"value": lab["auc"], "ci95": lab["auc_ci95"]}
        assert shown["sensitivity"] == {"value": lab["sensitivity"],
                                        "ci95": lab["sensitivity_ci95"]}
    test = card["quantitative_analyses"]["test"]
    for key in ("macro_auc", "micro_auc", "map"):
        assert test[key] == {"value": metrics["test"][key], "ci95": metrics["test"][f"{key}_ci95"]}
    md = (bundle / "model-card.md").read_text()
    assert "| macro AUC |" in md and "| mean average precision (mAP) |" in md
    assert "one per label, chosen on val by Youden's J" in md
    for label in LABELS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} | 12 ("))
        assert f"{metrics['thresholds'][label]:.3f}" in row


def test_a_run_whose_model_disagrees_with_its_task_is_refused(multilabel, tmp_path,
                                                              monkeypatch):
    """config.json says multi-label but the model predicts a softmax: no bundle is written."""
    from medtl.run import Run

    _, run_dir = multilabel
    load = Run.load_model

    def single_label(self, *args, **kwargs):
        clf = load(self, *args, **kwargs)
        clf.model_.multilabel = False
        return clf

    monkeypatch.setattr(Run, "load_model", single_label)
    with pytest.raises(MedtlError, match="task is multi-label but its model is single-label"):
        export_run(load_run(run_dir), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


# The keys a single-label bundle had before issue 21 (medtl 0.1.0, commit 14ff07a): a
# multi-label export must add nothing to a single-label one.
SINGLE_PREPROCESSING = ["format", "size", "mean", "std", "resize", "interpolation", "channels",
                        "view", "classes", "positive_class", "operating_points", "temperature",
                        "input", "output", "medtl_version", "run", "ood", "tta"]
SINGLE_CARD_METRICS = ["reported", "confidence_intervals", "split", "decision_thresholds",
                       "positive_class"]


def test_a_single_label_bundle_is_unchanged(tmp_path):
    """Its preprocessing.json and model card keep their keys (no task, no thresholds), its
    probabilities are a softmax, and the loaded bundle says single-label."""
    import medtl

    data = write_blob_images(tmp_path / "blobs", n_per_class=4, size=32,
                             splits=("train", "val", "test"))
    run = medtl.train(data, strategy="feature-extractor", backbone="mobilenet_v2", epochs=1,
                      weights="random", image_size=32, out=tmp_path / "run", quiet=True)
    bundle = export_run(load_run(run.path), tmp_path / "bundle")
    pre = json.loads((bundle / PREPROCESSING_FILE).read_text())
    assert list(pre) == SINGLE_PREPROCESSING
    assert pre["output"] == {"name": "probabilities"}
    assert pre["tta"]["averaged"] == "softmax probabilities of the views, before the temperature"
    card = json.loads((bundle / "model-card.json").read_text())
    assert list(card["metrics"]) == SINGLE_CARD_METRICS
    assert card["summary"]["task"] == "binary image classification: bar vs disc"
    loaded = load_bundle(bundle)
    assert (loaded.multilabel, loaded.thresholds) == (False, None)
    proba = loaded.predict_proba(sorted((data / "test").rglob("*.png")))
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
