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


# ------------------------------------------------------------------ issue 15: stale or broken
def test_a_bumped_pixel_pipeline_version_misses_the_cache(blob_data, tmp_path, monkeypatch):
    from medtl.data import readers

    ds = load_dataset(blob_data).split("test")
    bb = _backbone()
    _extractor(bb, tmp_path, engine="torch").transform(ds)
    same = CountingRunner()
    same.wrap(_extractor(bb, tmp_path, engine="torch")).transform(ds)
    monkeypatch.setattr(readers, "PIXEL_PIPELINE_VERSION", readers.PIXEL_PIPELINE_VERSION + 1)
    bumped = CountingRunner()
    bumped.wrap(_extractor(bb, tmp_path, engine="torch")).transform(ds)
    assert same.images == 0 and bumped.images == len(ds)


def test_a_damaged_chunk_is_quarantined_and_recomputed(blob_data, tmp_path, caplog):
    ds = load_dataset(blob_data).split("test")
    bb = _backbone()
    first = _extractor(bb, tmp_path, engine="torch")
    expected = first.transform(ds)
    folder = first.store.directory
    chunk = sorted(folder.glob("*.npz"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated
    counter = CountingRunner()
    again = counter.wrap(_extractor(bb, tmp_path, engine="torch")).transform(ds)
    assert counter.images == 8  # that chunk's batch only, computed again
    np.testing.assert_allclose(again, expected, rtol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and chunk.name in warnings[0]
    assert (folder / "quarantine" / chunk.name).is_file()
    caplog.clear()
    third = CountingRunner()
    third.wrap(_extractor(bb, tmp_path, engine="torch")).transform(ds)
    assert third.images == 0 and "damaged" not in caplog.text


def test_lookups_open_only_the_chunks_asked_for(tmp_path, monkeypatch):
    """No listing of the key folder, and one chunk read for a key, however big the cache."""
    from pathlib import Path

    from medtl.training import features

    store = features.FeatureStore(tmp_path, dim=4)
    for c in range(20):
        store.add([f"k{c}-{i}" for i in range(3)], np.full((3, 4), c, np.float32))
    opened = []
    real_load = np.load
    monkeypatch.setattr(features.np, "load", lambda p, **kw: opened.append(p) or real_load(p, **kw))
    for name in ("glob", "iterdir", "rglob"):
        monkeypatch.setattr(Path, name, lambda *a, **k: pytest.fail("listed the key folder"))
    fresh = features.FeatureStore(tmp_path, dim=4)
    assert len(fresh) == 60 and opened == []
    got = fresh.get_many(["k7-1", "k7-2", "k12-0", "unknown"])
    assert sorted(got) == ["k12-0", "k7-1", "k7-2"] and len(opened) == 2
    assert got["k7-1"].tolist() == [7] * 4 and got["k12-0"].tolist() == [12] * 4
    # What another process adds later is found without opening the store again.
    store.add(["late"], np.ones((1, 4), np.float32))
    assert "late" in fresh and fresh["late"].tolist() == [1] * 4


def test_an_interrupted_chunk_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from medtl import files
    from medtl.training.features import FeatureStore

    def interrupted(fd):
        raise KeyboardInterrupt

    store = FeatureStore(tmp_path, dim=4)
    store.add(["a"], np.ones((1, 4), np.float32))
    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.add(["b"], np.ones((1, 4), np.float32))
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = FeatureStore(tmp_path, dim=4)
    assert "a" in again and "b" not in again and len(list(tmp_path.glob("*.npz"))) == 1


_CONCURRENT = """
import sys, time
from pathlib import Path
import torch
from medtl.data import load_dataset
from medtl.data.transforms import Preprocessing
from medtl.models import create_backbone
from medtl.training.features import FrozenFeatures

data, cache, go, part = sys.argv[1:]
torch.manual_seed(0)
bb = create_backbone("mobilenet_v2", weights="random")
ext = FrozenFeatures(bb, Preprocessing.for_spec(bb.spec, 32), cache_dir=cache, quiet=True,
                     batch_size=3, engine="torch", threads=1)
ds = load_dataset(data)
third = len(ds) // 3  # two overlapping thirds each: shared and own images
ds = ds.subset(range(0, 2 * third) if part == "0" else range(third, len(ds)))
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.005)
ext.transform(ds)
print(ext.n_computed, flush=True)
"""


def test_two_processes_extracting_the_same_key_leave_one_consistent_cache(blob_data, tmp_path):
    import subprocess
    import sys

    from medtl.training.features import FeatureStore

    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(blob_data), str(cache),
                               str(go), part], stdout=subprocess.PIPE, text=True)
             for part in "01"]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()  # both start extracting at once
    computed = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ds = load_dataset(blob_data)
    torch.manual_seed(0)
    bb = create_backbone("mobilenet_v2", weights="random")
    alone = FrozenFeatures(bb, Preprocessing.for_spec(bb.spec, 32), cache=False, quiet=True,
                           batch_size=3, engine="torch", threads=1)
    expected = alone.transform(ds)
    shared = FrozenFeatures(bb, Preprocessing.for_spec(bb.spec, 32), cache_dir=cache,
                            quiet=True, engine="torch", threads=1)
    folder = shared.store.directory
    store = FeatureStore(folder, dim=bb.num_features)
    keys = [ds.content_key(i) for i in range(len(ds))]
    assert len(store) == len(set(keys)) and sum(computed) >= len(set(keys))
    for chunk in folder.glob("*.npz"):  # every chunk whole, none quarantined
        assert len(store._read_chunk(chunk.name)) > 0, chunk
    assert not (folder / "quarantine").exists() and not list(folder.glob(".*.tmp"))
    got = store.get_many(keys)
    np.testing.assert_array_equal(np.stack([got[k] for k in keys]), expected)
    counter = CountingRunner()
    np.testing.assert_array_equal(counter.wrap(shared).transform(ds), expected)
    assert counter.images == 0


def test_no_cache_path_leaves_the_cache_root(tmp_path, monkeypatch):
    """Every cache path is resolved and must stay under the root: a key part that climbs out,
    or a link planted in the cache that points elsewhere, is refused before anything is
    written."""
    from medtl.errors import MedtlError

    root, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    ext = _extractor(_backbone(), root)
    assert ext.store.directory.parent == (root / "features").resolve()
    monkeypatch.setattr(type(ext), "key", property(lambda self: "../../elsewhere/x"))
    ext._store = None
    with pytest.raises(MedtlError, match="leads outside"):
        ext.store  # noqa: B018 - the property is what is tested
    monkeypatch.undo()
    root.mkdir(exist_ok=True)
    (root / "onnx").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(MedtlError, match="leads outside"):
        ext._in_cache("onnx", f"{ext.key}.onnx")
    assert list(elsewhere.iterdir()) == []
