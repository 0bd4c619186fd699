"""Exported bundles: the manifest, the torch-free predictor, and tampered bundles refused.

The bundle is built here by hand (a tiny ONNX graph and a preprocessing.json), so these tests
check the loader and predictor on their own, whatever the exporter does."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from medtl.errors import MedtlError
from medtl.export.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    PREPROCESSING_FILE,
    load_bundle,
    write_manifest,
)

SIZE = 32
CLASSES = ["NORMAL", "PNEUMONIA"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
WEIGHTS = np.array([[4.0, -3.0], [-2.0, 5.0], [1.0, -1.5]], dtype=np.float32)
BIAS = np.array([0.3, -0.2], dtype=np.float32)


def _model() -> bytes:
    """image (N, 3, S, S) -> mean per channel -> linear head -> softmax, as an exported model."""
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
             helper.make_node("Add", ["logits0", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        [onnx.numpy_helper.from_array(WEIGHTS, "W"), onnx.numpy_helper.from_array(BIAS, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _preprocessing() -> dict:
    return {"format": 1, "size": SIZE, "resize": "squash", "interpolation": "bilinear",
            "mean": MEAN, "std": STD, "channels": 3,
            "view": {"window": "auto", "slices": "middle", "mode": "2d"},
            "classes": CLASSES, "positive_class": "PNEUMONIA",
            "operating_points": {"youden": 0.4, "sensitivity_0.9": 0.2}, "temperature": None,
            "input": {"name": "image", "layout": "NCHW", "dtype": "float32",
                      "scale": "pixels / 255 then (x - mean) / std"},
            "output": {"name": "probabilities"}, "medtl_version": "test", "run": {}}


def _reference(path: Path) -> np.ndarray:
    """The graph's computation in NumPy, from the image as medtl decodes and resizes it."""
    image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255
    x = (x - np.float32(MEAN)) / np.float32(STD)
    logits = x.mean(axis=(0, 1)) @ WEIGHTS + BIAS
    e = np.exp(logits - logits.max())
    return e / e.sum()


@pytest.fixture
def bundle(tmp_path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / MODEL_FILE).write_bytes(_model())
    (root / PREPROCESSING_FILE).write_text(json.dumps(_preprocessing()))
    (root / "model-card.md").write_text("# A tiny model\nresearch use only\n")
    write_manifest(root)
    return root


@pytest.fixture
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(40, 48, 3), (32, 32, 3), (64, 20, 3)]):
        # a tint per image, so that the classes' probabilities differ between images
        pixels = rng.integers(0, 256, shape) * (0.3 + 0.3 * i)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_manifest_lists_every_file_with_its_sha256(bundle):
    import hashlib

    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["format"] == 1
    assert sorted(manifest["files"]) == sorted(["model-card.md", MODEL_FILE, PREPROCESSING_FILE])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest


def test_predictions_equal_the_graph_computed_in_numpy(bundle, images):
    model = load_bundle(bundle)
    assert model.classes == CLASSES and model.positive_class == "PNEUMONIA"
    assert model.operating_points == {"youden": 0.4, "sensitivity_0.9": 0.2}
    proba = model.predict_proba(images)
    expected = np.stack([_reference(p) for p in images])
    assert proba.shape == (3, 2)
    np.testing.assert_allclose(proba, expected, atol=1e-5)
    assert np.ptp(proba[:, 1]) > 0.05  # the images are told apart: the check has teeth


