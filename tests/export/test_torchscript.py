"""medtl export --format torchscript: model.pt gives the run's own probabilities through the
bundle loader and `medtl predict BUNDLE`; a scikit-learn head is refused; a tampered model.pt
is refused on load.

Tiny blob data, 64 px, one epoch: a linear frozen run, a logistic-regression head (folded into a
linear layer), a calibrated fine-tuned network, and a kNN head (no torch form).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import medtl
from medtl.data import load_dataset
from medtl.errors import MedtlError
from medtl.export.bundle import MANIFEST_FILE, TORCHSCRIPT_FILE, load_bundle, write_manifest
from medtl.export.writer import export_run
from medtl.run import load_run
from tests.conftest import write_blob_images

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, epochs=1, quiet=True)
RUNS = {
    "linear": dict(strategy="feature-extractor"),
    "logreg": dict(strategy="hybrid", head="logreg"),
    "fine-tune": dict(strategy="fine-tune", calibrate=True),  # temperature traced in
    "knn": dict(strategy="hybrid", head="knn"),
}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("ts") / "blobs", n_per_class=8,
                             splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def runs(blobs, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {name: medtl.train(blobs, out=root / name, **FAST, **opts).path
            for name, opts in RUNS.items()}


@pytest.mark.parametrize("name", ["linear", "logreg", "fine-tune"])
def test_torchscript_matches_the_run(name, runs, blobs, tmp_path):
    run = load_run(runs[name])
    bundle = export_run(run, tmp_path / "bundle", format="torchscript")
    assert sorted(p.name for p in bundle.iterdir()) == [
        "manifest.json", "model-card.json", "model-card.md", "model.pt", "preprocessing.json"]
    test = load_dataset(blobs).split("test")
    want, want_ood = run.load_model(quiet=True).model_.predict_proba_ood(test)
    exported = load_bundle(bundle)
    got, got_ood = exported.predict_dataset_ood(test)
    assert got.shape == want.shape == (16, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the out-of-distribution score, a second output of the same traced module
    assert want_ood is not None and exported.ood is not None
    np.testing.assert_allclose(got_ood, want_ood, rtol=1e-3)
    assert exported.card["summary"]["model"].startswith("mobilenet_v2")
    if name == "fine-tune":
        assert exported.temperature == run.config["calibration"]["temperature"] is not None


def test_cli_export_and_predict_give_the_runs_rows(runs, blobs, tmp_path):
    """`medtl export --format torchscript` then `medtl predict BUNDLE` (workflow.predict, which
    the CLI calls) give the rows `medtl predict RUN` gives, probabilities within 1e-4."""
    from medtl.cli import main
    from medtl.workflow import predict

    out = tmp_path / "deploy"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(runs["fine-tune"]), "--format", "torchscript", "--out", str(out)])
    assert exc.value.code == 0 and (out / TORCHSCRIPT_FILE).is_file()
    images = blobs / "test"
    want, got = predict(runs["fine-tune"], [images]), predict(out, [images])
    assert [r["path"] for r in got] == [r["path"] for r in want] and len(want) == 16
    probs = [k for k in want[0] if k.startswith("prob_")]
    assert len(probs) == 2
    np.testing.assert_allclose([[float(r[k]) for k in probs] for r in got],
                               [[float(r[k]) for k in probs] for r in want], atol=1e-4)
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]


def test_a_scikit_learn_head_is_refused_naming_it(runs, tmp_path, capsys):
    with pytest.raises(MedtlError, match=r"'knn' head .*--format onnx"):
        export_run(load_run(runs["knn"]), tmp_path / "b", format="torchscript")
    assert not tmp_path.joinpath("b").exists() and not list(tmp_path.iterdir())  # no temp left
    from medtl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", str(runs["knn"]), "--format", "torchscript", "--out",
              str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "knn" in err and "Traceback" not in err
    with pytest.raises(MedtlError, match="export format 'tflite'"):
        export_run(load_run(runs["knn"]), tmp_path / "d", format="tflite")


def test_a_tampered_model_pt_is_refused_on_load(runs, tmp_path):
    bundle = export_run(load_run(runs["linear"]), tmp_path / "bundle", format="torchscript")
    model = bundle / TORCHSCRIPT_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(MedtlError, match="model.pt: sha256 differs"):
        load_bundle(bundle)
    # A manifest rewritten to match proves nothing: the archive must still load as TorchScript.
    model.write_bytes(b"PK\x03\x04 not a TorchScript archive")
    write_manifest(bundle)
    with pytest.raises(MedtlError, match="model.pt: not a TorchScript model") as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value)
    # Two models in one bundle: which one runs would be ambiguous.
    (bundle / "model.onnx").write_bytes(b"x")
    write_manifest(bundle)
    assert "model.onnx" in json.loads((bundle / MANIFEST_FILE).read_text())["files"]
    with pytest.raises(MedtlError, match="exactly one of model.onnx and model.pt"):
        load_bundle(bundle)
