from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtl.data import Dataset, Record, load_dataset
from medtl.data.privacy import patient_key
from medtl.errors import MedtlError


@pytest.fixture
def small(tree) -> Path:
    return tree(
        {
            "train/a": [f"a{i}.png" for i in range(6)],
            "train/b": [f"b{i}.png" for i in range(6)],
            "test/a": ["ta.png"],
            "test/b": ["tb.png"],
        }
    )


def test_split_subsets_share_classes(small: Path) -> None:
    ds = load_dataset(small, val_fraction=0.25)
    test = ds.split("test")
    assert len(test) == 2 and test.classes == ds.classes == ["a", "b"]
    assert test.split_names() == ["test"]
    assert sum(len(ds.split(s)) for s in ds.split_names()) == len(ds)


def test_missing_split_is_an_error_naming_it(small: Path) -> None:
    ds = load_dataset(small, val_fraction=0)
    with pytest.raises(MedtlError) as info:
        ds.split("val")
    message = str(info.value)
    assert "'val'" in message and "train, test" in message and "\n" not in message


def test_counts_labels_patients(small: Path) -> None:
    ds = load_dataset(small, val_fraction=0)
    assert ds.counts() == {"train": {"a": 6, "b": 6}, "test": {"a": 1, "b": 1}}
    assert ds.labels.dtype == np.int64 and ds.labels.tolist().count(1) == 7
    assert ds.patients == [None] * 14


def test_subset_and_drop(small: Path) -> None:
    ds = load_dataset(small, val_fraction=0)
    assert ds.subset([2, 0]).paths == [ds.paths[2], ds.paths[0]]
    kept = ds.drop([0, 1])
    assert len(kept) == len(ds) - 2 and ds.paths[0] not in kept.paths


def test_label_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="label 2"):
        Dataset([Record("/x.png", 2, "train")], ["a", "b"])


def test_content_key_is_the_sha256_of_the_bytes_and_memoised(small: Path) -> None:
    ds = load_dataset(small, val_fraction=0)
    path = Path(ds.records[0].path)
    key = ds.content_key(0)
    assert key == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ds.content_key(0) == key
    assert len({ds.content_key(i) for i in range(len(ds))}) == len(ds)  # different bytes


def test_identical_bytes_give_identical_keys(small: Path) -> None:
    shutil.copyfile(small / "train/a/a0.png", small / "train/a/copy.png")
    ds = load_dataset(small, val_fraction=0)
    first, copy = (
        ds.paths.index(str(small / "train/a/a0.png")),
        ds.paths.index(str(small / "train/a/copy.png")),
    )
    assert ds.content_key(first) == ds.content_key(copy)


def test_fingerprint_stable_and_sensitive_to_labels(tree) -> None:
    root = tree({"img": [f"{i}.png" for i in range(6)]})
    rows = [["path", "label"]] + [[f"img/{i}.png", "a" if i < 3 else "b"] for i in range(6)]

    def load(rows: list[list[str]]) -> Dataset:
        with open(root / "m.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        return load_dataset(root / "m.csv", val_fraction=0)

    before = load(rows).fingerprint()
    assert load(rows).fingerprint() == before
    assert load([rows[0], *reversed(rows[1:])]).fingerprint() == before  # order does not matter
    flipped = [row[:] for row in rows]
    flipped[1][1] = "b"
    assert load(flipped).fingerprint() != before


def test_fingerprint_sensitive_to_split_and_content(small: Path) -> None:
    ds = load_dataset(small, val_fraction=0)
    before = ds.fingerprint()
    moved = Dataset(
        [Record(r.path, r.label, "val" if i == 0 else r.split) for i, r in enumerate(ds.records)],
        ds.classes,
    )
    assert moved.fingerprint() != before
    shutil.copyfile(small / "train/b/b0.png", small / "train/a/a0.png")
    assert load_dataset(small, val_fraction=0).fingerprint() != before


def test_manifest_round_trip(small: Path, tmp_path: Path) -> None:
    ds = load_dataset(small, val_fraction=0.25, seed=4)
    for manifest in (small / "list.csv", tmp_path / "elsewhere" / "list.csv"):
        manifest.parent.mkdir(exist_ok=True)
        ds.to_manifest(manifest)
        again = load_dataset(manifest)
        assert [(r.path, r.split, r.patient_id) for r in again.records] == [
            (r.path, r.split, r.patient_id) for r in ds.records
        ]
        assert again.classes == ds.classes and again.fingerprint() == ds.fingerprint()
    first_row = (small / "list.csv").read_text().splitlines()[1]
    assert first_row.startswith("test/a/ta.png,a,,test")  # relative below the manifest's folder


def test_manifest_round_trip_keeps_patients(kermany_like: Path) -> None:
    ds = load_dataset(kermany_like, patient_regex=r"(person\d+|IM-\d+)")
    ds.to_manifest(kermany_like / "m.csv")
    # The manifest's column is read as record numbers: pseudonymised, so the same grouping.
    assert load_dataset(kermany_like / "m.csv").patients == [patient_key(p) for p in ds.patients]
    again = load_dataset(kermany_like / "m.csv")
    again.to_manifest(kermany_like / "m2.csv")  # pseudonyms are kept, not hashed again
    assert load_dataset(kermany_like / "m2.csv").patients == again.patients


def test_npz_content_key_and_manifest(tmp_path: Path) -> None:
    images = np.zeros((4, 3, 3), np.uint8)
    images[1, 0, 0] = 9
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.array([0, 0, 1, 1]))
    ds = load_dataset(tmp_path / "d.npz", val_fraction=0)
    keys = [ds.content_key(i) for i in range(4)]
    assert keys[0] == keys[2] == keys[3] != keys[1]  # same pixels, same key
    assert len(ds.fingerprint()) == 64
    with pytest.raises(MedtlError, match="npz"):
        ds.to_manifest(tmp_path / "m.csv")
