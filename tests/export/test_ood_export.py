"""The out-of-distribution score in an exported bundle: computed inside the ONNX graph from the
pooled features, it equals the run's own score for a frozen linear head, a scikit-learn head
converted by skl2onnx and a fine-tuned network; preprocessing.json's ``ood`` record is bounded
on load; ``medtl predict BUNDLE`` gives the run's ood columns."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import medtl
from medtl.data import load_dataset
from medtl.errors import MedtlError
from medtl.export.bundle import OOD_OUTPUT, PREPROCESSING_FILE, load_bundle, write_manifest
from medtl.export.writer import export_run
from medtl.run import load_run
from medtl.transfer.ood import OOD_FILE
from medtl.workflow import predict
from tests.conftest import write_blob_images

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=32, epochs=1, quiet=True)
RUNS = {"logreg": dict(strategy="hybrid", head="logreg"),
        "svm": dict(strategy="hybrid", head="svm"),
        "fine-tune": dict(strategy="fine-tune", calibrate=True)}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("ood_export") / "blobs", n_per_class=8,
                             splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def bundles(blobs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ood_bundles")
    out = {}
    for name, opts in RUNS.items():
        run = medtl.train(blobs, out=root / name, **FAST, **opts)
        out[name] = (run.path, export_run(load_run(run.path), root / f"{name}-bundle"))
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_bundle_ood_score_is_the_runs(name, bundles, blobs):
    run_dir, bundle_dir = bundles[name]
    test = load_dataset(blobs).split("test")
    model = load_run(run_dir).load_model(quiet=True).model_
    want_p, want_s = model.predict_proba_ood(test)
    exported = load_bundle(bundle_dir)
    got_p, got_s = exported.predict_dataset_ood(test)
    np.testing.assert_allclose(got_p, want_p, atol=1e-4)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-3)
    assert exported.ood == model.ood.record()
    assert exported.ood["fitted_on"] == "val" and exported.ood["modalities"] == []
    assert OOD_OUTPUT in [o.name for o in exported.session.get_outputs()]


def test_predict_bundle_gives_the_runs_ood_columns(bundles, blobs, tmp_path):
    from PIL import Image

    run_dir, bundle_dir = bundles["logreg"]
    shutil.copytree(blobs / "test" / "disc", tmp_path / "in")
    checker = (np.indices((48, 48)).sum(axis=0) // 4 % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "in" / "checker.png")
    from_run = predict(run_dir, [tmp_path / "in"], quiet=True)
    from_bundle = predict(bundle_dir, [tmp_path / "in"], quiet=True)
    assert [r["ood"] for r in from_bundle] == [r["ood"] for r in from_run]
    np.testing.assert_allclose([r["ood_score"] for r in from_bundle],
                               [r["ood_score"] for r in from_run], rtol=1e-3)
    flagged = [r["path"] for r in from_bundle if r["ood"]]
    assert "checker.png" in flagged


def _rewrite(bundle, change) -> None:
    path = bundle / PREPROCESSING_FILE
    info = json.loads(path.read_text())
    change(info["ood"])
    path.write_text(json.dumps(info))
    write_manifest(bundle)  # re-signed: only _check_ood stands between the file and its use


CRAFTED = {
    "negative threshold": lambda d: d.update(threshold=-1.0),
    "threshold not a number": lambda d: d.update(threshold="1e3"),
    "percentile over 100": lambda d: d.update(percentile=150),
    "unknown method": lambda d: d.update(method="energy"),
    "unknown key": lambda d: d.update(patient_id="x"),
    "fitted on test": lambda d: d.update(fitted_on="test"),
    "too many modalities": lambda d: d.update(modalities=[f"M{i}" for i in range(65)]),
    "modality not text": lambda d: d.update(modalities=[{"a": 1}]),
    "long body part": lambda d: d.update(body_parts=["X" * 65]),
    "control character": lambda d: d.update(body_parts=["CHEST\n"]),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_ood_record_is_refused(case, bundles, tmp_path):
    bundle = shutil.copytree(bundles["svm"][1], tmp_path / "b")
    _rewrite(bundle, CRAFTED[case])
    with pytest.raises(MedtlError, match=r"preprocessing\.json: ood"):
        load_bundle(bundle)


def test_a_run_saved_before_the_guard_exports_without_score(bundles, blobs, tmp_path, caplog):
    run = shutil.copytree(bundles["logreg"][0], tmp_path / "old")
    (run / "model" / OOD_FILE).unlink()
    bundle = export_run(load_run(run), tmp_path / "bundle")
    assert json.loads((bundle / PREPROCESSING_FILE).read_text())["ood"] is None
    exported = load_bundle(bundle)
    assert exported.ood is None
    assert OOD_OUTPUT not in [o.name for o in exported.session.get_outputs()]
    rows = predict(bundle, [blobs / "test" / "bar"], quiet=True)
    assert all(r["ood"] is None and r["ood_score"] is None for r in rows)
    assert any("no out-of-distribution detector" in m for m in caplog.messages)
    # A record that promises a score the graph does not compute is refused on load.
    info = json.loads((bundle / PREPROCESSING_FILE).read_text())
    info["ood"] = {"method": "mahalanobis", "threshold": 10.0}
    (bundle / PREPROCESSING_FILE).write_text(json.dumps(info))
    write_manifest(bundle)
    with pytest.raises(MedtlError, match=OOD_OUTPUT):
        load_bundle(bundle)
