"""medtl export: the ONNX graph gives the run's own probabilities, for every kind of run.

Each run is trained once (tiny blob data, 64 px, one epoch); the bundle's model.onnx is run with
onnxruntime on pixels built the way its preprocessing.json says, from the decoded uint8 images
medtl itself uses, and must match ``clf.predict_proba`` on the test split within 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import medtl
from medtl.data import load_dataset
from medtl.errors import MedtlError
from medtl.export.writer import export_run
from medtl.run import load_run
from tests.conftest import write_blob_images

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, epochs=1, quiet=True)
RUNS = {
    "linear": dict(strategy="feature-extractor"),
    "logreg": dict(strategy="hybrid", head="logreg"),
    "svm": dict(strategy="hybrid", head="svm"),
    "rf": dict(strategy="hybrid", head="rf", calibrate=True),  # temperature as ONNX nodes
    "knn": dict(strategy="hybrid", head="knn"),
    "prototype": dict(strategy="hybrid", head="prototype"),  # folded into a linear layer
    "fine-tune": dict(strategy="fine-tune"),
    "full": dict(strategy="full", calibrate=True),  # temperature inside the torch export
    "truncated": dict(strategy="truncated", keep=3),
}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("export") / "blobs", n_per_class=8,
                             splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def runs(blobs, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {name: medtl.train(blobs, out=root / name, **FAST, **opts).path
            for name, opts in RUNS.items()}


def onnx_proba(bundle, data) -> np.ndarray:
    """The bundle's probabilities, with only what preprocessing.json says (and PIL resizing)."""
    import onnxruntime as ort
    from PIL import Image

    pre = json.loads((bundle / "preprocessing.json").read_text())
    size = pre["size"]
    assert pre["input"]["layout"] == "NCHW" and pre["input"]["dtype"] == "float32"
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "nearest": Image.NEAREST}[pre["interpolation"]]
    images = [np.asarray(Image.fromarray(data.read(i)).resize((size, size), resample))
              for i in range(len(data))]
    x = np.stack(images).astype(np.float32) * np.float32(1 / 255)
    if pre["channels"] == 1:
        x = x.mean(axis=-1, keepdims=True)
    mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
    if pre["channels"] == 1:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    x = ((x - mean) / std).transpose(0, 3, 1, 2)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run([pre["output"]["name"]], {pre["input"]["name"]: x})[0]


@pytest.mark.parametrize("name", list(RUNS))
def test_onnx_matches_predict_proba(name, runs, blobs, tmp_path):
    run = load_run(runs[name])
    bundle = export_run(run, tmp_path / "bundle")
    test = load_dataset(blobs).split("test")
    want = run.load_model(quiet=True).predict_proba(test)
    got = onnx_proba(bundle, test)
    assert got.shape == want.shape == (16, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)
    pre = json.loads((bundle / "preprocessing.json").read_text())
    assert pre["classes"] == run.config["classes"]
    assert pre["run"]["strategy"] == run.config["strategy"]
    assert (pre["temperature"] is not None) == bool(RUNS[name].get("calibrate"))
    assert sorted(p.name for p in bundle.iterdir()) == [
        "manifest.json", "model-card.json", "model-card.md", "model.onnx", "preprocessing.json"]


def test_refuses_a_non_empty_folder_unless_overwrite(runs, tmp_path):
    run = load_run(runs["logreg"])
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MedtlError, match="not empty"):
        export_run(run, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_run(run, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_cli_export_then_bundle_predicts_as_the_run(runs, blobs, tmp_path, capsys):
    """`medtl export` writes a bundle that medtl.export.bundle loads (manifest checked) and that
    predicts the run's probabilities; an occupied --out is one error line, exit 2."""
    from medtl.cli import main
    from medtl.export.bundle import load_bundle

    out = tmp_path / "deploy"
    for args, code in (([runs["rf"], "--format", "onnx", "--out", out], 0),
                       ([runs["rf"], "--out", out], 2)):
        with pytest.raises(SystemExit) as exc:
            main(["export", *map(str, args)])
        assert exc.value.code == code
    err = capsys.readouterr().err
    assert "not empty" in err and "Traceback" not in err
    test = load_dataset(blobs).split("test")
    want = load_run(runs["rf"]).load_model(quiet=True).predict_proba(test)
    np.testing.assert_allclose(load_bundle(out).predict_dataset(test), want, atol=1e-4)


def test_refuses_a_linked_or_file_out(runs, tmp_path):
    run = load_run(runs["logreg"])
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedtlError, match="symbolic link"):
        export_run(run, tmp_path / "link", overwrite=True)
    with pytest.raises(MedtlError, match="not a folder"):
        export_run(run, tmp_path / "file", overwrite=True)
    assert (tmp_path / "target").is_dir() and (tmp_path / "file").read_text() == "x"
