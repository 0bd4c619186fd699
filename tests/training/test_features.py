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


def test_the_cache_key_is_the_tensors_never_a_claimed_hash(tmp_path):
    """A run from elsewhere that claims ImageNet's sha256 (or a path) gets its own key."""
    import dataclasses

    imagenet = create_backbone("mobilenet_v2", weights="imagenet")
    claimer = _backbone()
    claimer.weights_info = dataclasses.replace(imagenet.weights_info)  # the claimed identity
    key_imagenet = _extractor(imagenet, tmp_path).key
    key_claimer = _extractor(claimer, tmp_path).key
    assert key_claimer != key_imagenet
    claimer.weights_info = dataclasses.replace(imagenet.weights_info,
                                               sha256="/../../../../escaped")
    crafted = _extractor(claimer, tmp_path)
    assert crafted.key == key_claimer and "/" not in crafted.key and ".." not in crafted.key
    assert crafted.store.directory.parent == tmp_path / "features"
    # The same tensors give the same key, whatever they claim and wherever they came from.
    twin = _backbone()
    twin.load_state_dict(claimer.state_dict())
    assert _extractor(twin, tmp_path).key == key_claimer


def test_a_loaded_frozen_run_keys_the_cache_as_its_training_did(blob_data, tmp_path):
    import medtl

    ds = load_dataset(blob_data)
    clf = medtl.TransferClassifier(strategy="hybrid", image_size=32, quiet=True)
    clf.fit(ds.split("train"), ds.split("val"))
    loaded = medtl.TransferClassifier.load(clf.save(tmp_path / "model"), quiet=True)
    assert loaded.model_.extractor.key == clf.model_.extractor.key
