"""Typed records: where an image sits inside its file (npz array and index, volume slice, MIP) is
held in fields, not encoded in the path, and predictions.csv carries those fields as columns."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

import medtl
from medtl.data import Record, load_dataset
from medtl.data.checks import check_dataset
from medtl.data.dataset import _content_hash
from medtl.run import prediction_rows, write_csv

nib = pytest.importorskip("nibabel")

DEPTH = 5


def _npz(path: Path, n_train: int = 12, n_test: int = 6, side: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path,
             train_images=rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
             train_labels=np.arange(n_train) % 2,
             test_images=rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
             test_labels=np.arange(n_test) % 2)
    return path


def _volumes(root: Path, per_class: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            data = rng.normal(0, 1, (12, 12, DEPTH)).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.eye(4)), root / cls / f"{cls}{i}.nii.gz")
    return root


def test_record_fields_and_identity():
    image = Record("/d/a.png", 0, "train")
    array = Record("/d/x.npz", 1, "val", key="train", index=7)
    slice_ = Record("/d/v.nii.gz", 0, "test", slice=3)
    mip = Record("/d/series", 0, "test", mip=True)
    assert [r.uid for r in (image, array, slice_, mip)] == [
        "/d/a.png", "/d/x.npz::train/7", "/d/v.nii.gz::slice/3", "/d/series::mip"]
    assert [r.volume for r in (image, array, slice_, mip)] == [None, None, "/d/v.nii.gz",
                                                              "/d/series"]
    assert [r.location() for r in (image, array, slice_, mip)] == [
        {}, {"key": "train", "index": 7}, {"slice": 3}, {}]
    for bad in (dict(key="train"), dict(index=1), dict(key="t", index=0, slice=1),
                dict(slice=1, mip=True), dict(key="t", index=0, mip=True)):
        with pytest.raises(ValueError):
            Record("/d/f", 0, None, **bad)


def test_npz_records_are_typed_and_read_their_own_image(tmp_path):
    path = _npz(tmp_path / "mini.npz")
    ds = load_dataset(path)
    raw = np.load(path)
    assert {r.path for r in ds.records} == {str(path)}
    assert len(set(ds.uids)) == len(ds)
    for i, r in enumerate(ds.records):
        assert r.key in ("train", "test") and r.slice is None
        np.testing.assert_array_equal(ds.read(i)[..., 0], raw[f"{r.key}_images"][r.index])


def test_volume_records_are_typed_and_keep_their_content_keys(tmp_path):
    root = _volumes(tmp_path / "vols")
    ds = load_dataset(root, slices="all", val_fraction=0)
    assert len(ds) == 4 * DEPTH
    assert all("::" not in r.path and r.path.endswith(".nii.gz") for r in ds.records)
    assert sorted({r.slice for r in ds.records}) == list(range(DEPTH))
    assert ds.volumes == ds.paths
    # Feature caches are keyed by content keys: they must be what medtl 0.1 computed from its
    # "<volume>::slice/<k>" paths, or every cached volume feature would be recomputed.
    r = ds.records[2]
    old = f"{r.path}::slice/{r.slice}"
    view = f"|auto|2d|{old[len(r.path):]}"
    assert ds.content_key(2) == hashlib.sha256((_content_hash(r.path) + view).encode()
                                               ).hexdigest()
    mip = load_dataset(root, mode="mip", val_fraction=0)
    assert len(mip) == 4 and all(r.mip and r.slice is None for r in mip.records)
    assert mip.read(0).shape == (12, 12, 3)
    assert mip.content_key(0) != mip.content_key(1)


def test_a_volume_manifest_lists_each_volume_once_and_reloads_the_same_slices(tmp_path):
    root = _volumes(tmp_path / "vols")
    ds = load_dataset(root, slices="all", val_fraction=0)
    manifest = tmp_path / "m.csv"
    ds.to_manifest(manifest)
    with open(manifest, newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    again = load_dataset(manifest, slices="all", val_fraction=0)
    assert sorted(again.uids) == sorted(ds.uids)


def _columns(rows):
    return list(dict.fromkeys(k for r in rows for k in r))


def test_prediction_rows_add_location_columns_only_when_records_have_them(tmp_path):
    proba = np.array([[0.25, 0.75], [0.5, 0.5]])
    classes = ["a", "b"]
    files = [Record("/d/a.png", 0, "test"), Record("/d/b.png", 1, "test")]
    rows = prediction_rows(files, [0, 1], proba, classes, "test")
    assert _columns(rows) == ["path", "split", "label", "prob_a", "prob_b", "prediction"]
    npz = [Record("/d/x.npz", 0, "test", key="test", index=k) for k in (4, 9)]
    rows = prediction_rows(npz, [0, 1], proba, classes, "test")
    assert _columns(rows) == ["path", "key", "index", "split", "label", "prob_a", "prob_b",
                              "prediction"]
    assert [(r["path"], r["key"], r["index"]) for r in rows] == [
        ("/d/x.npz", "test", 4), ("/d/x.npz", "test", 9)]
    # a volume's aggregate row (a plain path) next to a slice row: empty slice, no marker
    rows = prediction_rows([Record("/d/v.nii.gz", 0, None, slice=2), "/d/v.nii.gz"], None,
                           proba, classes, None)
    assert _columns(rows)[:2] == ["path", "slice"]
    assert [(r["path"], r["slice"]) for r in rows] == [("/d/v.nii.gz", 2), ("/d/v.nii.gz", "")]
    write_csv(tmp_path / "p.csv", rows)
    assert "::" not in (tmp_path / "p.csv").read_text()


def test_check_names_npz_duplicates_by_key_and_index(tmp_path):
    path = tmp_path / "dup.npz"
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    images[3] = images[0]
    np.savez(path, train_images=images, train_labels=np.arange(6) % 2)
    result = check_dataset(path, quiet=True)
    dup = next(p for p in result["problems"] if p["kind"] == "duplicate_within_split")
    assert [(im["path"], im["key"], im["index"]) for im in dup["items"][0]["images"]] == [
        (str(path), "train", 0), (str(path), "train", 3)]
    assert dup["paths"] == [str(path)]
    assert "dup.npz train[0] = dup.npz train[3]" in dup["message"]
    assert result["summary"]["pixel_formats"] == {"array": 6}


def test_explanation_file_names_say_slice_and_array_index():
    from medtl.explain.runs import _file_stem

    taken: set[str] = set()
    names = [_file_stem(r, taken) for r in (
        Record("/d/v.nii.gz", 0, None, slice=3), Record("/d/v.nii.gz", 0, None, slice=4),
        Record("/d/x.npz", 0, None, key="test", index=5), Record("/d/v.nii.gz", 0, None, mip=True),
        Record("/d/a.png", 0, None))]
    assert names == ["v_slice3", "v_slice4", "x_test_5", "v", "a"]


def test_npz_run_predictions_have_key_and_index_columns_and_no_markers(tmp_path):
    path = _npz(tmp_path / "mini.npz", n_train=20, n_test=8, side=16)
    run = medtl.train(path, strategy="hybrid", head="logreg", backbone="mobilenet_v2",
                      weights="imagenet", image_size=32, out=tmp_path / "run", quiet=True)
    text = (run.path / "predictions.csv").read_text()
    assert "::" not in text
    rows = run.predictions()
    assert list(rows[0])[:3] == ["path", "key", "index"]
    assert {r["path"] for r in rows} == {path.name}  # relative to the data root (--paths)
    assert len({(r["key"], r["index"]) for r in rows}) == len(rows) == 12  # val 4 + test 8
    assert {r["key"] for r in rows if r["split"] == "val"} == {"train"}  # carved from train
    assert sorted(int(r["index"]) for r in rows if r["split"] == "test") == list(range(8))


def test_comparison_pairs_npz_rows_by_key_and_index_not_by_path():
    from sklearn.metrics import roc_auc_score

    from medtl.reporting.compare import _delong_against

    rng = np.random.default_rng(3)
    y = np.arange(20) % 2
    scores = [np.clip(0.5 * y + 0.25 + rng.normal(0, noise, 20), 0, 1) for noise in (0.1, 0.4)]

    def entry(p):
        rows = [{"path": "/d/x.npz", "key": "test", "index": str(i), "label": "b" if t else "a",
                 "prob_b": float(q)} for i, (t, q) in enumerate(zip(y, p, strict=True))]
        return {"config": {"positive_class": "b"}, "rows": rows}

    result = _delong_against(entry(scores[0]), entry(scores[1]))
    assert isinstance(result, dict)  # one shared path would read as a single image
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, scores[0]))
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, scores[1]))