def test_predict_with_a_bundle_never_imports_torch(bundle, images, tmp_path):
    """Loading and predicting, in Python and through `medtl predict BUNDLE`, in a fresh
    interpreter: torch stays out of sys.modules."""
    out = tmp_path / "out.csv"
    code = f"""
import sys
from medtl.export.bundle import load_bundle
proba = load_bundle({str(bundle)!r}).predict_proba([{str(images[0])!r}])
assert proba.shape == (1, 2), proba.shape
assert 'torch' not in sys.modules, 'torch imported by load_bundle/predict_proba'
from medtl.cli import main
try:
    main(['predict', {str(bundle)!r}, {str(images[0])!r}, {str(images[1])!r},
          '--output', {str(out)!r}])
except SystemExit as exc:
    assert not exc.code, exc.code
assert 'torch' not in sys.modules, 'torch imported by medtl predict BUNDLE'
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["img0.png", "img1.png"]
    for row, path in zip(rows, images[:2], strict=True):
        expected = _reference(path)
        assert [float(row[f"prob_{c}"]) for c in CLASSES] == pytest.approx(expected, abs=1e-5)
        assert row["prediction"] == CLASSES[int(expected.argmax())]


def _flip_model_byte(root: Path) -> None:
    data = bytearray((root / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / MODEL_FILE).write_bytes(bytes(data))


def _edit_preprocessing(root: Path) -> None:
    d = json.loads((root / PREPROCESSING_FILE).read_text())
    d["operating_points"]["youden"] = 0.9
    (root / PREPROCESSING_FILE).write_text(json.dumps(d))


def _symlink_card(root: Path) -> None:
    target = root.parent / "elsewhere.md"
    shutil.move(root / "model-card.md", target)
    os.symlink(target, root / "model-card.md")


def _manifest_names(root: Path, name: str) -> None:
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    manifest["files"][name] = "0" * 64
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))


TAMPERINGS = {
    "model byte": (_flip_model_byte, "model.onnx: sha256 differs"),
    "preprocessing": (_edit_preprocessing, "preprocessing.json: sha256 differs"),
    "extra file": (lambda r: (r / "extra.py").write_text("print(1)"),
                   "extra.py: not listed in the manifest"),
    "missing file": (lambda r: (r / "model-card.md").unlink(),
                     "model-card.md: listed in the manifest but missing"),
    "symlink": (_symlink_card, "model-card.md: cannot be read .*symlink"),
    "parent path": (lambda r: _manifest_names(r, "../x"), "not a plain file name"),
    "sub path": (lambda r: _manifest_names(r, "sub/x"), "not a plain file name"),
}


@pytest.mark.parametrize("how", sorted(TAMPERINGS))
def test_a_tampered_bundle_is_refused_on_load(bundle, how):
    tamper, message = TAMPERINGS[how]
    load_bundle(bundle)  # loads before the change
    tamper(bundle)
    with pytest.raises(MedtlError, match=message) as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value)


def test_bad_preprocessing_values_are_refused_even_when_the_manifest_matches(bundle):
    """A manifest rewritten to match proves nothing: the values are still bounded."""
    for key, value, message in [("size", 100_000, "size 100000 outside"),
                                ("classes", ["a"], "classes must be a list"),
                                ("positive_class", "CANCER", "not one of the classes"),
                                ("operating_points", {"x": 2.0}, "not a number in"),
                                ("format", 2, "format 1")]:
        d = _preprocessing()
        d[key] = value
        (bundle / PREPROCESSING_FILE).write_text(json.dumps(d))
        write_manifest(bundle)
        with pytest.raises(MedtlError, match=f"preprocessing.json: .*{message}"):
            load_bundle(bundle)


def test_cli_refuses_a_tampered_bundle_in_one_line(bundle, images):
    _flip_model_byte(bundle)
    done = subprocess.run([sys.executable, "-m", "medtl.cli", "predict", str(bundle),
                           str(images[0])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "sha256 differs" in lines[0], done.stderr


def test_a_model_whose_input_is_not_the_preprocessed_batch_is_refused_on_load(bundle):
    d = _preprocessing()
    d["size"] = 48  # the graph takes 32 x 32
    (bundle / PREPROCESSING_FILE).write_text(json.dumps(d))
    write_manifest(bundle)
    with pytest.raises(MedtlError, match=r"model.onnx: input 'image' of shape .*\(N, 3, 48, 48\)"):
        load_bundle(bundle)


def test_an_unreadable_image_stops_prediction_unless_skip_bad(bundle, images, tmp_path):
    from medtl.workflow import predict

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(MedtlError, match="notes.png"):
        load_bundle(bundle).predict_proba([images[0], bad])
    rows = predict(bundle, [images[0], bad], skip_bad=True)
    assert [r["prediction"] for r in rows][1] == "UNREADABLE"
    assert rows[0]["prob_PNEUMONIA"] == pytest.approx(_reference(images[0])[1], abs=1e-5)
