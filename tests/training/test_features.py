import numpy as np
import pytest
import torch

from medtl.data import load_dataset
from medtl.data.transforms import Preprocessing
from medtl.models import create_backbone
from medtl.training.features import FrozenFeatures


def _backbone(seed=0):
    torch.manual_seed(seed)
    return create_backbone("mobilenet_v2", weights="random")


def _extractor(bb, cache_dir, **kw):
    return FrozenFeatures(bb, Preprocessing.for_spec(bb.spec, 64), cache_dir=cache_dir,
                            quiet=True, batch_size=8, **kw)


class CountingRunner:
    """Counts backbone forward passes (batches) and images, whatever the engine."""

    def __init__(self):
        self.batches = 0
        self.images = 0

    def wrap(self, ext):
        run = ext._runner()

        def counted(pixels):
            self.batches += 1
            self.images += len(pixels)
            return run(pixels)

        ext._run_batch = counted
        return ext


def test_second_extraction_runs_no_backbone_pass(blob_data, tmp_path):
    ds = load_dataset(blob_data)
    bb = _backbone()
    first, second = CountingRunner(), CountingRunner()
    f1 = first.wrap(_extractor(bb, tmp_path)).transform(ds)
    f2 = second.wrap(_extractor(bb, tmp_path)).transform(ds)
    assert first.images == len(ds) and first.batches > 0
    assert second.batches == 0 and second.images == 0
    np.testing.assert_array_equal(f1, f2)


def test_other_weights_do_not_share_the_cache(blob_data, tmp_path):
    ds = load_dataset(blob_data).split("train")
    _extractor(_backbone(0), tmp_path).transform(ds)
    counter = CountingRunner()
    counter.wrap(_extractor(_backbone(1), tmp_path)).transform(ds)
    assert counter.images == len(ds)


def test_other_preprocessing_does_not_share_the_cache(blob_data, tmp_path):
    ds = load_dataset(blob_data).split("train")
    bb = _backbone()
    _extractor(bb, tmp_path).transform(ds)
    ext = FrozenFeatures(bb, Preprocessing.for_spec(bb.spec, 96), cache_dir=tmp_path,
                           quiet=True)
    counter = CountingRunner()
    counter.wrap(ext).transform(ds)
    assert counter.images == len(ds)


def test_interrupted_extraction_keeps_finished_batches(blob_data, tmp_path, monkeypatch):
    ds = load_dataset(blob_data)
    bb = _backbone()
    calls = {"n": 0}
    real_read = type(ds).read

    def failing_read(self, i):
        calls["n"] += 1
        if calls["n"] > 20:  # dies in the third batch of 8
            raise KeyboardInterrupt
        return real_read(self, i)

    monkeypatch.setattr(type(ds), "read", failing_read)
    with pytest.raises(KeyboardInterrupt):
        _extractor(bb, tmp_path).transform(ds)
    monkeypatch.setattr(type(ds), "read", real_read)
    counter = CountingRunner()
    counter.wrap(_extractor(bb, tmp_path)).transform(ds)
    assert 0 < counter.images <= len(ds) - 16


def test_onnx_runtime_matches_pytorch(blob_data, tmp_path):
    ds = load_dataset(blob_data).split("test")
    bb = _backbone()
    onnx = _extractor(bb, tmp_path / "a", engine="onnx")
    eager = _extractor(bb, tmp_path / "b", engine="torch")
    a, b = onnx.transform(ds), eager.transform(ds)
    assert onnx.engine_used == "onnxruntime" and eager.engine_used.startswith("torch")
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert np.isfinite(a).all() and a.std() > 0
