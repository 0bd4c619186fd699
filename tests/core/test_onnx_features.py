"""ONNX Runtime features against PyTorch's, on real chest X-rays with ImageNet weights, and the
fallback to PyTorch when the export fails (issue 14, step 0).

ImageNet features are O(1), so a RELATIVE tolerance is meaningful here; with random weights
they are ~1e-8 and an absolute tolerance of 1e-4 accepted features of any scale.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import medtl
from medtl.data.samples import demo_data_path

IMAGE_SIZE = 64


# ACCESSOR: adapt when the core is restructured
def extract(backbone, data, *, engine: str, cache_dir: Path) -> tuple[np.ndarray, str]:
    """Frozen features of ``data`` by ``engine`` (no feature cache), and the engine used."""
    from medtl.data.transforms import Preprocessing
    from medtl.training.features import FrozenFeatures

    ext = FrozenFeatures(backbone, Preprocessing.for_spec(backbone.spec, IMAGE_SIZE),
                         engine=engine, cache=False, cache_dir=cache_dir, quiet=True,
                         batch_size=8)
    return ext.transform(data), ext.engine_used


# ACCESSOR: adapt when the core is restructured
def break_onnx_export(monkeypatch) -> None:
    """Make every ONNX export from now on fail."""
    import medtl.training.features as features

    def export(*args, **kwargs):
        raise RuntimeError("export broken by the test")

    monkeypatch.setattr(features, "export_onnx", export)


# ACCESSOR: adapt when the core is restructured
def runtime_check():
    """The check an ONNX export must pass before it is trusted, as ``check(backbone, run)``;
    it raises when it refuses the export."""
    from medtl.training.features import _check_against_torch

    return lambda backbone, run: _check_against_torch(backbone, run, IMAGE_SIZE,
                                                      Path("/nonexistent/unused.onnx"))


@pytest.fixture(scope="module")
def xrays():
    """16 real JPEG chest X-rays of the embedded sample, both classes."""
    ds = medtl.load_dataset(demo_data_path()).split("test")
    idx = np.r_[np.flatnonzero(ds.labels == 0)[:8], np.flatnonzero(ds.labels == 1)[:8]]
    return ds.subset(idx)


@pytest.fixture(scope="module")
def imagenet_backbone():
    bb = medtl.create_backbone("mobilenet_v2", weights="imagenet")
    bb.reset_classifier(0)
    return bb.eval()


@pytest.fixture(scope="module")
def torch_features(xrays, imagenet_backbone, tmp_path_factory):
    feats, engine = extract(imagenet_backbone, xrays, engine="torch",
                            cache_dir=tmp_path_factory.mktemp("torch-cache"))
    assert engine.startswith("torch")
    return feats


@pytest.mark.parametrize("engine", ["onnx", "auto"])
def test_onnx_features_match_pytorch_relatively(xrays, imagenet_backbone, torch_features,
                                                tmp_path, engine):
    feats, used = extract(imagenet_backbone, xrays, engine=engine, cache_dir=tmp_path)
    # On CPU, auto must take ONNX Runtime: a silent fallback here would hide a broken export.
    assert used == "onnxruntime"
    scale = float(np.abs(torch_features).mean())
    assert scale > 0.05, "ImageNet features should be O(1), not ~0"
    np.testing.assert_allclose(feats, torch_features, rtol=1e-3, atol=1e-3 * scale)


def test_a_failed_export_falls_back_to_pytorch_and_says_so(xrays, imagenet_backbone,
                                                          torch_features, tmp_path,
                                                          monkeypatch, caplog):
    break_onnx_export(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="medtl"):
        feats, used = extract(imagenet_backbone, xrays, engine="auto", cache_dir=tmp_path)
    assert used.startswith("torch")
    np.testing.assert_allclose(feats, torch_features, rtol=1e-5, atol=1e-6)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("ONNX" in r.getMessage() and "PyTorch" in r.getMessage() for r in warnings), \
        [r.getMessage() for r in caplog.records]


def test_engine_onnx_does_not_fall_back(xrays, imagenet_backbone, tmp_path, monkeypatch):
    break_onnx_export(monkeypatch)
    with pytest.raises(Exception) as info:
        extract(imagenet_backbone, xrays, engine="onnx", cache_dir=tmp_path)
    assert "export broken by the test" in f"{info.value} {info.value.__cause__}"


def test_the_runtime_check_refuses_a_doubled_export_whatever_the_feature_scale():
    import torch

    check = runtime_check()  # outside pytest.raises: a broken accessor must not pass
    torch.manual_seed(0)
    bb = medtl.create_backbone("mobilenet_v2", weights="random")
    bb.reset_classifier(0)
    bb.eval()

    def doubled(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return bb.forward_features(torch.from_numpy(pixels)).numpy() * 2

    with pytest.raises(Exception) as info:  # noqa: B017 - whatever the check raises on refusal
        check(bb, doubled)
    assert not isinstance(info.value, (AttributeError, TypeError, NameError))
